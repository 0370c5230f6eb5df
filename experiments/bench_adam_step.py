"""Per-step cost of In-Run Shapley under AdamW, plain PyTorch loop, configurations interleaved round by round.

On a shared machine the load changes over minutes, which skews configurations timed one after the other (as
``bench_inrun`` does). Here every configuration has its own model (same initial parameters), optimizer and recorder,
and the rounds interleave them: each round times ``--steps-per-round`` steps of every configuration in turn; the
table shows the median over rounds of the CPU time per step (one torch thread; wall time with ``--threads 2`` or more,
where CPU time would count spinning threads) and its ratio to plain training.
GPT-2-shaped model as in ``bench_inrun`` (2 blocks of d 768, vocab 8192, batch 16 x 128, validation batch 2);
``--small`` is the small model of issue 12 (d 128, 3 blocks, context 64, vocab 256, batch 16, validation batch 2).
The first step of every configuration (store creation, the first-step self-checks) is timed apart and shown once:
the medians are the steady state. Embeddings only records without validation data (no validation pass).

    .venv/bin/python -m experiments.bench_adam_step [--rounds 4] [--layers 2] [--small] [--configs ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from experiments.bench_engine import GPT, GPTShape, next_token_losses, random_tokens
from experiments.benchutil import render_table, train_step
from inrun.valuation.recorder import InRunRecorder

CONFIGS = {
    "plain": None,
    "first [block]": dict(shapley="first", adam_values="block"),
    "first [fixed-state]": dict(shapley="first", adam_values="fixed-state"),
    "first [fixed-state], with norms": dict(shapley="first", adam_values="fixed-state", record_norms=True),
    "first [block], with norms": dict(shapley="first", adam_values="block", record_norms=True),
    "second [block]": dict(shapley="second", adam_values="block"),
    "second [fixed-state]": dict(shapley="second", adam_values="fixed-state"),
    "first, per val point [block]": dict(shapley="first", adam_values="block", per_val_point=True),
    "first, per val point [fixed-state]": dict(shapley="first", adam_values="fixed-state", per_val_point=True),
    "embeddings (64x64)": dict(shapley=None, embeddings=True),
}


def loss_fn(model, batch):
    return next_token_losses(model, batch["tokens"])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps-per-round", type=int, default=1)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--d-model", type=int, default=768, help="width (MLP 4x, heads of 64, at least 1)")
    parser.add_argument("--small", action="store_true",
                        help="issue 12's small model: d 128, 3 blocks, context 64, vocab 256, batch 16")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CPU time then counts every thread)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    if args.small:
        args.d_model, args.layers, args.seq_len, args.vocab, args.batch = 128, 3, 64, 256, 16
    shape = GPTShape(vocab=args.vocab, n_layer=args.layers, d_model=args.d_model, d_mlp=4 * args.d_model,
                     n_head=max(1, args.d_model // 64), max_len=max(1024, args.seq_len + 1))
    n_steps = args.rounds * args.steps_per_round + 1
    data = random_tokens(args.batch * n_steps, args.seq_len, args.vocab, 0, torch.device("cpu"))
    val = {"tokens": random_tokens(max(1, args.batch // 8), args.seq_len, args.vocab, 1, torch.device("cpu"))}
    configs = ["plain"] + [c for c in args.configs if c != "plain"]
    times: dict[str, list[float]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as folder:
        states = {}
        for k, name in enumerate(configs):
            torch.manual_seed(0)
            model = GPT(shape)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            recorder = None
            if CONFIGS[name] is not None:
                given = val if CONFIGS[name].get("shapley", "first") is not None else None
                recorder = InRunRecorder(model, Path(folder) / f"run{k}.h5", val_data=given, loss_fn=loss_fn,
                                         overwrite=True, **CONFIGS[name])
                recorder.start()
            states[name] = [model, optimizer, recorder, 0]

        def step(name: str) -> None:
            model, optimizer, recorder, t = states[name]
            ids = torch.arange(t * args.batch, (t + 1) * args.batch)
            train_step(model, optimizer, loss_fn, {"tokens": data[ids], "index": ids}, recorder)
            states[name][3] = t + 1

        first: dict[str, float] = {}
        for name in configs:  # the first step (store creation, first-step self-checks), timed apart
            start = clock()
            step(name)
            first[name] = clock() - start
        for _ in range(args.rounds):
            for name in configs:
                start = clock()
                for _ in range(args.steps_per_round):
                    step(name)
                times[name].append((clock() - start) / args.steps_per_round)
        for model, optimizer, recorder, _ in states.values():
            if recorder is not None:
                recorder.close()
    base = statistics.median(times["plain"])
    rows = [[name, f"{statistics.median(v):.3f}", f"{statistics.median(v) / base:.2f}x",
             " ".join(f"{x / t:.2f}" for x, t in zip(v, times["plain"])), f"{first[name]:.3f}"]
            for name, v in times.items()]
    unit = "CPU" if args.threads == 1 else "wall"
    print(render_table(["configuration", f"{unit} s / step (median)", "ratio", "ratio per round", f"first step {unit} s"],
                       rows))
    return {name: statistics.median(v) for name, v in times.items()}


if __name__ == "__main__":
    main()
