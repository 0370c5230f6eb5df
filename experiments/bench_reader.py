"""Reading a big run: time and peak memory of every read operation, each in a fresh process.

Stores are built with the library's own ``RunWriter`` (compressed at close, as a training run leaves them, with the
bitmap of sample ids the compression keeps; ``--compression none``: left uncompressed, and the reader finds the ids
by a pass over them): ``rows``
sample occurrences in steps of ``--batch`` records, sample ids drawn uniformly from a space ``--id-space`` times the
rows (sparse ids: about 95% distinct at 10x), 4 source labels, both value orders. Each operation runs in a new Python
process that imports only numpy/h5py/inrun's store (no torch) and reports its wall time and its peak resident memory
(``VmHWM``: the whole process, interpreter and libraries included; the row ``open only`` is that baseline) and
its CPU time (steadier than wall time on a shared machine). ``step_values`` is timed per call over random steps of a separate store with
``--step-store-steps`` steps (1M by default, 2 records each).

``--baseline`` runs the same operations with the reader of an earlier commit (``--baseline-commit``, default the one
before the streamed reader) side by side, and prints the ratio; the issue's own figures (another machine) are shown
for reference. The extrapolation to 1B rows is the line through the two largest sizes measured, for time and for
peak memory (which grows with the distinct ids: linearly in the rows at a fixed id space ratio).

    python experiments/bench_reader.py --rows 1000000 10000000 --baseline
    python experiments/bench_reader.py --rows 50000000          # opt-in: ~2 GB of disk, minutes to build
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OPERATIONS = ["open only", "sample_values", "top_k", "phase_values", "report", "export csv", "export parquet"]
ISSUE_TABLE = {  # the issue's figures (seconds, GB) at 10M and 50M rows, for the side-by-side column
    "sample_values": {10_000_000: (2.6, 0.9), 50_000_000: (28, 3.3)},
    "top_k": {10_000_000: (5.3, None), 50_000_000: (36, None)},
    "phase_values": {10_000_000: (2.0, None), 50_000_000: (9, 3.5)},
    "report": {10_000_000: (16, 1.2), 50_000_000: (77, 4.7)},
    "export csv": {10_000_000: (50, 1.6), 50_000_000: (175, 6.9)},
}


def build_store(path: Path, rows: int, batch: int, id_space: int, seed: int = 0,
                compression: str | None = "gzip") -> Path:
    """A one-rank store of ``rows`` records written step by step with ``RunWriter`` (``compression`` at close)."""
    from inrun.store.writer import RunWriter

    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".building.h5")
    with RunWriter(tmp, overwrite=True, flush_every=64, config={"shapley_order": 2, "update_rule": "sgd"},
                   compression=compression) as w:
        w.write_static("sources/names", ["web", "books", "code", "math"])
        done, step = 0, 0
        while done < rows:
            n = min(batch, rows - done)
            w.append_step({"lr": 1e-3 * (1 + step % 7), "val_loss": 1.0},
                          {"sample_id": rng.integers(0, id_space, n), "value_1": rng.normal(size=n),
                           "value_2": rng.normal(size=n), "grad_norm_sq": rng.uniform(0.5, 2, n),
                           "source": rng.integers(0, 4, n)})
            done, step = done + n, step + 1
    tmp.rename(path)
    return path


def child(operation: str, store: str, baseline: str | None, out_dir: str) -> dict:
    """Run one operation in this (fresh) process and return its time and peak memory."""
    if baseline:  # the earlier reader and command line, in place of today's
        import importlib.util

        import inrun.store  # noqa: F401 -- the package first: its __init__ imports today's reader

        for name, file in (("inrun.store.reader", baseline), ("inrun.cli", baseline.replace("reader_", "cli_"))):
            spec = importlib.util.spec_from_file_location(name, file)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
    from inrun import cli
    from inrun.store.reader import open_run

    start, cpu_start = time.perf_counter(), time.process_time()
    extra = {}
    with open_run(store) as run:
        window = max(1, run.num_steps // 10)
        if operation == "sample_values":
            run.sample_values(order=1)
        elif operation == "top_k":
            run.top_k(100)
        elif operation == "phase_values":
            run.phase_values(window, by_source=True)
        elif operation == "step_values":
            run.step_values(0)  # the index is built once
            picks = np.random.default_rng(0).integers(0, run.num_steps, 2000)
            t0 = time.perf_counter()
            for t in picks:
                run.step_values(int(t))
            extra["ms_per_call"] = 1e3 * (time.perf_counter() - t0) / picks.size
            extra["steps"] = run.num_steps
    if operation == "report":
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):
            cli.write_report(store, png=os.path.join(out_dir, "report.png"))
    elif operation == "export csv":
        cli.export(store, os.path.join(out_dir, "values.csv"), None)
    elif operation == "export parquet":
        if baseline:
            return {"skipped": "the baseline has no Parquet export"}
        cli.export(store, None, None, parquet_dir=os.path.join(out_dir, "parquet"))
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "cpu_seconds": time.process_time() - cpu_start, "peak_bytes": peak_rss(), **extra}


def peak_rss() -> int:
    """Peak resident memory of this process: ``VmHWM`` (reset by exec, unlike ``ru_maxrss``, which keeps the
    high-water mark of the parent process that forked this one); ``ru_maxrss`` where /proc is missing."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(operation: str, store: Path, baseline: Path | None, timeout: float) -> dict:
    with tempfile.TemporaryDirectory() as out_dir:
        command = [sys.executable, __file__, "--child", operation, "--store", str(store), "--out", out_dir]
        if baseline:
            command += ["--baseline-file", str(baseline)]
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"error": f"over {timeout:.0f} s"}
        if done.returncode != 0:
            return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"rc {done.returncode}"}
        return json.loads(done.stdout.strip().splitlines()[-1])


