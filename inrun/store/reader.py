"""Reading a recorded run: ``inrun.open_run(path)`` returns a ``Run`` over all rank files of one run.

Every aggregate streams the committed records of all ranks in blocks (vectorised numpy, no Python loop over rows),
in memory that grows with the distinct sample ids and the steps, never with the rows: a billion-record run reads
on one machine (experiments/bench_reader.py). Values follow ALGORITHMS.md: positive = the sample helped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from inrun.store.idbitmap import bitmap_of, merge_bitmaps
from inrun.store.paths import find_rank_files
from inrun.store.rankfile import RankFile
from inrun.store.schema import IncompatibleStoreError

NORMALIZATIONS = ("none", "lr", "grad_norm", "count")
SOURCE_NAMES_PATH = "sources/names"
UNLABELLED = "unlabelled"  # name of source -1 (a batch without source labels)
BLOCK_ROWS = 1 << 20  # rows per read block (8 MiB per 8-byte column)
BITMAP_MAX_IDS = 1 << 32  # the id index uses a bitmap over the id range up to this range (768 MiB) and at most
# idbitmap.BITMAP_IDS_PER_ROW ids of range per record: else sorted ids


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


class IdIndex:
    """The distinct sample ids of a run (ascending) and a vectorised map from id to position among them.

    Memory is proportional to the distinct ids, never to the rows: either a bitmap over the id range with per-word
    ranks (``range / 5.3`` bytes; used when the range is at most ``BITMAP_MAX_IDS`` ids and at most
    ``BITMAP_IDS_PER_ROW`` ids per record), from which the sorted ids (8 bytes each) are drawn only when asked for
    (``ids``; ``size``, ``positions`` and ``ids_at`` do without them), or, for sparse ids such as hashed document
    ids, the sorted ids alone (binary search). Built in one streamed pass over ``sample_id`` (two for sparse ids: the
    bitmap is given up as soon as the range outgrows it, and sorted blocks are merged).
    """

    def __init__(self, ids: np.ndarray | None = None, lo: int = 0, words: np.ndarray | None = None,
                 ranks: np.ndarray | None = None, size: int | None = None):
        if ids is None and words is None:
            raise ValueError("IdIndex needs the sorted ids or a bitmap (words and ranks)")
        self._ids = None if ids is None else _read_only(ids)
        self._size = int(ids.size if ids is not None else size)
        self._lo, self._words, self._ranks = lo, words, ranks

    @property
    def kind(self) -> str:
        return "bitmap" if self._words is not None else "sorted"

    @property
    def size(self) -> int:
        """The number of distinct ids."""
        return self._size

    @property
    def ids(self) -> np.ndarray:
        """The distinct ids, ascending (drawn from the bitmap on first use, then kept)."""
        if self._ids is None:
            self._ids = _read_only(_set_bits(self._words, self._size) + self._lo)
        return self._ids

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self._ids, self._words, self._ranks) if a is not None)

    def positions(self, keys: np.ndarray) -> np.ndarray:
        """Position of each of ``keys`` (ids that occur in the run) in ``ids``."""
        keys = np.asarray(keys, dtype=np.int64)
        if self._words is None:
            if keys.size < 4096:
                return np.searchsorted(self._ids, keys)
            # binary searches for keys in ascending order walk the ids mostly forward (numpy starts each search
            # from the last result): ~10x fewer cache misses than searching in record order
            order = np.argsort(keys)
            out = np.empty(keys.size, np.intp)
            out[order] = np.searchsorted(self._ids, keys[order])
            return out
        offset = (keys - self._lo).view(np.uint64)
        word = (offset >> np.uint64(6)).view(np.int64)
        below = np.left_shift(np.uint64(1), offset & np.uint64(63), out=offset)  # offset is not needed again
        below -= np.uint64(1)
        below &= self._words[word]
        out = self._ranks[word].astype(np.int64)
        out += np.bitwise_count(below)
        return out

    def ids_at(self, positions: np.ndarray) -> np.ndarray:
        """The ids at ``positions`` (as ``ids[positions]``) without drawing all ids from the bitmap."""
        positions = np.asarray(positions, dtype=np.int64)
        if self._ids is not None or not positions.size:
            return self.ids[positions]
        # the word holding each position's bit (positions in the ranks' dtype: no converted copy of all ranks)
        word = np.searchsorted(self._ranks, positions.astype(self._ranks.dtype), side="right") - 1
        kth = positions - self._ranks[word]
        bits = np.unpackbits(self._words[word].view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
        seen = np.cumsum(bits, axis=1)
        bit = np.argmax((seen > kth[:, None]) & (bits == 1), axis=1)
        return self._lo + 64 * word + bit

    @classmethod
    def build(cls, blocks: Callable[[], Iterator[np.ndarray]], rows: int) -> "IdIndex":
        """The index of the ids yielded by ``blocks()`` (``rows`` ids in all): one streamed pass that sets bits
        while the id range allows a bitmap, else (a second call of ``blocks()``) sorted distinct ids."""
        found = bitmap_of(blocks(), rows, BITMAP_MAX_IDS)
        if found is None:
            return cls(_sorted_unique(blocks()))
        return cls.from_bitmap(*found)

    @classmethod
    def from_bitmap(cls, lo: int, words: np.ndarray) -> "IdIndex":
        """The index of the ids whose bits are set in ``words`` (bit j of word w is id ``lo + 64 w + j``)."""
        counts = np.bitwise_count(words)
        total = int(counts.sum(dtype=np.int64))
        if not total:
            return cls(np.zeros(0, np.int64))
        ranks = np.cumsum(counts, dtype=np.int64 if total >= 2**31 else np.int32)
        ranks -= counts
        return cls(None, lo, words, ranks, total)


def _set_bits(words: np.ndarray, total: int) -> np.ndarray:
    """Indices of the set bits of ``words`` (bit j of word w is index 64 w + j), ascending: the bits unpacked to
    booleans 8M at a time (8 MB temporaries) and their nonzero indices taken."""
    out = np.empty(total, np.int64)
    data = words.view(np.uint8)
    filled, chunk = 0, 1 << 20
    for start in range(0, data.size, chunk):
        found = np.flatnonzero(np.unpackbits(data[start:start + chunk], bitorder="little").view(bool))
        part = out[filled:filled + found.size]
        part[:] = found
        part += 8 * start
        filled += found.size
    return out


def _sorted_unique(blocks: Iterator[np.ndarray]) -> np.ndarray:
    """Distinct values of the streamed blocks, ascending: each block's ``np.unique`` merged into sorted levels (a
    merge of sorted runs is linear with a stable sort), so peak memory is a small multiple of the distinct ids."""
    levels: list[np.ndarray] = []
    for ids in blocks:
        levels.append(np.unique(ids.astype(np.int64, copy=False)))
        while len(levels) > 1 and levels[-2].size <= 2 * levels[-1].size:
            top = levels.pop()
            levels[-1] = _merge_unique(levels[-1], top)
    while len(levels) > 1:
        top = levels.pop()
        levels[-1] = _merge_unique(levels[-1], top)
    return levels[0] if levels else np.zeros(0, np.int64)


def _merge_unique(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    merged = np.sort(np.concatenate([a, b]), kind="stable")
    if merged.size < 2:
        return merged
    return merged[np.r_[True, merged[1:] != merged[:-1]]]


@dataclass
class _FileSteps:
    """One rank file's steps (numbers, first rows, counts, learning rates) and a map step number -> row."""

    numbers: np.ndarray
    row_start: np.ndarray
    n_samples: np.ndarray
    lr: np.ndarray | None

    @classmethod
    def read(cls, f: RankFile) -> "_FileSteps":
        lr = f.step_column("lr") if "lr" in f.step_columns else None
        return cls(f.step_column("step"), f.step_column("row_start"), f.step_column("n_samples"), lr)

    @property
    def contiguous(self) -> bool:
        n = self.numbers
        return bool(n.size == 0 or n[-1] - n[0] == n.size - 1)

    def find(self, t: int) -> int | None:
        """Row of step number ``t`` in this file's steps table, or None; O(1) when the numbers are contiguous."""
        n = self.numbers
        if not n.size:
            return None
        i = t - int(n[0]) if self._contiguous else int(np.searchsorted(n, t))
        return i if 0 <= i < n.size and n[i] == t else None

    def __post_init__(self) -> None:
        self._contiguous = self.contiguous

    def rows_to_steps(self, start: int, stop: int) -> np.ndarray:
        """For each record row in ``start:stop``, the row of its step in the steps table."""
        ends = self.row_start + self.n_samples
        first = int(np.searchsorted(ends, start, side="right"))
        last = int(np.searchsorted(self.row_start, stop, side="left"))
        begin = np.maximum(self.row_start[first:last], start)
        end = np.minimum(ends[first:last], stop)
        return np.repeat(np.arange(first, last), np.maximum(end - begin, 0))


