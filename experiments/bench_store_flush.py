"""The store's cost on the training thread per step, before and after the commit stopped joining buffered rows.

A ``RunWriter`` receives steps shaped like a run recording embeddings (a batch of ``--batch`` records, each with a
projected gradient of ``--dim`` float32 values, the default columns besides) and commits them as the recorder does
(every 100 steps, or earlier once 64 MB are buffered; ``compression=None`` so close() does not rewrite the file).
Two ways of writing a commit alternate in one process, on the same arrays, ``--repeats`` times each:

* ``joined (before)``: each column's buffered parts joined with ``np.concatenate`` and written in one call, as the
  writer did up to this benchmark's commit (reproduced here by replacing ``inrun.store.writer._write_rows``);
* ``parts (now)``: the writer as it is: each part written straight into its slice of the dataset;
* ``parts, background``: the same with ``background=True`` (commits in a writer thread).

With ``--compute-ms N`` each step also multiplies matrices for about N ms (numpy, one BLAS thread, GIL released
as in a training step), and a fourth line runs that work without a store: what the store adds per step is then the
line minus that one, which is what a background writer can shrink (a writer thread overlaps the work; alone it only
adds a thread switch). On the shared 2-core machine those differences (1-2 ms of 25) stayed within the noise of
repeated runs; the default (0) times the store alone.

Printed: milliseconds per appended step (all ``append_step`` calls and the last ``flush``, by the wall clock and by
this process's CPU time), the share spent in ``sync`` (HDF5 flush plus ``fsync``, the same in both), and the load
average of the machine before and after::

    .venv/bin/python -m experiments.bench_store_flush [--steps 60] [--repeats 5] [--batch 16] [--dim 53248]
        [--compute-ms 20]    # with 20 ms of work a step besides the store
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from inrun.store import durability  # noqa: E402
from inrun.store import writer as store_writer  # noqa: E402
from inrun.store.schema import DEFAULT_RECORD_COLUMNS, Column  # noqa: E402


def joined_write_rows(dataset, start: int, parts: list[np.ndarray]) -> None:
    """The commit's write as it was: every buffered part of the column joined, then one resize and one write."""
    rows = np.concatenate(parts)
    dataset.resize(start + len(rows), axis=0)
    dataset[start : start + len(rows)] = rows


#: name -> (how a commit writes a column, background writer)
VARIANTS = {"joined (before)": (joined_write_rows, False), "parts (now)": (store_writer._write_rows, False),
            "parts, background": (store_writer._write_rows, True)}


class Work:
    """About ``ms`` milliseconds of matrix products, standing in for a training step's compute."""

    def __init__(self, ms: float):
        self.a = np.random.default_rng(1).normal(size=(256, 256)).astype(np.float32)
        began, reps = time.perf_counter(), 20
        for _ in range(reps):
            self.a @ self.a
        self.reps = int(round(ms / 1e3 / ((time.perf_counter() - began) / reps))) if ms > 0 else 0

    def __call__(self) -> None:
        for _ in range(self.reps):
            self.a @ self.a


def compute_only(steps: list[dict], work: Work) -> dict:
    began, cpu_began = time.perf_counter(), time.process_time()
    for _ in steps:
        work()
    return {"wall": time.perf_counter() - began, "cpu": time.process_time() - cpu_began, "sync": 0.0}


