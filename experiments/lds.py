"""Linear datamodeling score (LDS) of every inrun attribution method, against retraining, for SGD and AdamW.

Protocol (issue 14): scikit-learn's bundled digits (x / 16), an MLP 64-64-10 (ReLU), 1000 training and 300 test
points (a seeded split), 5 epochs of batches of 32 in a fixed data order (one seeded permutation per epoch, the same
for every run; a subset keeps the order of its own samples), the same initial parameters for every run. Ground truth:
``--subsets`` (50) random half-size subsets of the training set (seeded), each retrained from scratch; the loss of
each of ``--test-points`` (50) test points is recorded. For one method with values ``phi[i, j]`` (positive = sample i
reduced test point j's loss) the LDS of test point j is the Spearman correlation over subsets between
``sum_{i in S} phi[i, j]`` and ``-loss_j(S)``; the table shows the mean over test points.

Methods, all from runs of the full training set recorded with ``InRunRecorder`` (the test points as validation
points, ``per_val_point=True``):

* recorded In-Run Shapley, first and second order, with every Adam value variant (``adam_values``; SGD has one);
* post-hoc In-Run Shapley from whole projections and checkpoints at every step (``run.posthoc_values``);
* trajectory-specific LOO by data value embeddings (``run.trajectory_loo``);
* TracIn with the final model only, TracInCP over the recorded checkpoints, LoGra and DataInf (final model) at the
  damping values of ``--damping`` (each shown; the best is named).

Peers (``--peers``, default every installed one; ``--peers none`` to skip; ``experiments/lds_peers.py``): dattri
TracIn over the same every-step checkpoints, LiSSA and EK-FAC influence functions and DVEmb, and kronfluence EK-FAC,
all on the very trajectory the main recording saved (nothing retrained). A peer whose package is missing is skipped
with one line (``scripts/install-peers.sh`` installs both); one that fails is reported and the run goes on. The sign
is checked by the Pearson correlation of dattri TracIn with inrun's TracInCP values (printed and in the table). The
EK-FAC peers run once per ``--peer-damping`` value. The end of the output names the best inrun method and the best
peer per optimizer, with the paired standard error of their difference over test points; the output JSON keeps every
method's per-test-point correlations.

Retraining results are cached under ``--cache`` (default ``~/.cache/inrun-lds``), keyed by every setting that
changes them, so a second run only records and scores. With ``--step-loo K`` the first-steps question is checked
directly: for a few steps the real AdamW step is retaken without each sample of the batch (everything else equal) and
the change of the mean test loss is compared with each variant's per-step values (Spearman per step).

    .venv/bin/python -m experiments.lds [--optimizers sgd adamw] [--subsets 50] [--step-loo 4] [--peers none]
        [--peer-damping heuristic 0.01 0.1 1]
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
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import inrun
from experiments import lds_peers
from inrun.posthoc import baselines
from inrun.valuation.recorder import InRunRecorder
from inrun.valuation.update_rules import ADAM_VALUES, DEFAULT_ADAM_VALUES


@dataclass(frozen=True)
class Settings:
    """Everything that changes the retrained losses (the cache key)."""

    optimizer: str = "sgd"
    lr: float = 0.1
    n_train: int = 1000
    n_test: int = 300
    test_points: int = 50
    hidden: int = 64
    epochs: int = 5
    batch: int = 32
    subsets: int = 50
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


DEFAULT_LR = {"sgd": 0.1, "adamw": 1e-3}


def load_digits_split(s: Settings) -> tuple[dict, dict]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(s.seed))
    train, test = order[: s.n_train], order[s.n_train: s.n_train + s.n_test]
    test = test[: s.test_points]
    return ({"x": x[train], "y": y[train], "index": torch.arange(s.n_train)},
            {"x": x[test], "y": y[test], "index": torch.arange(len(test))})


def make_model(s: Settings) -> nn.Module:
    torch.manual_seed(s.seed + 1)
    return nn.Sequential(nn.Linear(64, s.hidden), nn.ReLU(), nn.Linear(s.hidden, 10))


def make_optimizer(s: Settings, model: nn.Module) -> torch.optim.Optimizer:
    if s.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=s.lr)
    return torch.optim.AdamW(model.parameters(), lr=s.lr)


def loss_fn(model: nn.Module, batch: dict) -> torch.Tensor:
    return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def epoch_orders(s: Settings) -> list[torch.Tensor]:
    """The fixed data order: one seeded permutation of the training ids per epoch."""
    g = torch.Generator().manual_seed(s.seed + 2)
    return [torch.randperm(s.n_train, generator=g) for _ in range(s.epochs)]


def batches(s: Settings, keep: np.ndarray | None = None):
    """The id batches of a run on the samples ``keep`` (a boolean mask; None: all), in the fixed order."""
    for order in epoch_orders(s):
        ids = order if keep is None else order[torch.from_numpy(keep[order.numpy()])]
        for start in range(0, len(ids), s.batch):
            yield ids[start: start + s.batch]


def steps_per_epoch(s: Settings) -> int:
    return -(-s.n_train // s.batch)


def take(data: dict, ids: torch.Tensor) -> dict:
    return {"x": data["x"][ids], "y": data["y"][ids], "index": data["index"][ids]}


def train_plain(s: Settings, train: dict, keep: np.ndarray | None = None, *, task: Any = None) -> nn.Module:
    """Train from the fixed initial parameters on the samples ``keep`` selects, in the fixed order. ``task``: a
    module with ``make_model``, ``make_optimizer``, ``take`` and ``loss_fn`` (default: this one, the digits task;
    ``experiments.lds_lm`` passes itself)."""
    task = task or sys.modules[__name__]
    model = task.make_model(s)
    optimizer = task.make_optimizer(s, model)
    for ids in batches(s, keep):
        optimizer.zero_grad()
        task.loss_fn(model, task.take(train, ids)).mean().backward()
        optimizer.step()
    return model


def subset_masks(s: Settings) -> np.ndarray:
    rng = np.random.default_rng(s.seed + 3)
    masks = np.zeros((s.subsets, s.n_train), bool)
    for k in range(s.subsets):
        masks[k, rng.choice(s.n_train, s.n_train // 2, replace=False)] = True
    return masks


def retrained_losses(s: Settings, train: dict, test: dict, cache: Path, *, task: Any = None,
                     prefix: str = "lds") -> tuple[np.ndarray, np.ndarray]:
    """``(masks [subsets, n_train], losses [subsets, test_points])``, from the cache (``<prefix>-<optimizer>-<key>``)
    when it holds them; ``task`` as for :func:`train_plain`."""
    task = task or sys.modules[__name__]
    path = cache / f"{prefix}-{s.optimizer}-{s.key()}.npz"
    masks = subset_masks(s)
    if path.exists():
        stored = np.load(path)
        if np.array_equal(stored["masks"], masks):
            return masks, stored["losses"]
    losses = np.zeros((s.subsets, len(test["index"])))
    for k, mask in enumerate(masks):
        model = train_plain(s, train, mask, task=task)
        with torch.no_grad():
            losses[k] = task.loss_fn(model, test).double().numpy()
    cache.mkdir(parents=True, exist_ok=True)
    np.savez(path, masks=masks, losses=losses, settings=json.dumps(asdict(s)))
    return masks, losses


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else 0.0


def lds_points(values: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> np.ndarray:
    """Per test point: Spearman(sum of values over the subset, -retrained loss)."""
    values = np.nan_to_num(np.asarray(values, np.float64))
    predicted = masks.astype(np.float64) @ values  # [subsets, test_points]
    return np.array([spearman(predicted[:, j], -losses[:, j]) for j in range(losses.shape[1])])


def lds(values: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> float:
    """Mean over test points of Spearman(sum of values over the subset, -retrained loss)."""
    return float(np.mean(lds_points(values, masks, losses)))


class Score(float):
    """An LDS that keeps its per-test-point correlations (``points``), for paired comparisons of methods."""

    points: np.ndarray

    def __new__(cls, points: np.ndarray) -> "Score":
        score = super().__new__(cls, float(np.mean(points)))
        score.points = points
        return score


def lds_score(values: np.ndarray, masks: np.ndarray, losses: np.ndarray) -> Score:
    return Score(lds_points(values, masks, losses))


# ------------------------------------------------------------------------------------------------------ recording


def record(s: Settings, train: dict, test: dict, path: Path, *, adam_values: str = DEFAULT_ADAM_VALUES,
           embeddings: bool = False) -> nn.Module:
    """Train on the full training set with the recorder (second order, per test point); return the final model."""
    model = make_model(s)
    optimizer = make_optimizer(s, model)
    options = dict(embeddings={"k_rows": 64, "k_cols": 64}, checkpoint_every=1) if embeddings else {}
    recorder = InRunRecorder(model, path, val_data=test, loss_fn=loss_fn, shapley="second", per_val_point=True,
                             overwrite=True, adam_values=adam_values, **options)
    recorder.start()
    for ids in batches(s):
        batch = take(train, ids)
        recorder.begin_microbatch(batch)
        loss = loss_fn(model, batch).mean()
        loss.backward()
        recorder.end_microbatch()
        recorder.before_optimizer_step(optimizer)
        optimizer.step()
        optimizer.zero_grad()
        recorder.note_train_loss(float(loss))
    recorder.close()
    return model


def per_val_values(run, order: int, n_train: int) -> np.ndarray:
    """``[n_train, n_val]`` run values per validation point (the reader's method where it exists)."""
    reader = getattr(run, "val_point_values", None)
    if reader is not None:
        ids, matrix = reader(order=order)
    else:
        column = f"value_{order}_per_val"
        records = run.records(["sample_id", column])
        ids, inverse = np.unique(records["sample_id"], return_inverse=True)
        matrix = np.zeros((ids.size, records[column].shape[1]))
        np.add.at(matrix, inverse.reshape(-1), records[column].astype(np.float64))
    out = np.zeros((n_train, matrix.shape[1]))
    out[np.asarray(ids, np.int64)] = matrix
    return out


def step_zero_share(run, order: int = 1) -> float:
    """The share of all |value| (per validation point) that sits in step 0."""
    column = f"value_{order}_per_val"
    records = run.records(["step", column])
    magnitude = np.abs(records[column].astype(np.float64)).sum(axis=1)
    return float(magnitude[records["step"] == 0].sum() / max(magnitude.sum(), 1e-300))


def tracin_cp_values(run, model, test: dict, train: dict, step_size: str = "update") -> np.ndarray:
    return baselines.tracin_cp(run, model, loss_fn, test, train, step_size=step_size)


# ------------------------------------------------------------------------------------------------------ step LOO


def step_loo(s: Settings, train: dict, test: dict, steps: list[int], variants: list[str]) -> dict[str, list[float]]:
    """For each step in ``steps``: the real AdamW step retaken without each sample of the batch (its loss weight 0,
    the mean's denominator unchanged, ALGORITHMS.md), the change of the mean test loss after the step, against each
    variant's first-order values of that step (Spearman). Returns ``{variant: [Spearman per step]}``."""
    from inrun.engine.products import capture_batch
    from inrun.valuation.shapley import MicroBatch, sample_sq_sums, value_step
    from inrun.valuation.update_rules import update_terms
    from inrun.valuation.validation import ValidationSet

    model = make_model(s)
    optimizer = make_optimizer(s, model)
    found: dict[str, list[float]] = {v: [] for v in variants}
    with inrun.GradientCapture(model) as capture:
        validation = ValidationSet(test, loss_fn, model, capture)
        params = dict(capture.parameters)
        for t, ids in enumerate(batches(s)):
            if t > max(steps):
                break
            batch = take(train, ids)
            n = len(ids)
            if t in steps:
                micro = [MicroBatch(capture_batch(capture, model, loss_fn, batch).scaled(1.0 / n), ids)]
                grads = micro[0].captured.gradient_sums()
                per_variant = {}
                for variant in variants:
                    sums = sample_sq_sums(micro) if variant == "noise-eps" else None
                    terms = update_terms(optimizer, params, grads, adam_values=variant, sample_sq_sums=sums)
                    per_variant[variant] = value_step(micro, terms, grads, validation, params, second_order=False,
                                                      per_val_point=False, record_norms=False).value_1
                # ground truth: the real step with and without each sample
                truth, full = np.zeros(n), 0.0
                for k in range(-1, n):
                    trial = make_model(s)
                    trial.load_state_dict(model.state_dict())
                    trial_opt = make_optimizer(s, trial)
                    trial_opt.load_state_dict(optimizer.state_dict())
                    weights = torch.ones(n)
                    if k >= 0:
                        weights[k] = 0.0
                    (loss_fn(trial, batch) * weights).sum().div(n).backward()
                    trial_opt.step()
                    with torch.no_grad():
                        after = float(loss_fn(trial, test).double().mean())
                    if k < 0:
                        full = after
                    else:
                        truth[k] = after - full  # positive: removing k raised the loss, so k helped
                for variant in variants:
                    found[variant].append(spearman(per_variant[variant], truth))
            capture.discard()
            optimizer.zero_grad()
            loss_fn(model, batch).mean().backward()
            optimizer.step()
            capture.discard()
    return found


# ------------------------------------------------------------------------------------------------------ main


def evaluate(s: Settings, args: argparse.Namespace, cache: Path, folder: Path) -> dict[str, float]:
    train, test = load_digits_split(s)
    start = time.perf_counter()
    masks, losses = retrained_losses(s, train, test, cache)
    print(f"[{s.optimizer}] ground truth: {s.subsets} retrained subsets ({time.perf_counter() - start:.1f} s)",
          flush=True)
    scores: dict[str, float] = {}
    variants = [DEFAULT_ADAM_VALUES] if s.optimizer == "sgd" else args.variants
    # the main recording: default variant, with projections and every-step checkpoints for the post-hoc methods
    path = folder / f"{s.optimizer}.h5"
    model = record(s, train, test, path, adam_values=variants[0], embeddings=not args.no_posthoc)
    with inrun.open_run(path) as run:
        label = "" if s.optimizer == "sgd" else f" [{variants[0]}]"
        for order in (1, 2):
            scores[f"In-Run Shapley recorded, order {order}{label}"] = lds_score(per_val_values(run, order, s.n_train),
                                                                          masks, losses)
        scores[f"share of |value| in step 0{label}"] = step_zero_share(run)
        if not args.no_posthoc:
            result = run.posthoc_values(model, loss_fn, test)
            for order, values in ((1, result.first), (2, result.second)):
                scores[f"post-hoc In-Run Shapley, order {order} (every-step checkpoints)"] = lds_score(values, masks,
                                                                                                      losses)
            scores["trajectory LOO (data value embeddings)"] = lds_score(run.trajectory_loo(model, loss_fn, test),
                                                                 masks, losses)
            scores["TracIn (final model only)"] = lds_score(baselines.tracin(run, model, loss_fn, test), masks, losses)
            tracin_cp = tracin_cp_values(run, model, test, train)
            scores["TracInCP (every-step checkpoints)"] = lds_score(tracin_cp, masks, losses)
            if s.optimizer != "sgd":  # with SGD the recorded update scale is the learning rate: the same values
                scores["TracInCP, learning-rate step sizes"] = lds_score(
                    tracin_cp_values(run, model, test, train, step_size="lr"), masks, losses)
            gradients = baselines.training_gradients(run, model, loss_fn, train)
            for damping in args.damping:
                scores[f"LoGra (damping {damping:g})"] = lds_score(
                    baselines.logra(run, model, loss_fn, test, gradients=gradients, damping=damping), masks, losses)
                scores[f"DataInf (damping {damping:g})"] = lds_score(
                    baselines.datainf(run, model, loss_fn, test, gradients=gradients, damping=damping), masks, losses)
            if args.peer_list:
                scores.update(peer_scores(s, args, run, model, train, test, masks, losses, tracin_cp))
        elif args.peer_list:
            print(f"[{s.optimizer}] peers need the every-step checkpoints of the post-hoc recording: skipped with "
                  "--no-posthoc", flush=True)
    for variant in variants[1:]:
        path = folder / f"{s.optimizer}-{variant}.h5"
        record(s, train, test, path, adam_values=variant)
        with inrun.open_run(path) as run:
            for order in (1, 2):
                scores[f"In-Run Shapley recorded, order {order} [{variant}]"] = lds_score(
                    per_val_values(run, order, s.n_train), masks, losses)
            scores[f"share of |value| in step 0 [{variant}]"] = step_zero_share(run)
    if s.optimizer == "adamw" and args.step_loo:
        steps = [0, 1, 2, 5, 20, 80][: args.step_loo]
        for variant, per_step in step_loo(s, train, test, steps, args.variants).items():
            for step, rho in zip(steps, per_step):
                scores[f"step LOO Spearman, step {step} [{variant}]"] = rho
    return scores


def peer_scores(s: Settings, args: argparse.Namespace, run, model: nn.Module, train: dict, test: dict,
                masks: np.ndarray, losses: np.ndarray, tracin_cp: np.ndarray) -> dict[str, float]:
    """LDS of every selected peer on the recorded trajectory (NaN for a peer that failed), and the sign check:
    Pearson(dattri TracIn, inrun TracInCP) over all (sample, test point) pairs."""
    inputs = lds_peers.inputs_from_run(run, model, train, test, list(batches(s)), steps_per_epoch(s), seed=s.seed)
    values, failures = lds_peers.run_peers(inputs, args.peer_list, dampings=args.peer_dampings,
                                           log=lambda line: print(f"[{s.optimizer}] {line}", flush=True))
    scores = {label: lds_score(matrix, masks, losses) for label, matrix in values.items()}
    scores.update({label: float("nan") for label in failures})
    tracin = next((p.label for p in lds_peers.PEERS if p.key == "dattri-tracin"), None)
    if tracin in values:
        rho = lds_peers.pearson(values[tracin], tracin_cp)
        print(f"[{s.optimizer}] sign check: Pearson(dattri TracIn, inrun TracInCP) = {rho:.4f}", flush=True)
        scores["sign check: Pearson(dattri TracIn, inrun TracInCP)"] = rho
    return scores


NOT_METHODS = ("share of |value|", "sign check", "step LOO")


def best_inrun_vs_peer(scores: dict[str, float]) -> str | None:
    """'best inrun method X vs best peer Y' from one optimizer's scores (None without peer rows)."""
    peer_prefixes = tuple({p.label.split(" ")[0] + " " for p in lds_peers.PEERS})
    methods = {k: v for k, v in scores.items() if not k.startswith(NOT_METHODS) and np.isfinite(v)}
    peers = {k: v for k, v in methods.items() if k.startswith(peer_prefixes)}
    inrun_rows = {k: v for k, v in methods.items() if k not in peers}
    if not peers or not inrun_rows:
        return None
    best_inrun, best_peer = max(inrun_rows, key=inrun_rows.get), max(peers, key=peers.get)
    a, b = scores[best_inrun], scores[best_peer]
    spread = ""
    if isinstance(a, Score) and isinstance(b, Score) and a.points.size > 1:
        d = a.points - b.points
        spread = f" (paired standard error over {d.size} test points {np.std(d, ddof=1) / np.sqrt(d.size):.3f})"
    return (f"best inrun: {best_inrun} {a:.3f}; best peer: {best_peer} {b:.3f}; difference {a - b:+.3f}{spread}")


def print_table(results: dict[str, dict[str, float]], optimizers: list[str]) -> None:
    """The markdown table of ``results`` (optimizer -> method -> score): one row per method, one column per
    optimizer ("failed" where a method gave NaN, empty where it did not run)."""
    names = list(dict.fromkeys(k for r in results.values() for k in r))
    print("| method | " + " | ".join(f"LDS, {name}" for name in optimizers) + " |")
    print("|---|" + "---|" * len(optimizers))
    for key in names:
        cells = [("failed" if np.isnan(results[o][key]) else f"{results[o][key]:.3f}") if key in results[o] else ""
                 for o in optimizers]
        print(f"| {key} | " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", nargs="+", default=["sgd", "adamw"], choices=["sgd", "adamw"])
    parser.add_argument("--subsets", type=int, default=50)
    parser.add_argument("--test-points", type=int, default=50)
    parser.add_argument("--n-train", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=list(ADAM_VALUES), choices=list(ADAM_VALUES),
                        help="Adam value variants to record (the first also gets the post-hoc methods)")
    parser.add_argument("--damping", nargs="+", type=float, default=[0.1, 1.0, 10.0, 100.0, 1000.0])
    parser.add_argument("--no-posthoc", action="store_true", help="recorded values only")
    parser.add_argument("--step-loo", type=int, default=0, help="AdamW: check the first K of steps 0,1,2,5,20,80 "
                        "against retaking the real step without each sample")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("INRUN_LDS_CACHE",
                                                                          Path.home() / ".cache" / "inrun-lds")))
    parser.add_argument("--seed", type=int, default=0, help="data split, initial parameters, order and subsets")
    parser.add_argument("--lr", nargs=2, type=float, default=[DEFAULT_LR["sgd"], DEFAULT_LR["adamw"]],
                        metavar=("SGD", "ADAMW"), help="learning rates")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--peers", nargs="+", default=["all"], metavar="PEER",
                        help=f"peer methods to run side by side: 'all' (default, those installed), 'none', or any of "
                        f"{', '.join(lds_peers.PEER_KEYS)}")
    parser.add_argument("--peer-damping", nargs="+", default=["heuristic"], metavar="D",
                        help="damping of the EK-FAC peers (dattri, kronfluence), one row each: 'heuristic' (0.1 x the "
                        "mean corrected eigenvalue; kronfluence's damping_factor=None) and/or numbers")
    parser.add_argument("--out", type=Path, default=Path("runs/lds.json"))
    args = parser.parse_args(argv)
    try:
        args.peer_list = lds_peers.select(args.peers)
    except ValueError as error:
        parser.error(str(error))
    try:
        args.peer_dampings = [None if d == "heuristic" else float(d) for d in args.peer_damping]
    except ValueError:
        parser.error(f"--peer-damping: got {args.peer_damping}; give 'heuristic' and/or numbers, e.g. "
                     "--peer-damping heuristic 0.01 0.1")
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    if args.variants[0] != DEFAULT_ADAM_VALUES and DEFAULT_ADAM_VALUES in args.variants:
        args.variants.remove(DEFAULT_ADAM_VALUES)
        args.variants.insert(0, DEFAULT_ADAM_VALUES)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in args.optimizers:
            lr = args.lr[0] if name == "sgd" else args.lr[1]
            s = Settings(optimizer=name, lr=lr, subsets=args.subsets, test_points=args.test_points,
                         n_train=args.n_train, epochs=args.epochs, seed=args.seed)
            results[name] = evaluate(s, args, args.cache, Path(folder))
    print_table(results, args.optimizers)
    for name in args.optimizers:
        line = best_inrun_vs_peer(results[name])
        if line:
            print(f"[{name}] {line}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()
                                             if k not in ("peer_list", "peer_dampings")},
                                    "results": results,
                                    "per_test_point": {o: {k: v.points.round(6).tolist() for k, v in r.items()
                                                           if isinstance(v, Score)} for o, r in results.items()}},
                                   indent=2))
    return results


if __name__ == "__main__":
    main()
