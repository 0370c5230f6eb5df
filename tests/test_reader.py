"""Reading runs: per-sample, per-step and per-phase values against plain references; multi-rank discovery; errors."""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import h5py
import numpy as np
import pytest

import inrun
from inrun.store.paths import rank_path
from inrun.store.reader import PhaseValues, find_rank_files, open_run
from inrun.store.schema import DEFAULT_RECORD_COLUMNS, DEFAULT_STEP_COLUMNS, IncompatibleStoreError
from inrun.store.writer import RunWriter

PER_VAL = DEFAULT_RECORD_COLUMNS | {"value_1_per_val": (np.float32, (2,))}


def make_steps(seed: int, n_steps: int = 12, n_ids: int = 15, order_2: bool = True) -> list[tuple[dict, dict]]:
    """Random steps: ids repeat within a step and across steps; some values and norms are special (NaN, 0)."""
    rng = np.random.default_rng(seed)
    steps = []
    for t in range(n_steps):
        n = int(rng.integers(0, 7))
        records = {
            "sample_id": rng.integers(0, n_ids, n),
            "value_1": rng.normal(size=n),
            "value_2": rng.normal(size=n) if order_2 else np.full(n, np.nan),
            "grad_norm_sq": rng.uniform(0.5, 2.0, n),
            "source": rng.integers(-1, 3, n),
            "value_1_per_val": rng.normal(size=(n, 2)).astype(np.float32),
        }
        if n >= 3:
            records["value_1"][0] = np.nan  # not recorded for this occurrence
            records["grad_norm_sq"][1] = 0.0  # guarded to weight 0 under normalize="grad_norm"
        steps.append(({"lr": 0.0 if t == 3 else 0.1 * (t + 1)}, records))
    return steps


def write_run(path: Path, steps: list[tuple[dict, dict]], run_id: str = "run-r", rank: int = 0,
              world_size: int = 1, source_names: list[str] | None = None, flush_every: int = 5) -> Path:
    with RunWriter(path, run_id=run_id, rank=rank, world_size=world_size, record_columns=PER_VAL,
                   flush_every=flush_every, config={"shapley_order": 2}) as w:
        for row, records in steps:
            w.append_step(row, records)
        if source_names:
            w.write_static("sources/names", source_names)
    return path


def occurrences(*rank_steps: list[tuple[dict, dict]]) -> list[dict]:
    """Every record as a plain dict (rank order, then step order): the input of the loop references below."""
    rows = []
    for steps in rank_steps:
        for t, (row, records) in enumerate(steps):
            for i in range(len(records["sample_id"])):
                rows.append({"step": t, "lr": row["lr"], **{k: v[i] for k, v in records.items()}})
    return rows


def reference_sample_values(rows: list[dict], order: int = 1, normalize: str = "none") -> dict[int, float]:
    sums, counts = defaultdict(float), defaultdict(int)
    for r in rows:
        sid = int(r["sample_id"])
        sums[sid] += 0.0
        value = float(r[f"value_{order}"])
        if np.isnan(value):
            continue
        if normalize == "lr":
            value = 0.0 if r["lr"] == 0 else value / r["lr"]
        if normalize == "grad_norm":
            value = 0.0 if r["grad_norm_sq"] == 0 else value / np.sqrt(r["grad_norm_sq"])
        sums[sid] += value
        counts[sid] += 1
    if normalize == "count":
        return {k: (sums[k] / counts[k] if counts[k] else np.nan) for k in sums}
    return dict(sums)


def assert_matches(ids: np.ndarray, values: np.ndarray, reference: dict[int, float]) -> None:
    assert ids.tolist() == sorted(reference)
    np.testing.assert_allclose(values, [reference[i] for i in ids.tolist()], rtol=1e-12, atol=1e-12)


@pytest.fixture
def one_rank(tmp_path):
    steps = make_steps(0)
    return write_run(tmp_path / "run.h5", steps, source_names=["web", "books", "code"]), steps


