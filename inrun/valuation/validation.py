"""The validation data In-Run Data Shapley values against: its loss, its gradient, anywhere in parameter space.

The validation utility is the mean of the per-sample validation losses over every validation point (all batches).
Losses and gradients are evaluated in eval mode (no dropout: a deterministic utility), with ``torch.autograd.grad``,
so ``param.grad`` is never touched, and with capture paused unless per-point gradients are asked for.
"""

from __future__ import annotations

import numbers
import warnings
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor, nn

from inrun.engine.capture import GradientCapture
from inrun.engine.captured import LossFn
from inrun.engine.products import capture_batch, per_sample_losses
from inrun.errors import BatchMismatchError, InvalidArgumentError
from inrun.valuation.rank_share import RankShare, _pack_captured


def move_to(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {key: move_to(value, device) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_to(value, device) for value in batch)
    return batch


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Temporarily switch every submodule to eval mode, restoring each one's own flag afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


@contextmanager
def shifted_parameters(params: dict[str, Tensor], shift: dict[str, Tensor]) -> Iterator[None]:
    """Temporarily add ``shift`` to the named parameters; restore them bit for bit afterwards."""
    names = list(shift)
    targets = [params[name] for name in names]
    saved = [target.detach().clone() for target in targets]
    try:
        if targets:
            with torch.no_grad():  # one list-wide add (the same per-tensor arithmetic as a loop of add_)
                torch._foreach_add_(targets, [shift[name].to(target.dtype) for name, target in zip(names, targets)])
        yield
    finally:
        if targets:
            with torch.no_grad():
                torch._foreach_copy_(targets, saved)


class ValidationSet:
    """Validation batches, kept on the model's device, with the loss function that scores them per sample."""

    def __init__(self, data: Any, loss_fn: LossFn, model: nn.Module, capture: GradientCapture):
        self.batches = list(validation_batches(data))
        self.loss_fn = loss_fn
        self.model = model
        self.capture = capture
        self.num_points: int | None = None
        #: set by :meth:`split_across_ranks`: this rank evaluates only its share of the points
        self.share: RankShare | None = None
        self._prefers_gradient: bool | None = None

    def split_across_ranks(self, share: RankShare | None = None) -> bool:
        """Keep only this rank's share of the validation points (a contiguous block, rank 0 first); from now on
        :meth:`loss`, :meth:`gradient` and :meth:`captured` evaluate the share and combine every rank's with one
        collective each (:mod:`inrun.valuation.rank_share`), so they return what the whole set gives, and every rank
        must call them in the same order. Every rank must hold the same validation data. Returns whether the set
        is split (not with one process, nor when a batch's size cannot be read: then every rank keeps all points)."""
        share = share if share is not None else RankShare()
        if share.world_size == 1 or self.share is not None:
            return self.share is not None
        mine = share.select(self.batches)
        if mine is None:
            warnings.warn("inrun: the validation batches hold no tensor to read their size from; every rank "
                          "evaluates all validation points", stacklevel=2)
            return False
        self.batches, self.share = mine, share
        return True

    def prefers_gradient(self, per_point: bool) -> bool:
        """Split across ranks: whether values whose update scale is one number per parameter should come from the
        all-reduced mean gradient (model-sized) rather than from every point's gathered factors (points x positions
        x layer widths; on small models with long sequences many times the model). Per-point values need the
        factors. Decided once, by sizes, with one collective on the first call, so every rank decides alike."""
        if self.share is None or per_point:
            return False
        if self._prefers_gradient is None:
            parts, error = self._captured_local()
            tensors: list[Tensor] = []
            for part in parts:
                _pack_captured(part, tensors)
            (factor_numel,) = self.share.sum_scalars([float(sum(t.numel() for t in tensors))], error)
            model_numel = sum(p.numel() for p in self.capture.parameters.values())
            self._prefers_gradient = factor_numel > model_numel
        return self._prefers_gradient

    def on_every_rank(self, flag: bool) -> bool:
        """``flag`` on every rank when the set is split (a collective: a step is valued on all ranks or none,
        because the valuation's collectives need every rank), else ``flag``."""
        return self.share.all_true(flag) if self.share is not None else flag

    def to(self, device: torch.device) -> "ValidationSet":
        self.batches = [move_to(batch, device) for batch in self.batches]
        return self

    def _losses(self, batch: Any) -> Tensor:
        try:
            return per_sample_losses(self.model, self.loss_fn, batch)
        except BatchMismatchError:
            raise
        except (TypeError, KeyError, IndexError, AttributeError, RuntimeError) as error:
            raise BatchMismatchError(
                f"the validation data does not fit the loss function ({type(error).__name__}: {error}); "
                "validation batches must have the same structure as training batches"
            ) from error

    def loss(self) -> float:
        """Mean validation loss at the current parameters."""
        total, count, error = 0.0, 0, None
        try:
            with eval_mode(self.model), torch.no_grad(), self._paused():
                for batch in self.batches:
                    losses = self.loss_fn(self.model, batch)
                    total += float(losses.double().sum())
                    count += losses.shape[0]
        except Exception as exc:  # noqa: BLE001 -- split: raised on every rank by the collective below
            if self.share is None:
                raise
            error = exc
        if self.share is not None:
            total, count = self.share.sum_scalars([total, count], error)
        return total / count

    def gradient(self, params: dict[str, Tensor]) -> tuple[float, dict[str, Tensor]]:
        """Mean validation loss and its gradient (per named parameter) at the current parameters."""
        names = list(params)
        sums: list[Tensor | None] = [None] * len(names)
        total, count, error = 0.0, 0, None
        try:
            with eval_mode(self.model), self._paused():
                for batch in self.batches:
                    losses = self._losses(batch)
                    grads = torch.autograd.grad(losses.sum(), [params[n] for n in names], allow_unused=True)
                    for k, grad in enumerate(grads):
                        if grad is not None:
                            sums[k] = grad if sums[k] is None else sums[k] + grad
                    total += float(losses.detach().double().sum())
                    count += losses.shape[0]
        except Exception as exc:  # noqa: BLE001 -- split: raised on every rank by the collective below
            if self.share is None:
                raise
            error = exc
        if self.share is not None:  # every rank's sums: one small and one model-sized all-reduce
            total, count = self.share.sum_scalars([total, count], error)
            count = int(count)
            sums = self.share.sum_tensors(
                [s if s is not None else torch.zeros_like(params[n]) for n, s in zip(names, sums)])  # type: ignore[misc]
        self.num_points = count
        held = [s for s in sums if s is not None]
        means = torch._foreach_div(held, count) if held else []  # one list-wide division (as s / count each)
        found = iter(means)
        gradient = {
            name: (next(found) if s is not None else torch.zeros_like(params[name])) for name, s in zip(names, sums)
        }
        return total / count, gradient

    def per_point_gradients(self) -> dict[str, Tensor]:
        """Each validation point's own loss gradient, materialised: ``{name: [n_val, *param.shape]}``."""
        parts = [captured.per_sample_gradients() for captured in self.captured()[1]]
        return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}

    def captured(self) -> tuple[float, list]:
        """Mean validation loss and each validation batch's per-sample gradient factors, at the current parameters
        (one forward and backward, no weight gradient computed)."""
        parts, error = self._captured_local()
        if self.share is not None:  # every rank's factors, in rank order (the single-process order of the points)
            parts = self.share.gather_captured(parts, self._device(), error)
        losses = torch.cat([part.losses for part in parts])
        self.num_points = losses.shape[0]
        return float(losses.double().mean()), parts

    def _captured_local(self) -> tuple[list, BaseException | None]:
        """This rank's batches captured; a failure is returned (split: to raise on every rank) or raised."""
        parts, error = [], None
        enabled, self.capture.enabled = self.capture.enabled, True
        try:
            with eval_mode(self.model):
                for batch in self.batches:
                    parts.append(capture_batch(self.capture, self.model, self.loss_fn, batch))
        except Exception as exc:  # noqa: BLE001 -- split: raised on every rank by the collective that follows
            if self.share is None:
                raise
            error = exc
        finally:
            self.capture.enabled = enabled
        return parts, error

    def _device(self) -> torch.device:
        for param in self.capture.parameters.values():
            return param.device
        return next(self.model.parameters()).device

    @contextmanager
    def _paused(self) -> Iterator[None]:
        enabled, self.capture.enabled = self.capture.enabled, False
        try:
            yield
        finally:
            self.capture.enabled = enabled


