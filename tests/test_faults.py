"""Faults against the store: kill -9 at every named point, a real full disk, injected write errors at every write
site, a second writer, an overwrite under a reader, a reader polling a live training run, the final step around
the final checkpoint, and the command line on bad files.

Each test checks that every step the writer reported committed is still in the store, whole and exact (compared
with data rebuilt independently of the writer), and that no success was reported over lost data.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_store import DATA_CODE, assert_tables, new_writer, write_steps

import inrun
from inrun import cli
from inrun.store import faults
from inrun.store.lock import is_locked, lock_path
from inrun.store.rankfile import RankFile
from inrun.store.schema import DamagedStoreError, StoreBusyError, StoreIOError

REPO = Path(__file__).resolve().parents[1]
STEPS = 10  # steps of a kill-matrix run; flush_every=3 commits blocks at 3, 6, 9 and the rest at close

# The child of the kill matrix: the store only (no torch), so it starts in a fraction of a second.
WRITER_CHILD = DATA_CODE + '''
import sys
from inrun.store import DEFAULT_RECORD_COLUMNS, RunWriter
path, mode, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
columns = DEFAULT_RECORD_COLUMNS | {"per_val": (np.float32, (3,)), "emb": (np.float16, (2, 3))}
if mode == "new":
    writer = RunWriter(path, run_id="run-a", record_columns=columns, flush_every=3, overwrite=True)
    writer.write_static("sources/names", np.array(["a", "b", "c"], dtype=object))
else:
    writer = RunWriter(path, run_id="run-a", resume=True, flush_every=3)
print("opened", writer.committed_steps, flush=True)
reported = writer.committed_steps
for t in range(writer.committed_steps, steps):
    writer.append_step(*step_data(t))
    if writer.committed_steps != reported:
        reported = writer.committed_steps
        print("committed", reported, flush=True)
writer.close()
print("committed", writer.committed_steps, flush=True)
print("closed", flush=True)
'''


@pytest.fixture(autouse=True)
def fresh_fault_counters():
    faults._hits.clear()
    yield
    faults._hits.clear()


def run_child(code: str, *args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout)


def reported_committed(stdout: str) -> int:
    """The last number of committed steps the child printed (0 if none)."""
    counts = [int(line.split()[1]) for line in stdout.splitlines() if line.startswith(("committed", "opened"))]
    return max(counts, default=0)


def assert_committed_whole(path: Path, at_least: int) -> int:
    """Every committed step is whole and exact, and nothing the writer reported committed is missing."""
    with RankFile(path) as f:
        n = f.committed_steps
    assert n >= at_least, f"{path}: {n} steps committed but the writer had reported {at_least}"
    if n:
        assert_tables(path, range(n))
    return n


def is_compressed(path: Path) -> bool:
    with h5py.File(path, "r", locking=False) as f:
        return all(ds.compression == "gzip" for ds in f["records"].values())


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ------------------------------------------------------------------------------------------------ kill -9 matrix

KILL_POINTS = ["create", "static", "write", "flush", "commit:2", "close", "compress", "resume"]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_9_at_every_named_point_loses_no_committed_step(tmp_path, point):
    path = tmp_path / "run.h5"
    if point == "resume":  # a crashed run, then a resume that is itself killed while opening the store
        first = run_child(WRITER_CHILD, str(path), "new", str(STEPS), env={"INRUN_KILL_AT": "flush:2"})
        assert first.returncode == -9
        before = assert_committed_whole(path, reported_committed(first.stdout))
        killed = run_child(WRITER_CHILD, str(path), "resume", str(STEPS), env={"INRUN_KILL_AT": "resume"})
    else:
        before = 0
        killed = run_child(WRITER_CHILD, str(path), "new", str(STEPS), env={"INRUN_KILL_AT": point})
    assert killed.returncode == -9, killed.stderr
    assert f"killed at {point.split(':')[0]}" in killed.stdout and "closed" not in killed.stdout
    if point == "create":  # creation is atomic: no store at all, only the temporary file
        assert not path.exists() and leftovers(tmp_path) == ["run.h5.new.tmp"]
    else:
        assert_committed_whole(path, max(before, reported_committed(killed.stdout)))
        if point == "compress":
            assert not is_compressed(path) and leftovers(tmp_path) == ["run.h5.repack.tmp"]
            assert assert_committed_whole(path, STEPS) == STEPS  # the kill came after the last commit
    assert not is_locked(path)  # the kernel dropped the dead writer's lock
    # Resuming (or, with no store, starting again) completes the store: compressed, exact, nothing left over.
    mode = "new" if point == "create" else "resume"
    done = run_child(WRITER_CHILD, str(path), mode, str(STEPS))
    assert done.returncode == 0, done.stderr
    assert "closed" in done.stdout
    assert_tables(path, range(STEPS))
    assert is_compressed(path)
    assert leftovers(tmp_path) == [] and not lock_path(path).exists()


# ------------------------------------------------------------------------------------------ a real full disk

DISK_CHILD = '''
import sys
import numpy as np
from inrun.store import DEFAULT_RECORD_COLUMNS, RunWriter, StoreIOError
import inrun.store.writer as writer_module
path, mode, reserve = sys.argv[1], sys.argv[2], sys.argv[3]
if reserve == "no-reserve":  # a disk that fills up behind the reservation's back: the flush itself must fail
    writer_module.reserve = lambda file, nbytes: None
columns = DEFAULT_RECORD_COLUMNS | {"big": (np.float32, (256,))}
def rows(t):
    return {"sample_id": t * 8 + np.arange(8), "value_1": t + np.arange(8) / 10,
            "big": np.full((8, 256), t + 1, np.float32)}
if mode == "new":
    writer = RunWriter(path, run_id="disk", record_columns=columns, flush_every=4)
else:
    writer = RunWriter(path, run_id="disk", resume=True, flush_every=4)
t = writer.committed_steps
try:
    while t < int(sys.argv[4]):
        writer.append_step({"lr": 0.1}, rows(t))
        t += 1
        print("committed", writer.committed_steps, flush=True)
except StoreIOError as err:
    print("error:", err, flush=True)
    writer.close()
    print("committed", writer.committed_steps, flush=True)
    sys.exit(3)
writer.close()
print("closed", flush=True)
'''


def assert_disk_rows(path: Path, at_least: int) -> int:
    """The full-disk run's committed rows, against the formula of the child's data."""
    with RankFile(path) as f:
        n = f.committed_steps
        assert n >= at_least
        t = np.repeat(np.arange(n), 8)
        np.testing.assert_array_equal(f.record_column("sample_id"), np.arange(8 * n))
        np.testing.assert_array_equal(f.record_column("value_1"), t + np.tile(np.arange(8) / 10, n))
        big = f.record_column("big")
        assert big.shape == (8 * n, 256) and (big == (t + 1)[:, None]).all(), "committed rows read back wrong"
    return n


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs (needs root and a kernel that lets this process mount; skipped otherwise)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: the injected-failure tests below cover each write site instead")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(disk)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip()}): the injected-failure tests below "
                    "cover each write site instead")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


@pytest.mark.parametrize("reserve", ["reserve", "no-reserve"])
def test_full_disk_stops_with_an_error_and_keeps_every_committed_row(small_disk, reserve):
    path = small_disk / "run.h5"
    full = run_child(DISK_CHILD, str(path), "new", reserve, "100000")
    assert full.returncode == 3, full.stdout + full.stderr  # stopped by the error: no crash, no success
    assert "closed" not in full.stdout
    message = [line for line in full.stdout.splitlines() if line.startswith("error:")][0]
    assert str(path) in message and "No space left on device" in message and "Nothing of this block" in message
    n = assert_disk_rows(path, reported_committed(full.stdout))
    assert n >= 20  # the disk held a fair number of steps first
    assert "uncompressed and complete" not in full.stdout + full.stderr  # no compression attempt after an error
    # Space freed (a larger disk: move the store), resuming completes the run exactly.
    bigger = small_disk.parent / "run.h5"
    shutil.copy(path, bigger)
    done = run_child(DISK_CHILD, str(bigger), "resume", "reserve", str(n + 30))
    assert done.returncode == 0, done.stdout + done.stderr
    assert assert_disk_rows(bigger, n + 30) == n + 30


def test_no_space_to_compress_says_so_only_because_the_store_is_complete(small_disk):
    filler = small_disk / "filler"
    path = small_disk / "run.h5"
    with new_writer(path, flush_every=3) as w:  # a small run; compressing it needs its size again in free space
        write_steps(w, range(8))
        free = shutil.disk_usage(small_disk).free
        filler.write_bytes(b"\0" * max(0, free - (1 << 16)))
        with pytest.warns(RuntimeWarning, match=r"compressing needs up to .* MB free.*stays uncompressed and "
                                                r"complete \(all 8 committed steps checked\)"):
            w.close()
    assert_tables(path, range(8))
    assert not is_compressed(path) and leftovers(small_disk) == []


# ------------------------------------------------------------------- injected write errors at every write site


@pytest.mark.parametrize("site", ["create", "write", "flush", "static"])
def test_injected_write_error_at_each_site_commits_nothing_after_it(tmp_path, monkeypatch, site):
    path = tmp_path / "run.h5"
    if site == "create":
        monkeypatch.setenv("INRUN_FAIL_AT", "create")
        with pytest.raises(StoreIOError, match=f"cannot write run store {path}.*No space left"):
            new_writer(path)
        assert not path.exists() and leftovers(tmp_path) == [] and not lock_path(path).exists()
        return
    w = new_writer(path, flush_every=3)
    write_steps(w, range(4))  # steps 0-2 committed, step 3 buffered
    monkeypatch.setenv("INRUN_FAIL_AT", site)
    with pytest.raises(StoreIOError, match=f"{path}.*No space left on device") as err:
        if site == "static":
            w.write_static("projection/0/rows", np.ones((4, 4)))
        else:
            write_steps(w, range(4, 6))  # the block of steps 3-5 fails
    assert "3 steps committed before stay whole" in str(err.value) or site == "static"
    with pytest.raises(StoreIOError, match="stopped after a write error"):
        w.append_step({}, {"sample_id": np.arange(2)})
    w.close()  # closes without committing anything more, and without a success warning
    assert_tables(path, range(3))
    assert not is_compressed(path) and not lock_path(path).exists()
    monkeypatch.delenv("INRUN_FAIL_AT")
    with new_writer(path, resume=True) as w:  # the error fixed, a resume continues where the commits end
        write_steps(w, range(3, 6))
    assert_tables(path, range(6))


def test_injected_error_while_compressing_keeps_the_checked_complete_store(tmp_path, monkeypatch):
    path = tmp_path / "run.h5"
    w = new_writer(path, flush_every=3)
    write_steps(w, range(5))
    monkeypatch.setenv("INRUN_FAIL_AT", "compress")
    with pytest.warns(RuntimeWarning, match=r"injected at compress.*uncompressed and complete \(all 5 committed"):
        w.close()
    assert_tables(path, range(5))
    assert leftovers(tmp_path) == [] and not lock_path(path).exists()


def test_a_write_error_swallowed_by_h5py_is_still_caught(tmp_path):
    """h5py reports errors raised while it frees an object only through sys.unraisablehook (as Cython does for
    every __dealloc__); the writer listens while it writes, and passes everything else on."""
    from types import SimpleNamespace

    from inrun.store.durability import SwallowedErrors

    passed_on = []
    previous, sys.unraisablehook = sys.unraisablehook, passed_on.append
    try:
        with SwallowedErrors() as swallowed:
            sys.unraisablehook(SimpleNamespace(  # what h5py's ObjectID.__dealloc__ hands over on a failed write
                exc_value=RuntimeError("Can't decrement id ref count (file write failed: errno = 28)"),
                object="h5py._objects.ObjectID.__dealloc__", err_msg=None))
            sys.unraisablehook(SimpleNamespace(exc_value=RuntimeError("not h5py's"), object="other", err_msg=None))
    finally:
        sys.unraisablehook = previous
    assert [u.exc_value.args[0] for u in passed_on] == ["not h5py's"]
    with pytest.raises(OSError, match="errno = 28"):
        swallowed.check()


# --------------------------------------------------------------------------------- one writer; overwrite safely

HOLDER_CHILD = DATA_CODE + '''
import sys
from inrun.store import DEFAULT_RECORD_COLUMNS, RunWriter
columns = DEFAULT_RECORD_COLUMNS | {"per_val": (np.float32, (3,)), "emb": (np.float16, (2, 3))}
writer = RunWriter(sys.argv[1], run_id="run-a", record_columns=columns, flush_every=2)
for t in range(4):
    writer.append_step(*step_data(t))
print("ready", flush=True)
sys.stdin.readline()
for t in range(4, 7):
    writer.append_step(*step_data(t))
writer.close()
print("closed", flush=True)
'''


def test_second_writer_is_refused_before_anything_is_touched(tmp_path):
    path = tmp_path / "run.h5"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER_CHILD, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "ready"
        size = path.stat().st_size
        for kwargs in ({"overwrite": True}, {"resume": True}):
            with pytest.raises(StoreBusyError, match=rf"{path} is being written by another writer \(pid "
                                                     rf"{holder.pid} on "):
                new_writer(path, **kwargs)
        assert path.stat().st_size == size
        with pytest.raises(FileExistsError):
            new_writer(path)
        assert_tables(path, range(4))  # the live store reads whole meanwhile
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "closed"
        assert holder.wait(timeout=30) == 0
    finally:
        holder.kill()
        holder.wait()
    assert_tables(path, range(7))  # the first run lost nothing
    with new_writer(path, overwrite=True) as w:  # once it is done, overwriting is allowed
        write_steps(w, range(2))
    assert_tables(path, range(2))


def test_overwrite_under_an_open_reader_leaves_the_reader_its_whole_file(tmp_path):
    path = tmp_path / "run.h5"
    with new_writer(path, flush_every=2) as w:
        write_steps(w, range(6))
    with inrun.open_run(path) as old:
        with new_writer(path, overwrite=True, run_id="run-b") as w:
            write_steps(w, range(3))
        assert old.run_id == "run-a" and old.num_steps == 6
        np.testing.assert_array_equal(old.records(["step"])["step"],
                                      np.repeat(np.arange(6), [(t * 7) % 5 for t in range(6)]))
    with inrun.open_run(path) as new:
        assert new.run_id == "run-b" and new.num_steps == 3
    assert leftovers(tmp_path) == []


# --------------------------------------------------------------------------------- damaged files, the command line


def test_damaged_or_foreign_files_get_one_clear_line_and_a_nonzero_exit(tmp_path, capsys):
    good = tmp_path / "good.h5"
    with new_writer(good, compression=None) as w:
        write_steps(w, range(5))
    data = good.read_bytes()
    (tmp_path / "half.h5").write_bytes(data[: len(data) // 2])
    (tmp_path / "start.h5").write_bytes(data[:104])  # what a kill during a non-atomic creation used to leave
    (tmp_path / "text.h5").write_text("not hdf5")
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["x"] = 1
    cases = {"half.h5": "is damaged or not a complete run store", "start.h5": "is damaged or not a complete run",
             "text.h5": "is damaged or not a complete run store", "foreign.h5": "is not an inrun run store",
             "missing.h5": "no run store at"}
    for name, fragment in cases.items():
        for command in (["report", str(tmp_path / name)], ["export", str(tmp_path / name), "--npz", "x.npz"]):
            assert cli.main(command) == 1
            out, err = capsys.readouterr()
            lines = err.strip().splitlines()
            assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in err, err
            assert lines[0].startswith(f"inrun {command[0]}: error: ") and "open elsewhere" not in err
    with pytest.raises(DamagedStoreError, match="not a complete run store"):
        cli.main(["report", str(tmp_path / "half.h5"), "--debug"])
    with pytest.raises(DamagedStoreError):
        inrun.open_run(tmp_path / "start.h5")
    done = subprocess.run([sys.executable, "-m", "inrun.cli", "export", str(tmp_path / "half.h5"), "--npz", "x.npz"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


# ------------------------------------------------------------------ training: a live reader, the final step

TRAIN_CODE = '''
import sys, time
import torch
from torch import nn
torch.set_num_threads(1)
from inrun.valuation.recorder import InRunRecorder

def loss_fn(model, batch):
    return nn.functional.mse_loss(model(batch["x"]), batch["y"], reduction="none").mean(1)

def data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 5, generator=g), torch.randn(64, 2, generator=g)
    val = {"x": torch.randn(6, 5, generator=g), "y": torch.randn(6, 2, generator=g)}
    return x, y, val

def train(path, steps, ckpt=None, resume=False, pause=0.0, kill_before_close=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y, val = data()
    recorder = InRunRecorder(model, path, val_data=val, loss_fn=loss_fn, flush_every=2, checkpoint_every=4,
                             record_norms=True)
    start = 0
    if resume:
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"]); optimizer.load_state_dict(state["optimizer"])
        recorder.load_state_dict(state["recorder"]); start = state["step"]
    recorder.start()
    for t in range(start, steps):
        i = torch.arange(t * 4, t * 4 + 4) % 64
        batch = {"x": x[i], "y": y[i], "index": i}
        recorder.begin_microbatch(batch)
        loss = loss_fn(model, batch).mean()
        loss.backward()
        recorder.end_microbatch()
        recorder.before_optimizer_step(optimizer)
        optimizer.step(); optimizer.zero_grad()
        recorder.note_train_loss(loss.item())
        if ckpt is not None:  # what a trainer's checkpoint holds after each step
            recorder.flush()
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "recorder": recorder.state_dict(), "step": t + 1}, ckpt)
        print("step", t, flush=True)
        time.sleep(pause)
    if kill_before_close:
        import os, signal
        os.kill(os.getpid(), signal.SIGKILL)
    recorder.close()
    print("closed", flush=True)
'''


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """An uninterrupted 12-step run, recorded in this process; the other runs must match it exactly."""
    folder = tmp_path_factory.mktemp("reference")
    namespace: dict = {}
    exec(TRAIN_CODE, namespace)
    namespace["train"](folder / "run.h5", 12)
    with inrun.open_run(folder / "run.h5") as run:
        return run.steps, run.records()


def assert_same_as_reference(path: Path, reference, steps: int) -> None:
    ref_steps, ref_records = reference
    with inrun.open_run(path) as run:
        got_steps, got_records = run.steps, run.records()
    assert len(got_steps["step"]) == steps
    for name in ("step", "lr", "train_loss", "val_loss", "val_loss_after", "sum_value_1", "checkpoint"):
        np.testing.assert_allclose(got_steps[name], ref_steps[name][:steps], rtol=1e-6, err_msg=name)
    rows = int(ref_steps["n_samples"][:steps].sum())
    for name in ("step", "sample_id", "value_1", "grad_norm_sq"):
        np.testing.assert_allclose(got_records[name], ref_records[name][:rows], rtol=1e-6, err_msg=name)


def train_child(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    code = TRAIN_CODE + "\nimport sys\nargs = sys.argv[1:]\n" + textwrap.dedent('''
        train(args[0], int(args[1]), ckpt=args[2] if args[2] != "-" else None, resume=args[3] == "resume",
              kill_before_close=args[4] == "kill")
    ''')
    return run_child(code, *args, env=env, timeout=120)


def test_live_reader_then_a_kill_around_the_final_checkpoint_then_resume(tmp_path, reference_run):
    """One training run in another process (one child, to save a torch start): a reader polls it while it trains
    and sees only whole committed steps; the run is then killed after the trainer's last checkpoint, before the
    recorder closed; resuming completes the store, across a second kill at the final model checkpoint."""
    path, ckpt = tmp_path / "run.h5", tmp_path / "trainer.ckpt"
    code = TRAIN_CODE + "\nimport sys\ntrain(sys.argv[1], 12, ckpt=sys.argv[2], pause=0.15, kill_before_close=True)\n"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-c", code, str(path), str(ckpt)], stdout=subprocess.PIPE, text=True,
                             env=env)
    ref_steps, ref_records = reference_run
    seen, live_polls, cli_ran = [], 0, False
    try:
        while child.poll() is None:
            if not path.exists():
                time.sleep(0.02)
                continue
            live = is_locked(path)
            with inrun.open_run(path) as run:
                n = run.num_steps
                steps, records = run.steps, run.records(["step", "sample_id", "value_1"])
            live_polls += live
            assert n >= (seen[-1] if seen else 0)
            seen.append(n)
            rows = int(ref_steps["n_samples"][:n].sum())
            np.testing.assert_allclose(steps["sum_value_1"], ref_steps["sum_value_1"][:n], rtol=1e-6)
            for name in ("step", "sample_id", "value_1"):
                np.testing.assert_allclose(records[name], ref_records[name][:rows], rtol=1e-6)
            if 4 <= n < 10 and live and not cli_ran:  # the command line on the live run too
                assert cli.main(["export", str(path), "--npz", str(tmp_path / "live.npz")]) == 0
                assert len(np.load(tmp_path / "live.npz")["sample_id"]) > 0
                cli_ran = True
            time.sleep(0.05)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -9
    assert cli_ran and live_polls >= 5 and len(set(seen)) >= 3, (seen, live_polls)
    # Killed after the trainer's last checkpoint, before the recorder closed: the last step waits in that
    # checkpoint for the validation loss after it, and is not in the store.
    assert_same_as_reference(path, reference_run, 11)
    final_checkpoint = tmp_path / "run.checkpoints" / "step_00000012.pt"
    # Resuming from that checkpoint takes no step but completes the store; killed again, at the final model
    # checkpoint: the last step was committed before it.
    resumed = train_child(str(path), "12", str(ckpt), "resume", "-", env={"INRUN_KILL_AT": "checkpoint"})
    assert resumed.returncode == -9 and "step" not in resumed.stdout, resumed.stderr
    assert_same_as_reference(path, reference_run, 12)
    assert not final_checkpoint.exists()
    # Once more, to the end (in this process): the same 12 steps, the final checkpoint, compressed.
    namespace: dict = {}
    exec(TRAIN_CODE, namespace)
    namespace["train"](path, 12, ckpt=ckpt, resume=True)
    assert_same_as_reference(path, reference_run, 12)
    assert final_checkpoint.exists() and is_compressed(path) and leftovers(tmp_path) == []


def test_lightning_resume_from_the_final_checkpoint_writes_the_last_step(tmp_path):
    """Lightning skips on_train_start/_end when a resume has no step left; the callback still completes the store
    (the values of such a completed step are checked exactly against an uninterrupted run above)."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint
    from test_callback import STEPS_PER_EPOCH, VAL, Net, loader, make_trainer

    from inrun.callbacks import InRunCallback

    torch.set_num_threads(1)

    class CrashAfterTheFinalCheckpoint(L.Callback):
        def on_train_end(self, trainer, pl_module):
            raise RuntimeError("crash before the store is closed")

    path, epochs = tmp_path / "run.h5", 2
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_epochs=1, save_on_train_epoch_end=True,
                                  save_top_k=-1)
    with pytest.raises(RuntimeError, match="crash before the store is closed"):
        make_trainer([CrashAfterTheFinalCheckpoint(), InRunCallback(path, val_data=VAL), checkpoints],
                     max_epochs=epochs).fit(Net("sgd"), loader())
    with inrun.open_run(path) as run:
        assert run.num_steps == epochs * STEPS_PER_EPOCH - 1  # the last step waits in the final checkpoint
    final = sorted((tmp_path / "checkpoints").glob("*.ckpt"))[-1]
    make_trainer([InRunCallback(path, val_data=VAL)], max_epochs=epochs).fit(
        Net("sgd"), loader(), ckpt_path=final, weights_only=True)
    with inrun.open_run(path) as run:
        steps = run.steps
        assert list(steps["step"]) == list(range(epochs * STEPS_PER_EPOCH))
        assert np.isfinite(steps["val_loss_after"]).all() and np.isfinite(run.records()["value_1"]).all()
    assert is_compressed(path)
