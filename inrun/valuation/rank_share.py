"""Validation split across data-parallel ranks: each rank evaluates its share of the points, collectives assemble
what the values need.

Under DDP or DeepSpeed every rank holds the same validation data. Evaluating all of it on every rank repeats the
same forward and backward ``world_size`` times; with a :class:`RankShare` rank ``r`` keeps only the ``r``-th
contiguous block of the validation points (in the order of the batches: rank 0 the first points), and

* the mean loss is an all-reduce of ``(sum of losses, count)`` (float64);
* the mean gradient (Adam-family values) is an all-reduce of the per-parameter gradient sums: one flat buffer of
  the model's size, the same traffic as one data-parallel gradient reduction;
* the per-point gradient factors (SGD-family values by ghost dot products, per-point values) are all-gathered:
  each tensor of each rank's captured batches goes into one flat buffer per dtype, padded to the largest rank's,
  and every rank rebuilds every rank's batches in rank order, which is the single-process point order.

So the values stay those of one process (to float round-off: sums are added in another order), and the validation
forward and backward per rank fall to ``1 / world_size``. The layout of the gathered factors (tensor shapes, factor
types) is exchanged once with ``all_gather_object`` and then checked every call by a 3-number all-gather (error
flag, buffer size, layout checksum), which also carries a failure on one rank to every rank: no rank is left
waiting in a collective the others never reach.

Every method is a collective on the group: every rank calls it, in the same order.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Mapping

import torch
from torch import Tensor

from inrun.engine.captured import CapturedBatch
from inrun.engine.factors import OuterFactor, concat_factors
from inrun.engine.products import infer_batch_size
from inrun.errors import InRunError


class RankShareError(InRunError):
    """The validation pass failed on another rank (this rank raises too, so that no rank waits forever)."""


class RankShare:
    """This rank's place in a process group, and the collectives the validation set uses.

    Args:
        group: a ``torch.distributed`` process group (None: the default group).
    """

    def __init__(self, group: Any = None):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise InRunError("splitting the validation set across ranks needs an initialised torch.distributed "
                             "process group; call it after the framework has set one up, or do not split")
        self.dist = dist
        self.group = group
        self.rank = dist.get_rank(group=group)
        self.world_size = dist.get_world_size(group=group)
        backend = str(dist.get_backend(group))
        #: tensors travel on the GPU with NCCL, on the CPU otherwise (gloo)
        self.device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
        self._layouts: tuple[Tensor, list] | None = None

    # -- which points are this rank's ------------------------------------------------------------------------------
    def bounds(self, total: int) -> tuple[int, int]:
        """``[start, stop)`` of this rank's points among ``total`` (contiguous, sizes differ by at most one)."""
        return self.rank * total // self.world_size, (self.rank + 1) * total // self.world_size

    def select(self, batches: list[Any]) -> list[Any] | None:
        """This rank's points of ``batches`` (each batch sliced along its leading dimension), in order; None when
        a batch's size cannot be read (no tensor in it)."""
        sizes = [infer_batch_size(batch) for batch in batches]
        if any(size is None for size in sizes):
            return None
        start, stop = self.bounds(sum(sizes))  # type: ignore[arg-type]
        mine, offset = [], 0
        for batch, size in zip(batches, sizes):
            low, high = max(start, offset) - offset, min(stop, offset + size) - offset  # type: ignore[operator]
            if high > low:
                mine.append(batch if (low, high) == (0, size) else _slice_batch(batch, low, high, size))
            offset += size  # type: ignore[operator]
        return mine

    # -- collectives -------------------------------------------------------------------------------------------------
    def sum_scalars(self, values: list[float], error: BaseException | None = None) -> list[float]:
        """Sums over the ranks of a few numbers (float64); raises on every rank if ``error`` is set on any."""
        buffer = torch.tensor([*values, 1.0 if error is not None else 0.0], dtype=torch.float64, device=self.device)
        self.dist.all_reduce(buffer, group=self.group)
        totals = buffer.tolist()
        self._raise_if_failed(int(totals[-1]), error)
        return totals[:-1]

    def sum_tensors(self, tensors: list[Tensor]) -> list[Tensor]:
        """Element-wise sums over the ranks of same-shaped tensors: one all-reduce of one buffer, float32 or wider
        (float64 tensors keep their precision, half-precision ones are summed in float32)."""
        if not tensors:
            return []
        dtype = torch.float32
        for t in tensors:
            dtype = torch.promote_types(dtype, t.dtype)
        flat = torch.cat([t.detach().reshape(-1).to(self.device, dtype) for t in tensors])
        self.dist.all_reduce(flat, group=self.group)
        out, offset = [], 0
        for t in tensors:
            out.append(flat[offset:offset + t.numel()].view(t.shape).to(t.device, t.dtype))
            offset += t.numel()
        return out

    def gather_captured(self, parts: list[CapturedBatch], device: torch.device,
                        error: BaseException | None = None) -> list[CapturedBatch]:
        """Every rank's captured validation batches, in rank order (the single-process order of the points).

        ``error``: this rank's local failure, if any; it is raised here on this rank and a
        :class:`RankShareError` on the others, after one collective every rank takes part in.
        """
        tensors: list[Tensor] = []
        layout = [] if error is not None else [_pack_captured(part, tensors) for part in parts]
        signature = zlib.crc32(repr(layout).encode())
        numel = sum(t.numel() for t in tensors)
        header = torch.tensor([1 if error is not None else 0, numel, signature], dtype=torch.int64, device=self.device)
        headers = [torch.empty_like(header) for _ in range(self.world_size)]
        self.dist.all_gather(headers, header, group=self.group)
        table = torch.stack(headers).cpu()
        self._raise_if_failed(int(table[:, 0].sum()), error)
        if self._layouts is None or not torch.equal(self._layouts[0], table):
            layouts: list[Any] = [None] * self.world_size
            self.dist.all_gather_object(layouts, layout, group=self.group)
            self._layouts = (table, layouts)
        layouts = self._layouts[1]
        # one padded all-gather per dtype, in an order every rank derives from the same layouts
        dtypes = sorted({entry[1] for rank_layout in layouts for entry in _tensor_entries(rank_layout)}, key=str)
        received: dict[int, list[Tensor]] = {r: [] for r in range(self.world_size)}
        for dtype in dtypes:
            counts = [sum(_numel(shape) for shape, d in _tensor_entries(lay) if d == dtype) for lay in layouts]
            width = max(counts)
            local = torch.zeros(width, dtype=dtype, device=self.device)
            mine = [t.reshape(-1) for t in tensors if t.dtype == dtype]
            if mine:
                local[:counts[self.rank]] = torch.cat(mine).to(self.device)
            out = [torch.empty_like(local) for _ in range(self.world_size)]
            self.dist.all_gather(out, local, group=self.group)
            for r, buffer in enumerate(out):
                received[r].append(buffer)
        gathered = []
        for r, rank_layout in enumerate(layouts):
            if r == self.rank:
                gathered.extend(parts)  # our own batches as they are
                continue
            offsets = {dtype: 0 for dtype in dtypes}
            buffers = dict(zip(dtypes, received[r]))

            def take(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
                start = offsets[dtype]
                offsets[dtype] = start + _numel(shape)
                return buffers[dtype][start:start + _numel(shape)].view(shape).to(device)

            gathered.extend(_unpack_captured(entry, take) for entry in rank_layout)
        return merge_captured(gathered)

    def all_true(self, flag: bool) -> bool:
        """``flag`` on every rank (one all-reduce of one number)."""
        value = torch.tensor([1 if flag else 0], dtype=torch.int64, device=self.device)
        self.dist.all_reduce(value, op=self.dist.ReduceOp.MIN, group=self.group)
        return bool(value.item())

    def _raise_if_failed(self, failures: int, error: BaseException | None) -> None:
        if error is not None:
            raise error
        if failures:
            raise RankShareError(f"the validation pass failed on {failures} other rank(s) of the split validation "
                                 "set; see that rank's error")


def merge_captured(parts: list[CapturedBatch]) -> list[CapturedBatch]:
    """The batches joined into one along the sample axis when they hold the same factor forms (positions padded
    with zeros, which contribute nothing), else unchanged. Every product over validation points then runs once
    instead of once per rank's piece: on small models the per-parameter overhead of a product, not its arithmetic,
    is what the valuation spends its time on."""
    if len(parts) < 2:
        return parts
    first = parts[0]

    def form(factor: Any) -> tuple:
        if isinstance(factor, OuterFactor):
            return (type(factor), type(factor.rows), type(factor.cols), factor.shape)
        return (type(factor), factor.numel)

    forms = {name: [form(f) for f in uses] for name, uses in first.factors.items()}
    for part in parts[1:]:
        if list(part.factors) != list(forms) or any(
                [form(f) for f in part.factors[name]] != forms[name] for name in forms):
            return parts
    factors = {name: [concat_factors([part.factors[name][k] for part in parts]) for k in range(len(uses))]
               for name, uses in first.factors.items()}
    merged = CapturedBatch(factors, sum(part.n for part in parts), first.shapes)
    merged.memory_budget, merged.force_route = first.memory_budget, first.force_route
    if all(part.losses is not None for part in parts):
        merged.losses = torch.cat([part.losses for part in parts])  # type: ignore[misc]
    return [merged]


# -- batches ----------------------------------------------------------------------------------------------------------
def _slice_batch(batch: Any, low: int, high: int, size: int) -> Any:
    """Points ``low:high`` of a (nested) batch of ``size`` points: tensors and per-point lists whose leading length
    is ``size`` are sliced, everything else is kept."""
    if isinstance(batch, Tensor):
        return batch[low:high] if batch.dim() > 0 and batch.shape[0] == size else batch
    if isinstance(batch, Mapping):
        return type(batch)({key: _slice_batch(value, low, high, size) for key, value in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, (tuple, list)):
        if len(batch) == size and not any(isinstance(v, (Tensor, Mapping, tuple, list)) for v in batch):
            return type(batch)(batch[low:high])  # a per-point list (strings, numbers)
        return type(batch)(_slice_batch(value, low, high, size) for value in batch)
    return batch


# -- captured batches as flat tensors plus a picklable layout -------------------------------------------------------
def _pack(value: Any, tensors: list[Tensor]) -> Any:
    if isinstance(value, Tensor):
        tensors.append(value.detach().contiguous())
        return ("tensor", value.dtype, tuple(value.shape))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _pack(getattr(value, f.name), tensors) for f in dataclasses.fields(value)}
        return ("dataclass", type(value), fields)
    return ("value", value)


def _unpack(entry: Any, take) -> Any:
    kind = entry[0]
    if kind == "tensor":
        return take(entry[2], entry[1])
    if kind == "dataclass":
        return entry[1](**{name: _unpack(field, take) for name, field in entry[2].items()})
    return entry[1]


def _pack_captured(part: CapturedBatch, tensors: list[Tensor]) -> dict:
    return {
        "n": part.n,
        "shapes": {name: tuple(shape) for name, shape in part.shapes.items()},
        "factors": {name: [_pack(f, tensors) for f in uses] for name, uses in part.factors.items()},
        "losses": None if part.losses is None else _pack(part.losses, tensors),
    }


def _unpack_captured(entry: dict, take) -> CapturedBatch:
    factors = {name: [_unpack(f, take) for f in uses] for name, uses in entry["factors"].items()}
    part = CapturedBatch(factors, entry["n"], {name: torch.Size(s) for name, s in entry["shapes"].items()})
    if entry["losses"] is not None:
        part.losses = _unpack(entry["losses"], take)
    return part


def _tensor_entries(layout: Any):
    """``(shape, dtype)`` of every tensor of a rank's packed layout (a list of packed batches), in packing order."""
    for batch in layout:
        for uses in batch["factors"].values():
            for factor in uses:
                yield from _entry_tensors(factor)
        if batch["losses"] is not None:
            yield from _entry_tensors(batch["losses"])


def _entry_tensors(entry: Any):
    if entry[0] == "tensor":
        yield entry[2], entry[1]
    elif entry[0] == "dataclass":
        for field in entry[2].values():
            yield from _entry_tensors(field)


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out
