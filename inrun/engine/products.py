"""The framework-free entry points: run a batch under capture, and the public products.

:func:`capture_batch` runs one forward and backward of ``loss_fn`` under a :class:`GradientCapture` without touching
``param.grad``; :func:`grad_dots` and :func:`grad_norms` are the self-contained public products
(../shared/CONTRACT.md).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from inrun.engine.capture import GradientCapture
from inrun.engine.captured import CapturedBatch, LossFn
from inrun.errors import InRunError, LossShapeError


def per_sample_losses(model: nn.Module, loss_fn: LossFn, batch: Any) -> Tensor:
    """Call ``loss_fn(model, batch)`` and check that it returned one differentiable loss per sample."""
    losses = loss_fn(model, batch)
    if not isinstance(losses, Tensor):
        raise LossShapeError(f"loss_fn must return a Tensor of per-sample losses, got {type(losses).__name__}")
    if losses.dim() != 1:
        hint = " (use reduction='none' and average over positions per sample)" if losses.dim() == 0 else ""
        raise LossShapeError(f"loss_fn must return one loss per sample, shape [n]; got shape {tuple(losses.shape)}{hint}")
    if not losses.requires_grad:
        raise LossShapeError("the losses do not require grad: are all parameters frozen, or is this inside no_grad?")
    finite = torch.isfinite(losses.detach())
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten().tolist()[:10]
        raise InRunError(f"loss_fn returned non-finite losses for samples {bad}")
    return losses


def infer_batch_size(batch: Any) -> int | None:
    """The leading dimension of the first tensor in a (nested) batch, or None if there is none."""
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.dim() > 0 else None
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else []
    for value in values:
        found = infer_batch_size(value)
        if found is not None:
            return found
    return None


def capture_batch(capture: GradientCapture, model: nn.Module, loss_fn: LossFn, batch: Any) -> CapturedBatch:
    """Forward and backward one batch under ``capture`` without touching ``param.grad``; return its factors."""
    return _run_captured_forward(capture, model, loss_fn, batch)[0]


def _run_captured_forward(
    capture: GradientCapture,
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    *,
    check_params: Mapping[str, Tensor] | None = None,
    spot: int = 0,
) -> tuple[CapturedBatch, tuple | None, list, list[int]]:
    """One forward and backward under ``capture``; with ``check_params`` also autograd's batch gradient of those
    parameters (from the same backward) and the gradients of ``spot`` single samples' losses (same forward, same
    dropout masks). Returns ``(captured, batch_grads, sample_grads, samples)``; the gradients are None under
    reentrant activation checkpointing (autograd.grad is refused there)."""
    capture.discard()
    capture.batch_size = infer_batch_size(batch)
    capture.keep_outputs = True
    try:
        losses = per_sample_losses(model, loss_fn, batch)
    finally:
        capture.keep_outputs = False
    outputs = capture.take_outputs()
    params = list(capture.parameters.values())
    checked = list(check_params.values()) if check_params else []
    # Only the hooked layers' output gradients are needed, so differentiate down to the outputs (no weight gradient
    # is computed); after an in-place change of an output, differentiate down to the parameters instead.
    targets = outputs if outputs is not None else params
    batch_grads: tuple | None = None
    sample_grads: list = []
    samples: list[int] = []
    if targets or checked:
        try:
            found = torch.autograd.grad(losses.sum(), targets + checked, allow_unused=True,
                                        retain_graph=bool(checked and spot))
            if checked:
                batch_grads = found[len(targets):]
                from inrun.engine.checks import spot_samples

                captured = capture.collect(num_samples=losses.shape[0])
                samples = spot_samples(losses.shape[0], spot) if spot else []
                try:
                    for k, i in enumerate(samples):
                        sample_grads.append(torch.autograd.grad(losses[i], checked, allow_unused=True,
                                                                retain_graph=k + 1 < len(samples)))
                finally:
                    capture.discard()  # the single-sample backwards fired the hooks again
                captured.losses = losses.detach()
                return captured, batch_grads, sample_grads, samples
        except RuntimeError as error:
            if "reentrant" not in str(error).lower() and ".grad()" not in str(error):
                raise
            # Reentrant activation checkpointing refuses autograd.grad: run a real backward and restore param.grad.
            capture.discard()
            capture.batch_size = capture.batch_size
            losses = per_sample_losses(model, loss_fn, batch)
            _backward_keeping_grads(losses.sum(), params)
            batch_grads, sample_grads, samples = None, [], []
    captured = capture.collect(num_samples=losses.shape[0])
    captured.losses = losses.detach()
    return captured, batch_grads, sample_grads, samples


def _backward_keeping_grads(loss: Tensor, params: list[Tensor]) -> None:
    """``loss.backward()`` that leaves every parameter's ``.grad`` exactly as it was."""
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        loss.backward()
    finally:
        for p, grad in zip(params, saved):
            p.grad = grad


def _capture(capture: GradientCapture, model: nn.Module, loss_fn: LossFn, batch: Any, check: bool) -> CapturedBatch:
    if not check:
        return capture_batch(capture, model, loss_fn, batch)
    from inrun.engine.checks import checked_capture

    return checked_capture(capture, model, loss_fn, batch)


def grad_dots(
    model: nn.Module, loss_fn: LossFn, train_batch: Any, val_batch: Any, *, allow_unsupported: bool = False,
    check: bool = True,
) -> Tensor:
    """``[n_train, n_val]`` matrix of per-sample gradient dot products over all trainable parameters.

    Entry ``(i, j)`` is ``<grad loss_fn(train)[i], grad loss_fn(val)[j]>``. Exact; per-sample gradients are never
    materialised where the Gram route is cheaper. ``param.grad`` and the parameters are left as they were.

    ``check`` (default True) verifies both batches first (:mod:`inrun.engine.checks`): samples independent, the
    per-sample gradients adding up to autograd's, and two samples' gradients recomputed alone; a failure raises
    :class:`~inrun.errors.ExactnessError` or :class:`~inrun.errors.SampleMixingError` instead of returning wrong
    numbers. It costs one more backward to the parameters, one more forward (the independence probe) and two
    spot-checked samples per batch (each run alone as a batch of one where that is exact and cheaper, else a backward
    of the batch); pass ``check=False`` in a loop over many batches once a model has passed.
    """
    with GradientCapture(model, allow_unsupported=allow_unsupported) as capture:
        val = _capture(capture, model, loss_fn, val_batch, check)
        train = _capture(capture, model, loss_fn, train_batch, check)
        return train.dots(val).detach()


def grad_norms(
    model: nn.Module, loss_fn: LossFn, batch: Any, *, allow_unsupported: bool = False, check: bool = True
) -> Tensor:
    """``[n]`` squared norm of each sample's gradient over all trainable parameters (ghost norms).

    ``check``: as for :func:`grad_dots`.
    """
    with GradientCapture(model, allow_unsupported=allow_unsupported) as capture:
        return _capture(capture, model, loss_fn, batch, check).squared_norms().detach()
