"""Linear datamodeling score (LDS) of inrun's attribution methods on a small language model (issue 14, opt-in).

The language-model companion of ``experiments.lds`` (same scoring, same ``lds()`` and ``spearman()``), small
enough for one CPU thread:

* data: ``--n-train`` (512) training windows of 32 byte tokens from the corpus of text that ships
  with Python (``experiments.textdata.build_corpus``: half documentation topics, half standard-library code, no
  corrupted source), and ``--test-points`` (20) held-out windows of the same two sources (disjoint from training);
* model: ``experiments.tinygpt.TinyGPT`` (d 32, 2 blocks, 4 heads, byte vocabulary 256, tied embeddings), the same
  initial parameters for every run;
* training: ``--epochs`` (8) epochs of batches of 16 in a fixed data order (one seeded permutation per epoch, the
  same for every run; a subset keeps the order of its own windows), SGD (lr 0.1) or AdamW (lr 1e-3, torch's default
  weight decay 0.01), the digits benchmark's learning rates: 256 steps, the mean test loss falls from 5.49 (uniform
  over bytes) to about 3.0 (SGD) / 2.75 (AdamW). Larger rates (SGD 0.3, AdamW 3e-3) make the retrained losses much
  less linear in the subset: every method's LDS drops (SGD 0.3: the recorded values' to about 0, the best
  method's to .20; AdamW 3e-3: ``block`` .23, ``fixed-state`` .16);
* ground truth: ``--subsets`` (50, as on digits) random half-size subsets of the training windows (seeded), each
  retrained from the same initial parameters; the loss of every test window after training. Cached under
  ``--cache`` (the digits benchmark's cache root, default ``~/.cache/inrun-lds``) as
  ``lds-lm-<optimizer>-<key>.npz``, keyed by every setting that changes it.

**The per-sample loss is the mean next-token cross-entropy over the window's labelled positions**
(``tinygpt.per_sample_lm_loss``; padding targets are ignored), and a training step minimises the batch mean of it.
The same function is the recorder's ``loss_fn`` (training windows and test windows alike) and the loss measured on
the retrained models, so a value ``phi[i, j]`` (positive = window i reduced test window j's loss) and the retrained
loss are the same quantity: the LDS of test window j is the Spearman correlation over subsets between
``sum_{i in S} phi[i, j]`` and ``-loss_j(S)``, averaged over test windows.

Methods, from runs of the full training set recorded with ``InRunRecorder`` (the test windows as validation points,
``per_val_point=True``, ``shapley="second"``):

* recorded In-Run Shapley, order 1 and 2; for AdamW every ``--variants`` Adam value rule (default ``block``, the
  library default, and ``fixed-state``, the exact fixed-state rule);
* unless ``--no-posthoc``: post-hoc In-Run Shapley and trajectory LOO (data value embeddings) from checkpoints at
  every step, TracIn (final model) and TracInCP (every ``--cp-every``-th (8) checkpoint: the training gradients
  are recomputed at each; for AdamW also weighted by the learning rate, ``step_size="lr"``), all from Kronecker
  projections of ``--k`` x ``--k`` per layer (16: not whole for the wider layers, so these are estimates).

    .venv/bin/python -m experiments.lds_lm [--optimizers sgd adamw] [--subsets 50] [--no-posthoc]

With the defaults about 4.5 minutes of CPU time on one thread, retraining included (measured from an empty cache:
4.5 min user, 4.9 min wall on a shared 2-core machine at a load of 2.5); the retraining, about a third of it, is
cached for later runs. 50 subsets
cost 0.7 CPU minutes more than 20, and 20 were too few: with 20 the SGD column's order of methods changed (recorded
values .19 against TracIn's .28; with 50, .30 against .21). A paired bootstrap over subsets (5% and 95% quantiles)
of the difference between the first two Adam value rules is printed with the table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import inrun
from experiments import lds as lds_task
from experiments.lds import batches, lds, per_val_values, step_zero_share
from experiments.textdata import build_corpus
from experiments.tinygpt import TinyGPT, TinyGPTConfig, per_sample_lm_loss
from inrun.posthoc import baselines
from inrun.store.paths import find_checkpoints
from inrun.valuation.recorder import InRunRecorder
from inrun.valuation.update_rules import ADAM_VALUES, DEFAULT_ADAM_VALUES

DEFAULT_LR = {"sgd": 0.1, "adamw": 1e-3}  # the digits benchmark's


@dataclass(frozen=True)
class Settings:
    """Everything that changes the retrained losses (the cache key)."""

    optimizer: str = "adamw"
    lr: float = 1e-3
    n_train: int = 512
    test_points: int = 20
    seq_len: int = 32
    d_model: int = 32
    n_layer: int = 2
    n_head: int = 4
    epochs: int = 8
    batch: int = 16
    subsets: int = 50
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha1(json.dumps({"task": "lm", **asdict(self)}, sort_keys=True).encode()).hexdigest()[:16]


def load_text_split(s: Settings) -> tuple[dict, dict]:
    """``(train, test)`` batch dicts (``input_ids``, ``labels``, ``index``): docs and code windows, half each."""
    corpus = build_corpus(seq_len=s.seq_len, val_samples=s.test_points, seed=s.seed,
                          samples_per_source={"docs": s.n_train - s.n_train // 2, "code": s.n_train // 2,
                                              "licence": 0, "corrupted": 0})

    def as_batch(samples) -> dict:
        return {"input_ids": samples.input_ids, "labels": samples.labels, "index": torch.arange(len(samples))}

    return as_batch(corpus.train), as_batch(corpus.val)


def make_model(s: Settings) -> nn.Module:
    config = TinyGPTConfig(vocab_size=256, seq_len=s.seq_len, n_layer=s.n_layer, n_head=s.n_head, d_model=s.d_model)
    return TinyGPT(config, seed=s.seed + 1)


def make_optimizer(s: Settings, model: nn.Module) -> torch.optim.Optimizer:
    if s.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=s.lr)
    return torch.optim.AdamW(model.parameters(), lr=s.lr)


def loss_fn(model: nn.Module, batch: dict) -> torch.Tensor:
    """Per-window loss ``[n]``: the mean next-token cross-entropy over the window's labelled positions."""
    return per_sample_lm_loss(model(batch["input_ids"]), batch["labels"])


