"""Fixed costs of inrun on a short Lightning fit: store creation, commits, compression at close, checkpoint writes.

The small model of issue 12: TinyGPT with d 128, 3 blocks, context 64, batch 16, a validation batch of 2, AdamW, a
Lightning fit of 24 steps; the wall time of ``trainer.fit`` includes the store's creation (at the first step) and its
close (final validation pass, last commit, compressing rewrite). Plain fits and fits with ``InRunCallback`` alternate
in one process (``--repeats`` of each, median). Inside the inrun fits, each fixed cost is timed where it happens by
wrapping the method that does it (nothing in the library changes):

* ``validation check``: ``InRunRecorder.start`` (hooks, and one validation gradient that fails early on bad data;
  called again at every step, where it returns at once);
* ``store creation``: ``InRunRecorder._open_store`` (``RunWriter`` creation: lock, file, tables, configuration);
* ``commits``: every ``RunWriter.flush`` (the writer commits every ``flush_every`` steps and at close); with the
  background writer (``INRUN_STORE_BACKGROUND=1``) the training thread's part of a commit: waiting for the block in
  flight and handing over the next (``RunWriter._commit_in_background``);
* ``compression``: ``RunWriter._compress``, the compressing rewrite after the file is closed;
* ``store close``: all of ``RunWriter.close`` (last commit, file close, compression);
* ``checkpoints``: ``InRunRecorder.save_checkpoint`` (the configurations with ``checkpoint_every``);
* ``recorder close``: ``InRunRecorder.close`` (final validation loss, last row, store close).

Each is printed in milliseconds and as a share of the inrun fit's time, next to the plain fit's time, by the wall
clock (what the issue asks) and by this process's CPU time (steadier on a shared machine); what is
left (``per-step work``) is the inrun fit minus the plain fit minus the fixed costs above (recorder close counted
once, it contains the store close)::

    .venv/bin/python -m experiments.bench_fixed_costs [--steps 24] [--repeats 3] [--threads 1]
    .venv/bin/python -m experiments.bench_fixed_costs --device cuda --dtype bf16     # on a GPU
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

#: (label, class path, method): the methods whose time is a fixed cost, timed where they run
TIMED = [
    ("validation check", "inrun.valuation.recorder:InRunRecorder", "start"),
    ("store creation", "inrun.valuation.recorder:InRunRecorder", "_open_store"),
    ("commits", "inrun.store.writer:RunWriter", "flush"),
    ("commits", "inrun.store.writer:RunWriter", "_commit_in_background"),  # the training thread's part of one
    ("compression", "inrun.store.writer:RunWriter", "_compress"),
    ("store close", "inrun.store.writer:RunWriter", "close"),
    ("checkpoints", "inrun.valuation.recorder:InRunRecorder", "save_checkpoint"),
    ("recorder close", "inrun.valuation.recorder:InRunRecorder", "close"),
]
#: the costs that do not contain one another (recorder close contains store close, which contains the last commit
#: and the compression; the "commits" before close are counted in "commits" minus the one inside close)
DISJOINT = ("validation check", "store creation", "checkpoints", "recorder close")

CONFIGS = {
    "first order": dict(shapley="first"),
    "second order": dict(shapley="second"),
    "embeddings only": dict(shapley=None, embeddings=True),
    "first order, checkpoint every 8": dict(shapley="first", checkpoint_every=8),
    "embeddings only, background writer": dict(shapley=None, embeddings=True, env={"INRUN_STORE_BACKGROUND": "1"}),
    # the commits as they were before they wrote the buffered parts unjoined (experiments.bench_store_flush)
    "embeddings only, joined commits (before)": dict(shapley=None, embeddings=True, joined=True),
}


class Timers:
    """Wall seconds and calls per label, for the methods in ``TIMED`` (patched on their classes while active)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._saved: list = []

    def __enter__(self) -> "Timers":
        import importlib

        for label, where, method in TIMED:
            module, name = where.split(":")
            cls = getattr(importlib.import_module(module), name)
            original = getattr(cls, method, None)
            if original is None:  # renamed since this benchmark was written: say so instead of timing nothing
                warnings.warn(f"bench_fixed_costs: {name}.{method} not found; '{label}' is not measured")
                continue
            self._saved.append((cls, method, original))
            setattr(cls, method, self._wrap(label, original))
        return self

    def __exit__(self, *exc) -> None:
        for cls, method, original in reversed(self._saved):
            setattr(cls, method, original)
        self._saved = []

    def _wrap(self, label: str, original):
        timers = self

        @functools.wraps(original)
        def timed(*args, **kwargs):
            if timers.device.type == "cuda":
                torch.cuda.synchronize(timers.device)
            began, cpu_began = time.perf_counter(), time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                if timers.device.type == "cuda":
                    torch.cuda.synchronize(timers.device)
                timers.seconds[label] = timers.seconds.get(label, 0.0) + time.perf_counter() - began
                timers.cpu_seconds[label] = timers.cpu_seconds.get(label, 0.0) + time.process_time() - cpu_began
                timers.calls[label] = timers.calls.get(label, 0) + 1

        return timed

    def reset(self) -> None:
        self.seconds, self.cpu_seconds, self.calls = {}, {}, {}


