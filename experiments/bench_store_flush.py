"""The store's cost on the training thread per step, before and after the commit stopped joining buffered rows.

A ``RunWriter`` receives steps shaped like a run recording embeddings (a batch of ``--batch`` records, each with a
projected gradient of ``--dim`` float32 values, the default columns besides) and commits them as the recorder does
(every 100 steps, or earlier once 64 MB are buffered; ``compression=None`` so close() does not rewrite the file).
Two ways of writing a commit alternate in one process, on the same arrays, ``--repeats`` times each:

* ``joined (before)``: each column's buffered parts joined with ``np.concatenate`` and written in one call, as the
  writer did up to this benchmark's commit (reproduced here by replacing ``inrun.store.writer._write_rows``);
* ``parts (now)``: the writer as it is: each part written straight into its slice of the dataset.

Printed: milliseconds per appended step (all ``append_step`` calls and the last ``flush``, by the wall clock and by
this process's CPU time), the share spent in ``sync`` (HDF5 flush plus ``fsync``, the same in both), and the load
average of the machine before and after::

    .venv/bin/python -m experiments.bench_store_flush [--steps 60] [--repeats 5] [--batch 16] [--dim 53248]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from inrun.store import durability
from inrun.store import writer as store_writer
from inrun.store.schema import DEFAULT_RECORD_COLUMNS, Column


def joined_write_rows(dataset, start: int, parts: list[np.ndarray]) -> None:
    """The commit's write as it was: every buffered part of the column joined, then one resize and one write."""
    rows = np.concatenate(parts)
    dataset.resize(start + len(rows), axis=0)
    dataset[start : start + len(rows)] = rows


VARIANTS = {"joined (before)": joined_write_rows, "parts (now)": store_writer._write_rows}


def one_run(folder: Path, steps: list[dict], write_rows, columns: dict) -> dict:
    """Append every step to a new store; wall and CPU seconds of the appends and the last flush, and of sync."""
    synced = {"wall": 0.0}
    real_sync, real_write = durability.sync, store_writer._write_rows

    def timed_sync(file):
        began = time.perf_counter()
        try:
            real_sync(file)
        finally:
            synced["wall"] += time.perf_counter() - began

    store_writer._write_rows, store_writer.sync = write_rows, timed_sync
    try:
        w = store_writer.RunWriter(folder / "run.h5", record_columns=columns, overwrite=True, compression=None)
        synced["wall"] = 0.0  # creation's sync is not a per-step cost
        began, cpu_began = time.perf_counter(), time.process_time()
        for records in steps:
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
    parser.add_argument("--folder", type=Path, default=Path("runs"), help="where the stores are written")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_store_flush.json"))
    args = parser.parse_args(argv)
    columns = dict(DEFAULT_RECORD_COLUMNS) | {"proj_grad": Column(np.float32, (args.dim,))}
    rng = np.random.default_rng(0)
    steps = [{"sample_id": np.arange(args.batch) + args.batch * t, "value_1": rng.normal(size=args.batch),
              "proj_grad": rng.normal(size=(args.batch, args.dim)).astype(np.float32)} for t in range(args.steps)]
    step_mb = steps[0]["proj_grad"].nbytes / 1e6
    load_before = os.getloadavg()
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    args.folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        for name, write_rows in VARIANTS.items():  # warm-up
            one_run(Path(folder), steps[:4], write_rows, columns)
        for _ in range(args.repeats):
            for name, write_rows in VARIANTS.items():
                results[name].append(one_run(Path(folder), steps, write_rows, columns))
    load_after = os.getloadavg()
    print(f"{args.steps} steps of {args.batch} records with {args.dim} float32 values each ({step_mb:.1f} MB a "
          f"step), median of {args.repeats}; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    summary = {}
    base = None
    for name, runs in results.items():
        wall = statistics.median(r["wall"] for r in runs) / args.steps * 1e3
        cpu = statistics.median(r["cpu"] for r in runs) / args.steps * 1e3
        sync = statistics.median(r["sync"] for r in runs) / args.steps * 1e3
        base = base or (wall, cpu)
        summary[name] = {"wall_ms_per_step": wall, "cpu_ms_per_step": cpu, "sync_ms_per_step": sync}
        print(f"  {name:16s} {wall:6.2f} ms/step wall ({wall / base[0]:.2f}x), {cpu:6.2f} ms/step CPU "
              f"({cpu / base[1]:.2f}x), of which sync {sync:5.2f} ms/step wall")
    payload = {"args": {k: str(v) for k, v in vars(args).items()}, "load_before": load_before,
               "load_after": load_after, "summary": summary, "runs": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2))
    return payload


if __name__ == "__main__":
    main()
