"""Cost of recording projected gradients for data value embeddings, and of building the embeddings afterwards.

A GPT-2-shaped model (``experiments.tinygpt.TinyGPT``, scaled by ``--layers``/``--d-model``) trained by a plain
PyTorch loop with AdamW on random tokens, in one process, side by side:

* ``off``: no recorder;
* ``embeddings``: ``InRunRecorder(shapley=None, embeddings={k_rows, k_cols})``: projected per-sample gradients only;
* ``shapley+embeddings`` (unless ``--no-shapley``): first-order In-Run values as well.

Configurations take turns in rounds of ``--round-steps`` steps (after a warm-up), so that a busy machine slows them
alike; the fit time of a configuration is the sum of its rounds. The recorder's ``close`` (final flush, and the store's
rewrite of the whole file with gzip) is timed apart and shown per recorded step ("close s/step") and folded into the
ratio "w/ close". Reported: the fit-time ratios to ``off``, bytes written per step (store size / steps) next to the formula
``B * D * itemsize`` (``D = sum over layer blocks of k_rows * k_cols``), and the embedding build throughput
(steps per second of :func:`inrun.posthoc.build_embeddings`, float32, on ``--device``).

    .venv/bin/python -m experiments.bench_embeddings            # 4 layers, d_model 128, k 64 x 64
    .venv/bin/python -m experiments.bench_embeddings --quick    # 2 layers, d_model 64, k 32 x 32
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import warnings
from pathlib import Path

import torch

from experiments.tinygpt import TinyGPT, TinyGPTConfig, per_sample_lm_loss
from inrun import embeddings
from inrun.valuation.recorder import InRunRecorder


def loss_fn(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return per_sample_lm_loss(model(batch["input_ids"]), batch["labels"])


def make_batches(n_batches: int, batch: int, seq: int, vocab: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n_batches):
        tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g)
        out.append({"input_ids": tokens[:, :-1], "labels": tokens[:, 1:],
                    "index": torch.arange(b * batch, (b + 1) * batch)})
    return out


class Trainer:
    """One configuration: its own model (same initialisation), optimizer and optional recorder."""

    def __init__(self, name: str, config: TinyGPTConfig, val: dict, path: Path | None, recorder_args: dict | None,
                 device: torch.device = torch.device("cpu"), bf16: bool = False):
        self.name = name
        self.device, self.bf16 = device, bf16
        self.model = TinyGPT(config, seed=0).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.recorder = None
        self.path = path
        if recorder_args is not None:
            self.recorder = InRunRecorder(self.model, path, val_data=val, loss_fn=loss_fn, overwrite=True, **recorder_args)
            self.recorder.start()
        self.seconds = 0.0
        self.close_seconds = 0.0
        self.steps = 0

    def run(self, batches: list[dict], timed: bool = True) -> None:
        start = time.perf_counter()
        for batch in batches:
            batch = {key: value.to(self.device) for key, value in batch.items()}
            if self.recorder:
                self.recorder.begin_microbatch(batch)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss = loss_fn(self.model, batch).mean()
            loss.backward()
            if self.recorder:
                self.recorder.end_microbatch()
                self.recorder.before_optimizer_step(self.optimizer)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.recorder:
                self.recorder.note_train_loss(float(loss.detach()))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if timed:
            self.seconds += time.perf_counter() - start
            self.steps += len(batches)

    def close(self) -> None:
        """The recorder's close: final flush, and the store's rewrite with compression (``RunWriter.close``)."""
        start = time.perf_counter()
        if self.recorder:
            self.recorder.close()
        self.close_seconds = time.perf_counter() - start


def projected_dim(path: Path) -> tuple[int, list[dict], str]:
    import h5py

    with h5py.File(path, "r") as f:
        layout = json.loads(f["projection"].attrs["layout"])
        dtype = str(f["records/proj_grad"].dtype)
    return sum(b["k_rows"] * b["k_cols"] for b in layout), layout, dtype


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--d-model", type=int, default=None)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--k", type=int, default=None, help="k_rows = k_cols of the projection")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="stored proj_grad dtype")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--round-steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--val", type=int, default=2, help="validation sequences (the recorder scores them each step)")
    parser.add_argument("--no-shapley", action="store_true")
    parser.add_argument("--device", default="cpu", help="device of the training loops and of the embedding build")
    parser.add_argument("--train-dtype", default="fp32", choices=("fp32", "bf16"),
                        help="bf16: the training forward runs under torch.autocast(bfloat16) (the recorder upcasts)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    layers = args.layers or (2 if args.quick else 4)
    d_model = args.d_model or (64 if args.quick else 128)
    k = args.k or (32 if args.quick else 64)
    rounds = args.rounds or (3 if args.quick else 4)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*not valued.*")
    # position table of 2 * seq rows (more than k): a one-hot side kept whole (rows <= k) cannot be projected yet
    config = TinyGPTConfig(vocab_size=256, seq_len=max(2 * args.seq, k + 1), n_layer=layers, n_head=args.heads,
                           d_model=d_model)
    total = args.warmup + rounds * args.round_steps
    batches = make_batches(total, args.batch, args.seq, config.vocab_size)
    val = make_batches(1, args.val, args.seq, config.vocab_size, seed=1)[0]
    emb = {"k_rows": k, "k_cols": k, "dtype": args.dtype}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        where = dict(device=torch.device(args.device), bf16=args.train_dtype == "bf16")
        val = {key: value.to(args.device) for key, value in val.items()}
        trainers = [Trainer("off", config, val, None, None, **where),
                    Trainer("embeddings", config, val, tmp / "emb.h5", {"shapley": None, "embeddings": emb}, **where)]
        if not args.no_shapley:
            trainers.append(Trainer("shapley+embeddings", config, val, tmp / "both.h5",
                                    {"shapley": "first", "embeddings": emb}, **where))
        n_params = sum(p.numel() for p in trainers[0].model.parameters())
        for trainer in trainers:
            trainer.run(batches[: args.warmup], timed=False)
        for r in range(rounds):
            part = batches[args.warmup + r * args.round_steps: args.warmup + (r + 1) * args.round_steps]
            for trainer in trainers if r % 2 == 0 else trainers[::-1]:
                trainer.run(part)
        for trainer in trainers:
            trainer.close()
        base = trainers[0].seconds / trainers[0].steps  # "off" has nothing to close
        dim, layout, stored = projected_dim(tmp / "emb.h5")
        itemsize = torch.tensor([], dtype=getattr(torch, stored)).element_size()
        steps = total
        print(f"model: TinyGPT {layers} layers, d_model {d_model}, {n_params / 1e6:.2f} M parameters, batch {args.batch} "
              f"x {args.seq} tokens, AdamW; projection {k} x {k} -> D = {dim} ({len(layout)} blocks), stored {stored}; "
              f"torch {torch.__version__} on {platform.machine()} ({args.device}, {args.train_dtype}), "
              f"{torch.get_num_threads()} threads")
        print(f"{'configuration':<22}{'s/step':>9}{'ratio':>8}{'close s/step':>14}{'ratio w/ close':>16}{'MiB/step':>10}")
        for trainer in trainers:
            per_step = trainer.seconds / trainer.steps
            close = trainer.close_seconds / steps  # the close rewrites every recorded step, warm-up included
            size = f"{trainer.path.stat().st_size / steps / 2**20:>10.2f}" if trainer.path else f"{'-':>10}"
            print(f"{trainer.name:<22}{per_step:>9.3f}{per_step / base:>8.2f}{close:>14.3f}"
                  f"{(per_step + close) / base:>16.2f}{size}")
        formula = args.batch * dim * itemsize
        print(f"bytes per step by formula: B * D * itemsize = {args.batch} * {dim} * {itemsize} = "
              f"{formula / 2**20:.2f} MiB (per sample per step {dim * itemsize / 1024:.1f} KiB)")
        m_bytes = sum((b["k_rows"] * b["k_cols"]) ** 2 for b in layout) * 4
        start = time.perf_counter()
        embeddings.build_embeddings(tmp / "emb.h5", tmp / "emb.dvemb.h5", device=args.device, progress=False,
                                    chunk_steps=64)
        build = time.perf_counter() - start
        print(f"embedding build ({args.device}, float32, M = {m_bytes / 2**20:.0f} MiB): {steps} steps in {build:.1f} s "
              f"= {steps / build:.2f} steps/s ({steps * args.batch / build:.0f} sample occurrences/s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
