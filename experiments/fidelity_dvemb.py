"""How well do data value embeddings predict retrained leave-one-out? (ALGORITHMS.md, "Evaluation metrics")

A 64-32-10 Tanh MLP on scikit-learn's bundled digits, plain SGD, a fixed batch order, recorded with
``InRunRecorder(..., shapley="first", embeddings={...})``. Ground truth by retraining with the same seed and batch
order and one sample's contribution dropped (its loss weight 0, the denominator B unchanged):

* single step: the sample removed from one of its steps (one occurrence, drawn at random);
* all epochs: the sample removed from every step that uses it.

TSLOO = L_test(theta'_T) - L_test(theta_T) (positive = the sample helped). Predictions from the same recorded run:
DVEmb (``hessian_scale="batch"``, the default, and ``1``, ALGORITHMS.md's formula as written), TracIn with the final
test gradient, the recorded first-order In-Run Data Shapley values, LoGra and DataInf (both static: the same score for
either ground truth); DVEmb from a second recording without projection; and an oracle, the exact derivative of the
final test loss with respect to each sample's loss weight through the whole unrolled training run. Spearman and Pearson correlations over a sample of training points, for several learning rates.

    .venv/bin/python -m experiments.fidelity_dvemb            # full: 4 learning rates, 100 points (~1-2 min)
    .venv/bin/python -m experiments.fidelity_dvemb --quick    # 1 learning rate, 40 points (< 40 s)

The full run writes its table into docs/embeddings.md (between the ``fidelity`` markers); ``--no-doc`` skips that.
"""

from __future__ import annotations

import argparse
import copy
import platform
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from inrun import baselines, embeddings, open_run
from inrun.valuation.recorder import InRunRecorder

DOC = Path(__file__).resolve().parents[1] / "docs" / "embeddings.md"
BEGIN, END = "<!-- fidelity:begin -->", "<!-- fidelity:end -->"
METHODS = ("DVEmb", "DVEmb, unprojected", "DVEmb (H as written, gamma=1)", "TracIn (final model)", "In-Run Shapley, 1st order",
           "LoGra (static)", "DataInf (static)", "oracle: exact unrolled derivative")


@dataclass
class Setup:
    n_train: int = 320
    n_test: int = 200
    batch: int = 32
    epochs: int = 5
    k: int = 16  # projection k_rows = k_cols
    seed: int = 0


def load_data(setup: Setup):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float64)
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(setup.seed))
    train, test = perm[: setup.n_train], perm[setup.n_train: setup.n_train + setup.n_test]
    return x[train], y[train], {"x": x[test], "y": y[test]}


def batch_order(setup: Setup) -> list[torch.Tensor]:
    """Dataset ids of every step: a fresh seeded permutation per epoch, the same for every retraining."""
    order = []
    for epoch in range(setup.epochs):
        perm = torch.randperm(setup.n_train, generator=torch.Generator().manual_seed(1000 + epoch))
        order += [perm[i: i + setup.batch] for i in range(0, setup.n_train, setup.batch)]
    return order


