"""Normalisation layers: the affine weight acts elementwise, ``y = x_hat * w + b``.

Per sample, ``c_i(w) = sum over positions of grad * x_hat`` and ``c_i(b) = sum over positions of grad``: vectors as
small as the parameter, so they are materialised. ``x_hat`` is recomputed from the captured input.
LayerNorm, RMSNorm and GroupNorm normalise within a sample. BatchNorm normalises across the batch in training mode,
so a sample has no gradient of its own there: only BatchNorm in eval mode (running statistics) is attributed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from inrun.engine.factors import Factor, FlatFactor
from inrun.engine.layers.registry import register_layer


def _affine_factors(module: nn.Module, normalised: Tensor, grad_output: Tensor, feature_dims: list[int]) -> dict[str, Factor]:
    """Sum ``grad * x_hat`` and ``grad`` over every dimension that is neither the sample nor a feature dimension."""
    reduce_dims = [d for d in range(1, grad_output.dim()) if d not in feature_dims]
    n = grad_output.shape[0]

    def reduce(tensor: Tensor) -> Tensor:
        # ``sum([])`` would reduce over every dimension: inputs without positions ([n, C]) need no reduction.
        return tensor.sum(reduce_dims) if reduce_dims else tensor

    found: dict[str, Factor] = {}
    if getattr(module, "weight", None) is not None:
        found["weight"] = FlatFactor(reduce(grad_output * normalised).reshape(n, -1))
    if getattr(module, "bias", None) is not None:
        found["bias"] = FlatFactor(reduce(grad_output).reshape(n, -1))
    return found


class LayerNormHandler:
    parameter_names = ("weight", "bias")

    def check(self, module: nn.Module) -> str | None:
        return None

    def factors(self, module: nn.Module, inputs: Tensor, grad_output: Tensor) -> dict[str, Factor]:
        shape = tuple(module.normalized_shape)
        normalised = F.layer_norm(inputs, shape, None, None, module.eps)
        feature_dims = list(range(inputs.dim() - len(shape), inputs.dim()))
        return _affine_factors(module, normalised, grad_output, feature_dims)


class RMSNormHandler:
    parameter_names = ("weight",)

    def check(self, module: nn.Module) -> str | None:
        return None

    def factors(self, module: nn.Module, inputs: Tensor, grad_output: Tensor) -> dict[str, Factor]:
        shape = tuple(module.normalized_shape)
        normalised = F.rms_norm(inputs, shape, None, module.eps)
        feature_dims = list(range(inputs.dim() - len(shape), inputs.dim()))
        return _affine_factors(module, normalised, grad_output, feature_dims)


class GroupNormHandler:
    parameter_names = ("weight", "bias")

    def check(self, module: nn.Module) -> str | None:
        return None

    def factors(self, module: nn.Module, inputs: Tensor, grad_output: Tensor) -> dict[str, Factor]:
        normalised = F.group_norm(inputs, module.num_groups, None, None, module.eps)
        return _affine_factors(module, normalised, grad_output, [1])


class BatchNormEvalHandler:
    parameter_names = ("weight", "bias")

    def check(self, module: nn.Module) -> str | None:
        if module.training or module.running_mean is None:
            return (
                "BatchNorm in training mode normalises with statistics of the whole batch, so no sample has a "
                "gradient of its own; call .eval() on it (running statistics) or freeze its parameters"
            )
        return None

    def factors(self, module: nn.Module, inputs: Tensor, grad_output: Tensor) -> dict[str, Factor]:
        view = [1, -1] + [1] * (inputs.dim() - 2)
        scale = torch.rsqrt(module.running_var.to(inputs.dtype) + module.eps).reshape(view)
        normalised = (inputs - module.running_mean.to(inputs.dtype).reshape(view)) * scale
        return _affine_factors(module, normalised, grad_output, [1])


register_layer(nn.LayerNorm, LayerNormHandler())
register_layer(nn.RMSNorm, RMSNormHandler())
register_layer(nn.GroupNorm, GroupNormHandler())
for _batch_norm in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    register_layer(_batch_norm, BatchNormEvalHandler())
