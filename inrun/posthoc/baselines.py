"""Baselines for data value embeddings, from the same recorded projection (ALGORITHMS.md, "Baselines").

All values follow the project's sign convention: **positive = the sample helped** (removing it would raise the test
loss). Every function has two layers: a pure one on projected vectors (``*_scores``: what the tests check against
direct implementations of the formulas) and one that reads a run (``tracin``, ``logra``, ``datainf``) and returns
``[n_ids, n_test]`` with ids in the order of ``run.sample_ids``.

Damping defaults (:data:`LOGRA_DAMPING`, :data:`DATAINF_DAMPING`) were chosen by the LDS benchmark
(``experiments/lds.py``).

* TracIn with the final model's test gradient: ``sum_t sum_b eta_{t,b} <P_b g_test, P_b c_i(t)>`` over the recorded
  occurrences (DVEmb with H = 0). Needs nothing but the run and the final model (:func:`tracin`).
* TracInCP (Pruthi et al. 2020) over the run's model checkpoints: ``sum_c sum_b w_{c,b} <P_b g_test(theta_c),
  P_b g_i(theta_c)>`` with every training sample's loss gradient recomputed at each checkpoint and
  ``w_{c,b} = sum_{t covered by c} eta_{t,b} / n_train`` (a sample's expected contribution per step is
  ``g_i / n_train`` under a mean loss); ``eta_{t,b}`` is the recorded update scale of block b (:func:`tracin_cp`).
* LoGra-style influence: the influence-function value ``I(z) = -g_test^T (F + lambda I)^{-1} g_z`` with ``F`` the
  projected empirical Fisher ``(1/n) sum_i g_i g_i^T`` of the final model's per-sample training gradients (per layer
  block by default, as LoGra does). Reported as helpfulness ``-I(z) = g_test^T (F + lambda I)^{-1} g_z``.
* DataInf per layer block: ``lambda_l = 0.1 mean_{i, coords} g_il^2``,
  ``hvp_l = 1/(n lambda_l) sum_i [v_l - (v_l . g_il) / (lambda_l + |g_il|^2) g_il]``, influence
  ``I(k) = -sum_l hvp_l . g_kl``; reported as helpfulness ``-I(k)``.

LoGra and DataInf need the final model's per-sample gradients of the training data, recomputed here with the run's
projector from training batches that carry their dataset indices (:func:`training_gradients`).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from inrun.engine.capture import GradientCapture
from inrun.engine.captured import LossFn
from inrun.engine.products import capture_batch
from inrun.engine.projection import BlockLayout, Projector
from inrun.errors import InvalidArgumentError
from inrun.posthoc.record import (
    EmbeddingsError,
    RunRecord,
    _check_captured_shapes,
    check_model,
    load_projector,
    project_test_gradients,
)
from inrun.store.reader import Run
from inrun.valuation.recorder import batch_field
from inrun.valuation.validation import eval_mode

ROW_BLOCK = 1 << 14


def _blocks(layout: Sequence[BlockLayout]) -> list[slice]:
    return [slice(b.offset, b.offset + b.size) for b in layout]


# ------------------------------------------------------------------------------------------------------ pure scores


def tracin_scores(proj_grad: np.ndarray, scales: np.ndarray, test: np.ndarray,
                  layout: Sequence[BlockLayout]) -> np.ndarray:
    """``[rows, n_test]``: ``sum_b scales[r, b] <test_b, proj_grad[r]_b>`` per record row (NaN rows give NaN)."""
    proj_grad, test = np.asarray(proj_grad, np.float64), np.asarray(test, np.float64)
    out = np.zeros((len(proj_grad), len(test)))
    for b, block in enumerate(_blocks(layout)):
        out += scales[:, b, None] * (proj_grad[:, block] @ test[:, block].T)
    return out


#: LoGra's damping, in units of the mean eigenvalue of the projected Fisher, chosen by the LDS benchmark
#: (experiments/lds.py, digits MLP: LDS SGD / AdamW .499/.528 at 0.1, .649/.701 at 1, .758/.850 at 10, .769/.887 at
#: 100, .734/.853 at 1000)
LOGRA_DAMPING = 100.0
#: DataInf's damping (times the mean squared coordinate of the projected gradients, per block): the LDS benchmark
#: found no effect between 0.1 and 1000 (.713-.714 SGD, .836 AdamW), since it stays far below |g_i|^2; the paper's 0.1
DATAINF_DAMPING = 0.1


def logra_scores(train: np.ndarray, test: np.ndarray, layout: Sequence[BlockLayout], *, damping: float = LOGRA_DAMPING,
                 block_diagonal: bool = True) -> np.ndarray:
    """``[n_train, n_test]`` helpfulness ``g_test^T (F + lambda I)^{-1} g_i``, ``F = (1/n) sum_i g_i g_i^T``.

    ``lambda = damping * trace(F) / dim`` (``damping`` times the mean eigenvalue of ``F``), per layer block when
    ``block_diagonal`` (``F`` block-diagonal), else over the whole projected vector.
    """
    train, test = np.asarray(train, np.float64), np.asarray(test, np.float64)
    blocks = _blocks(layout) if block_diagonal else [slice(0, train.shape[1])]
    out = np.zeros((len(train), len(test)))
    n = len(train)
    for block in blocks:
        g, v = train[:, block], test[:, block]
        k = g.shape[1]
        lam = damping * float((g * g).sum()) / (n * k)
        if lam <= 0:
            continue
        if n < k:  # Woodbury: (G^T G / n + lam I)^{-1} v = (v - G^T (n lam I + G G^T)^{-1} G v) / lam
            inner = np.linalg.solve(n * lam * np.eye(n) + g @ g.T, g @ v.T)
            x = (v.T - g.T @ inner) / lam
        else:
            x = np.linalg.solve(g.T @ g / n + lam * np.eye(k), v.T)
        out += g @ x
    return out


def datainf_scores(train: np.ndarray, test: np.ndarray, layout: Sequence[BlockLayout], *,
                   damping: float = DATAINF_DAMPING) -> np.ndarray:
    """``[n_train, n_test]`` DataInf helpfulness ``sum_l hvp_l . g_kl`` (ALGORITHMS.md, formula per layer block)."""
    train, test = np.asarray(train, np.float64), np.asarray(test, np.float64)
    out = np.zeros((len(train), len(test)))
    n = len(train)
    for block in _blocks(layout):
        g, v = train[:, block], test[:, block]
        lam = damping * float((g * g).mean())
        if lam <= 0:
            continue
        coef = (g @ v.T) / (lam + (g * g).sum(axis=1))[:, None]  # [n, m]: (v . g_i) / (lam + |g_i|^2)
        hvp = (v - coef.T @ g / n) / lam  # [m, k]
        out += g @ hvp.T
    return out


# ------------------------------------------------------------------------------------------------------ from a run


def _per_id(run: Run, ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Rows of ``scores`` (one per id in ``ids``) placed in the order of ``run.sample_ids``; NaN for ids not given."""
    order = run.sample_ids
    out = np.full((len(order), scores.shape[1]), np.nan)
    pos = np.searchsorted(order, ids)
    inside = pos < len(order)
    hit = np.zeros(len(ids), bool)
    hit[inside] = order[pos[inside]] == ids[inside]
    out[pos[hit]] = scores[hit]
    return out