class Run:
    """A recorded run, all ranks together. Open with ``inrun.open_run``; close with ``close()`` or ``with``.

    Aggregates stream the committed records in blocks of ``BLOCK_ROWS`` rows: their memory grows with the number of
    distinct sample ids (the id index, per-id sums) and steps, never with the number of rows. The id index, the
    steps tables, the last per-id result and a few phase tables are kept; no record column is.
    """

    def __init__(self, files: Sequence[RankFile]):
        self._files = list(files)
        self._cache: dict[Any, Any] = {}
        self._record_specs = self._files[0].record_columns

    def _cached(self, key: Any, compute: Callable[[], Any], keep: int | None = None) -> Any:
        """``compute()`` once per state of the files (the committed counts: a live run that grew is read again)."""
        state = tuple((f.committed_steps, f.committed_rows) for f in self._files)
        if self._cache.get("state") != state:
            self._cache = {"state": state}
        if key not in self._cache:
            if keep is not None:  # drop the oldest results of this family
                family = [k for k in self._cache if isinstance(k, tuple) and k[0] == key[0]]
                for old in family[: max(0, len(family) - keep + 1)]:
                    del self._cache[old]
            self._cache[key] = compute()
        return self._cache[key]

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
        return list(self._record_specs)

    def record_shape(self, name: str) -> tuple[int, ...]:
        """The shape of one row of record column ``name`` (``()`` for one value per row)."""
        self._check_column(name)
        return tuple(self._record_specs[name].shape)

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
        return dict(self._cached("steps", self._merged_steps))

    def _file_steps(self, i: int) -> _FileSteps:
        return self._cached(("file_steps", i), lambda: _FileSteps.read(self._files[i]))

    def _merged_steps(self) -> dict[str, np.ndarray]:
        base = max(self._files, key=lambda f: f.committed_steps)
        table = {name: base.step_column(name) for name in base.step_columns if name != "row_start"}
        numbers = table["step"]
        for name in [n for n in table if n == "n_samples" or n.startswith("sum_")]:
            table[name] = sum(_per_step(numbers, f.step_column(name), f.step_column("step")) for f in self._files)
        for k in (1, 2):
            name, values = f"residual_{k}", f"value_{k}"
            if name in table and values in self.record_columns:
                others = [i for i, f in enumerate(self._files) if f is not base]
                table[name] = table[name] + sum((self._streamed_per_step(i, values, numbers) for i in others),
                                                np.zeros(len(numbers)))
        return {name: _read_only(np.asarray(a)) for name, a in table.items()}

    def _streamed_per_step(self, i: int, column: str, numbers: np.ndarray) -> np.ndarray:
        """Sum of record column ``column`` of file ``i`` per step number in ``numbers`` (NaN counted as 0)."""
        f, steps = self._files[i], self._file_steps(i)
        out = np.zeros(len(numbers))
        for start in range(0, f.committed_rows, BLOCK_ROWS):
            values = np.nan_to_num(f.record_column(column, start, start + BLOCK_ROWS))
            pos, found = _positions(numbers, steps.numbers[steps.rows_to_steps(start, start + values.size)])
            np.add.at(out, pos[found], values[found])
        return out

    def iter_records(self, columns: Sequence[str] | None = None,
                     block_rows: int = BLOCK_ROWS) -> Iterator[dict[str, np.ndarray]]:
        """The records table of all ranks (rank 0's rows first) in blocks of at most ``block_rows`` rows, each a
        dict of arrays; ``"rank"`` gives each row's rank. Memory: one block, whatever the size of the run."""
        names = list(columns) if columns is not None else self.record_columns
        for name in names:
            if name != "rank":
                self._check_column(name)
        for f in self._files:
            for start in range(0, f.committed_rows, block_rows):
                stop = min(start + block_rows, f.committed_rows)
                yield {name: np.full(stop - start, f.rank, np.int32) if name == "rank"
                       else f.record_column(name, start, stop) for name in names}

    def records(self, columns: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The raw records table of all ranks (rank 0's rows first), as a dict of whole arrays.

        ``columns``: the record columns to read (default all); the extra name ``"rank"`` gives each row's rank.
        This loads whole columns (memory grows with the rows): use ``iter_records`` or the aggregates on big runs.
        """
        names = list(columns) if columns is not None else self.record_columns
        parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
        for block in self.iter_records(names):
            for name in names:
                parts[name].append(block[name])
        return {name: np.concatenate(p) if p else self._empty(name) for name, p in parts.items()}

    def _empty(self, name: str) -> np.ndarray:
        if name == "rank":
            return np.zeros(0, np.int32)
        spec = self._record_specs[name]
        return np.zeros((0, *spec.shape), spec.dtype)

    def _check_column(self, name: str) -> None:
        if name not in self._record_specs:
            raise KeyError(f"this run has no record column {name!r}; its columns are {self.record_columns}")

    def _blocks(self, columns: Sequence[str]) -> Iterator[tuple[int, int, int, dict[str, np.ndarray]]]:
        """``(file index, start row, stop row, block)`` over all committed records."""
        for i, f in enumerate(self._files):
            for start in range(0, f.committed_rows, BLOCK_ROWS):
                stop = min(start + BLOCK_ROWS, f.committed_rows)
                yield i, start, stop, {name: f.record_column(name, start, stop) for name in columns}

    @property
    def sample_ids(self) -> np.ndarray:
        """The distinct sample ids seen in the run, ascending."""
        return self._id_index().ids

    @property
    def num_samples(self) -> int:
        """How many distinct sample ids the run has (without drawing the ids themselves from the id index)."""
        return self._id_index().size

    def _id_index(self) -> IdIndex:
        def blocks() -> Iterator[np.ndarray]:
            return (block["sample_id"] for *_, block in self._blocks(["sample_id"]))

        def build() -> IdIndex:
            stored = [f.id_bitmap() for f in self._files]  # kept by the close-time compression: no id pass
            if all(bitmap is not None for bitmap in stored):
                return IdIndex.from_bitmap(*merge_bitmaps(stored))
            return IdIndex.build(blocks, self.num_records)

        return self._cached("id_index", build)

    def sample_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, occurrences)``: how many records each sample id has (every epoch, every rank)."""
        index = self._id_index()

        def count() -> np.ndarray:
            counts = np.zeros(index.size, np.int32 if self.num_records < 2**31 else np.int64)
            for *_, block in self._blocks(["sample_id"]):
                np.add.at(counts, index.positions(block["sample_id"]), 1)
            return _read_only(counts)

        return index.ids, self._cached(("counts",), count)

    # -- values -----------------------------------------------------------------------------------------------------

    def sample_values(self, order: int = 1, normalize: str = "none",
                      per_val: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Run values per sample id: ``(ids, values)``, ids ascending as in ``sample_ids``.

        Each occurrence (every epoch, every rank) counts; records whose value is NaN (not recorded) are left out.
        ``normalize``: "none" (sum), "lr" (each record divided by its step's learning rate), "grad_norm" (each
        record divided by the sample's gradient norm: cosine-style), "count" (mean per recorded occurrence).
        ``per_val``: sum the per-validation-point column ``value_<order>_per_val`` instead -> values [n_ids, n_val]
        (see ``val_point_values``).
        """
        if per_val:
            return self.val_point_values(order, normalize)
        self._check_normalize(normalize)
        self._check_recorded(order)
        return self._id_index().ids, self._sample_sums(order, normalize)

    def _sample_sums(self, order: int, normalize: str) -> np.ndarray:
        """The per-id sums of ``sample_values`` (positions as in ``sample_ids``), kept (one at a time)."""
        return self._cached(("sums", order, normalize),
                            lambda: self._accumulate([(order, normalize)], [])[0][order, normalize], keep=1)

    def precompute(self, orders: Sequence[int] = (1,), window: int | None = None, by_source: bool = False,
                   normalize: str = "none") -> None:
        """Compute the per-id sums of ``orders`` (and their phase tables over ``window`` steps) in one streamed
        pass and keep them, so that the ``sample_values``, ``top_k``/``bottom_k`` and ``phase_values`` calls that
        follow with these arguments read nothing. Each column is read once, the id positions found once, instead
        of once per call (``inrun report``). Orders the run did not record are left out. Memory: one float64 per
        distinct id per order."""
        self._check_normalize(normalize)
        if window is not None and window < 1:
            raise ValueError(f"window must be >= 1 step, got {window}")
        recorded = []
        for order in orders:
            self._value_column_name(order)  # 1 or 2
            try:
                self._check_recorded(order)
            except ValueError:
                continue
            recorded.append(order)
        sums = [(order, normalize) for order in recorded if ("sums", order, normalize) not in self._cache_now()]
        phases = [] if window is None else [
            (window, order, by_source, normalize) for order in recorded
            if ("phases", window, order, by_source, normalize) not in self._cache_now()]
        if not sums and not phases:
            return
        sum_results, phase_results = self._accumulate(sums, phases)
        cache = self._cache_now()
        for (order, norm), result in sum_results.items():
            cache[("sums", order, norm)] = result
        for spec, result in phase_results.items():
            cache[("phases", *spec)] = result

    def _cache_now(self) -> dict:
        """The cache, emptied first if the files' committed counts changed (a live run that grew)."""
        self._cached("state-check", lambda: None)
        return self._cache

    def val_point_values(self, order: int = 1, normalize: str = "none") -> tuple[np.ndarray, np.ndarray]:
        """In-run values per validation point: ``(ids, values)`` with ``values[i, j]`` the value of sample
        ``ids[i]`` for validation point ``j``, summed over its occurrences (``normalize`` as in ``sample_values``).

        Needs a run recorded with ``per_val_point=True`` (order 2 also with ``shapley='second'``). The row mean
        over validation points is ``sample_values(order)``. Memory: ``n_ids x n_val`` float64, streamed rows.
        """
        self._check_normalize(normalize)
        self._check_recorded(order)
        name = f"{self._value_column_name(order)}_per_val"
        if name not in self._record_specs:
            raise ValueError(f"this run recorded no per-validation-point values of order {order} (no column "
                             f"{name!r}); record them with per_val_point=True"
                             + (" and shapley='second'" if order == 2 else ""))
        index = self._id_index()
        sums = self._cached(("sums", order, normalize, "per_val"),
                            lambda: self._per_val_sums(name, normalize, index), keep=1)
        return index.ids, sums

    def _value_column_name(self, order: int) -> str:
        if order not in (1, 2):
            raise ValueError(f"order must be 1 (first-order values) or 2 (second-order values), not {order!r}")
        return f"value_{order}"

    def _check_normalize(self, normalize: str) -> None:
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, not {normalize!r}")

    def _check_recorded(self, order: int) -> str:
        """The value column of ``order``, after checking that the run recorded it (a streamed scan, kept)."""
        name = self._value_column_name(order)
        what = "first-order" if order == 1 else "second-order"
        how = "shapley='first' or 'second'" if order == 1 else "shapley='second'"
        if name not in self.record_columns:
            raise ValueError(f"this run recorded no {what} values (no column {name!r}); record them with {how}")
        if self.num_records and not self._cached(("any", name), lambda: self._any_value(name)):
            raise ValueError(f"this run recorded no {what} values (all NaN); record them with {how}")
        return name

    def _any_value(self, name: str) -> bool:
        return any(not np.isnan(block[name]).all() for *_, block in self._blocks([name]))

    def _weights(self, normalize: str, i: int, start: int, stop: int, block: dict,
                 row_steps: np.ndarray | None = None) -> np.ndarray | None:
        """Per-record factor of a normalisation for rows ``start:stop`` of file ``i`` (None: 1); ``row_steps``:
        each row's row in the steps table, when already known."""
        if normalize == "lr":
            steps = self._file_steps(i)
            if steps.lr is None:
                raise ValueError("normalize='lr' needs the steps table's 'lr' column, which this run lacks")
            return _inverse_or_zero(steps.lr[steps.rows_to_steps(start, stop) if row_steps is None else row_steps])
        if normalize == "grad_norm":
            return _inverse_or_zero(np.sqrt(block["grad_norm_sq"]))
        return None

    def _norm_columns(self, normalize: str) -> list[str]:
        if normalize != "grad_norm":
            return []
        if "grad_norm_sq" not in self._record_specs or not self._cached(("any", "grad_norm_sq"),
                                                                         lambda: self._any_value("grad_norm_sq")):
            raise ValueError("normalize='grad_norm' needs the samples' gradient norms, but this run recorded none (all "
                             "NaN); record with record_norms=True (off by default: it costs 5-20% of a training step)")
        return ["grad_norm_sq"]

    def _values_blocks(self, name: str, normalize: str,
                       extra: Sequence[str] = ()) -> Iterator[tuple[int, int, np.ndarray, dict]]:
        """``(file, start, values, block)``: values of column ``name`` after normalisation (NaN: not recorded)."""
        columns = [name, *self._norm_columns(normalize), *extra]
        for i, start, stop, block in self._blocks(list(dict.fromkeys(columns))):
            values = block[name].astype(np.float64)
            weights = self._weights(normalize, i, start, stop, block)
            if weights is not None:
                values *= weights if values.ndim == 1 else weights[:, None]
            yield i, start, values, block

    def _accumulate(self, sums: Sequence[tuple[int, str]],
                    phases: Sequence[tuple[int, int, bool, str]]) -> tuple[dict, dict]:
        """One streamed pass for several aggregates: per-id sums for each ``(order, normalize)`` of ``sums`` and a
        phase table for each ``(window, order, by_source, normalize)`` of ``phases``. Every column is read once per
        block, the id positions are found once per block and each normalisation is applied once."""
        index = self._id_index() if sums else None
        names = [self._value_column_name(spec[0]) for spec in sums] + \
                [self._value_column_name(spec[1]) for spec in phases]
        norms = {spec[1] for spec in sums} | {spec[3] for spec in phases}
        columns = names + ["sample_id"] * bool(sums) + ["source"] * any(spec[2] for spec in phases)
        for norm in norms:
            columns += self._norm_columns(norm)
        summed = {spec: _IdSums(index.size, spec[1] == "count") for spec in sums}
        tables = {spec: _PhaseSums(spec[0], self._num_phases(spec[0])) for spec in phases}
        for i, start, stop, block in self._blocks(list(dict.fromkeys(columns))):
            steps = self._file_steps(i)
            row_steps = steps.rows_to_steps(start, stop) if phases or "lr" in norms else None
            values: dict[tuple[str, str], np.ndarray] = {}

            def normalized(name: str, norm: str) -> np.ndarray:
                if (name, norm) not in values:
                    weights = self._weights(norm, i, start, stop, block, row_steps)
                    values[name, norm] = block[name] * weights if weights is not None else block[name]
                return values[name, norm]

            if sums:
                positions = index.positions(block["sample_id"])
                for (order, norm), acc in summed.items():
                    acc.add(positions, normalized(f"value_{order}", norm))
            if phases:
                for (window, order, by_source, norm), table in tables.items():
                    table.add(table.phases_of(i, steps.numbers)[row_steps], normalized(f"value_{order}", norm),
                              block["source"] if by_source else None)
        return ({spec: _read_only(acc.finish()) for spec, acc in summed.items()},
                {spec: self._phase_values(table, spec[2], spec[3]) for spec, table in tables.items()})

    def _per_val_sums(self, name: str, normalize: str, index: IdIndex) -> np.ndarray:
        n_val = self._record_specs[name].shape[0]
        sums = np.zeros((n_val, index.size))
        counts = np.zeros((n_val, index.size)) if normalize == "count" else None
        for _, _, values, block in self._values_blocks(name, normalize, ["sample_id"]):
            pos = index.positions(block["sample_id"])
            for j in range(n_val):
                recorded = ~np.isnan(values[:, j])
                np.add.at(sums[j], pos[recorded], values[recorded, j])
                if counts is not None:
                    np.add.at(counts[j], pos[recorded], 1.0)
        return _read_only((_mean(sums, counts) if counts is not None else sums).T)

    def step_values(self, t: int, order: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, values)`` of optimizer step ``t``'s batch, all ranks concatenated (rank 0 first), record order.

        O(1) per call: each file's steps are indexed by step number once; only the step's rows are read."""
        name = self._value_column_name(order)
        if name not in self._record_specs:
            self._check_recorded(order)  # raises a clear error
        ids, values = [], []
        for i, f in enumerate(self._files):
            steps = self._file_steps(i)
            row = steps.find(int(t))
            if row is None:
                continue
            start = int(steps.row_start[row])
            stop = start + int(steps.n_samples[row])
            ids.append(self._record_rows(i, "sample_id", start, stop))
            values.append(self._record_rows(i, name, start, stop))
        if not ids:
            raise KeyError(f"step {t} was not recorded; this run recorded {self.num_steps} steps "
                           f"(numbers {self._step_range()})")
        ids_all, values_all = np.concatenate(ids), np.concatenate(values)
        if values_all.size and np.isnan(values_all).all():
            self._check_recorded(order)  # raises when the whole run lacks this order
        return ids_all, values_all

    def _record_rows(self, i: int, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of record column ``name`` of file ``i``, through a kept dataset handle (a finished
        store: no group lookup per call) or, for a store still being written, through the file's fresh view."""
        f = self._files[i]
        if getattr(f, "live", False):
            return f.record_column(name, start, stop)
        return self._cached(("dataset", i, name), lambda: f.file["records"][name])[start:stop]

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
        self._check_normalize(normalize)
        self._check_recorded(order)
        return self._cached(("phases", window, order, by_source, normalize),
                            lambda: self._accumulate([], [(window, order, by_source, normalize)])[1][
                                window, order, by_source, normalize], keep=4)

    def _phase_values(self, table: "_PhaseSums", by_source: bool, normalize: str) -> PhaseValues:
        n_phases, window = table.sums.shape[1], table.window
        starts = np.arange(n_phases, dtype=np.int64) * window
        sources, sums, counts = table.sources, table.sums, table.counts
        if not by_source:
            total = sums[0] if sources.size else np.zeros(n_phases)
            count = counts[0] if sources.size else np.zeros(n_phases)
            return PhaseValues(window, starts, _finish(total, count, normalize), count)
        names = self.source_names or []
        source_ids = np.union1d(np.arange(len(names)), sources).astype(np.int64)
        labels = [names[s] if 0 <= s < len(names) else UNLABELLED if s == -1 else f"source {s}"
                  for s in source_ids.tolist()]
        rows = np.searchsorted(sources, source_ids)
        present = np.isin(source_ids, sources)
        table_out, count = np.zeros((n_phases, source_ids.size)), np.zeros((n_phases, source_ids.size))
        table_out[:, present], count[:, present] = sums[rows[present]].T, counts[rows[present]].T
        return PhaseValues(window, starts, _finish(table_out, count, normalize), count, source_ids, labels)

    def _num_phases(self, window: int) -> int:
        last = max((int(f.step_column("step")[-1]) for f in self._files if f.committed_steps), default=-1)
        return last // window + 1

    def top_k(self, k: int, order: int = 1, normalize: str = "none") -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` samples with the highest values, best first: ``(ids, values)`` (ties: lower id first).

        A partial selection (``np.argpartition``) over the per-id sums, then a sort of the ``k`` picked."""
        k = _check_k(k)
        self._check_normalize(normalize)
        self._check_recorded(order)
        values = self._sample_sums(order, normalize)
        pick = _best(values, k, largest=True)
        return self._id_index().ids_at(pick), values[pick]

    def bottom_k(self, k: int, order: int = 1, normalize: str = "none") -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` samples with the lowest values, worst first: ``(ids, values)`` (ties: lower id first)."""
        k = _check_k(k)
        self._check_normalize(normalize)
        self._check_recorded(order)
        values = self._sample_sums(order, normalize)
        pick = _best(values, k, largest=False)
        return self._id_index().ids_at(pick), values[pick]

    # -- answers for test points chosen after training -------------------------------------------------------------

    def trajectory_loo(self, model, loss_fn, test_batch, **options) -> np.ndarray:
        """Data value embedding estimates of trajectory-specific leave-one-out, ``[n_ids, n_test]`` in the order of
        ``sample_ids`` (positive = helped); see :func:`inrun.posthoc.trajectory_loo` for the options."""
        return _posthoc().trajectory_loo(self, model, loss_fn, test_batch, **options)

    def posthoc_values(self, model, loss_fn, test_batch, **options):
        """First- and second-order In-Run Shapley values for test points chosen after training (from projected
        gradients and model checkpoints); see :func:`inrun.posthoc.posthoc_values`."""
        return _posthoc().posthoc_values(self, model, loss_fn, test_batch, **options)

    # -- closing ----------------------------------------------------------------------------------------------------

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


class _IdSums:
    """Per-id sums (and with ``count`` occurrence counts) of streamed values; NaN values are not recorded."""

    def __init__(self, n: int, count: bool):
        self.sums = np.zeros(n)
        self.counts = np.zeros(n) if count else None

    def add(self, positions: np.ndarray, values: np.ndarray) -> None:
        recorded = ~np.isnan(values)
        if not recorded.all():
            positions, values = positions[recorded], values[recorded]
        np.add.at(self.sums, positions, values)
        if self.counts is not None:
            np.add.at(self.counts, positions, 1.0)

    def finish(self) -> np.ndarray:
        return _mean(self.sums, self.counts) if self.counts is not None else self.sums


class _PhaseSums:
    """Sums and counts of streamed values per (source label, phase of ``window`` steps); the rows of ``sums`` are
    the labels seen (``sources``, ascending; one row 0 when not split by source)."""

    def __init__(self, window: int, n_phases: int):
        self.window = window
        self._phases: dict[int, np.ndarray] = {}
        self.sources = np.zeros(0, np.int64)
        self.sums, self.counts = np.zeros((0, n_phases)), np.zeros((0, n_phases))

    def phases_of(self, file: int, step_numbers: np.ndarray) -> np.ndarray:
        """The phase of each step of a file's steps table (kept per file)."""
        if file not in self._phases:
            self._phases[file] = step_numbers // self.window
        return self._phases[file]

    def add(self, phase: np.ndarray, values: np.ndarray, labels: np.ndarray | None) -> None:
        """Add ``values`` (NaN: not recorded) of records in phases ``phase`` with source ``labels`` (or None)."""
        recorded = ~np.isnan(values)
        if not recorded.all():
            phase, values = phase[recorded], values[recorded]
            labels = labels[recorded] if labels is not None else None
        if not values.size:
            return
        n_phases = self.sums.shape[1]
        if labels is None:
            self._grow(np.zeros(1, np.int64))
            key = phase
        else:
            low, high = int(labels.min()), int(labels.max())
            if high - low < 1 << 16:  # few labels (the usual case): found by counting, mapped by a lookup table
                offsets = labels - labels.dtype.type(low)
                self._grow(np.flatnonzero(np.bincount(offsets)) + low)
                key = (np.searchsorted(self.sources, np.arange(low, high + 1)) * n_phases)[offsets]
            else:
                self._grow(np.unique(labels).astype(np.int64))
                key = np.searchsorted(self.sources, labels) * n_phases
            key += phase
        np.add.at(self.sums.reshape(-1), key, values)
        self.counts += np.bincount(key, minlength=self.counts.size).reshape(self.counts.shape)

    def _grow(self, seen: np.ndarray) -> None:
        """Make room for the labels ``seen`` (rows kept in label order)."""
        if np.isin(seen, self.sources).all():
            return
        grown = np.union1d(self.sources, seen)
        rows = np.searchsorted(grown, self.sources)
        self.sums, self.counts = (_grow_rows(a, rows, grown.size) for a in (self.sums, self.counts))
        self.sources = grown


def _grow_rows(table: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """``table`` with its rows moved to ``rows`` of a zero table of ``n`` rows."""
    grown = np.zeros((n, *table.shape[1:]), table.dtype)
    grown[rows] = table
    return grown


def _best(values: np.ndarray, k: int, largest: bool) -> np.ndarray:
    """Positions of the ``k`` largest (or smallest) ``values``, best first, ties by lower position (= lower id),
    NaN last. Selected chunk by chunk (each chunk's best ``k`` by ``np.argpartition``, then the best of those), so
    the temporaries are one chunk and ``k`` candidates per chunk, never a sort or a copy of all values."""
    candidates, keys = [], []
    for start in range(0, values.size, BLOCK_ROWS):
        chunk = values[start:start + BLOCK_ROWS]
        key = np.where(np.isnan(chunk), -np.inf, chunk) if largest else -np.where(np.isnan(chunk), np.inf, chunk)
        if k < key.size:
            kth = key[np.argpartition(key, key.size - k)[key.size - k]] if k else np.inf
            above = np.flatnonzero(key > kth)
            picked = np.concatenate([above, np.flatnonzero(key == kth)[: k - above.size]])
        else:
            picked = np.arange(key.size)
        candidates.append(picked + start)
        keys.append(key[picked])
    if not candidates:
        return np.zeros(0, np.intp)
    position, key = np.concatenate(candidates), np.concatenate(keys)
    return position[np.lexsort((position, -key))[:k]]


# ----------------------------------------------------------------------------------------------------------- helpers


def _posthoc():
    """The post-hoc package, imported on first use: the one place the store reaches above itself, so that reading a
    run needs neither torch nor the post-hoc code unless one of its methods is called."""
    import importlib

    return importlib.import_module("inrun.posthoc")


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


__all__ = ["open_run", "find_rank_files", "Run", "PhaseValues", "IdIndex", "NORMALIZATIONS"]