def make_model(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()


def loss_fn(model: nn.Module, batch: dict) -> torch.Tensor:
    return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def test_loss(model: nn.Module, test: dict) -> float:
    with torch.no_grad():
        return float(loss_fn(model, test).mean())


def train(lr, x, y, order, *, removal=None, start=None, states=None, recorder_args=None) -> nn.Module:
    """Plain SGD over ``order``. ``removal = (sample_id, steps)``: that sample's loss weight is 0 at those steps
    (the mean still divides by B). ``start = (step, state_dict)`` resumes from a saved state; ``states`` collects
    the state before every step; ``recorder_args`` records the run with ``InRunRecorder``."""
    model = make_model()
    first = 0
    if start is not None:
        first, state = start
        model.load_state_dict(state)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    recorder = None
    if recorder_args is not None:
        recorder = InRunRecorder(model, **recorder_args)
        recorder.start()
    for step in range(first, len(order)):
        if states is not None:
            states.append(copy.deepcopy(model.state_dict()))
        ids = order[step]
        batch = {"x": x[ids], "y": y[ids], "index": ids}
        weights = torch.ones(len(ids), dtype=torch.float64)
        if removal is not None and step in removal[1]:
            weights[ids == removal[0]] = 0.0
        if recorder:
            recorder.begin_microbatch(batch)
        loss = (loss_fn(model, batch) * weights).sum() / len(ids)
        loss.backward()
        if recorder:
            recorder.end_microbatch()
            recorder.before_optimizer_step(optimizer)
        optimizer.step()
        optimizer.zero_grad()
        if recorder:
            recorder.note_train_loss(loss.item())
    if recorder:
        recorder.close()
    return model


def unrolled_derivative(lr, x, y, order, test) -> torch.Tensor:
    """``-dL_test(theta_T) / dw[s, j]`` for the loss weight of the j-th sample of step s (all weights 1): the exact
    first-order TSLOO, by differentiating through the whole training run. Not available in practice (it needs the
    test set before training and a second-order pass through every step); here it shows how linear the truth is."""
    model = make_model()
    params = {name: p.detach().clone().requires_grad_(True) for name, p in model.named_parameters()}
    weights = torch.ones(len(order), len(order[0]), dtype=torch.float64, requires_grad=True)
    current = dict(params)
    for step, ids in enumerate(order):
        logits = torch.func.functional_call(model, current, (x[ids],))
        loss = (F.cross_entropy(logits, y[ids], reduction="none") * weights[step, : len(ids)]).sum() / len(ids)
        grads = torch.autograd.grad(loss, list(current.values()), create_graph=True)
        current = {name: value - lr * g for (name, value), g in zip(current.items(), grads)}
    final = F.cross_entropy(torch.func.functional_call(model, current, (test["x"],)), test["y"]).mean()
    return -torch.autograd.grad(final, weights)[0].detach()


def correlations(predicted: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    from scipy.stats import pearsonr, spearmanr

    return float(spearmanr(predicted, truth)[0]), float(pearsonr(predicted, truth)[0])


def one_learning_rate(lr: float, setup: Setup, points: int, workdir: Path) -> dict:
    x, y, test = load_data(setup)
    order = batch_order(setup)
    states: list[dict] = []
    started = time.perf_counter()
    final = train(lr, x, y, order, states=states)
    base = test_loss(final, test)
    with torch.no_grad():
        accuracy = float((final(test["x"]).argmax(1) == test["y"]).double().mean())
    path = workdir / f"run-lr{lr}.h5"
    recorded = train(lr, x, y, order, recorder_args=dict(
        path=path, val_data=test, loss_fn=loss_fn, shapley="first", overwrite=True,
        embeddings={"k_rows": setup.k, "k_cols": setup.k, "kind": "gaussian", "seed": 0}))
    drift = max(float((a - b).abs().max()) for a, b in zip(final.state_dict().values(), recorded.state_dict().values()))
    assert drift == 0.0, f"recording changed training (max parameter difference {drift})"
    exact_path = workdir / f"run-lr{lr}-exact.h5"  # 64 x 64 keeps every layer of this MLP whole: no projection
    train(lr, x, y, order, recorder_args=dict(path=exact_path, val_data=test, loss_fn=loss_fn, shapley=None,
                                             overwrite=True, embeddings={"k_rows": 64, "k_cols": 64}))

    # ground truth
    occurrences: dict[int, list[int]] = {}
    for step, ids in enumerate(order):
        for i in ids.tolist():
            occurrences.setdefault(i, []).append(step)
    rng = np.random.default_rng(setup.seed)
    chosen = np.sort(rng.choice(setup.n_train, size=points, replace=False))
    one_step = np.array([occurrences[int(i)][rng.integers(len(occurrences[int(i)]))] for i in chosen])
    truth_one, truth_all = [], []
    for i, step in zip(chosen.tolist(), one_step.tolist()):
        model = train(lr, x, y, order, removal=(i, {step}), start=(step, states[step]))
        truth_one.append(test_loss(model, test) - base)
        steps = occurrences[i]
        model = train(lr, x, y, order, removal=(i, set(steps)), start=(steps[0], states[steps[0]]))
        truth_all.append(test_loss(model, test) - base)
    truth_one, truth_all = np.array(truth_one), np.array(truth_all)
    retrain_seconds = time.perf_counter() - started

    # predictions from the recorded run
    started = time.perf_counter()
    predictions_one, predictions_all = {}, {}
    with open_run(path) as run:
        records = run.records(["sample_id", "step", "value_1"])
        row = {(int(i), int(s)): r for r, (i, s) in enumerate(zip(records["sample_id"], records["step"]))}
        one_rows = np.array([row[(int(i), int(s))] for i, s in zip(chosen, one_step)])
        at = np.searchsorted(run.sample_ids, chosen)

        def add(name, per_row, per_id):
            predictions_one[name] = per_row[one_rows]
            predictions_all[name] = per_id[at]

        for name, scale in (("DVEmb", "batch"), ("DVEmb (H as written, gamma=1)", 1.0)):
            out = embeddings.build_embeddings(run, workdir / f"run-lr{lr}-{scale}.dvemb.h5", dtype="float64",
                                              hessian_scale=scale, progress=False, resume=False)
            add(name, embeddings.trajectory_loo(run, final, loss_fn, test, embeddings=out, per_occurrence=True).mean(1),
                embeddings.trajectory_loo(run, final, loss_fn, test, embeddings=out).mean(1))
        with open_run(exact_path) as exact:
            out = embeddings.build_embeddings(exact, workdir / f"run-lr{lr}-exact.dvemb.h5", dtype="float64",
                                              progress=False, resume=False)
            add("DVEmb, unprojected",
                embeddings.trajectory_loo(exact, final, loss_fn, test, embeddings=out, per_occurrence=True).mean(1),
                embeddings.trajectory_loo(exact, final, loss_fn, test, embeddings=out).mean(1))
        add("TracIn (final model)", baselines.tracin(run, final, loss_fn, test, per_occurrence=True).mean(1),
            baselines.tracin(run, final, loss_fn, test).mean(1))
        value_1 = np.asarray(records["value_1"])
        add("In-Run Shapley, 1st order", value_1, run.sample_values(order=1)[1])
        grads = baselines.training_gradients(run, final, loss_fn, {"x": x, "y": y, "index": torch.arange(len(x))})
        for name, fn in (("LoGra (static)", baselines.logra), ("DataInf (static)", baselines.datainf)):
            static = fn(run, final, loss_fn, test, gradients=grads).mean(1)
            predictions_one[name] = static[at]
            predictions_all[name] = static[at]
    derivative = unrolled_derivative(lr, x, y, order, test)
    position = {(int(i), s): j for s, ids in enumerate(order) for j, i in enumerate(ids.tolist())}
    predictions_one["oracle: exact unrolled derivative"] = np.array(
        [float(derivative[s, position[(int(i), int(s))]]) for i, s in zip(chosen, one_step)])
    predictions_all["oracle: exact unrolled derivative"] = np.array(
        [sum(float(derivative[s, position[(int(i), s)]]) for s in occurrences[int(i)]) for i in chosen])
    predict_seconds = time.perf_counter() - started
    rows = {name: correlations(predictions_one[name], truth_one) + correlations(predictions_all[name], truth_all)
            for name in METHODS}
    scale = float(np.median(predictions_all["DVEmb"] / truth_all))
    return {"lr": lr, "test_loss": base, "accuracy": accuracy, "rows": rows, "retrain_s": retrain_seconds,
            "predict_s": predict_seconds, "median_ratio": scale,
            "truth_scale": (float(np.abs(truth_one).mean()), float(np.abs(truth_all).mean()))}


def markdown(results: list[dict], setup: Setup, points: int, command: str, seconds: float) -> str:
    lines = [
        f"Command: `{command}` ({seconds:.0f} s on {platform.machine()} with torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread).",
        "",
        f"Setup: digits ({setup.n_train} train / {setup.n_test} test), MLP 64-32-10 Tanh in float64, plain SGD, "
        f"batch {setup.batch}, {setup.epochs} epochs ({setup.epochs * setup.n_train // setup.batch} steps), "
        f"projection {setup.k} x {setup.k} per layer (Gaussian), {points} training points; L_test = mean loss over "
        "the test set. Columns: Spearman / Pearson correlation with retrained TSLOO.",
        "",
    ]
    for result in results:
        one, everything = result["truth_scale"]
        lines += [
            f"**lr = {result['lr']}** (final test loss {result['test_loss']:.3f}, accuracy {result['accuracy']:.1%}; "
            f"mean |TSLOO| {one:.1e} single step, {everything:.1e} all epochs; "
            f"median DVEmb / TSLOO {result['median_ratio']:.2f})",
            "",
            "| method | single step: Spearman | Pearson | all epochs: Spearman | Pearson |",
            "|---|---:|---:|---:|---:|",
        ]
        for name in METHODS:
            s1, p1, s2, p2 = result["rows"][name]
            lines.append(f"| {name} | {s1:.2f} | {p1:.2f} | {s2:.2f} | {p2:.2f} |")
        lines.append("")
    return "\n".join(lines)


def write_doc(table: str, doc: Path = DOC) -> None:
    text = doc.read_text() if doc.exists() else f"# Data value embeddings\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip() + f"\n\n## Fidelity\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one learning rate, 40 points (< 40 s)")
    parser.add_argument("--points", type=int, default=None, help="training points compared (default 100; quick 40)")
    parser.add_argument("--lrs", type=float, nargs="*", default=None, help="learning rates (default 0.05 0.1 0.3 1.0)")
    parser.add_argument("--no-doc", action="store_true", help="do not write the table into docs/embeddings.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # a tiny model: threads only add overhead (and fight on a busy machine)
    warnings.filterwarnings("ignore", message=".*not valued.*")
    setup = Setup()
    points = args.points or (40 if args.quick else 100)
    lrs = args.lrs or ([0.3] if args.quick else [0.05, 0.1, 0.3, 1.0])
    started = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for lr in lrs:
            result = one_learning_rate(lr, setup, points, Path(tmp))
            results.append(result)
            print(f"lr {lr}: retraining {result['retrain_s']:.1f} s, predictions {result['predict_s']:.1f} s", flush=True)
    seconds = time.perf_counter() - started
    command = ".venv/bin/python -m experiments.fidelity_dvemb" + (" --quick" if args.quick else "")
    if args.points or args.lrs:
        command += (f" --points {points}" if args.points else "") + (f" --lrs {' '.join(map(str, lrs))}" if args.lrs else "")
    table = markdown(results, setup, points, command, seconds)
    print(table)
    if not args.quick and not args.no_doc:
        write_doc(table)
        print(f"wrote the table into {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
