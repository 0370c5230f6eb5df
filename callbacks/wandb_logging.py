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


class RunningTotals:
    """Per-sample running sums of values, indexed densely by sample id (ids are dataset indices)."""

    def __init__(self) -> None:
        self.values = np.zeros(0)
        self.seen = np.zeros(0, dtype=bool)
        self.sources = np.full(0, -1, dtype=np.int32)

    def add(self, ids: np.ndarray, values: np.ndarray, sources: np.ndarray) -> None:
        if ids.size == 0:
            return
        needed = int(ids.max()) + 1
        if needed > self.values.size:
            grow = max(needed, 2 * self.values.size)
            self.values = np.concatenate([self.values, np.zeros(grow - self.values.size)])
            self.seen = np.concatenate([self.seen, np.zeros(grow - self.seen.size, dtype=bool)])
            self.sources = np.concatenate([self.sources, np.full(grow - self.sources.size, -1, np.int32)])
        np.add.at(self.values, ids, values)
        self.seen[ids] = True
        self.sources[ids] = sources

    def extremes(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Ids of the ``k`` highest and ``k`` lowest totals (among samples seen so far)."""
        ids = np.flatnonzero(self.seen)
        order = ids[np.argsort(self.values[ids])]
        return order[::-1][:k], order[:k]


class WandbInfluenceLogger:
    """Logs what :class:`~inrun.valuation.recorder.InRunRecorder` records, step by step, to a W&B run.

    Args:
        run: a ``wandb`` run; None to take the trainer's ``WandbLogger`` experiment when attached to a Trainer.
        phase_length: steps per phase for the per-phase influence curves.
        table_every: steps between histograms and top/bottom tables.
        top_k: rows in each of the top and bottom tables.
        source_names: names of the source labels, for readable keys.
    """

    def __init__(
        self,
        run: Any = None,
        *,
        phase_length: int = 50,
        table_every: int = 100,
        top_k: int = 10,
        source_names: list[str] | None = None,
    ):
        self.run = run
        self.phase_length = phase_length
        self.table_every = table_every
        self.top_k = top_k
        self.source_names = source_names
        self.totals = RunningTotals()
        self._phase: dict[str, float] = {}
        self._phase_start: int | None = None

    def _source_name(self, source: int) -> str:
        if source < 0:
            return "all"
        if self.source_names and source < len(self.source_names):
            return self.source_names[source]
        return f"source{source}"

    def __call__(self, row: dict, records: dict) -> None:
        """Recorder listener: one written step row and its records."""
        if self.run is None:
            return
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

        top, bottom = self.totals.extremes(self.top_k)
        columns = ["sample_id", "value_1", "source"]

        def table(ids: np.ndarray) -> Any:
            rows = [[int(i), float(self.totals.values[i]), self._source_name(int(self.totals.sources[i]))] for i in ids]
            return wandb.Table(columns=columns, data=rows)

        seen = self.totals.values[self.totals.seen]
        return {
            f"{PREFIX}/top_samples": table(top),
            f"{PREFIX}/bottom_samples": table(bottom),
            f"{PREFIX}/value_histogram": wandb.Histogram(seen),
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
