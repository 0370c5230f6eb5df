"""How far post-hoc In-Run Shapley values drift from the in-run ones as model checkpoints get sparser.

An MLP on scikit-learn's bundled digits trains with plain SGD while the recorder values every sample against a
validation set per validation point (the ground truth here) and records projected contributions and a checkpoint
at every step. The validation points are then treated as test points chosen after training, and post-hoc values
are computed from checkpoints at every step, every 10 steps, or the final model only; for whole projections (exact
at every step) and for random 16 x 16 and 8 x 8 Kronecker projections. Reported: the relative error of the per-sample,
per-test-point values and the Spearman correlation of the per-sample sums, for both orders.

    .venv/bin/python -m experiments.posthoc_sparsity [--epochs 2] [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import inrun
from inrun.posthoc.values import find_checkpoints
from inrun.valuation.recorder import InRunRecorder


def digits(n_train: int, n_test: int, seed: int) -> tuple[dict, dict]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    train, test = order[:n_train], order[n_train:n_train + n_test]
    return {"x": x[train], "y": y[train]}, {"x": x[test], "y": y[test]}


def loss_fn(model: nn.Module, batch: dict) -> torch.Tensor:
    return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def train(path: Path, train_set: dict, test_set: dict, projection: dict, epochs: int, batch: int, lr: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    recorder = InRunRecorder(model, path, val_data=test_set, loss_fn=loss_fn, shapley="second", per_val_point=True,
                             embeddings=projection, checkpoint_every=1, overwrite=True)
    recorder.start()
    n = train_set["x"].shape[0]
    for _ in range(epochs):
        for start in range(0, n - batch + 1, batch):
            ids = torch.arange(start, start + batch)
            step_batch = {"x": train_set["x"][ids], "y": train_set["y"][ids], "index": ids}
            recorder.begin_microbatch(step_batch)
            loss_fn(model, step_batch).mean().backward()
            recorder.end_microbatch()
            recorder.before_optimizer_step(optimizer)
            optimizer.step()
            optimizer.zero_grad()
    recorder.close()
    return model


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks = lambda v: np.argsort(np.argsort(v)).astype(float)  # noqa: E731
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def in_run_per_test(run, order: int) -> np.ndarray:
    records = run.records(columns=["sample_id", f"value_{order}_per_val"])
    out = np.zeros((run.sample_ids.size, records[f"value_{order}_per_val"].shape[1]))
    np.add.at(out, np.searchsorted(run.sample_ids, records["sample_id"]), records[f"value_{order}_per_val"])
    return out


def main(argv: list[str] | None = None) -> list[list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train", type=int, default=512)
    parser.add_argument("--test", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--quick", action="store_true", help="a smaller run for a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.train, args.epochs = 128, 1
    warnings.filterwarnings("ignore")
    train_set, test_set = digits(args.train, args.test, seed=0)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for label, projection in (("whole (exact)", {"k_rows": 64, "k_cols": 64}),
                                  ("random 16x16", {"k_rows": 16, "k_cols": 16, "seed": 1}),
                                  ("random 8x8", {"k_rows": 8, "k_cols": 8, "seed": 1})):
            path = Path(folder) / f"run-{projection['k_rows']}.h5"
            model = train(path, train_set, test_set, projection, args.epochs, args.batch, args.lr)
            with inrun.open_run(path) as run:
                every = find_checkpoints(run)
                final_step = max(every)
                schemes = {
                    "every step": every,
                    "every 10 steps": {s: p for s, p in every.items() if s % 10 == 0 or s == final_step},
                    "final model only": {},
                }
                truth = {order: in_run_per_test(run, order) for order in (1, 2)}
                for scheme, checkpoints in schemes.items():
                    result = run.posthoc_values(model, loss_fn, test_set, checkpoints=checkpoints)
                    for order, values in ((1, result.first), (2, result.second)):
                        error = np.linalg.norm(values - truth[order]) / np.linalg.norm(truth[order])
                        rho = spearman(values.sum(1), truth[order].sum(1))
                        rows.append([label, scheme, str(order), f"{error:.2e}", f"{rho:.3f}"])
    header = ["projection", "checkpoints", "order", "relative error", "Spearman (per-sample sums)"]
    print(f"digits MLP 64-32-10, SGD lr {args.lr}, {args.train} training samples x {args.epochs} epochs, "
          f"batch {args.batch}, {args.test} test points")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return rows


if __name__ == "__main__":
    main()
