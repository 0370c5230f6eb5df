"""Benchmark: Lightning fit time and peak memory with ``InRunCallback`` vs without, on a GPT-2-shaped model.

Configurations, measured side by side in one process on the same model shape, data and number of steps:
plain training; first-order values; second-order values; first-order values per validation point; and
projected-gradient recording (embeddings, shapley=None). The validation batch is one eighth of the training batch.
Ratios are fit time with the callback over fit time without. Timing and memory methods: ``experiments/benchutil.py``.

    .venv/bin/python -m experiments.bench_inrun [--steps 6] [--seq-len 128] [--batch 16] [--layers 2] [--vocab 8192]
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


def fit_once(args: argparse.Namespace, shape: GPTShape, data: Dataset, val: dict, options: dict | None,
             folder: Path) -> None:
    module = GPTModule(shape, lr=1e-4, optimizer=args.optimizer)
    callbacks = []
    if options is not None:
        callbacks.append(InRunCallback(folder / "run.h5", val_data=val, overwrite=True, **options))
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
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS))
    parser.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                        help="SGD-family rules value by ghost dot products with the validation points; Adam's "
                             "elementwise scale needs one weight-gradient-sized product per layer")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 gives steadier CPU times)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the fits run")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="bf16: Lightning's bf16-mixed")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_inrun.json"))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    os.environ.setdefault("WANDB_MODE", "offline")
    shape = GPTShape(vocab=args.vocab, n_layer=args.layers)
    data = TokenWindows(random_tokens(args.batch * args.steps, args.seq_len, args.vocab, 0, torch.device("cpu")))
    val = {"tokens": random_tokens(max(1, args.batch // 8), args.seq_len, args.vocab, 1, torch.device("cpu")),
           "index": torch.arange(max(1, args.batch // 8))}
    device = torch.device(args.device)
    print(f"GPT-2-shaped model: {args.layers} blocks, d 768, vocab {args.vocab}; batch {args.batch} x {args.seq_len} "
          f"tokens, validation batch {val['tokens'].shape[0]}; {args.optimizer}; {args.steps} optimizer steps per fit; "
          f"{torch.get_num_threads()} threads")
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        fit_once(args, shape, data, val, None, Path(folder))  # warm-up: imports, allocator, kernels
        for name in args.configs:
            options = CONFIGS[name]
            results[name] = measure(lambda: fit_once(args, shape, data, val, options, Path(folder)), device,
                                    repeats=args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"args": {k: str(v) for k, v in vars(args).items()}, "results": {k: v.as_dict() for k, v in results.items()}}
    args.out.write_text(json.dumps(payload, indent=2))
    base = results["plain"]
    rows = []
    for name, m in results.items():
        rows.append([name, f"{m.seconds:.2f}", f"{m.cpu_seconds:.2f}", f"{m.seconds / base.seconds:.2f}x",
                     f"{m.cpu_seconds / base.cpu_seconds:.2f}x", format_bytes(m.peak_bytes)])
    print(render_table(["configuration", "fit wall s", "fit cpu s", "wall ratio", "cpu ratio", "peak memory"], rows))
    return payload


if __name__ == "__main__":
    main()
