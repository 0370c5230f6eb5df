"""Benchmark: Lightning fit time and peak memory with ``InRunCallback`` vs without, on a GPT-2-shaped model.

Configurations, measured side by side in one process on the same model shape, data and number of steps:
plain training; first-order values; second-order values; first-order values per validation point; and
projected-gradient recording (embeddings, shapley=None). The validation batch is one eighth of the training batch.
With AdamW every value configuration runs once per Adam value variant of ``--adam-values`` (``block``, the default,
values by ghost dot products; ``fixed-state``, the exact elementwise rule). ``--threads 1 2`` repeats the table per
torch thread count. Ratios are fit time with the callback over fit time without. Timing and memory methods:
``experiments/benchutil.py``. ``--fidelity`` also records both variants on the same fit and reports how the default
approximates the exact fixed-state values (per-step Pearson and Spearman, relative error of run totals).

    .venv/bin/python -m experiments.bench_inrun [--steps 6] [--seq-len 128] [--batch 16] [--layers 2] [--vocab 8192]
        [--optimizer adamw|sgd] [--adam-values block fixed-state] [--threads 1 2] [--fidelity]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
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
        callbacks.append(InRunCallback(path or folder / "run.h5", val_data=val, overwrite=True, **options))
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
