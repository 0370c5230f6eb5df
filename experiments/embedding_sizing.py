"""How many bytes per sample occurrence do data value embeddings need, and what does a smaller projection cost in
fidelity? (docs/embeddings.md, "Sizing")

Two parts:

* **Bytes** for real model shapes, from the parameter shapes of transformers configs built on the meta device (no
  weights, no download): GPT-2 small (124M), Pythia-410M and Pythia-1B shapes (GPT-NeoX), for several projection sizes
  ``k x k`` per matrix and flat parameters kept whole (the default) or projected to ``flat_k``. The record row adds 44
  bytes (ids, values, norms) to ``D * 4`` (float32) or ``D * 2`` (float16).
* **Fidelity** of trajectory-specific leave-one-out (TSLOO) on the retraining experiment of
  ``experiments/fidelity_dvemb.py`` (digits, MLP 64-32-10, SGD, fixed batch order): the ground truth is computed once
  by retraining, then DVEmb is recorded and built for each projection size and compared (Spearman, Pearson; single
  step and all epochs).

    .venv/bin/python -m experiments.embedding_sizing              # lr 0.1, 60 points (a few minutes on 1 core)
    .venv/bin/python -m experiments.embedding_sizing --quick      # 12 points, 2 sizes (smoke test)
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from experiments import fidelity_dvemb as fid
from inrun import embeddings, open_run

ROW_EXTRA_BYTES = 44  # step, sample_id, value_1, value_2, grad_norm_sq (8 each) and source (4)


def projected_dim(shapes: list[tuple[int, ...]], k: int, flat_k: int | None = None) -> tuple[int, int]:
    """``(D, flat part of D)`` for parameters of ``shapes`` (2-D: a matrix, else flat) at ``k x k`` per matrix."""
    total = flat = 0
    for shape in shapes:
        if len(shape) == 2:
            total += min(shape[0], k) * min(shape[1], k)
        else:
            n = int(np.prod(shape))
            part = min(n, k * k if flat_k is None else flat_k)
            total += part
            flat += part
    return total, flat


def model_shapes() -> dict[str, tuple[int, list[tuple[int, ...]]]]:
    """Parameter counts and shapes of GPT-2 small and two Pythia sizes (meta device: no memory, no download)."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

    configs = {
        "GPT-2 small (124M)": (GPT2LMHeadModel, GPT2Config()),
        "Pythia-410M shapes": (GPTNeoXForCausalLM, GPTNeoXConfig(hidden_size=1024, num_hidden_layers=24,
                                                                  num_attention_heads=16, intermediate_size=4096,
                                                                  vocab_size=50304)),
        "Pythia-1B shapes": (GPTNeoXForCausalLM, GPTNeoXConfig(hidden_size=2048, num_hidden_layers=16,
                                                                num_attention_heads=8, intermediate_size=8192,
                                                                vocab_size=50304)),
    }
    found = {}
    for name, (cls, config) in configs.items():
        with torch.device("meta"):
            model = cls(config)
        params = dict(model.named_parameters())  # tied weights appear once
        found[name] = (sum(p.numel() for p in params.values()), [tuple(p.shape) for p in params.values()])
    return found