# --------------------------------------------------------------------------------------------------------- values


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("normalize", ["none", "lr", "grad_norm", "count"])
def test_sample_values_match_a_loop_reference(one_rank, order, normalize):
    path, steps = one_rank
    with inrun.open_run(path) as run:
        ids, values = run.sample_values(order=order, normalize=normalize)
        assert_matches(ids, values, reference_sample_values(occurrences(steps), order, normalize))
        np.testing.assert_array_equal(run.sample_ids, ids)


def test_per_val_sums(one_rank):
    path, steps = one_rank
    rows = occurrences(steps)
    with open_run(path) as run:
        ids, values = run.sample_values(per_val=True)
    assert values.shape == (len(ids), 2)
    for j in range(2):
        reference = reference_sample_values([dict(r, value_1=r["value_1_per_val"][j]) for r in rows])
        assert_matches(ids, values[:, j], reference)


def test_step_values_in_record_order(one_rank):
    path, steps = one_rank
    with open_run(path) as run:
        assert run.num_steps == len(steps)
        for t, (_, records) in enumerate(steps):
            ids, values = run.step_values(t)
            np.testing.assert_array_equal(ids, records["sample_id"])
            np.testing.assert_array_equal(values, records["value_1"])
            np.testing.assert_array_equal(run.step_values(t, order=2)[1], records["value_2"])
        with pytest.raises(KeyError, match="step 99 was not recorded"):
            run.step_values(99)


def test_order_2_not_recorded_is_a_clear_error(tmp_path):
    path = write_run(tmp_path / "run.h5", make_steps(1, order_2=False))
    with open_run(path) as run:
        with pytest.raises(ValueError, match="no second-order values.*shapley='second'"):
            run.sample_values(order=2)
        with pytest.raises(ValueError, match="no second-order values"):
            run.step_values(2, order=2)
        with pytest.raises(ValueError, match="order must be 1"):
            run.sample_values(order=3)
        with pytest.raises(ValueError, match="normalize must be one of"):
            run.sample_values(normalize="softmax")


