"""Rank gathering for the integrations: collectives that every rank calls, with a one-process fallback.

``torch.distributed`` when a process group is up, else the single-process answer; no DeepSpeed or Lightning import,
so the Lightning DDP path and the DeepSpeed wrapper share them.
"""

from __future__ import annotations

import hashlib
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


def sum_over_ranks(tensor: torch.Tensor, group: Any = None) -> torch.Tensor:
    """``tensor`` summed over the ranks of ``group`` (default: every rank), in place, and returned (a collective:
    every rank calls it with a tensor of the same size and dtype). One process: ``tensor`` as it is."""
    dist = process_group()
    if dist is not None and dist.get_world_size(group=group) > 1:
        dist.all_reduce(tensor, group=group)
    return tensor


def validation_digest(batches: list[Any]) -> str:
    """A short checksum of validation batches (tensor bytes, shapes, dtypes, keys), to check that ranks agree."""
    digest = hashlib.sha256()

    def feed(data: Any) -> None:
        if isinstance(data, torch.Tensor):
            tensor = data.detach().cpu().contiguous()
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            if tensor.numel():
                digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(data, dict):
            for key in sorted(data, key=str):
                digest.update(str(key).encode())
                feed(data[key])
        elif isinstance(data, (list, tuple)):
            for item in data:
                feed(item)
        else:
            digest.update(repr(data).encode())

    for batch in batches:
        feed(batch)
    return digest.hexdigest()[:16]


def split_validation(recorder: Any, enabled: bool = True, *, checked: bool = False) -> bool:
    """Split ``recorder``'s validation set across the ranks of the default process group (collective; call it on
    every rank after ``recorder.start()``, before the first step): each rank evaluates its share of the points and
    the values stay those of one process (:mod:`inrun.valuation.rank_share`). The store's configuration records
    ``validation_split_ranks``. Returns whether the set is split (never with one process or ``enabled=False``).

    Every rank must hold the same validation data; unless ``checked`` (the caller compared them already), the ranks
    compare a checksum first and every rank raises ``ValueError`` if they differ.
    """
    dist = process_group()
    world = dist.get_world_size() if dist is not None else 1
    split = False
    if enabled and world > 1 and recorder.validation is not None:  # None: no validation data (embeddings only)
        if not checked:
            digests = all_gather_object(validation_digest(recorder.validation.batches))
            if len(set(digests)) > 1:
                shown = ", ".join(f"rank {r}={d}" for r, d in enumerate(digests))
                raise ValueError(
                    "inrun splits the validation set across ranks, so every rank must pass the same val_data, "
                    f"but the ranks' validation data differ (checksums {shown}); pass the same batches on every "
                    "rank, or split_validation=False to let each rank evaluate its own"
                )
        split = recorder.validation.split_across_ranks()
    recorder.extra_config["validation_split_ranks"] = world if split else 1
    return split