def tracin(run: Run, model: nn.Module, loss_fn: LossFn, test_batch: Any, *,
           per_occurrence: bool = False) -> np.ndarray:
    """TracIn with the final model's test gradient over every recorded occurrence (DVEmb with H = 0).

    ``[n_ids, n_test]`` in the order of ``run.sample_ids`` (sum over occurrences), or with ``per_occurrence``
    ``[n_records, n_test]`` in ``run.records()`` row order (NaN where the step's projections were not recorded).
    """
    projector = load_projector(run)
    test = project_test_gradients(projector, model, loss_fn, test_batch)
    record = RunRecord(run)
    try:
        parts = []
        for k, rank in enumerate(record.ranks):
            steps = record.files[k].record_column("step")
            for start in range(0, rank.rows, ROW_BLOCK):
                rows = record.read(k, start, start + ROW_BLOCK)
                index = np.searchsorted(record.step_numbers, steps[start: start + len(rows)])
                parts.append(tracin_scores(rows, record.scales[index], test, projector.layout))
        per_row = np.concatenate(parts) if parts else np.zeros((0, len(test)))
    finally:
        record.close()
    if per_occurrence:
        return per_row
    ids, inverse = np.unique(run.records(["sample_id"])["sample_id"], return_inverse=True)
    finite = np.isfinite(per_row).all(axis=1)
    sums = np.zeros((len(ids), len(test)))
    np.add.at(sums, inverse.reshape(-1)[finite], per_row[finite])
    return _per_id(run, ids, sums)