def take(data: dict, ids: torch.Tensor) -> dict:
    return {"input_ids": data["input_ids"][ids], "labels": data["labels"][ids], "index": data["index"][ids]}


def retrained_losses(s: Settings, train: dict, test: dict, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(masks [subsets, n_train], losses [subsets, test_points])`` of this task, by the digits benchmark's cached
    retraining (its own cache files, ``lds-lm-*``)."""
    return lds_task.retrained_losses(s, train, test, cache, task=sys.modules[__name__], prefix="lds-lm")


def bootstrap_difference(a: np.ndarray, b: np.ndarray, masks: np.ndarray, losses: np.ndarray, *, draws: int = 200,
                         seed: int = 0) -> tuple[float, float]:
    """5% and 95% quantiles of ``lds(a) - lds(b)`` over subsets drawn with replacement (the same draw for both)."""
    rng = np.random.default_rng(seed)
    differences = []
    for _ in range(draws):
        rows = rng.integers(0, len(masks), len(masks))
        differences.append(lds(a, masks[rows], losses[rows]) - lds(b, masks[rows], losses[rows]))
    low, high = np.quantile(differences, [0.05, 0.95])
    return float(low), float(high)


def record(s: Settings, train: dict, test: dict, path: Path, *, adam_values: str = DEFAULT_ADAM_VALUES,
           embeddings: int = 0) -> tuple[nn.Module, list[float]]:
    """Train on the full training set with the recorder (second order, per test window); return the final model
    and the training loss per step. ``embeddings``: k for k x k projections and every-step checkpoints (0: none)."""
    model = make_model(s)
    optimizer = make_optimizer(s, model)
    options = dict(embeddings={"k_rows": embeddings, "k_cols": embeddings}, checkpoint_every=1) if embeddings else {}
    recorder = InRunRecorder(model, path, val_data=test, loss_fn=loss_fn, shapley="second", per_val_point=True,
                             overwrite=True, adam_values=adam_values, **options)
    recorder.start()
    train_losses = []
    for ids in batches(s):
        batch = take(train, ids)
        recorder.begin_microbatch(batch)
        loss = loss_fn(model, batch).mean()
        loss.backward()
        recorder.end_microbatch()
        recorder.before_optimizer_step(optimizer)
        optimizer.step()
        optimizer.zero_grad()
        train_losses.append(float(loss.detach()))
        recorder.note_train_loss(train_losses[-1])
    recorder.close()
    return model, train_losses


def evaluate(s: Settings, args: argparse.Namespace, cache: Path, folder: Path) -> dict[str, float]:
    train, test = load_text_split(s)
    start = time.perf_counter()
    masks, losses = retrained_losses(s, train, test, cache)
    print(f"[{s.optimizer}] ground truth: {s.subsets} retrained subsets ({time.perf_counter() - start:.1f} s); "
          f"test loss over subsets: mean {losses.mean():.3f}, spread (mean std over subsets) "
          f"{losses.std(axis=0).mean():.4f}", flush=True)
    scores: dict[str, float] = {}
    recorded: dict[str, np.ndarray] = {}
    variants = [DEFAULT_ADAM_VALUES] if s.optimizer == "sgd" else args.variants
    for position, variant in enumerate(variants):
        main = position == 0 and not args.no_posthoc
        path = folder / f"{s.optimizer}-{variant}.h5"
        start = time.perf_counter()
        model, train_losses = record(s, train, test, path, adam_values=variant, embeddings=args.k if main else 0)
        label = "" if s.optimizer == "sgd" else f" [{variant}]"
        print(f"[{s.optimizer}] recorded run{label}: {time.perf_counter() - start:.1f} s, training loss "
              f"{np.mean(train_losses[:4]):.3f} -> {np.mean(train_losses[-4:]):.3f}", flush=True)
        with inrun.open_run(path) as run:
            for order in (1, 2):
                recorded[f"{variant}, order {order}"] = values = per_val_values(run, order, s.n_train)
                scores[f"In-Run Shapley recorded, order {order}{label}"] = lds(values, masks, losses)
            scores[f"share of |value| in step 0{label}"] = step_zero_share(run)
            if main:
                start = time.perf_counter()
                result = run.posthoc_values(model, loss_fn, test)
                scores[f"post-hoc In-Run Shapley, order 1 ({args.k}x{args.k}, every-step checkpoints)"] = lds(
                    result.first, masks, losses)
                scores[f"post-hoc In-Run Shapley, order 2 ({args.k}x{args.k}, every-step checkpoints)"] = lds(
                    result.second, masks, losses)
                scores[f"trajectory LOO (data value embeddings, {args.k}x{args.k})"] = lds(
                    run.trajectory_loo(model, loss_fn, test), masks, losses)
                scores[f"TracIn (final model only, {args.k}x{args.k})"] = lds(
                    baselines.tracin(run, model, loss_fn, test), masks, losses)
                found = find_checkpoints(run)
                kept = {step: file for step, file in found.items() if step % args.cp_every == 0}
                label_cp = f"TracInCP ({len(kept)} checkpoints, every {args.cp_every} steps, {args.k}x{args.k})"
                scores[label_cp] = lds(baselines.tracin_cp(run, model, loss_fn, test, train, checkpoints=kept),
                                       masks, losses)
                if s.optimizer != "sgd":  # with SGD the recorded update scale is the learning rate: the same sum
                    scores[f"{label_cp}, learning-rate step sizes"] = lds(baselines.tracin_cp(
                        run, model, loss_fn, test, train, checkpoints=kept, step_size="lr"), masks, losses)
                print(f"[{s.optimizer}] post-hoc methods: {time.perf_counter() - start:.1f} s", flush=True)
    if len(variants) > 1:
        for order in (1, 2):
            low, high = bootstrap_difference(recorded[f"{variants[0]}, order {order}"],
                                             recorded[f"{variants[1]}, order {order}"], masks, losses)
            scores[f"LDS [{variants[0]}] - [{variants[1]}], order {order}: 5% bootstrap quantile"] = low
            scores[f"LDS [{variants[0]}] - [{variants[1]}], order {order}: 95% bootstrap quantile"] = high
    return scores


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", nargs="+", default=["sgd", "adamw"], choices=["sgd", "adamw"])
    parser.add_argument("--subsets", type=int, default=50)
    parser.add_argument("--test-points", type=int, default=20)
    parser.add_argument("--n-train", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--variants", nargs="+", default=[DEFAULT_ADAM_VALUES, "fixed-state"],
                        choices=list(ADAM_VALUES), help="Adam value rules to record (the first also gets the post-hoc "
                        "methods)")
    parser.add_argument("--k", type=int, default=16, help="projection size k (k x k per layer) for the post-hoc "
                        "methods")
    parser.add_argument("--cp-every", type=int, default=8, help="TracInCP: use every k-th step's checkpoint")
    parser.add_argument("--no-posthoc", action="store_true", help="recorded values only")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("INRUN_LDS_CACHE",
                                                                          Path.home() / ".cache" / "inrun-lds")))
    parser.add_argument("--seed", type=int, default=0, help="data split, initial parameters, order and subsets")
    parser.add_argument("--lr", nargs=2, type=float, default=[DEFAULT_LR["sgd"], DEFAULT_LR["adamw"]],
                        metavar=("SGD", "ADAMW"), help="learning rates")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/lds_lm.json"))
    args = parser.parse_args(argv)
    if args.subsets < 3:
        parser.error(f"--subsets must be at least 3 for a Spearman correlation, got {args.subsets}")
    if args.cp_every < 1:
        parser.error(f"--cp-every must be a positive number of steps, got {args.cp_every}")
    if args.k < 1:
        parser.error(f"--k must be a positive projection size, got {args.k}")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    results = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        for name in args.optimizers:
            lr = args.lr[0] if name == "sgd" else args.lr[1]
            s = Settings(optimizer=name, lr=lr, subsets=args.subsets, test_points=args.test_points,
                         n_train=args.n_train, epochs=args.epochs, seed=args.seed)
            results[name] = evaluate(s, args, args.cache, Path(folder))
    lds_task.print_table(results, args.optimizers)
    print(f"total {time.perf_counter() - started:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                   indent=2))
    return results


if __name__ == "__main__":
    main()
