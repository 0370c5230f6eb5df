"""Weights & Biases logging of in-run influence: per-step aggregates, per-source and per-phase curves, histograms,
and a table of the current top and bottom samples.

Everything is keyed by ``trainer/global_step`` (never ``step=``: with Lightning's ``WandbLogger`` an out-of-order
``step=`` is silently dropped; NOTES.md). Only rank 0 logs; in offline mode (``WANDB_MODE=offline``) nothing touches
the network.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

PREFIX = "inrun"


DEFAULT_MAX_IDS = 10_000_000  # running totals kept exactly up to this many distinct ids (about 200 MB)


class RunningTotals:
    """Per-sample running sums of values keyed by any int64 sample id (dataset indices, hashed document ids up to
    2**63-1, negative ids): sorted ids with their totals and last source label, plus a buffer of the steps since
    the last merge, merged by one sort when it outgrows the kept ids (amortised: each id is sorted a logarithmic
    number of times). Memory: about 20 bytes per distinct id seen (twice that while merging).

    ``max_ids`` caps the ids kept. Past it the totals become approximate: after each merge only the ``max_ids``
    ids with the largest ``|total|`` are kept (the candidates for the top and bottom tables), an evicted id that
    comes back starts again from zero, and ``approximate`` turns True (a warning says so once). Use a cap of a few
    times the table size only when the id space is far larger than memory.
    """

    def __init__(self, max_ids: int = DEFAULT_MAX_IDS) -> None:
        if max_ids < 1:
            raise ValueError(f"max_ids must be >= 1, got {max_ids}")
        self.max_ids = int(max_ids)
        self.ids = np.zeros(0, np.int64)
        self.totals = np.zeros(0)
        self.sources = np.zeros(0, np.int32)
        self.approximate = False
        self.evicted = 0  # ids dropped so far (approximate mode)
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending_rows = 0

    def add(self, ids: np.ndarray, values: np.ndarray, sources: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            return
        self._pending.append((ids, np.asarray(values, dtype=np.float64).reshape(-1),
                              np.asarray(sources, dtype=np.int32).reshape(-1)))
        self._pending_rows += ids.size
        if self._pending_rows > max(self.ids.size, 1 << 16):
            self.merge()

    def merge(self) -> None:
        """Fold the buffered steps into the kept totals (sums in the order the values arrived)."""
        if not self._pending:
            return
        ids = np.concatenate([self.ids, *(p[0] for p in self._pending)])
        values = np.concatenate([self.totals, *(p[1] for p in self._pending)])
        sources = np.concatenate([self.sources, *(p[2] for p in self._pending)])
        self._pending, self._pending_rows = [], 0
        order = np.argsort(ids, kind="stable")
        ids, values, sources = ids[order], values[order], sources[order]
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        ends = np.r_[starts[1:], ids.size] - 1
        self.ids, self.totals, self.sources = ids[starts], np.add.reduceat(values, starts), sources[ends]
        if self.ids.size > self.max_ids:
            keep = np.sort(np.argpartition(-np.abs(self.totals), self.max_ids - 1)[: self.max_ids])
            self.evicted += self.ids.size - keep.size
            self.ids, self.totals, self.sources = self.ids[keep], self.totals[keep], self.sources[keep]
            if not self.approximate:
                warnings.warn(f"W&B running totals: more than max_ids={self.max_ids} distinct sample ids; keeping the "
                              f"{self.max_ids} largest |totals| from now on (tables become approximate). The run's "
                              "store holds the exact values.", RuntimeWarning, stacklevel=2)
            self.approximate = True

    def __len__(self) -> int:
        self.merge()
        return int(self.ids.size)

    def extremes(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Positions (into ``ids``/``totals``/``sources``) of the ``k`` highest and ``k`` lowest totals, best and
        worst first (ties: lower id first); merges the buffer first."""
        self.merge()
        return _ranked(self.totals, k), _ranked(-self.totals, k)