def tracin_cp(run: Run, model: nn.Module, loss_fn: LossFn, test_batch: Any, train_data: Any, *,
              checkpoints: "dict[int, Any] | str | None" = None, index_key: str = "index",
              index_fn: Callable[[Any], Tensor] | None = None, step_size: str = "update") -> np.ndarray:
    """TracInCP over the run's model checkpoints (``checkpoint_every`` at recording time), as helpfulness.

    Each checkpoint ``c`` (the model at the start of step ``s_c``) stands for the steps up to the next one; its
    weight per layer block is the sum of the step sizes of those steps over the number of training samples.
    ``step_size="update"`` (default) takes the recorded update scales (for Adam the per-tensor step size the update
    took, as the block values do; for SGD the learning rate); ``step_size="lr"`` takes the optimizer's learning rate,
    as TracInCP is defined (Pruthi et al. 2020) and as dattri's TracIn weights checkpoints. With SGD both are equal.
    The training samples' gradients are recomputed at every checkpoint from ``train_data`` (batches carrying their
    dataset indices). ``[n_ids, n_test]`` in ``run.sample_ids`` order (NaN for samples not in ``train_data``).
    ``model`` is restored to its own parameters afterwards.
    """
    from pathlib import Path

    from inrun.posthoc.values import _load_state
    from inrun.store.paths import find_checkpoints

    if step_size not in ("update", "lr"):
        raise InvalidArgumentError(f"tracin_cp(step_size={step_size!r}): expected 'update' (the recorded update "
                                   "scales) or 'lr' (the optimizer's learning rate, TracInCP's definition)")
    found = ({int(k): Path(v) for k, v in checkpoints.items()} if isinstance(checkpoints, dict)
             else find_checkpoints(run, checkpoints))
    if not found:
        raise EmbeddingsError(f"{run.paths[0]} has no model checkpoints; TracInCP needs them: record with "
                              "checkpoint_every=k (or pass checkpoints={step: file}); tracin() uses the final model only")
    projector = load_projector(run)
    record = RunRecord(run)
    try:
        step_numbers, scales = record.step_numbers, record.scales
    finally:
        record.close()
    if step_size == "lr":
        # the steps the recording valued (a skipped step's scales are NaN, read as 0 above): the same steps as "update"
        valued = np.any(scales != 0, axis=1, keepdims=True)
        lrs = np.nan_to_num(np.asarray(run.steps["lr"], np.float64), nan=0.0)[:, None]
        scales = np.where(valued, np.broadcast_to(lrs, scales.shape), 0.0)
    starts = sorted(found)
    original = {name: t.detach().clone() for name, t in model.state_dict().items()}
    total, ids = None, None
    try:
        for position, start in enumerate(starts):
            end = starts[position + 1] if position + 1 < len(starts) else int(step_numbers.max(initial=-1)) + 1
            covered = (step_numbers >= start) & (step_numbers < end)
            if not covered.any():
                continue
            model.load_state_dict(_load_state(found[start], run))
            train_ids, train = training_gradients(projector, model, loss_fn, train_data, index_key=index_key,
                                                  index_fn=index_fn)
            test = project_test_gradients(projector, model, loss_fn, test_batch)
            weights = scales[covered].sum(axis=0) / len(train_ids)
            part = tracin_scores(train, np.broadcast_to(weights, (len(train), len(weights))), test, projector.layout)
            if ids is not None and not np.array_equal(ids, train_ids):
                raise EmbeddingsError("train_data gave different sample ids at different checkpoints")
            ids, total = train_ids, part if total is None else total + part
    finally:
        model.load_state_dict(original)
    if total is None:
        raise EmbeddingsError("no recorded step falls after any checkpoint; nothing to sum")
    return _per_id(run, ids, total)


