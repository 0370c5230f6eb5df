"""Benchmark: Lightning fit time and peak memory with ``InRunCallback`` vs without, on a GPT-2-shaped model.

Configurations, measured side by side in one process on the same model shape, data and number of steps:
plain training; first-order values; second-order values; first-order values per validation point; and
projected-gradient recording (embeddings, shapley=None, without validation data: no validation pass). The validation
batch is one eighth of the training batch.
With AdamW every value configuration runs once per Adam value variant of ``--adam-values`` (``block``, the default,
values by ghost dot products; ``fixed-state``, the exact elementwise rule). ``--threads 1 2`` repeats the table per
torch thread count. Ratios are fit time with the callback over fit time without. Timing and memory methods:
``experiments/benchutil.py``. ``--fidelity`` also records both variants on the same fit and reports how the default
approximates the exact fixed-state values (per-step Pearson and Spearman, relative error of run totals).
``--phases`` then fits every configuration once more with the main pieces of inrun's work timed where they run
(:data:`PHASES`, CPU time, each counted without the timed pieces it calls) and prints them per optimizer step and as a
share of a plain step: where the ratio goes. What no phase covers (``other``) is the hooks during the training pass,
the callback's glue, parameter shifts, direction stacking and Python between the pieces.

    .venv/bin/python -m experiments.bench_inrun [--steps 6] [--seq-len 128] [--batch 16] [--layers 2] [--vocab 8192]
        [--optimizer adamw|sgd] [--adam-values block fixed-state] [--threads 1 2] [--fidelity] [--phases]
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from experiments.bench_engine import GPT, GPTShape, next_token_losses, random_tokens
from experiments.benchutil import format_bytes, measure, render_table
from inrun.callbacks import InRunCallback
from inrun.valuation.update_rules import ADAM_VALUES, DEFAULT_ADAM_VALUES


class TokenWindows(Dataset):
    """Random token windows with their dataset index (the batch format the callback needs)."""

    def __init__(self, tokens: Tensor):
        self.tokens = tokens

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, index: int) -> dict:
        return {"tokens": self.tokens[index], "index": index}


class GPTModule(L.LightningModule):
    def __init__(self, shape: GPTShape, lr: float, optimizer: str):
        super().__init__()
        self.model = GPT(shape)
        self.lr = lr
        self.optimizer_name = optimizer

    def per_sample_loss(self, batch: dict) -> Tensor:
        return next_token_losses(self.model, batch["tokens"])

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self):
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


CONFIGS = {
    "plain": None,
    "first": dict(shapley="first"),
    "second": dict(shapley="second"),
    "first, per val point": dict(shapley="first", per_val_point=True),
    "embeddings (64x64)": dict(shapley=None, embeddings=True),
}


#: (label, "module:Class" or "module", attribute): the pieces of inrun's work timed by ``--phases``; functions are patched
#: in the module that calls them
PHASES = [
    ("first-step self-checks", "inrun.engine.checks:RecorderChecks", "on_start"),
    ("first-step self-checks", "inrun.engine.checks:RecorderChecks", "on_microbatch"),
    ("first-step self-checks", "inrun.engine.checks:RecorderChecks", "on_step"),
    ("factor collection (end of backward)", "inrun.valuation.recorder:InRunRecorder", "end_microbatch"),
    ("non-finite gradient check", "inrun.valuation.recorder:InRunRecorder", "_non_finite"),
    ("update terms (Adam)", "inrun.valuation.recorder", "update_terms"),
    ("validation gradient(s)", "inrun.valuation.validation:ValidationSet", "gradient"),
    ("validation factors (ghost route)", "inrun.valuation.validation:ValidationSet", "captured"),
    ("validation losses (base, final)", "inrun.valuation.validation:ValidationSet", "loss"),
    ("products with D g_V and norms", "inrun.engine.captured:CapturedBatch", "fixed_dots_and_norms"),
    ("ghost products and norms", "inrun.engine.captured:CapturedBatch", "dots_by_parameter"),
    ("ghost products and norms", "inrun.engine.captured:CapturedBatch", "squared_norms"),
    ("projections (embeddings)", "inrun.valuation.recorder:InRunRecorder", "_add_projections"),
    ("store creation", "inrun.valuation.recorder:InRunRecorder", "_open_store"),
    ("store rows and commits", "inrun.store.writer:RunWriter", "append_step"),
    ("store rows and commits", "inrun.store.writer:RunWriter", "flush"),
    ("store close (compression)", "inrun.store.writer:RunWriter", "close"),
]


class PhaseTimers:
    """CPU seconds per label of :data:`PHASES`, each exclusive of the timed calls made inside it."""

    def __init__(self):
        self.cpu: dict[str, float] = {}
        self.wall: dict[str, float] = {}
        self._stack: list[list[float]] = []  # CPU and wall time spent in timed callees, per active timed call
        self._saved: list = []

    def __enter__(self) -> "PhaseTimers":
        for label, where, name in PHASES:
            module, _, cls_name = where.partition(":")
            owner = importlib.import_module(module)
            owner = getattr(owner, cls_name) if cls_name else owner
            original = owner.__dict__.get(name) if cls_name else getattr(owner, name, None)
            if original is None:
                warnings.warn(f"bench_inrun --phases: {where}.{name} not found; '{label}' is not measured")
                continue
            self._saved.append((owner, name, original))
            wrapped = self._wrap(label, original.__func__ if isinstance(original, staticmethod) else original)
            setattr(owner, name, staticmethod(wrapped) if isinstance(original, staticmethod) else wrapped)
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved = []

    def _wrap(self, label: str, original):
        timers = self

        @functools.wraps(original)
        def timed(*args, **kwargs):
            timers._stack.append([0.0, 0.0])
            began, wall_began = time.process_time(), time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent, wall_spent = time.process_time() - began, time.perf_counter() - wall_began
                inner, wall_inner = timers._stack.pop()
                timers.cpu[label] = timers.cpu.get(label, 0.0) + spent - inner
                timers.wall[label] = timers.wall.get(label, 0.0) + wall_spent - wall_inner
                if timers._stack:
                    timers._stack[-1][0] += spent
                    timers._stack[-1][1] += wall_spent

        return timed


def phases(args: argparse.Namespace, shape: GPTShape, data: Dataset, val: dict, base: dict) -> dict:
    """One more fit per inrun configuration under :class:`PhaseTimers`: CPU and wall ms per step, and the CPU share
    of a plain step (``base``: the plain fit's measurement)."""
    found = {}
    base_cpu, base_wall = base["cpu_seconds"], base["seconds"]
    other = "other (training-pass hooks, callback glue, shifts, Python)"
    with tempfile.TemporaryDirectory() as folder:
        for name, options in configurations(args).items():
            if options is None:
                continue
            with PhaseTimers() as timers:
                began, wall_began = time.process_time(), time.perf_counter()
                fit_once(args, shape, data, val, options, Path(folder))
                total, wall = time.process_time() - began, time.perf_counter() - wall_began
            cpu = dict(timers.cpu, **{other: total - base_cpu - sum(timers.cpu.values())})
            walls = dict(timers.wall, **{other: wall - base_wall - sum(timers.wall.values())})
            print(f"{name}: fit {total:.2f} s CPU ({total / base_cpu:.2f}x plain), {wall:.2f} s wall "
                  f"({wall / base_wall:.2f}x); per optimizer step:")
            print(render_table(["phase", "CPU ms / step", "CPU share of a plain step", "wall ms / step"],
                               [[label, f"{1e3 * cpu[label] / args.steps:.1f}", f"{100 * cpu[label] / base_cpu:.1f}%",
                                 f"{1e3 * walls[label] / args.steps:.1f}"]
                                for label in sorted(cpu, key=lambda label: -cpu[label])]), flush=True)
            found[name] = {"fit_cpu_s": total, "fit_wall_s": wall, "plain_cpu_s": base_cpu, "plain_wall_s": base_wall,
                           "phases_cpu_s": cpu, "phases_wall_s": walls}
    return found


def configurations(args: argparse.Namespace) -> dict[str, dict | None]:
    """The configurations to time: each value configuration once per Adam value variant under AdamW."""
    found: dict[str, dict | None] = {}
    for name in args.configs:
        options = CONFIGS[name]
        if options is None or options.get("shapley") is None or args.optimizer != "adamw":
            found[name] = options
            continue
        for variant in args.adam_values:
            found[f"{name} [{variant}]"] = {**options, "adam_values": variant}
    return found


def fit_once(args: argparse.Namespace, shape: GPTShape, data: Dataset, val: dict, options: dict | None,
             folder: Path, path: Path | None = None) -> None:
    module = GPTModule(shape, lr=1e-4, optimizer=args.optimizer)
    callbacks = []
    if options is not None:
        # embeddings only (shapley=None) records without validation data, as it would be used: no validation pass
        given = val if options.get("shapley", "first") is not None else None
        callbacks.append(InRunCallback(path or folder / "run.h5", val_data=given, overwrite=True, **options))
    trainer = L.Trainer(
        max_steps=args.steps, accelerator="gpu" if args.device == "cuda" else "cpu", devices=1,
        precision="bf16-mixed" if args.dtype == "bf16" else "32-true", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    trainer.fit(module, DataLoader(data, batch_size=args.batch, shuffle=False))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--d-model", type=int, default=768, help="width (MLP 4x, heads of 64, at least 1)")
    parser.add_argument("--small", action="store_true",
                        help="the small-model setting of issue 12: d 128, 3 layers, ctx 64, vocab 256, batch 16, "
                             "validation 2, 24 steps; compare wall-time ratios (they include store open and close)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                        help="SGD-family rules value by ghost dot products with the validation points; Adam's "
                             "elementwise scale needs one weight-gradient-sized product per layer")
    parser.add_argument("--threads", type=int, nargs="+", default=[1],
                        help="torch CPU thread counts, one table each (1 gives steadier CPU times)")
    parser.add_argument("--adam-values", nargs="+", default=["block", "fixed-state"], choices=list(ADAM_VALUES),
                        help="AdamW: the value variants to time (docs/adam-values.md)")
    parser.add_argument("--phases", action="store_true",
                        help="then fit each configuration once more with inrun's main pieces of work timed (CPU)")
    parser.add_argument("--fidelity", action="store_true",
                        help="AdamW: the default variant against the exact fixed-state values on this model")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the fits run")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="bf16: Lightning's bf16-mixed")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_inrun.json"))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    os.environ.setdefault("WANDB_MODE", "offline")
    if args.small:
        args.d_model, args.layers, args.seq_len, args.vocab, args.batch, args.steps = 128, 3, 64, 256, 16, 24
    shape = GPTShape(vocab=args.vocab, n_layer=args.layers, d_model=args.d_model, d_mlp=4 * args.d_model,
                     n_head=max(1, args.d_model // 64), max_len=max(1024, args.seq_len + 1))
    data = TokenWindows(random_tokens(args.batch * args.steps, args.seq_len, args.vocab, 0, torch.device("cpu")))
    val = {"tokens": random_tokens(max(1, args.batch // 8), args.seq_len, args.vocab, 1, torch.device("cpu")),
           "index": torch.arange(max(1, args.batch // 8))}
    device = torch.device(args.device)
    payload: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "results": {}}
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"GPT-2-shaped model: {args.layers} blocks, d {args.d_model}, vocab {args.vocab}; batch {args.batch} x "
              f"{args.seq_len} tokens, validation batch {val['tokens'].shape[0]}; {args.optimizer}; {args.steps} "
              f"optimizer steps per fit; {torch.get_num_threads()} threads", flush=True)
        results = {}
        with tempfile.TemporaryDirectory() as folder:
            fit_once(args, shape, data, val, None, Path(folder))  # warm-up: imports, allocator, kernels
            for name, options in configurations(args).items():
                results[name] = measure(lambda: fit_once(args, shape, data, val, options, Path(folder)), device,
                                        repeats=args.repeats)
        base = results["plain"]
        rows = []
        for name, m in results.items():
            rows.append([name, f"{m.seconds:.2f}", f"{m.cpu_seconds:.2f}", f"{m.seconds / base.seconds:.2f}x",
                         f"{m.cpu_seconds / base.cpu_seconds:.2f}x", format_bytes(m.peak_bytes)])
        print(render_table(["configuration", "fit wall s", "fit cpu s", "wall ratio", "cpu ratio", "peak memory"],
                           rows), flush=True)
        key = "results" if len(args.threads) == 1 else f"results_{threads}_threads"
        payload[key if key != "results" else "results"] = {k: v.as_dict() for k, v in results.items()}
        if key != "results" and threads == args.threads[0]:
            payload["results"] = payload[key]
    if args.phases:
        payload["phases"] = phases(args, shape, data, val, payload["results"]["plain"])
    if args.fidelity and args.optimizer == "adamw":
        payload["fidelity"] = fidelity(args, shape, data, val)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2))
    return payload


def fidelity(args: argparse.Namespace, shape: GPTShape, data: Dataset, val: dict) -> dict:
    """Record the same AdamW fit with the default variant and with ``fixed-state`` (second order); compare."""
    from experiments.adam_fidelity import compare_runs

    with tempfile.TemporaryDirectory() as folder:
        paths = {}
        for variant in (DEFAULT_ADAM_VALUES, "fixed-state"):
            paths[variant] = Path(folder) / f"{variant}.h5"
            torch.manual_seed(0)
            fit_once(args, shape, data, val, dict(shapley="second", adam_values=variant), Path(folder),
                     paths[variant])
        found = compare_runs(paths[DEFAULT_ADAM_VALUES], paths["fixed-state"])
    print(f"fidelity of {DEFAULT_ADAM_VALUES!r} to 'fixed-state' on this model: {json.dumps(found)}")
    return found


if __name__ == "__main__":
    main()