def bytes_table(sizes=(8, 16, 32, 64)) -> str:
    lines = ["| model | params | k x k | flat parameters | D | flat share | bytes / occurrence (float32) | "
             "100k steps x batch 512 (float32) | (float16) |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for name, (count, shapes) in model_shapes().items():
        for k in sizes:
            for flat_k in (None, k):
                dim, flat = projected_dim(shapes, k, flat_k)
                row32, row16 = dim * 4 + ROW_EXTRA_BYTES, dim * 2 + ROW_EXTRA_BYTES
                occurrences = 100_000 * 512
                lines.append(f"| {name} | {count / 1e6:.0f}M | {k} x {k} | "
                             f"{'default: min(n, k * k)' if flat_k is None else f'flat_k = {flat_k}'} | {dim:,} | "
                             f"{flat / dim:.0%} | {row32 / 1e3:,.1f} KB | {row32 * occurrences / 1e12:,.1f} TB | "
                             f"{row16 * occurrences / 1e12:,.1f} TB |")
    return "\n".join(lines)


def fidelity_table(lr: float, points: int, settings: list[dict], seed: int = 0) -> str:
    setup = fid.Setup(seed=seed)
    x, y, test = fid.load_data(setup)
    order = fid.batch_order(setup)
    states: list[dict] = []
    final = fid.train(lr, x, y, order, states=states)
    base = fid.test_loss(final, test)
    occurrences: dict[int, list[int]] = {}
    for step, ids in enumerate(order):
        for i in ids.tolist():
            occurrences.setdefault(i, []).append(step)
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(setup.n_train, size=points, replace=False))
    one_step = np.array([occurrences[int(i)][rng.integers(len(occurrences[int(i)]))] for i in chosen])
    truth_one, truth_all = [], []
    for i, step in zip(chosen.tolist(), one_step.tolist()):  # the ground truth, once for every projection size
        model = fid.train(lr, x, y, order, removal=(i, {step}), start=(step, states[step]))
        truth_one.append(fid.test_loss(model, test) - base)
        steps = occurrences[i]
        model = fid.train(lr, x, y, order, removal=(i, set(steps)), start=(steps[0], states[steps[0]]))
        truth_all.append(fid.test_loss(model, test) - base)
    lines = ["| k x k | flat parameters | D | bytes / occurrence (float32 D) | single step: Spearman | Pearson | "
             "all epochs: Spearman | Pearson |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as folder:
        for n, options in enumerate(settings):
            path = Path(folder) / f"run{n}.h5"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                recorder_args = dict(path=path, val_data=test, loss_fn=fid.loss_fn, shapley=None, overwrite=True,
                                     embeddings={"kind": "gaussian", "seed": 0, **options})
                fid.train(lr, x, y, order, recorder_args=recorder_args)
            with open_run(path) as run:
                records = run.records(["sample_id", "step"])
                row = {(int(i), int(s)): r for r, (i, s) in enumerate(zip(records["sample_id"], records["step"]))}
                one_rows = np.array([row[(int(i), int(s))] for i, s in zip(chosen, one_step)])
                at = np.searchsorted(run.sample_ids, chosen)
                dim = run.record_shape("proj_grad")[0]
                out = embeddings.build_embeddings(run, Path(folder) / f"run{n}.dvemb.h5", dtype="float64",
                                                  progress=False, resume=False)
                one = embeddings.trajectory_loo(run, final, fid.loss_fn, test, embeddings=out,
                                                per_occurrence=True).mean(1)[one_rows]
                everything = embeddings.trajectory_loo(run, final, fid.loss_fn, test, embeddings=out).mean(1)[at]
            s1, p1 = fid.correlations(one, np.array(truth_one))
            s2, p2 = fid.correlations(everything, np.array(truth_all))
            flat = "default: min(n, k * k)" if options.get("flat_k") is None else f"flat_k = {options['flat_k']}"
            lines.append(f"| {options['k_rows']} x {options['k_cols']} | {flat} | {dim:,} | {dim * 4:,} B | "
                         f"{s1:.2f} | {p1:.2f} | {s2:.2f} | {p2:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="12 points, two projection sizes, no model table")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--points", type=int, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    if args.quick:
        settings = [{"k_rows": 2, "k_cols": 2}, {"k_rows": 4, "k_cols": 4, "flat_k": 4}]
    else:
        settings = [{"k_rows": k, "k_cols": k, **extra} for k in (2, 4, 8, 16, 32)
                    for extra in ({}, {"flat_k": k})]
        print(bytes_table(), flush=True)
        print()
    print(fidelity_table(args.lr, args.points or (12 if args.quick else 60), settings), flush=True)
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
