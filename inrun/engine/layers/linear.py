"""``nn.Linear``: ``s = a W^T + b``; per sample ``c_i(W) = b_i^T a_i`` over positions, ``c_i(b) = sum_t b_i,t``."""

from __future__ import annotations

from torch import Tensor, nn

from inrun.engine.factors import DenseSide, Factor, FlatFactor, OuterFactor
from inrun.engine.layers.registry import register_layer, sample_major


class LinearHandler:
    """A linear map with a weight ``[d_out, d_in]`` (or ``[d_in, d_out]`` when ``input_major``) and optional bias."""

    parameter_names = ("weight", "bias")

    def __init__(self, input_major: bool = False):
        self.input_major = input_major

    def check(self, module: nn.Module) -> str | None:
        return None

    def factors(self, module: nn.Module, inputs: Tensor, grad_output: Tensor) -> dict[str, Factor]:
        activations = DenseSide(sample_major(inputs))
        output_grads = sample_major(grad_output)
        rows, cols = (activations, DenseSide(output_grads)) if self.input_major else (DenseSide(output_grads), activations)
        found: dict[str, Factor] = {"weight": OuterFactor(rows, cols)}
        if module.bias is not None:
            found["bias"] = FlatFactor(output_grads.sum(1))
        return found


register_layer(nn.Linear, LinearHandler())