def test_phase_values_without_and_with_sources(one_rank):
    path, steps = one_rank
    rows = [r for r in occurrences(steps) if not np.isnan(r["value_1"])]
    with open_run(path) as run:
        phases = run.phase_values(window=5)
        assert isinstance(phases, PhaseValues)
        np.testing.assert_array_equal(phases.phase_starts, [0, 5, 10])
        expected = np.zeros(3)
        counts = np.zeros(3)
        for r in rows:
            expected[r["step"] // 5] += r["value_1"]
            counts[r["step"] // 5] += 1
        np.testing.assert_allclose(phases.values, expected, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(phases.counts, counts)
        assert phases.source_names is None

        by_source = run.phase_values(window=5, by_source=True, normalize="count")
        assert by_source.source_ids.tolist() == [-1, 0, 1, 2]
        assert by_source.source_names == ["unlabelled", "web", "books", "code"]
        sums, counts = np.zeros((3, 4)), np.zeros((3, 4))
        for r in rows:
            sums[r["step"] // 5, r["source"] + 1] += r["value_1"]
            counts[r["step"] // 5, r["source"] + 1] += 1
        with np.errstate(invalid="ignore"):
            np.testing.assert_allclose(by_source.values, sums / counts, rtol=1e-12, atol=1e-12)
        assert run.source_names == ["web", "books", "code"]


def test_phases_name_unnamed_sources(tmp_path):
    steps = [({"lr": 0.1}, {"sample_id": np.arange(3), "value_1": np.ones(3), "source": np.array([0, 4, 4])})]
    with RunWriter(tmp_path / "run.h5") as w:
        w.append_step(*steps[0])
    with open_run(tmp_path / "run.h5") as run:
        phases = run.phase_values(window=10, by_source=True)
        assert phases.source_names == ["source 0", "source 4"]
        np.testing.assert_array_equal(phases.values, [[1.0, 2.0]])
        assert run.source_names is None


def test_top_and_bottom_k(one_rank):
    path, steps = one_rank
    reference = reference_sample_values(occurrences(steps))
    ranked = sorted(reference, key=lambda i: (-reference[i], i))
    with open_run(path) as run:
        ids, values = run.top_k(4)
        assert ids.tolist() == ranked[:4]
        np.testing.assert_allclose(values, [reference[i] for i in ranked[:4]])
        ids, _ = run.bottom_k(3)
        assert ids.tolist() == sorted(reference, key=lambda i: (reference[i], i))[:3]
        assert len(run.top_k(1000)[0]) == len(reference)
        with pytest.raises(ValueError, match="k must be"):
            run.top_k(-1)


def test_tables_config_and_metadata(one_rank):
    path, steps = one_rank
    with open_run(path) as run:
        assert run.config == {"shapley_order": 2}
        assert run.coverage == {}
        assert (run.schema_version, run.world_size, run.run_id) == (1, 1, "run-r")
        assert run.inrun_version == inrun.__version__
        table = run.steps
        np.testing.assert_array_equal(table["lr"], [row["lr"] for row, _ in steps])
        np.testing.assert_array_equal(table["n_samples"], [len(r["sample_id"]) for _, r in steps])
        assert "row_start" not in table
        records = run.records(["sample_id", "value_1_per_val", "rank"])
        np.testing.assert_array_equal(records["sample_id"], np.concatenate([r["sample_id"] for _, r in steps]))
        assert records["value_1_per_val"].shape == (run.num_records, 2)
        assert (records["rank"] == 0).all()
        assert set(run.records()) == set(PER_VAL)
        with pytest.raises(KeyError, match="no record column 'nope'"):
            run.records(["nope"])
        assert "num_steps=12" in repr(run)


def test_empty_run(tmp_path):
    RunWriter(tmp_path / "run.h5").close()
    with open_run(tmp_path / "run.h5") as run:
        assert run.num_steps == 0
        ids, values = run.sample_values()
        assert ids.size == 0 and values.size == 0
        assert run.phase_values(window=3).values.size == 0
        assert run.top_k(3)[0].size == 0


def test_reader_ignores_rows_past_the_commit(tmp_path):
    steps = make_steps(2)
    path = write_run(tmp_path / "run.h5", steps)
    with h5py.File(path, "r+") as f:  # a crash after writing a block, before committing it
        for table in ("steps", "records"):
            for ds in f[table].values():
                ds.resize(ds.shape[0] + 4, axis=0)
                ds[-4:] = 3
    with open_run(path) as run:
        assert run.num_steps == len(steps)
        assert_matches(*run.sample_values(), reference_sample_values(occurrences(steps)))


def test_ids_that_are_not_small_indices(tmp_path):
    ids = np.array([-5, 10**15, 7, -5, 10**15])
    with RunWriter(tmp_path / "run.h5") as w:
        w.append_step({}, {"sample_id": ids, "value_1": np.arange(5.0)})
    with open_run(tmp_path / "run.h5") as run:
        got_ids, values = run.sample_values()
    assert got_ids.tolist() == [-5, 7, 10**15]
    np.testing.assert_array_equal(values, [3.0, 2.0, 5.0])


# ----------------------------------------------------------------------------------------------------- multi-rank


@pytest.fixture
def two_ranks(tmp_path):
    folder = tmp_path / "runs"
    rank_steps = [make_steps(10), make_steps(11)]
    for rank, steps in enumerate(rank_steps):
        write_run(rank_path(folder / "run.h5", rank, 2), steps, rank=rank, world_size=2)
    return folder, rank_steps


@pytest.mark.parametrize("how", ["folder", "prefix", "prefix.h5", "glob prefix"])
def test_multi_rank_runs_open_from_folder_or_prefix(two_ranks, how):
    folder, rank_steps = two_ranks
    target = {"folder": folder, "prefix": folder / "run", "prefix.h5": folder / "run.h5",
              "glob prefix": folder / "ru"}[how]
    with open_run(target) as run:
        assert run.world_size == 2 and run.paths == [folder / "run.rank0.h5", folder / "run.rank1.h5"]
        assert run.num_steps == 12
        assert_matches(*run.sample_values(), reference_sample_values(occurrences(*rank_steps)))
        t = 4
        ids, values = run.step_values(t)
        np.testing.assert_array_equal(ids, np.concatenate([s[t][1]["sample_id"] for s in rank_steps]))
        np.testing.assert_array_equal(values, np.concatenate([s[t][1]["value_1"] for s in rank_steps]))
        np.testing.assert_array_equal(run.steps["n_samples"],
                                      [len(a[1]["sample_id"]) + len(b[1]["sample_id"]) for a, b in zip(*rank_steps)])
        ranks = run.records(["rank"])["rank"]
        assert ranks.tolist() == [0] * sum(len(r["sample_id"]) for _, r in rank_steps[0]) + \
            [1] * sum(len(r["sample_id"]) for _, r in rank_steps[1])


def test_run_level_steps_sum_ranks_and_residuals(tmp_path):
    """Each file's residual is its own values' sum minus the step's utility; the run-level one covers all ranks."""
    columns = DEFAULT_STEP_COLUMNS | {"sum_value_1": (np.float64, ())}
    rng = np.random.default_rng(5)
    utility = rng.normal(size=4)
    values = [[rng.normal(size=int(rng.integers(1, 4))) for _ in range(4)] for _ in range(2)]
    for rank in range(2):
        with RunWriter(rank_path(tmp_path / "run.h5", rank, 2), run_id="r", rank=rank, world_size=2,
                       step_columns=columns) as w:
            for t, v in enumerate(values[rank]):
                w.append_step({"sum_value_1": v.sum(), "residual_1": v.sum() - utility[t]},
                              {"sample_id": np.arange(len(v)), "value_1": v})
    total = np.array([values[0][t].sum() + values[1][t].sum() for t in range(4)])
    with open_run(tmp_path / "run.h5") as run:
        steps = run.steps
    np.testing.assert_allclose(steps["sum_value_1"], total, rtol=1e-12)
    np.testing.assert_allclose(steps["residual_1"], total - utility, rtol=1e-12, atol=1e-12)
    assert np.isnan(steps["residual_2"]).all()  # not known stays not known


def test_missing_rank_is_named(two_ranks):
    folder, _ = two_ranks
    (folder / "run.rank1.h5").unlink()
    with pytest.raises(FileNotFoundError, match=r"rank\(s\) \[1\] are missing"):
        open_run(folder)
    with pytest.raises(FileNotFoundError, match=r"rank\(s\) \[1\]"):
        open_run(folder / "run.rank0.h5")  # a single rank's file of a two-rank run


def test_foreign_file_is_named(two_ranks):
    folder, _ = two_ranks
    write_run(folder / "other.h5", make_steps(3), run_id="another-run")
    with pytest.raises(IncompatibleStoreError, match=r"other.h5 belong\(s\) to another run than .*run.rank0.h5"):
        open_run(folder)
    with open_run(folder / "run") as run:  # the prefix still picks out one run
        assert run.world_size == 2


def test_duplicate_rank_is_an_error(two_ranks):
    folder, _ = two_ranks
    (folder / "copy.h5").write_bytes((folder / "run.rank1.h5").read_bytes())
    with pytest.raises(IncompatibleStoreError, match="both hold rank 1"):
        open_run(folder)


# ------------------------------------------------------------------------------------------------ bad paths, files


def test_nothing_at_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run store at"):
        open_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no run store"):
        open_run(tmp_path / "empty")


def test_newer_schema_asks_to_upgrade(tmp_path):
    path = write_run(tmp_path / "run.h5", make_steps(4))
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 2
        f.attrs["inrun_version"] = "9.0.0"
    with pytest.raises(IncompatibleStoreError,
                       match=r"written by inrun 9.0.0 with schema 2; this inrun \(.*\) reads up to schema 1; upgrade"):
        open_run(path)


def test_not_an_inrun_file(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(IncompatibleStoreError, match="not an inrun run store"):
        open_run(path)
    junk = tmp_path / "junk.h5"
    junk.write_text("not hdf5")
    with pytest.raises(OSError, match="junk.h5"):
        open_run(junk)


def test_find_rank_files_prefers_rank_files(tmp_path):
    for name in ("run.rank0.h5", "run.rank1.h5", "run2.h5"):
        (tmp_path / name).touch()
    assert [p.name for p in find_rank_files(tmp_path / "run")] == ["run.rank0.h5", "run.rank1.h5"]
    assert [p.name for p in find_rank_files(tmp_path / "run2")] == ["run2.h5"]


# --------------------------------------------------------------------------------------------------------- scale


def test_two_million_records_against_a_sorting_reference(tmp_path):
    rng = np.random.default_rng(7)
    n_steps, batch, n_ids = 200, 10_000, 300_000
    ids = rng.integers(0, n_ids, (n_steps, batch))
    values = rng.normal(size=(n_steps, batch))
    path = tmp_path / "big.h5"
    with RunWriter(path, flush_every=50, compression=None) as w:
        for t in range(n_steps):
            w.append_step({"lr": 0.1}, {"sample_id": ids[t], "value_1": values[t]})

    start = time.perf_counter()
    with open_run(path) as run:
        got_ids, got_values = run.sample_values()
        top_ids, _ = run.top_k(10)
        phases = run.phase_values(window=20)
    elapsed = time.perf_counter() - start

    flat_ids, flat_values = ids.ravel(), values.ravel()  # reference: sort, then sum runs of equal ids
    order = np.argsort(flat_ids, kind="stable")
    sorted_ids = flat_ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    np.testing.assert_array_equal(got_ids, sorted_ids[starts])
    np.testing.assert_allclose(got_values, np.add.reduceat(flat_values[order], starts), rtol=1e-9, atol=1e-9)
    assert set(top_ids.tolist()) <= set(got_ids.tolist())
    np.testing.assert_allclose(phases.values, values.reshape(10, -1).sum(axis=1), rtol=1e-9)
    assert elapsed < 10, f"reading 2M records took {elapsed:.1f}s"


# ------------------------------------------------------------------------------------------------ streamed reading

PER_VAL_2 = PER_VAL | {"value_2_per_val": (np.float32, (2,))}


def write_sparse_rank(path: Path, seed: int, rank: int, world_size: int, ids_pool: np.ndarray,
                      compression: str | None = "gzip") -> dict:
    """A rank file with ids drawn from ``ids_pool`` (hashed-looking int64 ids), returning its raw columns."""
    rng = np.random.default_rng(seed)
    raw = {k: [] for k in ("step", "lr", "sample_id", "value_1", "value_2", "grad_norm_sq", "source",
                           "value_1_per_val", "value_2_per_val")}
    with RunWriter(path, run_id="sparse", rank=rank, world_size=world_size, record_columns=PER_VAL_2,
                   flush_every=3, compression=compression) as w:
        for t in range(9):
            n = int(rng.integers(0, 9))
            records = {
                "sample_id": rng.choice(ids_pool, n),
                "value_1": np.round(rng.normal(size=n), 1),  # rounded: ties in top_k
                "value_2": rng.normal(size=n),
                "grad_norm_sq": rng.uniform(0.5, 2.0, n),
                "source": rng.integers(-1, 5, n).astype(np.int32),
                "value_1_per_val": rng.normal(size=(n, 2)).astype(np.float32),
                "value_2_per_val": rng.normal(size=(n, 2)).astype(np.float32),
            }
            if n >= 2:
                records["value_1"][1] = np.nan
                records["value_1_per_val"][0, 1] = np.nan
            lr = 0.0 if t == 2 else 0.05 * (t + 1)
            w.append_step({"lr": lr}, records)
            for k, v in records.items():
                raw[k].append(v)
            raw["step"].append(np.full(n, t))
            raw["lr"].append(np.full(n, lr))
    return {k: np.concatenate(v) for k, v in raw.items()}


@pytest.fixture(params=["bitmap", "bitmap-streamed", "sorted"])
def sparse_run(tmp_path, monkeypatch, request):
    """Two ranks, ids from a sparse pool (up to 2**62) or a compact one, read in blocks of 5 rows. "bitmap": the
    bitmaps the close-time compression stored with each rank file; "bitmap-streamed": uncompressed files without
    them, the bitmap built by a pass over the ids."""
    import inrun.store.reader as reader

    monkeypatch.setattr(reader, "BLOCK_ROWS", 5)
    rng = np.random.default_rng(3)
    if request.param == "sorted":
        pool = np.r_[rng.integers(-(2**62), 2**62, 20), 2**62, -(2**62)]
    else:
        pool = rng.choice(400, 25, replace=False) - 100
    compression = None if request.param == "bitmap-streamed" else "gzip"
    raws = [write_sparse_rank(rank_path(tmp_path / "run.h5", r, 2), 20 + r, r, 2, pool, compression)
            for r in range(2)]
    raw = {k: np.concatenate([r[k] for r in raws]) for k in raws[0]}
    with open_run(tmp_path / "run.h5") as run:
        assert run._id_index().kind == request.param.split("-")[0]
        stored = [f.id_bitmap() is not None for f in run._files]
        assert stored == [request.param == "bitmap"] * 2
        yield run, raw, raws


def plain_sums(raw: dict, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference over the raw columns with plain numpy: unique ids, per-id sums and counts of non-NaN values."""
    ids, inverse = np.unique(raw["sample_id"], return_inverse=True)
    recorded = ~np.isnan(values)
    sums = np.bincount(inverse[recorded], weights=values[recorded], minlength=ids.size)
    return ids, sums, np.bincount(inverse[recorded], minlength=ids.size).astype(float)


@pytest.mark.parametrize("normalize", ["none", "lr", "grad_norm", "count"])
@pytest.mark.parametrize("order", [1, 2])
def test_streamed_sums_match_plain_numpy(sparse_run, order, normalize):
    run, raw, _ = sparse_run
    values = raw[f"value_{order}"].copy()
    if normalize == "lr":
        values = np.where(raw["lr"] == 0, 0.0, values / np.where(raw["lr"] == 0, 1, raw["lr"]))
    if normalize == "grad_norm":
        values = values / np.sqrt(raw["grad_norm_sq"])
    ids, sums, counts = plain_sums(raw, values)
    if normalize == "count":
        with np.errstate(invalid="ignore"):
            sums = np.where(counts > 0, sums / counts, np.nan)
    got_ids, got = run.sample_values(order=order, normalize=normalize)
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_allclose(got, sums, rtol=1e-12, atol=1e-12)
    counted_ids, occurrences = run.sample_counts()
    np.testing.assert_array_equal(occurrences, np.unique(raw["sample_id"], return_counts=True)[1])


def test_streamed_top_k_breaks_ties_by_id(sparse_run):
    run, raw, _ = sparse_run
    ids, sums, _ = plain_sums(raw, raw["value_1"])
    for k in (0, 1, 3, 7, len(ids), len(ids) + 5):
        best = sorted(range(len(ids)), key=lambda i: (-sums[i], ids[i]))[:k]
        worst = sorted(range(len(ids)), key=lambda i: (sums[i], ids[i]))[:k]
        assert run.top_k(k)[0].tolist() == ids[best].tolist()
        assert run.bottom_k(k)[0].tolist() == ids[worst].tolist()
    assert len(set(np.round(sums, 6).tolist())) < len(ids)  # the data do hold ties


@pytest.mark.parametrize("by_source", [False, True])
def test_streamed_phases_match_plain_numpy(sparse_run, by_source):
    run, raw, _ = sparse_run
    recorded = ~np.isnan(raw["value_1"])
    phase = raw["step"][recorded] // 4
    values = raw["value_1"][recorded]
    phases = run.phase_values(window=4, by_source=by_source)
    if not by_source:
        np.testing.assert_allclose(phases.values, np.bincount(phase, weights=values, minlength=3), rtol=1e-12)
        return
    sources = np.unique(raw["source"])
    assert phases.source_ids.tolist() == sources.tolist()
    for j, s in enumerate(sources):
        mine = raw["source"][recorded] == s
        np.testing.assert_allclose(phases.values[:, j], np.bincount(phase[mine], weights=values[mine], minlength=3),
                                   rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(phases.counts[:, j], np.bincount(phase[mine], minlength=3))


def test_streamed_step_values_and_records(sparse_run):
    run, raw, raws = sparse_run
    for t in range(9):
        ids, values = run.step_values(t, order=2)
        np.testing.assert_array_equal(ids, np.concatenate([r["sample_id"][r["step"] == t] for r in raws]))
        np.testing.assert_array_equal(values, np.concatenate([r["value_2"][r["step"] == t] for r in raws]))
    records = run.records(["sample_id", "value_1_per_val", "rank"])
    np.testing.assert_array_equal(records["sample_id"], raw["sample_id"])
    np.testing.assert_array_equal(records["value_1_per_val"], raw["value_1_per_val"])
    blocks = list(run.iter_records(["step"], block_rows=4))
    assert max(len(b["step"]) for b in blocks) == 4
    np.testing.assert_array_equal(np.concatenate([b["step"] for b in blocks]), raw["step"])


@pytest.mark.parametrize("order", [1, 2])
def test_val_point_matrix_matches_plain_numpy(sparse_run, order):
    run, raw, _ = sparse_run
    got_ids, matrix = run.val_point_values(order=order)
    assert matrix.shape == (len(got_ids), 2)
    for j in range(2):
        ids, sums, counts = plain_sums(raw, raw[f"value_{order}_per_val"][:, j].astype(np.float64))
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_allclose(matrix[:, j], sums, rtol=1e-12, atol=1e-12)
    _, means = run.val_point_values(order=order, normalize="count")
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(means[:, 1], sums / counts, rtol=1e-12)


def test_val_point_matrix_not_recorded_is_a_clear_error(one_rank):
    path, _ = one_rank
    with open_run(path) as run:
        assert run.val_point_values(order=1)[1].shape[1] == 2
        with pytest.raises(ValueError, match="no per-validation-point values of order 2.*per_val_point=True and "
                                             "shapley='second'"):
            run.val_point_values(order=2)


@pytest.mark.parametrize("kind", ["bitmap", "sorted"])
def test_id_index_positions(kind, monkeypatch):
    import inrun.store.reader as reader

    if kind == "sorted":
        monkeypatch.setattr(reader, "BITMAP_MAX_IDS", 0)
    rng = np.random.default_rng(1)
    blocks = [rng.integers(100, 110, 5)] + [rng.integers(-70, 5000, int(rng.integers(0, 300))) for _ in range(13)]
    blocks.append(np.array([-700, 9000]))  # the bitmap widens on both sides, more than once
    index = reader.IdIndex.build(lambda: iter(blocks), sum(b.size for b in blocks))
    assert index.kind == kind
    everything = np.concatenate(blocks)
    np.testing.assert_array_equal(index.ids, np.unique(everything))
    np.testing.assert_array_equal(index.ids[index.positions(everything)], everything)
    fresh = reader.IdIndex.build(lambda: iter(blocks), sum(b.size for b in blocks))  # ids not drawn yet
    picks = np.random.default_rng(2).integers(0, fresh.size, 50)
    np.testing.assert_array_equal(fresh.ids_at(picks), np.unique(everything)[picks])
    assert fresh.size == np.unique(everything).size
    many = np.random.default_rng(3).permutation(np.repeat(everything, 3))  # >= 4096 keys: sorted-search path
    assert many.size >= 4096
    np.testing.assert_array_equal(np.unique(everything)[fresh.positions(many)], many)


@pytest.mark.parametrize("window", [3, 4])
def test_precompute_matches_separate_calls_and_reads_nothing_after(sparse_run, window, monkeypatch):
    run, raw, _ = sparse_run
    run.precompute((1, 2), window=window, by_source=True)

    def no_reads(*args, **kwargs):
        raise AssertionError("precompute should have kept this aggregate")

    with monkeypatch.context() as patch:
        patch.setattr(run, "_blocks", no_reads)
        kept = {order: (run.sample_values(order), run.top_k(4, order), run.bottom_k(3, order),
                        run.phase_values(window, order, by_source=True)) for order in (1, 2)}
        assert run.num_samples == np.unique(raw["sample_id"]).size
    with open_run(run.paths[0].parent) as fresh:  # the same answers one call at a time, each from its own pass
        for order, (values, top, bottom, phases) in kept.items():
            for got, want in zip((values, top, bottom),
                                 (fresh.sample_values(order), fresh.top_k(4, order), fresh.bottom_k(3, order))):
                np.testing.assert_array_equal(got[0], want[0])
                np.testing.assert_array_equal(got[1], want[1])
            want = fresh.phase_values(window, order, by_source=True)
            np.testing.assert_array_equal(phases.values, want.values)
            np.testing.assert_array_equal(phases.counts, want.counts)
            assert phases.source_names == want.source_names
    ids, sums, _ = plain_sums(raw, raw["value_2"])  # and against plain numpy
    np.testing.assert_allclose(kept[2][0][1], sums, rtol=1e-12, atol=1e-12)


def test_phases_with_labels_far_apart(tmp_path):
    """Source labels spread over a wide range (not a small table of labels) are summed per label all the same."""
    labels = np.array([5, 300_000, -1, 300_000, 5, -(2**31)], np.int32)
    values = np.array([1.0, 2.0, 4.0, 8.0, np.nan, 16.0])
    with RunWriter(tmp_path / "run.h5") as w:
        w.append_step({"lr": 0.1}, {"sample_id": np.arange(6), "value_1": values, "source": labels})
        w.append_step({"lr": 0.1}, {"sample_id": np.arange(2), "value_1": np.array([32.0, 64.0]),
                                    "source": np.array([300_000, 7], np.int32)})
    with open_run(tmp_path / "run.h5") as run:
        phases = run.phase_values(window=1, by_source=True)
    assert phases.source_ids.tolist() == [-(2**31), -1, 5, 7, 300_000]
    np.testing.assert_array_equal(phases.values, [[16.0, 4.0, 1.0, 0.0, 10.0], [0.0, 0.0, 0.0, 64.0, 32.0]])
    np.testing.assert_array_equal(phases.counts, [[1, 1, 1, 0, 2], [0, 0, 0, 1, 1]])


def test_stored_id_bitmap_is_used_only_when_it_covers_the_committed_rows(tmp_path, monkeypatch):
    """The bitmap kept at close spares the id pass; one that does not cover exactly the committed rows (written
    for other rows) is ignored and the ids are found by the pass."""
    from inrun.store import compression

    steps = make_steps(7, n_steps=20, n_ids=40)
    path = write_run(tmp_path / "run.h5", steps)
    expected = np.unique(np.concatenate([r["sample_id"] for _, r in steps]))
    with h5py.File(path, "r") as f:
        bits = f["index/sample_id_bits"]
        lo, words = int(bits.attrs["lo"]), bits[()]
    got = np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little")) + lo
    np.testing.assert_array_equal(got, expected)  # the stored bits, read without the reader
    with open_run(path) as run:
        calls = []
        monkeypatch.setattr(run, "_blocks", lambda columns: calls.append(columns) or iter(()))
        np.testing.assert_array_equal(run.sample_ids, expected)
        assert calls == []  # no pass over the ids
        monkeypatch.undo()
    with h5py.File(path, "r+") as f:
        f["index/sample_id_bits"].attrs["rows"] = 1  # as if written for other rows
    with open_run(path) as run:
        assert run._files[0].id_bitmap() is None
        np.testing.assert_array_equal(run.sample_ids, expected)
    compression.repack(path, None)  # uncompressed (as for a resume): the bitmap is dropped
    with h5py.File(path, "r") as f:
        assert "index" not in f


def test_rank_without_records_and_stored_bitmaps_merge(tmp_path):
    """Rank files' stored bitmaps are merged (rank 1 has no records: an empty bitmap) into the run's ids."""
    full = make_steps(11, n_steps=6, n_ids=300)
    empty = [(row, {k: v[:0] for k, v in records.items()}) for row, records in full]
    for rank, steps in enumerate([full, empty]):
        write_run(rank_path(tmp_path / "run.h5", rank, 2), steps, run_id="two", rank=rank, world_size=2)
    with open_run(tmp_path / "run.h5") as run:
        assert [f.id_bitmap() is not None for f in run._files] == [True, True]
        expected = np.unique(np.concatenate([r["sample_id"] for _, r in full]))
        np.testing.assert_array_equal(run.sample_ids, expected)
        top_ids, top_values = run.top_k(3)
        sums = {int(i): v for i, v in zip(*run.sample_values())}
        assert [sums[int(i)] for i in top_ids] == top_values.tolist()