class ValidationBatches(list):
    """Validation data split into batches and checked (:func:`validation_batches`); passed on as it is."""


def _as_batches(data: Any) -> Iterable[Any]:
    """A single batch (tensor, tuple or dict) or an iterable of batches (a DataLoader, a list of batches)."""
    if isinstance(data, ValidationBatches):
        return data
    if isinstance(data, (Tensor, dict, tuple)):
        return [data]
    if isinstance(data, list) and data and isinstance(data[0], Tensor):  # a batch given as [inputs, targets]
        return [data]
    return data


def _tensors(batch: Any, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
    """``(where, tensor)`` for every tensor of a (nested) batch."""
    if isinstance(batch, Tensor):
        yield prefix or "the batch", batch
    elif isinstance(batch, dict):
        for key, value in batch.items():
            yield from _tensors(value, f"{prefix}[{key!r}]")
    elif isinstance(batch, (tuple, list)):
        for position, value in enumerate(batch):
            yield from _tensors(value, f"{prefix}[{position}]")


def validation_batches(data: Any) -> ValidationBatches:
    """``val_data`` as a list of batches, refused clearly (:class:`~inrun.errors.InvalidArgumentError`, naming
    ``val_data``) when it is not batches, holds none, has a batch with zero rows, holds NaN or infinity, or lives on
    the 'meta' device (no values). A loader is iterated once here: its batches are kept."""
    if isinstance(data, ValidationBatches):
        return data
    if data is None or isinstance(data, (str, bytes, numbers.Number)) or not (
            isinstance(data, (Tensor, dict, tuple, list)) or hasattr(data, "__iter__")):
        raise InvalidArgumentError(
            f"val_data must be a validation batch (a tensor, tuple or dict of tensors), a list of batches or a "
            f"loader, got {type(data).__name__} {repr(data)[:40]}"
        )
    batches = ValidationBatches(_as_batches(data))
    if not batches:
        raise InvalidArgumentError("val_data is empty: pass a batch, or a loader / list with at least one batch")
    for k, batch in enumerate(batches):
        found = list(_tensors(batch))
        name = "val_data" if len(batches) == 1 else f"val_data batch {k}"
        for where, tensor in found:
            if tensor.device.type == "meta":
                raise InvalidArgumentError(
                    f"{name}: {where} is on the 'meta' device (a shape without values); create the validation data "
                    "with values, on any real device (it is moved to the model's device)"
                )
        sized = [tensor for _, tensor in found if tensor.dim() > 0]
        if sized and all(tensor.shape[0] == 0 for tensor in sized):
            raise InvalidArgumentError(
                f"{name} has 0 rows (no validation points); the validation utility is a mean over points: give at "
                "least one"
            )
        for where, tensor in found:
            if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
                raise InvalidArgumentError(
                    f"{name}: {where} holds NaN or infinity; the validation data must be finite (clean or drop "
                    "those validation points)"
                )
    return batches
