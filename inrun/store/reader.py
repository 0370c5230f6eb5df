"""Reading a recorded run: ``inrun.open_run(path)`` returns a ``Run`` over all rank files of one run.

Every aggregate is vectorised numpy over the committed records of all ranks (no Python loop over rows), so runs
with millions of records read in about a second. Values follow ALGORITHMS.md: positive = the sample helped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from inrun.store.paths import find_rank_files
from inrun.store.rankfile import RankFile
from inrun.store.schema import IncompatibleStoreError

NORMALIZATIONS = ("none", "lr", "grad_norm", "count")
SOURCE_NAMES_PATH = "sources/names"
UNLABELLED = "unlabelled"  # name of source -1 (a batch without source labels)
BLOCK_ROWS = 1 << 18  # rows per read block for multi-dimensional columns


@dataclass(frozen=True)
class PhaseValues:
    """Values summed over windows of ``window`` optimizer steps (phase p covers steps p*window .. (p+1)*window-1).

    ``values`` and ``counts`` (records with a value) are [n_phases], or [n_phases, n_sources] when split by source;
    then column j belongs to source id ``source_ids[j]`` named ``source_names[j]`` (-1 = unlabelled).
    """

    window: int
    phase_starts: np.ndarray
    values: np.ndarray
    counts: np.ndarray
    source_ids: np.ndarray | None = None
    source_names: list[str] | None = None


def open_run(path: str | Path) -> "Run":
    """Open a run for reading: a rank file, a folder of ``*.h5`` rank files, or a prefix of them.

    ``runs/run.h5`` also finds ``runs/run.rank0.h5``, ``runs/run.rank1.h5``, ... when it does not exist itself.
    All files must belong to one run (same ``run_id`` and ``world_size``) and every rank must be present.
    """
    paths = find_rank_files(path)
    files: list[RankFile] = []
    try:
        for p in paths:
            files.append(RankFile(p))
        return Run(_check_one_run(files, Path(path)))
    except BaseException:
        for f in files:
            f.close()
        raise


def _check_one_run(files: list[RankFile], asked: Path) -> list[RankFile]:
    """Check that ``files`` are exactly the ranks 0..world_size-1 of one run; return them sorted by rank."""
    groups: dict[tuple[str, int], list[RankFile]] = {}
    for f in files:
        groups.setdefault((f.run_id, f.world_size), []).append(f)
    (run_id, world_size), members = max(groups.items(), key=lambda item: len(item[1]))  # the run most files share
    foreign = [f for f in files if f not in members]
    if foreign:
        raise IncompatibleStoreError(
            f"{', '.join(str(f.path) for f in foreign)} belong(s) to another run than {members[0].path} "
            f"(run_id {run_id}, world_size {world_size}); found run_id {foreign[0].run_id}, world_size "
            f"{foreign[0].world_size}. Move it out of the way, or open one run's files by their prefix."
        )
    by_rank: dict[int, RankFile] = {}
    for f in files:
        if f.rank in by_rank:
            raise IncompatibleStoreError(f"{f.path} and {by_rank[f.rank].path} both hold rank {f.rank} of run {run_id}")
        by_rank[f.rank] = f
    missing = [r for r in range(world_size) if r not in by_rank]
    if missing:
        raise FileNotFoundError(
            f"run {run_id} has {world_size} ranks but rank(s) {missing} are missing from {asked} "
            f"(found {[str(f.path) for f in files]}). Pass the folder or prefix that holds every rank's file."
        )
    return [by_rank[r] for r in range(world_size)]


class Run:
    """A recorded run, all ranks together. Open with ``inrun.open_run``; close with ``close()`` or ``with``."""

    def __init__(self, files: Sequence[RankFile]):
        self._files = list(files)
        self._cache: dict[Any, Any] = {}

    # -- metadata ---------------------------------------------------------------------------------------------------

    @property
    def paths(self) -> list[Path]:
        """The rank files, in rank order."""
        return [f.path for f in self._files]

    @property
    def run_id(self) -> str:
        return self._files[0].run_id

    @property
    def world_size(self) -> int:
        return self._files[0].world_size

    @property
    def schema_version(self) -> int:
        return self._files[0].schema_version

    @property
    def inrun_version(self) -> str:
        """The inrun version that wrote the run."""
        return self._files[0].inrun_version

    @property
    def config(self) -> dict[str, Any]:
        """The run configuration the callback stored (rank 0's)."""
        return self._files[0].config

    @property
    def coverage(self) -> dict[str, Any]:
        """What the run recorded and what it left out (rank 0's)."""
        return self._files[0].coverage

    @property
    def num_steps(self) -> int:
        """Optimizer steps recorded (the most any rank committed; ranks record the same steps)."""
        return max(f.committed_steps for f in self._files)

    @property
    def num_records(self) -> int:
        """Committed record rows over all ranks (one per sample occurrence)."""
        return sum(f.committed_rows for f in self._files)

    @property
    def record_columns(self) -> list[str]:
        return list(self._files[0].record_columns)

    @property
    def source_names(self) -> list[str] | None:
        """Names of the source labels (static ``sources/names``), or None when the run stored none."""
        if not self._files[0].has_static(SOURCE_NAMES_PATH):
            return None
        return [str(s) for s in self._files[0].static(SOURCE_NAMES_PATH)]

    def static(self, path: str, rank: int = 0) -> np.ndarray:
        """A static array stored with ``RunWriter.write_static`` (e.g. ``projections/<layer>``)."""
        return self._files[rank].static(path)

    # -- tables -----------------------------------------------------------------------------------------------------

    @property
    def steps(self) -> dict[str, np.ndarray]:
        """The run-level steps table: the columns of the rank with the most committed steps (normally rank 0), with
        ``n_samples`` and every ``sum_*`` column summed over ranks and ``residual_<k>`` made run-level (each file's
        residual covers only its own rank's values). ``row_start`` is left out: it is an offset into one file."""
        if "steps" not in self._cache:
            self._cache["steps"] = self._merged_steps()
        return dict(self._cache["steps"])

    def _merged_steps(self) -> dict[str, np.ndarray]:
        base = max(self._files, key=lambda f: f.committed_steps)
        table = {name: base.step_column(name) for name in base.step_columns if name != "row_start"}
        numbers = table["step"]
        for name in [n for n in table if n == "n_samples" or n.startswith("sum_")]:
            table[name] = sum(_per_step(numbers, f.step_column(name), f.step_column("step")) for f in self._files)
        for k in (1, 2):
            name, values = f"residual_{k}", f"value_{k}"
            if name in table and values in self.record_columns:
                others = [f for f in self._files if f is not base]
                table[name] = table[name] + sum(
                    (_per_step(numbers, f.record_column(values), f.record_column("step"), skip_nan=True)
                     for f in others),
                    np.zeros(len(numbers)),
                )
        return {name: _read_only(np.asarray(a)) for name, a in table.items()}

    def records(self, columns: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The raw records table of all ranks (rank 0's rows first), as a dict of arrays.

        ``columns``: the record columns to read (default all); the extra name ``"rank"`` gives each row's rank.
        One-value-per-row columns come back read-only (they are cached); copy them to modify.
        """
        names = list(columns) if columns is not None else self.record_columns
        return {name: self._column(name) for name in names}

    def _column(self, name: str) -> np.ndarray:
        """Record column ``name`` over all ranks. One-value-per-row columns are cached (and read-only)."""
        key = ("records", name)
        if key in self._cache:
            return self._cache[key]
        if name == "rank":
            array = np.concatenate([np.full(f.committed_rows, f.rank, np.int32) for f in self._files])
        else:
            self._check_column(name)
            array = np.concatenate([f.record_column(name) for f in self._files])
        if array.ndim == 1:
            self._cache[key] = _read_only(array)
        return array

    def _check_column(self, name: str) -> None:
        if name not in self._files[0].record_columns:
            raise KeyError(f"this run has no record column {name!r}; its columns are {self.record_columns}")

    def _per_record_step_column(self, name: str) -> np.ndarray:
        """Step column ``name`` repeated for each record of the step (all ranks, record order)."""
        return np.concatenate(
            [np.repeat(f.step_column(name), f.step_column("n_samples")) for f in self._files]
        )

    @property
    def sample_ids(self) -> np.ndarray:
        """The distinct sample ids seen in the run, ascending."""
        return self._id_index()[0]

    def _id_index(self) -> tuple[np.ndarray, np.ndarray]:
        if "id_index" not in self._cache:
            ids, inverse = _unique_inverse(self._column("sample_id"))
            self._cache["id_index"] = (_read_only(ids), _read_only(inverse))
        return self._cache["id_index"]

    # -- values -----------------------------------------------------------------------------------------------------

    def sample_values(self, order: int = 1, normalize: str = "none",
                      per_val: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Run values per sample id: ``(ids, values)``, ids ascending as in ``sample_ids``.

        Each occurrence (every epoch, every rank) counts; records whose value is NaN (not recorded) are left out.
        ``normalize``: "none" (sum), "lr" (each record divided by its step's learning rate), "grad_norm" (each
        record divided by the sample's gradient norm: cosine-style), "count" (mean per recorded occurrence).
        ``per_val``: sum the per-validation-point column ``value_<order>_per_val`` instead -> values [n_ids, n_val].
        """
        ids, inverse = self._id_index()
        if per_val:
            return ids, self._per_val_sums(order, normalize, inverse, len(ids))
        values, recorded = self._record_values(order, normalize)
        sums = np.bincount(inverse, weights=values, minlength=len(ids))
        if normalize == "count":
            sums = _mean(sums, np.bincount(inverse, weights=recorded, minlength=len(ids)))
        return ids, sums

    def _value_column_name(self, order: int) -> str:
        if order not in (1, 2):
            raise ValueError(f"order must be 1 (first-order values) or 2 (second-order values), not {order!r}")
        return f"value_{order}"

    def _check_recorded(self, order: int) -> np.ndarray:
        """The raw value column of ``order``, after checking that the run recorded it."""
        name = self._value_column_name(order)
        what = "first-order" if order == 1 else "second-order"
        how = "shapley='first' or 'second'" if order == 1 else "shapley='second'"
        if name not in self.record_columns:
            raise ValueError(f"this run recorded no {what} values (no column {name!r}); record them with {how}")
        values = self._column(name)
        if values.size and np.isnan(values).all():
            raise ValueError(f"this run recorded no {what} values (all NaN); record them with {how}")
        return values

    def _record_weights(self, normalize: str) -> np.ndarray | None:
        """Per-record factor of a normalisation (None: 1). Zero learning rates / gradient norms give weight 0."""
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, not {normalize!r}")
        if normalize == "lr":
            return _inverse_or_zero(self._per_record_step_column("lr"))
        if normalize == "grad_norm":
            norms_sq = self._column("grad_norm_sq")
            if norms_sq.size and np.isnan(norms_sq).all():
                raise ValueError("normalize='grad_norm' needs gradient norms, but this run recorded none (all NaN)")
            return _inverse_or_zero(np.sqrt(norms_sq))
        return None

    def _record_values(self, order: int, normalize: str) -> tuple[np.ndarray, np.ndarray]:
        """Per-record values after normalisation, 0 where not recorded, and the 0/1 'recorded' mask."""
        values = self._check_recorded(order)
        weights = self._record_weights(normalize)
        if weights is not None:
            values = values * weights
        recorded = ~np.isnan(values)
        return np.where(recorded, values, 0.0), recorded.astype(np.float64)

    def _per_val_sums(self, order: int, normalize: str, inverse: np.ndarray, n_ids: int) -> np.ndarray:
        self._check_recorded(order)
        name = f"{self._value_column_name(order)}_per_val"
        self._check_column(name)
        weights = self._record_weights(normalize)
        n_val = self._files[0].record_columns[name].shape[0]
        sums, counts = np.zeros((n_ids, n_val)), np.zeros((n_ids, n_val))
        offset = 0
        for f in self._files:
            for start in range(0, f.committed_rows, BLOCK_ROWS):
                block = f.record_column(name, start, start + BLOCK_ROWS).astype(np.float64)
                rows = slice(offset + start, offset + start + len(block))
                if weights is not None:
                    block *= weights[rows, None]
                recorded = ~np.isnan(block)
                np.add.at(sums, inverse[rows], np.where(recorded, block, 0.0))
                np.add.at(counts, inverse[rows], recorded)
            offset += f.committed_rows
        return _mean(sums, counts) if normalize == "count" else sums

    def step_values(self, t: int, order: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, values)`` of optimizer step ``t``'s batch, all ranks concatenated (rank 0 first), record order."""
        name = self._value_column_name(order)
        if name not in self.record_columns:
            self._check_recorded(order)  # raises a clear error
        ids, values, found = [], [], False
        for f in self._files:
            numbers = f.step_column("step")
            i = int(np.searchsorted(numbers, t))
            if i == len(numbers) or numbers[i] != t:
                continue
            found = True
            start = int(f.step_column("row_start")[i])
            stop = start + int(f.step_column("n_samples")[i])
            ids.append(f.record_column("sample_id", start, stop))
            values.append(f.record_column(name, start, stop))
        if not found:
            raise KeyError(f"step {t} was not recorded; this run recorded {self.num_steps} steps "
                           f"(numbers {self._step_range()})")
        ids_all, values_all = np.concatenate(ids), np.concatenate(values)
        if values_all.size and np.isnan(values_all).all():
            self._check_recorded(order)  # raises when the whole run lacks this order
        return ids_all, values_all

    def _step_range(self) -> str:
        numbers = self.steps["step"]
        return f"{numbers[0]}..{numbers[-1]}" if len(numbers) else "none"

    def phase_values(self, window: int, order: int = 1, by_source: bool = False,
                     normalize: str = "none") -> PhaseValues:
        """Values summed over phases of ``window`` optimizer steps (and per source label with ``by_source``).

        ``normalize`` as in ``sample_values``; "count" gives the mean value per record of each phase.
        """
        if window < 1:
            raise ValueError(f"window must be >= 1 step, got {window}")
        values, recorded = self._record_values(order, normalize)
        phase = self._column("step") // window
        n_phases = self._num_phases(window)
        starts = np.arange(n_phases, dtype=np.int64) * window
        if not by_source:
            sums = np.bincount(phase, weights=values, minlength=n_phases)
            counts = np.bincount(phase, weights=recorded, minlength=n_phases)
            return PhaseValues(window, starts, _finish(sums, counts, normalize), counts)
        source_ids, names = self._source_labels()
        key = phase * len(source_ids) + np.searchsorted(source_ids, self._column("source"))
        size = n_phases * len(source_ids)
        sums = np.bincount(key, weights=values, minlength=size).reshape(n_phases, len(source_ids))
        counts = np.bincount(key, weights=recorded, minlength=size).reshape(n_phases, len(source_ids))
        return PhaseValues(window, starts, _finish(sums, counts, normalize), counts, source_ids, names)

    def _num_phases(self, window: int) -> int:
        last = max((int(f.step_column("step")[-1]) for f in self._files if f.committed_steps), default=-1)
        return last // window + 1

    def _source_labels(self) -> tuple[np.ndarray, list[str]]:
        """Source ids to report (every named source, plus any other id present) and their names."""
        names = self.source_names or []
        ids = np.union1d(np.arange(len(names)), self._column("source")).astype(np.int64)
        labels = [names[s] if 0 <= s < len(names) else UNLABELLED if s == -1 else f"source {s}" for s in ids.tolist()]
        return ids, labels

    def top_k(self, k: int, order: int = 1, normalize: str = "none") -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` samples with the highest values, best first: ``(ids, values)`` (ties: lower id first)."""
        ids, values = self.sample_values(order, normalize)
        key = np.where(np.isnan(values), -np.inf, values)
        pick = np.argsort(-key, kind="stable")[: _check_k(k)]
        return ids[pick], values[pick]

    def bottom_k(self, k: int, order: int = 1, normalize: str = "none") -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` samples with the lowest values, worst first: ``(ids, values)`` (ties: lower id first)."""
        ids, values = self.sample_values(order, normalize)
        key = np.where(np.isnan(values), np.inf, values)
        pick = np.argsort(key, kind="stable")[: _check_k(k)]
        return ids[pick], values[pick]

    # -- closing ----------------------------------------------------------------------------------------------------

    # -- answers for test points chosen after training -------------------------------------------------------------

    def trajectory_loo(self, model, loss_fn, test_batch, **options) -> np.ndarray:
        """Data value embedding estimates of trajectory-specific leave-one-out, ``[n_ids, n_test]`` in the order of
        ``sample_ids`` (positive = helped); see :func:`inrun.posthoc.trajectory_loo` for the options."""
        return _posthoc().trajectory_loo(self, model, loss_fn, test_batch, **options)

    def posthoc_values(self, model, loss_fn, test_batch, **options):
        """First- and second-order In-Run Shapley values for test points chosen after training (from projected
        gradients and model checkpoints); see :func:`inrun.posthoc.posthoc_values`."""
        return _posthoc().posthoc_values(self, model, loss_fn, test_batch, **options)

    def close(self) -> None:
        """Close every rank file (the ``Run`` is unusable afterwards)."""
        for f in self._files:
            f.close()
        self._cache.clear()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Run({str(self._files[0].path)!r}, run_id={self.run_id!r}, world_size={self.world_size}, "
                f"num_steps={self.num_steps}, num_records={self.num_records})")


# ----------------------------------------------------------------------------------------------------------- helpers


def _posthoc():
    """The post-hoc package, imported on first use: the one place the store reaches above itself, so that reading a
    run needs neither torch nor the post-hoc code unless one of its methods is called."""
    import importlib

    return importlib.import_module("inrun.posthoc")


def _unique_inverse(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(ids, return_inverse=True)``, in O(n) by counting when ids are small non-negative integers
    (dataset indices, the usual case)."""
    if ids.size and ids.min() >= 0 and ids.max() < 2 * ids.size + (1 << 20):
        present = np.bincount(ids) > 0
        unique = np.flatnonzero(present)
        lookup = np.cumsum(present) - 1
        return unique.astype(ids.dtype), lookup[ids]
    unique, inverse = np.unique(ids, return_inverse=True)
    return unique, inverse.reshape(-1)


def _per_step(numbers: np.ndarray, values: np.ndarray, steps: np.ndarray, skip_nan: bool = False) -> np.ndarray:
    """Sum of ``values`` per step number in ``numbers`` (sorted); ``steps`` gives each value's step number."""
    pos, found = _positions(numbers, steps)
    values = values[found]
    if skip_nan:
        values = np.nan_to_num(values)
    out = np.zeros(len(numbers), dtype=np.result_type(values.dtype, np.int64))
    np.add.at(out, pos[found], values)
    return out


def _positions(sorted_numbers: np.ndarray, numbers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each of ``numbers`` sits in ``sorted_numbers``, and whether it is there at all."""
    pos = np.searchsorted(sorted_numbers, numbers)
    inside = pos < len(sorted_numbers)
    found = np.zeros(len(numbers), bool)
    found[inside] = sorted_numbers[pos[inside]] == numbers[inside]
    return pos, found


def _inverse_or_zero(x: np.ndarray) -> np.ndarray:
    """1/x, with 0 where x == 0 (and NaN where x is NaN)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = 1.0 / x
    out[x == 0] = 0.0
    return out


def _mean(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """sums / counts, NaN where nothing was counted."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(counts > 0, sums / counts, np.nan)


def _finish(sums: np.ndarray, counts: np.ndarray, normalize: str) -> np.ndarray:
    return _mean(sums, counts) if normalize == "count" else sums


def _check_k(k: int) -> int:
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return int(k)


def _read_only(array: np.ndarray) -> np.ndarray:
    array.flags.writeable = False
    return array


__all__ = ["open_run", "find_rank_files", "Run", "PhaseValues", "NORMALIZATIONS"]