class TokenWindows(Dataset):
    """Random token windows in the batch format of ``experiments.textdata`` (input ids, labels, index)."""

    def __init__(self, n: int, seq_len: int, vocab: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, vocab, (n, seq_len + 1), generator=generator)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.tokens[i, :-1], "labels": self.tokens[i, 1:], "index": i}


def fit(args, options: dict | None, folder: Path, timers: Timers) -> dict:
    """One fit: its wall and CPU seconds, and the fixed costs timed inside it (both clocks)."""
    import lightning as L

    from experiments.tinygpt import TinyGPTConfig, TinyGPTModule
    from inrun.callbacks import InRunCallback

    config = TinyGPTConfig(seq_len=args.seq_len, n_layer=args.layers, d_model=args.d_model, n_head=4)
    module = TinyGPTModule(config, optimizer="adamw", lr=1e-3, seed=0)
    data = TokenWindows(args.batch * args.steps, args.seq_len, config.vocab_size, seed=0)
    val_windows = TokenWindows(args.val, args.seq_len, config.vocab_size, seed=1)
    val = {k: torch.stack([val_windows[i][k] for i in range(args.val)]) for k in ("input_ids", "labels")}
    callbacks = []
    options = None if options is None else dict(options)
    env = {} if options is None else options.pop("env", {})
    joined = False if options is None else options.pop("joined", False)
    saved_env = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # read when the store is created, at the first step
    if options is not None:
        callbacks.append(InRunCallback(folder / "run.h5", val_data=val, overwrite=True, **options))
    trainer = L.Trainer(max_steps=args.steps, accelerator="gpu" if args.device == "cuda" else "cpu", devices=1,
                        precision="bf16-mixed" if args.dtype == "bf16" else "32-true", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=callbacks)
    loader = DataLoader(data, batch_size=args.batch, shuffle=False)
    timers.reset()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    import inrun.store.writer as store_writer
    from experiments.bench_store_flush import joined_write_rows

    write_rows = store_writer._write_rows
    if joined:
        store_writer._write_rows = joined_write_rows
    began, cpu_began = time.perf_counter(), time.process_time()
    try:
        trainer.fit(module, loader)
    finally:
        store_writer._write_rows = write_rows
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"wall": time.perf_counter() - began, "cpu": time.process_time() - cpu_began,
            "costs": {"wall": dict(timers.seconds), "cpu": dict(timers.cpu_seconds)}, "calls": dict(timers.calls)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--val", type=int, default=2, help="validation windows")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench_fixed_costs.json"))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("WANDB_MODE", "offline")
    torch.set_num_threads(args.threads)
    timers = Timers(torch.device(args.device))
    plain: list[dict] = []
    runs: dict[str, list[dict]] = {name: [] for name in args.configs}
    with tempfile.TemporaryDirectory() as folder, timers:
        fit(args, None, Path(folder), timers)  # warm-up: imports, allocator, kernels
        fit(args, CONFIGS[args.configs[0]], Path(folder), timers)
        for _ in range(args.repeats):  # side by side: plain, each configuration, plain, ...
            plain.append(fit(args, None, Path(folder), timers))
            for name in args.configs:
                runs[name].append(fit(args, CONFIGS[name], Path(folder), timers))
    from experiments.benchutil import render_table

    labels = list(dict.fromkeys(label for label, _, _ in TIMED))
    print(f"TinyGPT d {args.d_model}, {args.layers} blocks, context {args.seq_len}; batch {args.batch}, validation "
          f"{args.val}; AdamW; Lightning fit of {args.steps} steps on {args.device} ({args.dtype}, "
          f"{torch.get_num_threads()} threads); median of {args.repeats}")
    payload: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "plain": plain, "configs": {}}
    for clock in ("wall", "cpu"):
        plain_s = statistics.median(run[clock] for run in plain)
        header = ["configuration", "plain fit s", "inrun fit s", "ratio", *labels, "per-step work"]
        rows = []
        for name in args.configs:
            total = statistics.median(run[clock] for run in runs[name])
            costs = {label: statistics.median(run["costs"][clock].get(label, 0.0) for run in runs[name])
                     for label in labels}
            calls = {label: max(run["calls"].get(label, 0) for run in runs[name]) for label in labels}
            fixed = sum(costs[label] for label in DISJOINT)
            commits_outside_close = max(0.0, costs["commits"] - (costs["store close"] - costs["compression"]))
            per_step = total - plain_s - fixed - commits_outside_close
            cells = [f"{costs[label] * 1e3:.0f} ms ({100 * costs[label] / total:.1f}%)" + (
                     f" x{calls[label]}" if calls[label] > 1 and label != "validation check" else "")
                     for label in labels]
            rows.append([name, f"{plain_s:.2f}", f"{total:.2f}", f"{total / plain_s:.2f}x", *cells,
                         f"{per_step * 1e3:.0f} ms ({100 * per_step / total:.1f}%)"])
            payload["configs"].setdefault(name, {})[clock] = {
                "median_s": total, "plain_median_s": plain_s, "ratio": total / plain_s, "fixed_costs_s": costs,
                "calls": calls, "per_step_work_s": per_step}
        print(f"\n{clock} time (shares of the inrun fit's {clock} time):")
        print(render_table(header, rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2))
    return payload


if __name__ == "__main__":
    main()
