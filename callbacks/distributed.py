"""Rank gathering for the integrations: collectives that every rank calls, with a one-process fallback.

``torch.distributed`` when a process group is up, else the single-process answer; no DeepSpeed or Lightning import,
so the Lightning DDP path and the DeepSpeed wrapper share them.
"""

from __future__ import annotations

from typing import Any

import torch


def process_group():
    return torch.distributed if torch.distributed.is_available() and torch.distributed.is_initialized() else None


def all_gather_object(value: Any) -> list[Any]:
    dist = process_group()
    if dist is None or dist.get_world_size() == 1:
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def all_ranks_true(flag: bool) -> bool:
    """``flag`` on every rank (a collective): the same answer everywhere before a rank-dependent branch."""
    dist = process_group()
    if dist is None or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())