def _batches(data: Any) -> Iterable[Any]:
    if isinstance(data, (dict, Tensor, tuple)):
        return [data]
    return data


def training_gradients(run_or_projector: "Run | Projector", model: nn.Module, loss_fn: LossFn, train_data: Any, *,
                       index_key: str = "index", index_fn: Callable[[Any], Tensor] | None = None,
                       allow_unsupported: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Projected per-sample loss gradients of the training data at the current (final) model.

    ``train_data``: a batch or an iterable of batches carrying dataset indices (``batch[index_key]`` or
    ``index_fn(batch)``). Returns ``(ids, gradients [n, D])`` with ids ascending, each id once (first seen kept).
    """
    projector = run_or_projector if isinstance(run_or_projector, Projector) else load_projector(run_or_projector)
    ids_parts, grad_parts = [], []
    with GradientCapture(model, allow_unsupported=allow_unsupported) as capture:
        check_model(projector, capture)
        with eval_mode(model), torch.enable_grad():
            for batch in _batches(train_data):
                ids = index_fn(batch) if index_fn is not None else batch_field(batch, index_key)
                if ids is None:
                    raise EmbeddingsError(f"training batches must carry their dataset indices under '{index_key}' "
                                          "(or pass index_fn=lambda batch: LongTensor[n])")
                captured = capture_batch(capture, model, loss_fn, batch)
                _check_captured_shapes(projector, captured)
                ids_parts.append(torch.as_tensor(ids).reshape(-1).long().cpu().numpy())
                grad_parts.append(projector.project_batch(captured).detach().double().cpu().numpy())
    if not ids_parts:
        raise EmbeddingsError("train_data holds no batches")
    ids = np.concatenate(ids_parts)
    grads = np.concatenate(grad_parts)
    unique, first = np.unique(ids, return_index=True)
    return unique, grads[first]


def logra(run: Run, model: nn.Module, loss_fn: LossFn, test_batch: Any, train_data: Any = None, *,
          damping: float = LOGRA_DAMPING, block_diagonal: bool = True, index_key: str = "index",
          index_fn: Callable[[Any], Tensor] | None = None,
          gradients: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """LoGra-style influence at the final model as helpfulness ``g_test^T (F + lambda I)^{-1} g_i``.

    ``[n_ids, n_test]`` in ``run.sample_ids`` order (NaN for samples not in ``train_data``). ``gradients``: the
    ``(ids, gradients)`` of :func:`training_gradients`, to share them with :func:`datainf`.
    """
    projector = load_projector(run)
    ids, train = gradients if gradients is not None else training_gradients(
        projector, model, loss_fn, train_data, index_key=index_key, index_fn=index_fn)
    test = project_test_gradients(projector, model, loss_fn, test_batch)
    return _per_id(run, ids, logra_scores(train, test, projector.layout, damping=damping,
                                          block_diagonal=block_diagonal))


def datainf(run: Run, model: nn.Module, loss_fn: LossFn, test_batch: Any, train_data: Any = None, *,
            damping: float = DATAINF_DAMPING, index_key: str = "index", index_fn: Callable[[Any], Tensor] | None = None,
            gradients: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """DataInf at the final model, per layer block, as helpfulness (``-`` the influence of ALGORITHMS.md).

    ``[n_ids, n_test]`` in ``run.sample_ids`` order (NaN for samples not in ``train_data``).
    """
    projector = load_projector(run)
    ids, train = gradients if gradients is not None else training_gradients(
        projector, model, loss_fn, train_data, index_key=index_key, index_fn=index_fn)
    test = project_test_gradients(projector, model, loss_fn, test_batch)
    return _per_id(run, ids, datainf_scores(train, test, projector.layout, damping=damping))


__all__ = ["tracin", "tracin_cp", "logra", "datainf", "training_gradients", "tracin_scores", "logra_scores", "datainf_scores"]