def baseline_reader(commit: str, folder: Path) -> Path:
    """The reader and command line of ``commit``, written to ``folder`` (the reader's path is returned)."""
    for module in ("store/reader", "cli"):
        source = subprocess.run(["git", "show", f"{commit}:inrun/{module}.py"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout
        (folder / f"{module.split('/')[-1]}_{commit[:10]}.py").write_text(source)
    return folder / f"reader_{commit[:10]}.py"


def extrapolate(figures: dict, target: float = 1e9) -> list[str]:
    """Time and peak memory at ``target`` rows, on the line through the two largest sizes measured."""
    sizes = sorted(figures)
    if len(sizes) < 2:
        return []
    small, big = sizes[-2], sizes[-1]
    lines = [f"\nextrapolated to {target:,.0f} rows (line through {small:,} and {big:,} rows)",
             f"{'operation':<16}{'time':>12}{'peak RSS':>12}"]
    for operation, result in figures[big].items():
        a, b = figures[small][operation]["streamed"], result["streamed"]
        if "seconds" not in a or "seconds" not in b:
            continue
        at = lambda key: b[key] + (b[key] - a[key]) / (big - small) * (target - big)  # noqa: E731
        lines.append(f"{operation:<16}{at('seconds') / 60:>10.1f} m{at('peak_bytes') / 2**30:>9.1f} GB")
    return lines


def fmt(result: dict | None, key: str = "seconds") -> str:
    if result is None:
        return "-"
    if "error" in result or "skipped" in result:
        return result.get("error") or "n/a"
    if key == "peak_bytes":
        return f"{result[key] / 2**30:.2f} GB"
    return f"{result[key]:.2f} s"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--id-space", type=float, default=10.0, help="ids drawn from [0, id_space * rows)")
    parser.add_argument("--step-store-steps", type=int, default=1_000_000, help="0: skip the step_values store")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "inrun_bench_reader"))
    parser.add_argument("--operations", nargs="+", default=OPERATIONS, choices=OPERATIONS)
    parser.add_argument("--compression", default="gzip", choices=["gzip", "lzf", "none"],
                        help="how the stores are compressed at close (none: uncompressed, no stored id bitmap)")
    parser.add_argument("--baseline", action="store_true", help="also run the earlier reader, side by side")
    parser.add_argument("--baseline-commit", default="ba4d8a6")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per operation")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--store", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--baseline-file", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.store, args.baseline_file, args.out)))
        return

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    baseline = baseline_reader(args.baseline_commit, workdir) if args.baseline else None
    figures: dict = {"rows": {}, "step_values": None}
    for rows in args.rows:
        space = int(args.id_space * rows)
        started = time.perf_counter()
        suffix = "" if args.compression == "gzip" else f"_{args.compression}"
        compression = None if args.compression == "none" else args.compression
        store = build_store(workdir / f"run_{rows}_{args.batch}_{space}{suffix}.h5", rows, args.batch, space,
                            compression=compression)
        print(f"\n== {rows:,} rows, batch {args.batch}, ids from [0, {space:,}), {args.compression}, store "
              f"{store.stat().st_size / 2**20:.0f}"
              f" MiB (ready in {time.perf_counter() - started:.0f} s)", flush=True)
        header = f"{'operation':<16}{'time':>10}{'CPU':>10}{'peak RSS':>11}{'issue table':>14}"
        if baseline:
            header += f"{'baseline time':>15}{'CPU':>10}{'peak':>10}{'speed-up':>10}{'(CPU)':>9}"
        header += f"{'load':>7}"  # the 1-minute load average after the operation (the machine may be shared)
        print(header, flush=True)
        results = {}
        for operation in args.operations:
            mine = run_child(operation, store, None, args.timeout)
            other = run_child(operation, store, baseline, args.timeout) if baseline else None
            results[operation] = {"streamed": mine, "baseline": other}
            line = f"{operation:<16}{fmt(mine):>10}{fmt(mine, 'cpu_seconds'):>10}{fmt(mine, 'peak_bytes'):>11}"
            issue = ISSUE_TABLE.get(operation, {}).get(rows)
            line += f"{issue[0]:>8} s {issue[1] or '?':>3} GB" if issue else f"{'':>14}"
            if baseline:
                ratio = (f"{other['seconds'] / mine['seconds']:.1f}x" if "seconds" in (other or {}) and
                         "seconds" in mine else "-")
                cpu = (f"{other['cpu_seconds'] / mine['cpu_seconds']:.1f}x" if "cpu_seconds" in (other or {}) and
                       "cpu_seconds" in mine else "-")
                line += f"{fmt(other):>15}{fmt(other, 'cpu_seconds'):>10}{fmt(other, 'peak_bytes'):>10}{ratio:>10}{cpu:>9}"
            results[operation]["load_average"] = os.getloadavg()[0]
            print(line + f"{os.getloadavg()[0]:>7.1f}", flush=True)
        figures["rows"][rows] = results
    for line in extrapolate(figures["rows"]):
        print(line, flush=True)
    if args.step_store_steps:
        steps = args.step_store_steps
        store = build_store(workdir / f"steps_{steps}.h5", 2 * steps, 2, 20 * steps)
        mine = run_child("step_values", store, None, args.timeout)
        other = run_child("step_values", store, baseline, args.timeout) if baseline else None
        figures["step_values"] = {"streamed": mine, "baseline": other}
        line = f"\nstep_values over {steps:,} steps: " + (f"{mine['ms_per_call']:.3f} ms per call, peak "
                                                         f"{fmt(mine, 'peak_bytes')}" if "ms_per_call" in mine
                                                         else str(mine))
        if other and "ms_per_call" in other:
            line += f"; baseline {other['ms_per_call']:.3f} ms per call"
        print(line, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1, default=str))


if __name__ == "__main__":
    main()