def _ranked(key: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` largest ``key`` values, largest first, ties by position, without a full sort."""
    if k < key.size:
        part = np.argpartition(-key, k - 1)[:k] if k > 0 else np.zeros(0, np.intp)
        kth = key[part].min() if k > 0 else np.inf
        picked = np.r_[np.flatnonzero(key > kth), np.flatnonzero(key == kth)][:k]
    else:
        picked = np.arange(key.size)
    return picked[np.lexsort((picked, -key[picked]))]


class WandbInfluenceLogger:
    """Logs what :class:`~inrun.valuation.recorder.InRunRecorder` records, step by step, to a W&B run.

    Args:
        run: a ``wandb`` run; None to take the trainer's ``WandbLogger`` experiment when attached to a Trainer.
        phase_length: steps per phase for the per-phase influence curves.
        table_every: steps between histograms and top/bottom tables.
        top_k: rows in each of the top and bottom tables.
        source_names: names of the source labels, for readable keys.
        max_ids: distinct sample ids whose running totals are kept exactly (see :class:`RunningTotals`).

    A failure while logging (W&B down, a bad value) is a warning, never an error: training and the store go on.
    """

    def __init__(
        self,
        run: Any = None,
        *,
        phase_length: int = 50,
        table_every: int = 100,
        top_k: int = 10,
        source_names: list[str] | None = None,
        max_ids: int = DEFAULT_MAX_IDS,
    ):
        self.run = run
        self.phase_length = phase_length
        self.table_every = table_every
        self.top_k = top_k
        self.source_names = source_names
        self.totals = RunningTotals(max_ids)
        self.failures = 0  # steps whose logging failed (warned once)
        self._phase: dict[str, float] = {}
        self._phase_start: int | None = None

    def _source_name(self, source: int) -> str:
        if source < 0:
            return "all"
        if self.source_names and source < len(self.source_names):
            return self.source_names[source]
        return f"source{source}"

    def __call__(self, row: dict, records: dict) -> None:
        """Recorder listener: one written step row and its records. Errors become a warning (the first one; later
        ones are counted in ``failures``)."""
        if self.run is None:
            return
        try:
            self._log(row, records)
        except Exception as err:  # noqa: BLE001 -- logging must never stop training or the store
            self.failures += 1
            if self.failures == 1:
                warnings.warn(f"W&B logging failed at step {row.get('step')} ({type(err).__name__}: {err}); "
                              "training and the store go on, later failures are counted in logger.failures",
                              RuntimeWarning, stacklevel=2)

    def _log(self, row: dict, records: dict) -> None:
        step = int(row["step"])
        metrics: dict[str, Any] = {"trainer/global_step": step}
        for key in ("val_loss", "val_loss_after", "sum_value_1", "sum_value_2", "residual_1", "residual_2", "lr"):
            value = row.get(key)
            if value is not None and np.isfinite(value):
                metrics[f"{PREFIX}/{key}"] = float(value)
        values = np.asarray(records.get("value_1", np.zeros(0)), dtype=float)
        ids = np.asarray(records["sample_id"], dtype=np.int64)
        sources = np.asarray(records.get("source", np.full(ids.size, -1)), dtype=np.int32)
        if values.size:
            metrics[f"{PREFIX}/mean_value_1"] = float(values.mean())
            for source in np.unique(sources):
                name = self._source_name(int(source))
                total = float(values[sources == source].sum())
                metrics[f"{PREFIX}/source/{name}/value_1"] = total
                self._phase[name] = self._phase.get(name, 0.0) + total
            self.totals.add(ids, values, sources)
        metrics.update(self._phase_metrics(step))
        if self.table_every and (step + 1) % self.table_every == 0:
            metrics.update(self._tables())
        self.run.log(metrics)

    def _phase_metrics(self, step: int) -> dict[str, float]:
        if self._phase_start is None:
            self._phase_start = step
        if step + 1 - self._phase_start < self.phase_length:
            return {}
        found = {f"{PREFIX}/phase/{name}/value_1": total for name, total in self._phase.items()}
        found[f"{PREFIX}/phase/start_step"] = self._phase_start
        self._phase, self._phase_start = {}, None
        return found

    def _tables(self) -> dict[str, Any]:
        import wandb

        totals = self.totals
        top, bottom = totals.extremes(self.top_k)
        columns = ["sample_id", "value_1", "source"]

        def table(picked: np.ndarray) -> Any:
            rows = [[int(totals.ids[i]), float(totals.totals[i]), self._source_name(int(totals.sources[i]))]
                    for i in picked]
            return wandb.Table(columns=columns, data=rows)

        return {
            f"{PREFIX}/top_samples": table(top),
            f"{PREFIX}/bottom_samples": table(bottom),
            f"{PREFIX}/value_histogram": wandb.Histogram(totals.totals),
        }


def log_posthoc(run: Any, result: Any, top_k: int = 10) -> None:
    """Log post-hoc values (:class:`inrun.posthoc.PosthocValues`) to a W&B run: top and bottom samples by summed
    first-order value, and the per-step curve of both orders, as tables next to the in-run metrics."""
    import wandb

    summed = result.summed(1)
    order = np.argsort(summed)
    rows = lambda picked: [[int(result.sample_ids[i]), float(summed[i]), float(result.summed(2)[i])] for i in picked]  # noqa: E731
    columns = ["sample_id", "posthoc_value_1", "posthoc_value_2"]
    steps = [[int(s), float(a), float(b), note] for s, a, b, note in
             zip(result.steps, result.step_first.sum(1), result.step_second.sum(1), result.approximation)]
    run.log({
        f"{PREFIX}/posthoc_top_samples": wandb.Table(columns=columns, data=rows(order[::-1][:top_k])),
        f"{PREFIX}/posthoc_bottom_samples": wandb.Table(columns=columns, data=rows(order[:top_k])),
        f"{PREFIX}/posthoc_steps": wandb.Table(columns=["step", "value_1", "value_2", "test gradient at"], data=steps),
    })


def attach_wandb(callback: Any, trainer: Any) -> None:
    """Connect ``callback.wandb`` (True or a :class:`WandbInfluenceLogger`) to the trainer's W&B run on rank 0."""
    logger = callback.wandb if isinstance(callback.wandb, WandbInfluenceLogger) else WandbInfluenceLogger()
    if logger.run is None:
        from lightning.pytorch.loggers import WandbLogger

        found = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not found:
            warnings.warn("InRunCallback(wandb=...) needs a WandbLogger on the Trainer or a run; not logging", stacklevel=2)
            return
        logger.run = found[0].experiment
    if logger.source_names is None:
        logger.source_names = callback.options.get("source_names")
    callback.recorder.listeners.append(logger)
