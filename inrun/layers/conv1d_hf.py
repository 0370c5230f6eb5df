"""Hugging Face's GPT-2 ``Conv1D``: a linear layer with the weight stored transposed, ``s = a W + b``.

Registered by qualified name, so transformers is never imported by inrun.
"""

from __future__ import annotations

from torch import Tensor, nn

from inrun.factors import DenseSide, Factor, FlatFactor, OuterFactor
from inrun.layers.registry import register_layer, sample_major


class HFConv1DHandler:
    parameter_names = ("weight", "bias")

    def check(self, module: nn.Module) -> str | None:
        return None

    def factors(self, module: nn.Module, inputs: Tensor, grad_output: Tensor) -> dict[str, Factor]:
        activations = sample_major(inputs)
        output_grads = sample_major(grad_output)
        # weight is [d_in, d_out]: rows are inputs, columns are output gradients.
        found: dict[str, Factor] = {"weight": OuterFactor(DenseSide(activations), DenseSide(output_grads))}
        if module.bias is not None:
            found["bias"] = FlatFactor(output_grads.sum(1))
        return found


register_layer("transformers.pytorch_utils.Conv1D", HFConv1DHandler())
