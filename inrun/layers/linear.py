"""``nn.Linear``: ``s = a W^T + b``; per sample ``c_i(W) = b_i^T a_i`` over positions, ``c_i(b) = sum_t b_i,t``."""

from __future__ import annotations

from torch import Tensor, nn

from inrun.factors import DenseSide, Factor, FlatFactor, OuterFactor
from inrun.layers.registry import register_layer, sample_major


class LinearHandler:
    parameter_names = ("weight", "bias")

    def check(self, module: nn.Module) -> str | None:
        return None

    def factors(self, module: nn.Module, inputs: Tensor, grad_output: Tensor) -> dict[str, Factor]:
        activations = sample_major(inputs)
        output_grads = sample_major(grad_output)
        found: dict[str, Factor] = {"weight": OuterFactor(DenseSide(output_grads), DenseSide(activations))}
        if module.bias is not None:
            found["bias"] = FlatFactor(output_grads.sum(1))
        return found


register_layer(nn.Linear, LinearHandler())
