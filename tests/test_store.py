"""The run store writer: round trips, commit protocol under kill -9, resume, overwrite rules, write failures."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import inrun
from inrun.store import compression, writer
from inrun.store.paths import rank_path
from inrun.store.rankfile import RankFile
from inrun.store.schema import DEFAULT_RECORD_COLUMNS, DEFAULT_STEP_COLUMNS, IncompatibleStoreError, StoreIOError
from inrun.store.writer import RunWriter

EXTRA_RECORD_COLUMNS = {"per_val": (np.float32, (3,)), "emb": (np.float16, (2, 3))}
RECORD_COLUMNS = DEFAULT_RECORD_COLUMNS | EXTRA_RECORD_COLUMNS

# Deterministic data of step t, shared (as source text) with the kill -9 child process.
DATA_CODE = '''
import numpy as np

def step_data(t):
    n = (t * 7) % 5
    step_row = {"lr": 1.0 / (t + 1), "train_loss": float(t), "val_loss": 2.0 * t, "skipped": t % 2,
                "residual_1": -float(t)}
    records = {
        "sample_id": t * 10 + np.arange(n),
        "value_1": np.sin(t + np.arange(n)),
        "value_2": np.cos(t + np.arange(n)),
        "grad_norm_sq": np.arange(n) + 0.5 * t,
        "source": (np.arange(n) + t) % 3,
        "per_val": (t + np.arange(3 * n)).reshape(n, 3).astype(np.float32),
        "emb": (t - np.arange(6 * n)).reshape(n, 2, 3).astype(np.float16),
    }
    return step_row, records
'''
_namespace: dict = {}
exec(DATA_CODE, _namespace)
step_data = _namespace["step_data"]


def write_steps(writer: RunWriter, steps: range) -> None:
    for t in steps:
        writer.append_step(*step_data(t))


def expected_tables(steps: range) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """What the steps and records tables must hold after writing ``steps`` from a fresh file (independent of
    the writer: built from step_data directly)."""
    step_rows, record_rows = [], []
    for t in steps:
        row, records = step_data(t)
        record_rows.append(dict(records, step=np.full(len(records["sample_id"]), t)))
        step_rows.append(dict(row, step=t, n_samples=len(records["sample_id"])))
    n = np.array([r["n_samples"] for r in step_rows], dtype=np.int64)
    steps_table = {name: np.array([r[name] for r in step_rows]) for name in step_rows[0]}
    steps_table["row_start"] = np.concatenate([[0], np.cumsum(n)[:-1]])
    records_table = {name: np.concatenate([r[name] for r in record_rows]) for name in record_rows[0]}
    return steps_table, records_table


def assert_tables(path: Path, steps: range) -> None:
    exp_steps, exp_records = expected_tables(steps)
    with RankFile(path) as f:
        assert f.committed_steps == len(steps)
        for name, expected in exp_steps.items():
            got = f.step_column(name)
            np.testing.assert_array_equal(got, expected.astype(got.dtype), err_msg=name)
        for name, expected in exp_records.items():
            got = f.record_column(name)
            np.testing.assert_array_equal(got, expected.astype(got.dtype), err_msg=name)
        assert np.isnan(f.step_column("residual_2")).all()


def new_writer(path: Path, **kwargs) -> RunWriter:
    kwargs.setdefault("run_id", "run-a")
    kwargs.setdefault("record_columns", RECORD_COLUMNS)
    return RunWriter(path, **kwargs)


# ------------------------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("compression", ["gzip", "lzf", None])
def test_round_trip_over_several_flush_blocks(tmp_path, compression):
    path = tmp_path / "run.h5"
    with new_writer(path, flush_every=4, compression=compression) as w:
        write_steps(w, range(11))
        assert w.num_steps == 11 and w.committed_steps == 8  # 3 still buffered
    assert_tables(path, range(11))
    with h5py.File(path, "r") as f:
        assert f["records/emb"].shape == (sum((t * 7) % 5 for t in range(11)), 2, 3)
        assert f["records/value_1"].compression == compression
        assert f["records/emb"].chunks[1:] == (2, 3)


@settings(max_examples=20, deadline=None)
@given(sizes=st.lists(st.integers(0, 6), min_size=1, max_size=15), flush_every=st.integers(1, 5))
def test_round_trip_any_batch_sizes_and_flush_points(sizes, flush_every):
    columns = DEFAULT_RECORD_COLUMNS | {"vec": (np.float32, (2,))}
    rng = np.random.default_rng(len(sizes))
    ids = [rng.integers(0, 50, n) for n in sizes]
    vals = [rng.normal(size=n) for n in sizes]
    vecs = [rng.normal(size=(n, 2)).astype(np.float32) for n in sizes]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.h5"
        with RunWriter(path, record_columns=columns, flush_every=flush_every, compression=None) as w:
            for i, n in enumerate(sizes):
                w.append_step({"lr": 0.1}, {"sample_id": ids[i], "value_1": vals[i], "vec": vecs[i]})
        with RankFile(path) as f:
            np.testing.assert_array_equal(f.step_column("n_samples"), sizes)
            np.testing.assert_array_equal(f.step_column("row_start"), np.cumsum([0] + sizes)[:-1])
            np.testing.assert_array_equal(f.record_column("sample_id"), np.concatenate(ids))
            np.testing.assert_array_equal(f.record_column("value_1"), np.concatenate(vals))
            np.testing.assert_array_equal(f.record_column("vec"), np.concatenate(vecs))
            np.testing.assert_array_equal(f.record_column("step"), np.repeat(np.arange(len(sizes)), sizes))
            assert np.isnan(f.record_column("value_2")).all()
            assert (f.record_column("source") == -1).all()


def test_header_attributes(tmp_path):
    path = tmp_path / "run.h5"
    config, coverage = {"shapley": "first", "lr": 0.1}, {"steps": "all"}
    with new_writer(path, rank=1, world_size=2, config=config, coverage=coverage) as w:
        write_steps(w, range(3))
        w.set_coverage({"steps": "all", "layers": ["fc1"]})
    with h5py.File(path, "r") as f:
        a = f.attrs
        assert a["format"] == "inrun-run" and a["schema_version"] == 1
        assert a["inrun_version"] == inrun.__version__
        assert datetime.fromisoformat(a["created"]).tzinfo is not None
        assert (a["run_id"], a["rank"], a["world_size"]) == ("run-a", 1, 2)
        assert json.loads(a["config"]) == config
        assert json.loads(a["coverage"]) == {"steps": "all", "layers": ["fc1"]}
        assert (a["committed_steps"], a["committed_rows"]) == (3, sum((t * 7) % 5 for t in range(3)))
        assert f.id.get_create_plist().get_version()[0] < 3  # no superblock-v3 "open for write" flag


def test_byte_budget_commits_before_flush_every(tmp_path):
    with new_writer(tmp_path / "run.h5", flush_every=1000, max_buffer_bytes=1) as w:
        write_steps(w, range(5))
        assert w.committed_steps == 5


def test_context_manager_commits_finished_steps_when_an_error_escapes(tmp_path):
    path = tmp_path / "run.h5"
    with pytest.raises(RuntimeError, match="training broke"):
        with new_writer(path) as w:
            write_steps(w, range(3))
            raise RuntimeError("training broke")
    assert_tables(path, range(3))


def test_static_arrays_strings_and_groups(tmp_path):
    path = tmp_path / "run.h5"
    proj = np.random.default_rng(0).normal(size=(64, 300)).astype(np.float32)
    with new_writer(path) as w:
        w.write_static("projections/fc1", proj, attrs={"seed": 3, "shape": [64, 300]})
        w.write_static("sources/names", ["web", "books", "código"])
        w.write_static("projections", attrs={"kind": "kronecker"})
        w.write_static("sources/names", ["web", "books", "code"])  # replaces
        with pytest.raises(ValueError, match="outside 'steps' and 'records'"):
            w.write_static("records/extra", proj)
    with RankFile(path) as f:
        np.testing.assert_array_equal(f.static("projections/fc1"), proj)
        assert list(f.static("sources/names")) == ["web", "books", "code"]
        assert f.file["projections"].attrs["kind"] == "kronecker"
        assert json.loads(f.file["projections/fc1"].attrs["shape"]) == [64, 300]
        assert f.has_static("sources/names") and not f.has_static("sources/other")


def test_rank_path_naming():
    assert rank_path("runs/run.h5", 0, 1) == Path("runs/run.h5")
    assert rank_path("runs/run.h5", 1, 2) == Path("runs/run.rank1.h5")
    assert rank_path("runs/run", 0, 4) == Path("runs/run.rank0.h5")


# -------------------------------------------------------------------------------------------------------- validation


def test_rows_are_validated_before_anything_is_buffered(tmp_path):
    with new_writer(tmp_path / "run.h5") as w:
        with pytest.raises(ValueError, match="share one length"):
            w.append_step({}, {"sample_id": np.arange(3), "value_1": np.ones(2)})
        with pytest.raises(KeyError, match="not in"):
            w.append_step({}, {"sample_id": np.arange(3), "valeu_1": np.ones(3)})
        with pytest.raises(KeyError, match="not in"):
            w.append_step({"learning_rate": 0.1}, {"sample_id": np.arange(3)})
        with pytest.raises(ValueError, match="filled by the writer"):
            w.append_step({"n_samples": 3}, {"sample_id": np.arange(3)})
        with pytest.raises(KeyError, match="sample_id"):
            w.append_step({}, {"value_1": np.ones(3)})
        with pytest.raises(ValueError, match=r"needs shape \(3, 2, 3\)"):
            w.append_step({}, {"sample_id": np.arange(3), "emb": np.ones((3, 6))})
        assert w.num_steps == 0
        w.append_step({"step": 5}, {"sample_id": np.arange(3)})
        with pytest.raises(ValueError, match="truncate_to_step"):
            w.append_step({"step": 5}, {"sample_id": np.arange(3)})
        assert w.append_step({}, {"sample_id": np.arange(1)}) == 6


def test_column_specs_are_checked():
    with pytest.raises(ValueError, match="needs the columns"):
        RunWriter("unused.h5", step_columns={"lr": (np.float64, ())})
    with pytest.raises(TypeError, match="not supported"):
        RunWriter("unused.h5", record_columns=DEFAULT_RECORD_COLUMNS | {"name": (str, ())})
    assert not Path("unused.h5").exists()


# ------------------------------------------------------------------------------------------ creation and overwrite


def test_refuses_to_overwrite_and_says_how_to_fix(tmp_path):
    path = tmp_path / "run.h5"
    with new_writer(path) as w:
        write_steps(w, range(3))
    with pytest.raises(FileExistsError, match="overwrite=True") as err:
        new_writer(path)
    assert "resume=True" in str(err.value)
    assert_tables(path, range(3))  # untouched
    with new_writer(path, overwrite=True, run_id="run-b") as w:
        write_steps(w, range(2))
    assert_tables(path, range(2))
    with pytest.raises(ValueError, match="not both"):
        new_writer(path, overwrite=True, resume=True)


def test_unwritable_path_fails_at_creation(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(StoreIOError, match="a_file") as err:
        new_writer(blocker / "runs" / "run.h5")
    assert isinstance(err.value, OSError)
    with pytest.raises(StoreIOError, match="is a folder"):
        new_writer(tmp_path)


def test_creates_missing_parent_folders(tmp_path):
    path = tmp_path / "deep" / "er" / "run.h5"
    with new_writer(path) as w:
        write_steps(w, range(1))
    assert path.is_file()


# --------------------------------------------------------------------------------------------------------- kill -9

# The child imports only the store (no torch): it loads in a fraction of a second.
KILL_SCRIPT = DATA_CODE + '''
import sys
from inrun.store import DEFAULT_RECORD_COLUMNS, RunWriter
columns = DEFAULT_RECORD_COLUMNS | {"per_val": (np.float32, (3,)), "emb": (np.float16, (2, 3))}
writer = RunWriter(sys.argv[1], run_id="kill-test", record_columns=columns, flush_every=2)
t = 0
while True:
    writer.append_step(*step_data(t))
    t += 1
    if t == 4:
        print("committed", flush=True)
'''


def test_kill_9_leaves_every_committed_step_whole(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(KILL_SCRIPT)
    paths = [tmp_path / f"killed{trial}.h5" for trial in range(3)]
    # Three writers at once, each killed at a random moment.
    children = [subprocess.Popen([sys.executable, str(script), str(p)], stdout=subprocess.PIPE, text=True)
                for p in paths]
    rnd = random.Random(1234)
    try:
        for child in children:
            assert child.stdout.readline().strip() == "committed"
            time.sleep(rnd.uniform(0.02, 0.5))
            child.send_signal(signal.SIGKILL)
            child.wait()
    finally:
        for child in children:
            child.kill()
            child.wait()
    for path in paths:
        with RankFile(path) as f:
            n = f.committed_steps
            assert n > 0
            n_samples, row_start = f.step_column("n_samples"), f.step_column("row_start")
            np.testing.assert_array_equal(row_start, np.concatenate([[0], np.cumsum(n_samples)[:-1]]))
            assert f.committed_rows == n_samples.sum() == int(f.file.attrs["committed_rows"])
            assert f.file["records/sample_id"].shape[0] >= f.committed_rows
        assert_tables(path, range(n))
        compression.repack(path)  # a crashed run's file can be compressed as it is
        assert_tables(path, range(n))
        with RunWriter(path, run_id="kill-test", resume=True) as w:  # and resumed where it stopped
            write_steps(w, range(n, n + 3))
        assert_tables(path, range(n + 3))


# ---------------------------------------------------------------------------------------------------------- resume


def grow_uncommitted_tail(path: Path, extra_steps: int, extra_rows: int) -> None:
    """Simulate a crash after a block was written but before it was committed: junk past the committed rows."""
    with h5py.File(path, "r+") as f:
        for table, extra in (("steps", extra_steps), ("records", extra_rows)):
            for ds in f[table].values():
                ds.resize(ds.shape[0] + extra, axis=0)
                ds[-extra:] = 7


def test_resume_cuts_the_uncommitted_tail_and_continues_numbering(tmp_path):
    path = tmp_path / "run.h5"
    with new_writer(path, flush_every=2) as w:
        write_steps(w, range(5))
    grow_uncommitted_tail(path, extra_steps=3, extra_rows=11)
    assert_tables(path, range(5))  # readers ignore the tail
    with new_writer(path, resume=True) as w:
        assert (w.num_steps, w.last_step) == (5, 4)
        assert all(ds.compression is None for ds in w._records.values())  # appends go to uncompressed chunks
        assert w._records["sample_id"].shape[0] == w.committed_rows
        assert w._steps["lr"].shape[0] == 5
        write_steps(w, range(5, 9))  # step numbers continue without being passed
    assert_tables(path, range(9))


def test_truncate_to_step_after_resume(tmp_path):
    path = tmp_path / "run.h5"
    with new_writer(path, flush_every=3) as w:
        write_steps(w, range(10))
    with new_writer(path, resume=True, run_id=None, record_columns=None) as w:
        w.truncate_to_step(4)
        assert (w.committed_steps, w.last_step) == (4, 3)
        write_steps(w, range(4, 7))
    assert_tables(path, range(7))


def test_truncate_to_step_flushes_buffered_steps_first(tmp_path):
    path = tmp_path / "run.h5"
    with new_writer(path, flush_every=100) as w:
        write_steps(w, range(6))
        w.truncate_to_step(3)
        w.truncate_to_step(50)  # nothing past it: no change
        assert w.num_steps == 3
        w.truncate_to_step(0)
        assert (w.num_steps, w.last_step) == (0, None)
        write_steps(w, range(2))
    assert_tables(path, range(2))


def test_resume_checks_identity_and_format(tmp_path):
    path = tmp_path / "run.h5"
    with new_writer(path, rank=0, world_size=2) as w:
        write_steps(w, range(2))
    with pytest.raises(IncompatibleStoreError, match="run_id is 'run-a' in the file but 'run-z'"):
        new_writer(path, resume=True, run_id="run-z", world_size=2)
    with pytest.raises(IncompatibleStoreError, match="world_size"):
        new_writer(path, resume=True, world_size=4)
    with pytest.raises(IncompatibleStoreError, match="columns"):
        new_writer(path, resume=True, world_size=2, record_columns=DEFAULT_RECORD_COLUMNS)
    with pytest.raises(FileNotFoundError, match="resume=True"):
        new_writer(tmp_path / "missing.h5", resume=True)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = 1
    with pytest.raises(IncompatibleStoreError, match="not an inrun run store"):
        new_writer(other, resume=True)
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(IncompatibleStoreError, match="schema 99.*upgrade inrun"):
        new_writer(path, resume=True, world_size=2)


# --------------------------------------------------------------------------------------------------- write failure


@pytest.mark.parametrize("fail_in", ["records", "steps"])
def test_failed_write_keeps_the_committed_part_readable(tmp_path, monkeypatch, fail_in):
    path = tmp_path / "run.h5"
    n_record_cols, n_step_cols = len(RECORD_COLUMNS), len(DEFAULT_STEP_COLUMNS)
    ok_writes = n_record_cols + n_step_cols + (2 if fail_in == "records" else n_record_cols + 2)
    calls = {"n": 0}
    real_write = writer._write_rows

    def failing_write(dataset, start, rows):
        calls["n"] += 1
        if calls["n"] > ok_writes:
            raise OSError(28, "No space left on device")
        real_write(dataset, start, rows)

    monkeypatch.setattr(writer, "_write_rows", failing_write)
    w = new_writer(path, flush_every=3)
    write_steps(w, range(5))  # the first block (steps 0-2) commits
    with pytest.raises(StoreIOError, match=str(path)) as err:
        w.append_step(*step_data(5))  # the second block fails part-way
    assert "No space left" in str(err.value) and "resume=True" in str(err.value)
    with pytest.raises(StoreIOError, match="stopped after a write error"):
        w.append_step(*step_data(6))
    w.close()
    assert_tables(path, range(3))
    monkeypatch.setattr(writer, "_write_rows", real_write)
    with new_writer(path, resume=True) as w:
        write_steps(w, range(3, 6))
    assert_tables(path, range(6))


# ------------------------------------------------------------------------- commits write the buffered parts unjoined


@pytest.mark.parametrize("join_below", [0, 1 << 20])
@pytest.mark.parametrize("flush_every", [1, 3, 100])
def test_parts_written_one_by_one_round_trip(tmp_path, monkeypatch, join_below, flush_every):
    """Every buffered part written into its own slice (join_below=0), empty steps among them, or joined."""
    monkeypatch.setattr(writer, "JOIN_BELOW_BYTES", join_below)
    path = tmp_path / "run.h5"
    with new_writer(path, flush_every=flush_every) as w:
        write_steps(w, range(11))
    assert_tables(path, range(11))


def test_large_columns_reach_hdf5_without_a_copy(tmp_path, monkeypatch):
    """The arrays given to append_step are what h5py writes from: no joined copy of the buffered rows."""
    given_arrays, written = [], []
    real_setitem = h5py.Dataset.__setitem__

    def spy(dataset, key, value):
        if dataset.name == "/records/big":
            written.append(value)
        return real_setitem(dataset, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", spy)
    big = 1 + writer.JOIN_BELOW_BYTES // (4 * 4 * 4)  # 4 steps of 4 float32 rows exceed the join threshold
    with new_writer(tmp_path / "run.h5", flush_every=4, compression=None, record_columns=DEFAULT_RECORD_COLUMNS | {
            "big": (np.float32, (big,))}) as w:
        for t in range(4):
            given_arrays.append(np.full((4, big), t, np.float32))
            w.append_step({}, {"sample_id": np.arange(4) + 4 * t, "big": given_arrays[-1]})
    assert len(written) == 4 and all(np.shares_memory(a, b) for a, b in zip(written, given_arrays))
    with RankFile(tmp_path / "run.h5") as f:
        np.testing.assert_array_equal(f.record_column("big"), np.concatenate(given_arrays))


@pytest.mark.parametrize("fail_at", [1, 2, 5])
def test_write_error_between_parts_commits_nothing_of_the_block(tmp_path, monkeypatch, fail_at):
    """A write that fails after some parts of a block reached the file: no commit, the earlier blocks whole."""
    monkeypatch.setattr(writer, "JOIN_BELOW_BYTES", 0)
    path = tmp_path / "run.h5"
    real_setitem = h5py.Dataset.__setitem__
    calls = {"armed": False, "n": 0}

    def failing(dataset, key, value):
        if calls["armed"]:
            calls["n"] += 1
            if calls["n"] == fail_at:
                raise OSError(28, "No space left on device")
        return real_setitem(dataset, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", failing)
    w = new_writer(path, flush_every=3)
    write_steps(w, range(5))  # steps 0-2 committed, 3-4 buffered
    calls["armed"] = True
    with pytest.raises(StoreIOError, match="No space left.*3 steps committed before stay whole"):
        w.append_step(*step_data(5))
    w.close()
    calls["armed"] = False
    assert_tables(path, range(3))
    with new_writer(path, resume=True) as w:
        write_steps(w, range(3, 6))
    assert_tables(path, range(6))


# ---------------------------------------------------------------------------------------------- compression on close


def test_live_file_is_uncompressed_and_close_compresses_it(tmp_path):
    path = tmp_path / "run.h5"
    proj = np.arange(64 * 300, dtype=np.float32).reshape(64, 300)
    w = new_writer(path, flush_every=2)
    write_steps(w, range(5))
    w.write_static("projections/fc1", proj)
    w.write_static("sources/names", ["a", "b"])
    assert all(ds.compression is None for ds in [*w._records.values(), *w._steps.values()])
    w.close()
    with h5py.File(path, "r") as f:
        assert all(ds.compression == "gzip" for ds in [*f["records"].values(), *f["steps"].values()])
        assert f["projections/fc1"].compression == "gzip"
        assert f.attrs["run_id"] == "run-a"
    assert not path.with_name("run.h5.repack.tmp").exists()
    assert_tables(path, range(5))
    with RankFile(path) as f:
        np.testing.assert_array_equal(f.static("projections/fc1"), proj)
        assert list(f.static("sources/names")) == ["a", "b"]


def test_failed_compression_keeps_the_complete_uncompressed_file(tmp_path, monkeypatch):
    def no_space(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(compression, "_copy_store", no_space)
    path = tmp_path / "run.h5"
    w = new_writer(path)
    write_steps(w, range(4))
    with pytest.warns(RuntimeWarning, match="stays uncompressed and complete"):
        w.close()
    assert not path.with_name("run.h5.repack.tmp").exists()
    assert_tables(path, range(4))


def test_leftover_of_an_interrupted_compression_is_removed(tmp_path):
    path = tmp_path / "run.h5"
    with new_writer(path) as w:
        write_steps(w, range(2))
    leftover = path.with_name("run.h5.repack.tmp")
    leftover.write_bytes(b"half a file")
    with new_writer(path, resume=True) as w:
        assert not leftover.exists()
        write_steps(w, range(2, 3))
    assert_tables(path, range(3))


# ------------------------------------------------------------------------------------------ ownership, damage


def test_one_writer_per_store_and_the_lock_goes_with_the_writer(tmp_path):
    from inrun.store.lock import is_locked, lock_path
    from inrun.store.schema import StoreBusyError

    path = tmp_path / "run.h5"
    first = new_writer(path, flush_every=2)
    write_steps(first, range(3))
    assert is_locked(path) and lock_path(path).exists()
    for kwargs in ({"overwrite": True}, {"resume": True}):  # a second handle in this process is refused too
        with pytest.raises(StoreBusyError, match=rf"{path} is being written by another writer \(pid {os.getpid()}"):
            new_writer(path, **kwargs)
    with pytest.raises(StoreBusyError):
        compression.repack(path)
    first.close()
    assert not is_locked(path) and not lock_path(path).exists()
    assert_tables(path, range(3))
    with pytest.raises(IncompatibleStoreError):  # a refused resume releases the lock again
        new_writer(path, resume=True, run_id="another")
    assert not lock_path(path).exists()
    with new_writer(path, overwrite=True, run_id="run-b") as w:
        write_steps(w, range(2))
    assert_tables(path, range(2))


def test_creation_is_a_rename_and_leftovers_are_cleaned(tmp_path):
    path = tmp_path / "run.h5"
    stale = tmp_path / "run.h5.new.tmp"
    stale.write_bytes(b"a killed creation")
    with new_writer(path) as w:
        assert not stale.exists() and path.exists()  # the finished empty store is in place before any step
        with RankFile(path) as f:  # readable in the writer's own process too
            assert f.live and f.committed_steps == 0 and f.run_id == "run-a"
        write_steps(w, range(2))
        w.flush()
        with inrun.open_run(path) as run:
            assert run.num_steps == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.h5"]


def test_damaged_files_are_not_mistaken_for_locked_ones(tmp_path):
    from inrun.store.schema import DamagedStoreError, open_error

    path = tmp_path / "run.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(96))  # an HDF5 signature and nothing else
    sblock = OSError("Unable to synchronously open file (truncated file: eof = 104, sblock->base_addr = 0)")
    assert isinstance(open_error(path, sblock, "r"), DamagedStoreError)
    assert "open elsewhere" not in str(open_error(path, sblock, "r"))
    locked = OSError("Unable to synchronously open file (unable to lock file, errno = 11)")
    assert "HDF5 file locking" in str(open_error(path, locked, "r+"))
    with pytest.raises(DamagedStoreError, match="is damaged or not a complete run store"):
        RankFile(path)
