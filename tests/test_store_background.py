"""The store's background writer (``RunWriter(background=True)``): commits run off the training thread under the
same protocol; a write error there stops the writer and surfaces on the training thread as the same
``StoreIOError``, and nothing is committed after it; kill -9 at the named points and a real full disk keep every
committed step (the children of tests/test_faults.py, run with ``INRUN_STORE_BACKGROUND=1``)."""

from __future__ import annotations

import threading

import pytest
import test_faults as faults_tests
from test_store import assert_tables, new_writer, step_data, write_steps

from inrun.store import faults
from inrun.store import writer as store_writer
from inrun.store.lock import is_locked
from inrun.store.schema import StoreIOError

small_disk = faults_tests.small_disk  # the 3 MB tmpfs fixture
BACKGROUND = {"INRUN_STORE_BACKGROUND": "1"}


@pytest.fixture(autouse=True)
def fresh_fault_counters():
    faults._hits.clear()
    yield
    faults._hits.clear()


@pytest.mark.parametrize("flush_every", [1, 3, 100])
def test_background_round_trip(tmp_path, flush_every):
    path = tmp_path / "run.h5"
    with new_writer(path, flush_every=flush_every, background=True) as w:
        write_steps(w, range(11))
        assert w.num_steps == 11
    assert_tables(path, range(11))
    with new_writer(path, resume=True, flush_every=flush_every, background=True) as w:  # row_start continues
        write_steps(w, range(11, 17))
    assert_tables(path, range(17))


def test_the_environment_variable_turns_it_on(tmp_path, monkeypatch):
    monkeypatch.delenv(store_writer.BACKGROUND_ENV, raising=False)
    with new_writer(tmp_path / "a.h5") as w:
        assert not w.background  # off by default
    monkeypatch.setenv(store_writer.BACKGROUND_ENV, "1")
    with new_writer(tmp_path / "b.h5") as w:
        assert w.background
    with new_writer(tmp_path / "c.h5", background=False) as w:
        assert not w.background


def test_append_returns_while_the_commit_is_on_disk_only_later(tmp_path, monkeypatch):
    """The training thread goes on while the writer thread syncs; the counts move only once the sync is done."""
    release, syncing = threading.Event(), threading.Event()
    real_sync = store_writer.sync

    def slow_sync(file):
        if threading.current_thread() is not threading.main_thread():
            syncing.set()
            assert release.wait(30)
        real_sync(file)

    path = tmp_path / "run.h5"
    w = new_writer(path, flush_every=3, background=True)
    monkeypatch.setattr(store_writer, "sync", slow_sync)
    write_steps(w, range(4))  # steps 0-2 handed to the writer thread, which waits in sync
    assert syncing.wait(30)
    assert w.committed_steps == 0 and w.num_steps == 4  # returned before the block was on disk
    write_steps(w, range(4, 5))
    release.set()
    w.flush()  # waits for the block in flight, then commits the rest
    assert w.committed_steps == 5
    w.close()
    assert_tables(path, range(5))


@pytest.mark.parametrize("surfaces_at", ["append_step", "flush", "close"])
def test_an_error_in_the_writer_thread_stops_training_and_nothing_is_committed_after_it(tmp_path, monkeypatch,
                                                                                         surfaces_at):
    path = tmp_path / "run.h5"
    real_write = store_writer._write_rows
    blocks = {"failing": False}

    def failing_write(dataset, start, parts):
        if blocks["failing"] and threading.current_thread() is not threading.main_thread():
            raise OSError(28, "No space left on device")
        real_write(dataset, start, parts)

    monkeypatch.setattr(store_writer, "_write_rows", failing_write)
    w = new_writer(path, flush_every=3, background=True)
    write_steps(w, range(4))
    w.flush()  # steps 0-3 committed
    blocks["failing"] = True
    write_steps(w, range(4, 7))  # the block of steps 4-6 fails in the writer thread
    w._pending.join()  # (the test waits for it; training would go on with the next steps)
    blocks["failing"] = False
    with pytest.raises(StoreIOError, match="No space left.*Nothing of this block was committed.*4 steps committed"):
        if surfaces_at == "append_step":
            w.append_step(*step_data(7))
        elif surfaces_at == "flush":
            w.flush()
        else:
            w.close()
    if surfaces_at != "close":
        with pytest.raises(StoreIOError, match="stopped after a write error"):
            w.append_step(*step_data(7))
    w.close()  # nothing more is committed, no compression
    assert not is_locked(path)
    assert_tables(path, range(4))
    assert not faults_tests.is_compressed(path)
    with new_writer(path, resume=True, background=True) as w:
        write_steps(w, range(4, 9))
    assert_tables(path, range(9))


@pytest.mark.parametrize("point", ["write", "flush", "commit:2", "close", "compress"])
def test_kill_9_in_the_writer_thread_loses_no_committed_step(tmp_path, point):
    path = tmp_path / "run.h5"
    killed = faults_tests.run_child(faults_tests.WRITER_CHILD, str(path), "new", str(faults_tests.STEPS),
                                    env={"INRUN_KILL_AT": point, **BACKGROUND})
    assert killed.returncode == -9, killed.stderr
    assert f"killed at {point.split(':')[0]}" in killed.stdout and "closed" not in killed.stdout
    faults_tests.assert_committed_whole(path, faults_tests.reported_committed(killed.stdout))
    assert not is_locked(path)
    done = faults_tests.run_child(faults_tests.WRITER_CHILD, str(path), "resume", str(faults_tests.STEPS),
                                  env=BACKGROUND)
    assert done.returncode == 0 and "closed" in done.stdout, done.stderr
    assert_tables(path, range(faults_tests.STEPS))


@pytest.mark.parametrize("reserve", ["reserve", "no-reserve"])
def test_full_disk_with_the_writer_thread(small_disk, reserve):
    path = small_disk / "run.h5"
    full = faults_tests.run_child(faults_tests.DISK_CHILD, str(path), "new", reserve, "100000", env=BACKGROUND)
    assert full.returncode == 3, full.stdout + full.stderr  # stopped by the error: no crash, no success
    assert "closed" not in full.stdout
    message = [line for line in full.stdout.splitlines() if line.startswith("error:")][0]
    assert "No space left on device" in message and "Nothing of this block" in message
    n = faults_tests.assert_disk_rows(path, faults_tests.reported_committed(full.stdout))
    assert n >= 20