def one_run(folder: Path, steps: list[dict], variant: tuple, columns: dict, work: Work) -> dict:
    """Append every step to a new store; wall and CPU seconds of the appends and the last flush, and of sync."""
    synced = {"wall": 0.0}
    real_sync, real_write = durability.sync, store_writer._write_rows

    def timed_sync(file):
        began = time.perf_counter()
        try:
            real_sync(file)
        finally:
            synced["wall"] += time.perf_counter() - began

    write_rows, background = variant
    store_writer._write_rows, store_writer.sync = write_rows, timed_sync
    try:
        w = store_writer.RunWriter(folder / "run.h5", record_columns=columns, overwrite=True, compression=None,
                                   background=background)
        synced["wall"] = 0.0  # creation's sync is not a per-step cost
        began, cpu_began = time.perf_counter(), time.process_time()
        for records in steps:
            work()
            w.append_step({}, records)
        w.flush()
        wall, cpu = time.perf_counter() - began, time.process_time() - cpu_began
        commits = w.committed_steps
        w.close()
    finally:
        store_writer._write_rows, store_writer.sync = real_write, real_sync
    assert commits == len(steps)
    return {"wall": wall, "cpu": cpu, "sync": synced["wall"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dim", type=int, default=13 * 4096, help="projected gradient size per record")
    parser.add_argument("--compute-ms", type=float, default=0.0, help="work per step besides the store")
    parser.add_argument("--folder", type=Path, default=Path("runs"), help="where the stores are written")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_store_flush.json"))
    args = parser.parse_args(argv)
    columns = dict(DEFAULT_RECORD_COLUMNS) | {"proj_grad": Column(np.float32, (args.dim,))}
    rng = np.random.default_rng(0)
    steps = [{"sample_id": np.arange(args.batch) + args.batch * t, "value_1": rng.normal(size=args.batch),
              "proj_grad": rng.normal(size=(args.batch, args.dim)).astype(np.float32)} for t in range(args.steps)]
    step_mb = steps[0]["proj_grad"].nbytes / 1e6
    work = Work(args.compute_ms)
    load_before = os.getloadavg()
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    if work.reps:
        results["work alone (no store)"] = []
    args.folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        for name, variant in VARIANTS.items():  # warm-up
            one_run(Path(folder), steps[:4], variant, columns, work)
        for _ in range(args.repeats):
            for name, variant in VARIANTS.items():
                results[name].append(one_run(Path(folder), steps, variant, columns, work))
            if work.reps:
                results["work alone (no store)"].append(compute_only(steps, work))
    load_after = os.getloadavg()
    print(f"{args.steps} steps of {args.batch} records with {args.dim} float32 values each ({step_mb:.1f} MB a "
          f"step), {args.compute_ms:g} ms of work a step; median of {args.repeats}; load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after")
    summary = {}
    alone = statistics.median(r["wall"] for r in results["work alone (no store)"]) if work.reps else 0.0
    alone_cpu = statistics.median(r["cpu"] for r in results["work alone (no store)"]) if work.reps else 0.0
    base = None
    for name, runs in results.items():
        wall = statistics.median(r["wall"] for r in runs) / args.steps * 1e3
        cpu = statistics.median(r["cpu"] for r in runs) / args.steps * 1e3
        sync = statistics.median(r["sync"] for r in runs) / args.steps * 1e3
        store = wall - alone / args.steps * 1e3
        store_cpu = cpu - alone_cpu / args.steps * 1e3
        summary[name] = {"wall_ms_per_step": wall, "cpu_ms_per_step": cpu, "sync_ms_per_step": sync,
                         "store_wall_ms_per_step": store, "store_cpu_ms_per_step": store_cpu}
        if name.startswith("work alone"):
            print(f"  {name:22s} {wall:6.2f} ms/step wall, {cpu:6.2f} ms/step CPU")
            continue
        base = base or (store, store_cpu)
        print(f"  {name:22s} {wall:6.2f} ms/step wall, store {store:5.2f} ms/step ({store / base[0]:.2f}x); "
              f"CPU {cpu:6.2f} ms/step, store {store_cpu:5.2f} ms/step ({store_cpu / base[1]:.2f}x); "
              f"sync {sync:5.2f} ms/step wall")
    payload = {"args": {k: str(v) for k, v in vars(args).items()}, "load_before": load_before,
               "load_after": load_after, "summary": summary, "runs": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2))
    return payload


if __name__ == "__main__":
    main()
