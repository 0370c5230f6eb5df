"""``nn.Conv2d`` and ``nn.Conv1d`` as linear layers over unfolded patches.

Unfolding the input gives, per sample, patches ``[L, C_in k_h k_w]`` (L output positions) and the output gradient
``[L, C_out]``; the weight gradient is then the linear layer's ``sum_l b_l a_l^T`` with ``T = L``. Grouped convolutions
are materialised group by group (exact, one block of the weight per group).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from inrun.engine.factors import DenseSide, Factor, FlatFactor, OuterFactor
from inrun.engine.layers.registry import register_layer


def _explicit_padding(module: nn.Module, inputs: Tensor, spatial: int) -> tuple[Tensor, tuple[int, ...]]:
    """Apply non-zero padding modes and string paddings to the input; return it with the padding unfold should add."""
    if module.padding_mode != "zeros":
        return F.pad(inputs, module._reversed_padding_repeated_twice, mode=module.padding_mode), (0,) * spatial
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return inputs, (0,) * spatial
        pads: list[int] = []
        for kernel, dilation in zip(reversed(module.kernel_size), reversed(module.dilation)):
            total = dilation * (kernel - 1)
            pads += [total // 2, total - total // 2]
        return F.pad(inputs, pads), (0,) * spatial
    return inputs, tuple(module.padding)


class ConvHandler:
    parameter_names = ("weight", "bias")

    def __init__(self, spatial: int):
        self.spatial = spatial

    def check(self, module: nn.Module) -> str | None:
        return None

    def factors(self, module: nn.Module, inputs: Tensor, grad_output: Tensor) -> dict[str, Factor]:
        inputs, padding = _explicit_padding(module, inputs, self.spatial)
        kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
        if self.spatial == 1:  # treat as a 2-D convolution of height 1
            inputs, grad_output = inputs.unsqueeze(2), grad_output.unsqueeze(2)
            kernel, dilation, stride, padding = (1, *kernel), (1, *dilation), (1, *stride), (0, *padding)
        n = inputs.shape[0]
        patches = F.unfold(inputs, kernel, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)
        output_grads = grad_output.reshape(n, module.out_channels, -1).transpose(1, 2)
        found: dict[str, Factor] = {}
        if module.groups == 1:
            found["weight"] = OuterFactor(DenseSide(output_grads), DenseSide(patches))
        else:
            found["weight"] = FlatFactor(self._grouped(module, patches, output_grads))
        if module.bias is not None:
            found["bias"] = FlatFactor(output_grads.sum(1))
        return found

    @staticmethod
    def _grouped(module: nn.Module, patches: Tensor, output_grads: Tensor) -> Tensor:
        groups = module.groups
        n, length, _ = patches.shape
        patches = patches.reshape(n, length, groups, -1)
        output_grads = output_grads.reshape(n, length, groups, -1)
        per_group = torch.einsum("nlgo,nlgk->ngok", output_grads, patches)  # [n, groups, C_out/g, C_in/g k]
        return per_group.reshape(n, -1)


register_layer(nn.Conv2d, ConvHandler(spatial=2))
register_layer(nn.Conv1d, ConvHandler(spatial=1))
