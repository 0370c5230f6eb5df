"""In-Run Data Shapley values recorded by ``InRunRecorder`` against independent references.

The references use nothing from inrun: per-sample gradients come from ``torch.func`` (tests/reference.py), the
optimizer step from torch's own optimizer, the update rule's scale from the formulas of ALGORITHMS.md, and exact
Shapley values from enumerating every subset of a batch. The store is read back with h5py directly (only its
committed part), so these tests do not depend on ``inrun.store.reader``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inrun.valuation.recorder import InRunRecorder
from inrun.valuation.update_rules import DEFAULT_ADAM_VALUES
from tests.reference import per_sample_grads

DTYPE = torch.float64
N_FEATURES, N_CLASSES = 6, 3






# ------------------------------------------------------------------------------------------------ data and models


def make_data(n: int = 64, n_val: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, N_FEATURES, generator=g, dtype=DTYPE)
    y = torch.randint(0, N_CLASSES, (n,), generator=g)
    xv = torch.randn(n_val, N_FEATURES, generator=g, dtype=DTYPE)
    yv = torch.randint(0, N_CLASSES, (n_val,), generator=g)
    return x, y, {"x": xv, "y": yv}


def make_mlp(seed: int = 1, hidden: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(N_FEATURES, hidden), nn.Tanh(), nn.Linear(hidden, N_CLASSES)).to(DTYPE)


def loss_fn(model: nn.Module, batch: dict) -> torch.Tensor:
    return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def batch_of(x, y, ids) -> dict:
    ids = torch.as_tensor(ids)
    return {"x": x[ids], "y": y[ids], "index": ids}


def schedule(n_steps: int, batch: int, accumulate: int, n: int) -> list[list[torch.Tensor]]:
    """Sample ids of every micro-batch of every step: consecutive ids, wrapping around the data."""
    out, cursor = [], 0
    for _ in range(n_steps):
        micro = []
        for _ in range(accumulate):
            micro.append(torch.arange(cursor, cursor + batch) % n)
            cursor += batch
        out.append(micro)
    return out


# ------------------------------------------------------------------------------------------------ reading a store


def read_store(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The committed part of a store's ``steps`` and ``records`` tables, with plain h5py."""
    with h5py.File(path, "r") as f:
        n_steps, n_rows = int(f.attrs["committed_steps"]), int(f.attrs["committed_rows"])
        steps = {k: f["steps"][k][:n_steps] for k in f["steps"]}
        records = {k: f["records"][k][:n_rows] for k in f["records"]}
    return steps, records


def step_records(records: dict, t: int) -> dict[str, np.ndarray]:
    sel = records["step"] == t
    return {k: v[sel] for k, v in records.items()}


# ------------------------------------------------------------------------------------------------ the recorder loop


def record_run(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: list[list[torch.Tensor]],
    x, y, val, path, **recorder_kwargs,
) -> tuple[dict, dict]:
    """A plain training loop driving InRunRecorder: mean loss per micro-batch, divided by the accumulation count."""
    recorder_kwargs.setdefault("record_norms", True)  # |c_i|^2 is compared with the replay's too
    recorder = InRunRecorder(model, path, val_data=val, loss_fn=loss_fn, overwrite=True, **recorder_kwargs)
    recorder.start()
    for micro in steps:
        losses = []
        for ids in micro:
            batch = batch_of(x, y, ids)
            recorder.begin_microbatch(batch)
            loss = loss_fn(model, batch).mean() / len(micro)
            loss.backward()
            recorder.end_microbatch()
            losses.append(float(loss.detach()) * len(micro))
        recorder.before_optimizer_step(optimizer)
        optimizer.step()
        optimizer.zero_grad()
        recorder.note_train_loss(sum(losses) / len(losses))
    recorder.close()
    return read_store(path)


# ------------------------------------------------------------------------------------------------ the reference replay


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def model_at(model: nn.Module, params: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` with the given parameter values (eval mode)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(params[name])
    return m.eval()


def val_loss_at(model: nn.Module, params: dict[str, torch.Tensor], val: dict) -> float:
    with torch.no_grad():
        out = torch.func.functional_call(model, params, (val["x"],))
        return float(F.cross_entropy(out, val["y"], reduction="none").mean())


def val_point_grads(model: nn.Module, params: dict[str, torch.Tensor], val: dict) -> dict[str, torch.Tensor]:
    """Each validation point's loss gradient at ``params``: ``{name: [n_val, *shape]}`` (torch.func)."""
    return per_sample_grads(model_at(model, params), loss_fn, val)


def dot(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> torch.Tensor:
    """``sum over parameters <a_i, b>`` for stacked ``a`` ([n, *shape]) and a single ``b``: [n]."""
    return sum((a[k].reshape(a[k].shape[0], -1) * b[k].reshape(1, -1)).sum(1) for k in b)


@dataclass
class ReplayStep:
    ids: np.ndarray
    value_1: np.ndarray
    value_2: np.ndarray
    per_val_1: np.ndarray
    per_val_2: np.ndarray
    grad_norm_sq: np.ndarray
    val_loss: float  # L_V(theta_t)
    val_loss_base: float  # L_V(theta_t + Delta_0)
    val_loss_after: float  # L_V(theta_{t+1})
    direction_norm_sq: float = float("nan")  # |D * g_V|^2
    contributions: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)  # c_i, [n, *shape]
    params: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)  # theta_t
    scale: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)  # D


def adam_scale(optimizer: torch.optim.Optimizer, param: torch.Tensor, grad: torch.Tensor, group: dict,
               adam_values: str = "fixed-state") -> torch.Tensor:
    """The fixed-state Adam/AdamW scale of ALGORITHMS.md, from the optimizer's state before it steps; with
    ``adam_values="block"`` its one-number summary per tensor, ``sum(D G^2) / sum(G^2)`` (docs/adam-values.md)."""
    beta1, beta2 = group["betas"]
    state = optimizer.state.get(param, {})
    t = int(state.get("step", 0)) + 1
    full = grad + group["weight_decay"] * param.detach() if type(optimizer) is torch.optim.Adam else grad
    v = beta2 * state.get("exp_avg_sq", torch.zeros_like(param)) + (1 - beta2) * full**2
    fixed = group["lr"] * (1 - beta1) / (1 - beta1**t) / ((v / (1 - beta2**t)).sqrt() + group["eps"])
    if adam_values == "fixed-state":
        return fixed
    assert adam_values == "block", adam_values
    return torch.full_like(fixed, float((fixed * grad**2).sum() / (grad**2).sum()))


def replay(
    model: nn.Module,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    steps: list[list[torch.Tensor]],
    x, y, val,
    *,
    clip_norm: float | None = None,
    world_size: int = 1,
    adam_values: str = DEFAULT_ADAM_VALUES,
) -> list[ReplayStep]:
    """Re-run training on a fresh copy of ``model`` (same initial parameters) and compute every step's values.

    ``world_size``: each micro-batch stands for the union of that many ranks' batches of equal size, whose
    mean-reduced gradients data parallelism averages; that is the mean over the union, so nothing changes here.
    """
    model = copy.deepcopy(model)
    optimizer = make_optimizer(model)
    named = dict(model.named_parameters())
    out = []
    for micro in steps:
        theta = params_of(model)
        n_micro = len(micro)
        contributions: dict[str, list[torch.Tensor]] = {k: [] for k in named}
        ids = []
        for mids in micro:
            batch = batch_of(x, y, mids)
            grads = per_sample_grads(model_at(model, theta), loss_fn, batch)
            for k in named:
                contributions[k].append(grads[k] / (len(mids) * n_micro))
            ids.append(mids)
            # the real gradient for the real optimizer, by autograd
            (loss_fn(model, batch).mean() / n_micro).backward()
        c = {k: torch.cat(v) for k, v in contributions.items()}
        coefficient = 1.0
        if clip_norm is not None:
            total = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm))
            coefficient = min(1.0, clip_norm / (total + 1e-6))
            c = {k: v * coefficient for k, v in c.items()}
        G = {k: p.grad.detach().clone() for k, p in named.items()}
        for k in named:  # sanity: the contributions add up to the gradient the optimizer sees
            torch.testing.assert_close(c[k].sum(0), G[k], rtol=1e-9, atol=1e-12)
        scale = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                k = next(name for name, q in named.items() if q is p)
                if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
                    scale[k] = adam_scale(optimizer, p, G[k], group, adam_values)
                else:
                    # SGD, with momentum (no dampening, no Nesterov) and weight decay: the step is
                    # -lr (momentum * buffer + wd * theta + G), so D = lr and the rest is Delta_0
                    assert type(optimizer) is torch.optim.SGD and not group["dampening"] and not group["nesterov"]
                    scale[k] = torch.full_like(p, group["lr"])
        optimizer.step()
        optimizer.zero_grad()
        theta_next = params_of(model)
        delta_b = {k: -scale[k] * G[k] for k in named}
        delta_0 = {k: theta_next[k] - theta[k] - delta_b[k] for k in named}  # what the real optimizer added
        theta_base = {k: theta[k] + delta_0[k] for k in named}
        theta_mid = {k: theta[k] + delta_0[k] + delta_b[k] / 2 for k in named}
        g_val = val_point_grads(model, theta, val)
        g_mid = val_point_grads(model, theta_mid, val)
        n_val = val["y"].shape[0]
        per_val_1 = torch.stack([dot(c, {k: scale[k] * g_val[k][j] for k in named}) for j in range(n_val)], 1)
        per_val_2 = torch.stack([dot(c, {k: scale[k] * g_mid[k][j] for k in named}) for j in range(n_val)], 1)
        value_1 = dot(c, {k: scale[k] * g_val[k].mean(0) for k in named})
        value_2 = dot(c, {k: scale[k] * g_mid[k].mean(0) for k in named})
        out.append(ReplayStep(
            ids=torch.cat(ids).numpy(),
            value_1=value_1.numpy(), value_2=value_2.numpy(),
            per_val_1=per_val_1.numpy(), per_val_2=per_val_2.numpy(),
            grad_norm_sq=sum(v.reshape(v.shape[0], -1).pow(2).sum(1) for v in c.values()).numpy(),
            val_loss=val_loss_at(model, theta, val),
            val_loss_base=val_loss_at(model, theta_base, val),
            val_loss_after=val_loss_at(model, theta_next, val),
            direction_norm_sq=float(sum(float((scale[k].double() * g_val[k].double().mean(0)).square().sum())
                                        for k in named)),
            contributions=c, params=theta, scale=scale,
        ))
    return out


def assert_values_match(steps_table, records, reference: list[ReplayStep], orders=(1, 2), rtol=1e-7, norms=True):
    """The recorded values (and, with ``norms``, the per-sample norms; without, the column must be NaN: not
    recorded) of every step against the replay's."""
    assert list(steps_table["step"]) == list(range(len(reference)))
    assert not steps_table["skipped"].any()
    for t, ref in enumerate(reference):
        got = step_records(records, t)
        np.testing.assert_array_equal(got["sample_id"], ref.ids, err_msg=f"step {t}")
        for order in orders:
            expected = getattr(ref, f"value_{order}")
            scale = np.abs(expected).max()
            np.testing.assert_allclose(got[f"value_{order}"], expected, rtol=0, atol=rtol * scale,
                                       err_msg=f"value_{order} at step {t}")
        if norms:
            np.testing.assert_allclose(got["grad_norm_sq"], ref.grad_norm_sq, rtol=1e-7, err_msg=f"|c_i|^2, step {t}")
        else:
            assert np.isnan(got["grad_norm_sq"]).all(), f"step {t}: norms recorded though not asked for"
        np.testing.assert_allclose(steps_table["direction_norm_sq"][t], ref.direction_norm_sq, rtol=1e-5,
                                   err_msg=f"|D g_V|^2, step {t}")


SGD_LR = 0.3


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=SGD_LR)


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)


def adam_l2(model):
    return torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.05)


def sgd_momentum_wd(model):
    return torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=0.05)


def sgd_two_groups(model):
    return torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.5},
                            {"params": model[2].parameters(), "lr": 0.05}], lr=0.1)


# ------------------------------------------------------------------------------------------------ values per step


@pytest.mark.parametrize("shapley", ["first", "second"])
@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("make_optimizer, adam_values",
                         [(sgd, DEFAULT_ADAM_VALUES), (adamw, "fixed-state"), (adam_l2, "fixed-state"),
                          (adamw, "block"), (adam_l2, "block")],
                         ids=["sgd", "adamw", "adam-l2", "adamw-block", "adam-l2-block"])
def test_values_match_an_independent_replay(tmp_path, make_optimizer, adam_values, accumulate, shapley):
    x, y, val = make_data()
    model = make_mlp()
    init = copy.deepcopy(model)
    plan = schedule(n_steps=5, batch=4, accumulate=accumulate, n=len(y))
    steps_table, records = record_run(model, make_optimizer(model), plan, x, y, val, tmp_path / "run.h5",
                                      shapley=shapley, adam_values=adam_values)
    reference = replay(init, make_optimizer, plan, x, y, val, adam_values=adam_values)
    orders = (1,) if shapley == "first" else (1, 2)
    assert_values_match(steps_table, records, reference, orders=orders)
    if shapley == "first":
        assert np.isnan(records["value_2"]).all()
    # the recorder trained the model exactly as the replay did
    final = params_of(model)
    replayed = copy.deepcopy(init)
    opt = make_optimizer(replayed)
    for micro in plan:
        for ids in micro:
            (loss_fn(replayed, batch_of(x, y, ids)).mean() / len(micro)).backward()
        opt.step(), opt.zero_grad()
    for k, v in params_of(replayed).items():
        torch.testing.assert_close(final[k], v, rtol=0, atol=0)


def test_sgd_with_momentum_and_weight_decay(tmp_path):
    """Delta_0 != 0 for SGD (momentum and decay): the midpoint and the base loss must include it."""
    x, y, val = make_data()
    model = make_mlp()
    init = copy.deepcopy(model)
    plan = schedule(n_steps=5, batch=4, accumulate=2, n=len(y))
    steps_table, records = record_run(model, sgd_momentum_wd(model), plan, x, y, val, tmp_path / "run.h5",
                                      shapley="second")
    reference = replay(init, sgd_momentum_wd, plan, x, y, val)
    assert_values_match(steps_table, records, reference)
    for t, ref in enumerate(reference):
        assert steps_table["val_loss_base"][t] == pytest.approx(ref.val_loss_base, rel=1e-10)
    assert np.abs(steps_table["val_loss_base"] - steps_table["val_loss"])[1:].min() > 1e-5  # momentum moved theta


def test_validation_data_in_several_batches(tmp_path):
    """A loader of uneven validation batches (3 + 2 points): the utility is the mean over all 5 points."""
    x, y, val = make_data(n_val=5)
    loader = torch.utils.data.DataLoader([{"x": val["x"][i], "y": val["y"][i]} for i in range(5)], batch_size=3)
    model = make_mlp()
    init = copy.deepcopy(model)
    plan = schedule(n_steps=3, batch=4, accumulate=1, n=len(y))
    steps_table, records = record_run(model, adamw(model), plan, x, y, loader, tmp_path / "run.h5",
                                      shapley="second", per_val_point=True)
    reference = replay(init, adamw, plan, x, y, val)
    assert_values_match(steps_table, records, reference)
    for t, ref in enumerate(reference):
        got = step_records(records, t)
        np.testing.assert_allclose(got["value_1_per_val"], ref.per_val_1, rtol=0,
                                   atol=1e-6 * np.abs(ref.per_val_1).max())
        assert steps_table["val_loss"][t] == pytest.approx(ref.val_loss, rel=1e-10)


def test_validation_runs_in_eval_mode(tmp_path):
    """With dropout, the validation loss is the deterministic eval-mode loss, and training mode is restored."""
    x, y, val = make_data()
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(N_FEATURES, 16), nn.Tanh(), nn.Dropout(0.5), nn.Linear(16, N_CLASSES)).to(DTYPE)
    model.train()
    snapshots = []
    recorder = InRunRecorder(model, tmp_path / "run.h5", val_data=val, loss_fn=loss_fn, shapley="second",
                             overwrite=True)
    recorder.start()
    optimizer = sgd(model)
    for ids in schedule(n_steps=3, batch=4, accumulate=1, n=len(y)):
        batch = batch_of(x, y, ids[0])
        snapshots.append(params_of(model))
        recorder.begin_microbatch(batch)
        loss_fn(model, batch).mean().backward()
        recorder.end_microbatch()
        recorder.before_optimizer_step(optimizer)
        assert model.training and model[2].training
        optimizer.step(), optimizer.zero_grad()
    recorder.close()
    steps_table, records = read_store(tmp_path / "run.h5")
    for t, theta in enumerate(snapshots):
        assert steps_table["val_loss"][t] == pytest.approx(val_loss_at(model.eval(), theta, val), rel=1e-12)
    assert np.isfinite(records["value_2"]).all()


def test_two_param_groups_with_different_learning_rates(tmp_path):
    x, y, val = make_data()
    model = make_mlp()
    init = copy.deepcopy(model)
    plan = schedule(n_steps=4, batch=4, accumulate=2, n=len(y))
    steps_table, records = record_run(model, sgd_two_groups(model), plan, x, y, val, tmp_path / "run.h5",
                                      shapley="second")
    reference = replay(init, sgd_two_groups, plan, x, y, val)
    assert_values_match(steps_table, records, reference)
    # a single-lr formula would be far off: the groups' learning rates differ tenfold
    for t, ref in enumerate(reference):
        single = sum((ref.contributions[k] * 0.5).reshape(len(ref.ids), -1) @
                     val_point_grads(init, ref.params, val)[k].mean(0).reshape(-1) for k in ref.params)
        assert np.abs(single.numpy() - ref.value_1).max() > 1e-3 * np.abs(ref.value_1).max()
    np.testing.assert_allclose(steps_table["lr"], 0.5)  # the first group's learning rate


def test_steps_table_against_independent_losses(tmp_path):
    """val_loss, val_loss_base, val_loss_after, train_loss and the sums, for AdamW (Delta_0 != 0)."""
    x, y, val = make_data()
    model = make_mlp()
    init = copy.deepcopy(model)
    plan = schedule(n_steps=5, batch=4, accumulate=2, n=len(y))
    steps_table, records = record_run(model, adamw(model), plan, x, y, val, tmp_path / "run.h5", shapley="second")
    reference = replay(init, adamw, plan, x, y, val)
    for t, ref in enumerate(reference):
        assert steps_table["val_loss"][t] == pytest.approx(ref.val_loss, rel=1e-10)
        assert steps_table["val_loss_base"][t] == pytest.approx(ref.val_loss_base, rel=1e-10)
        assert steps_table["val_loss_after"][t] == pytest.approx(ref.val_loss_after, rel=1e-10)
        assert steps_table["n_samples"][t] == 8
        assert steps_table["lr"][t] == pytest.approx(0.01)
        got = step_records(records, t)
        assert steps_table["sum_value_1"][t] == pytest.approx(got["value_1"].sum(), rel=1e-12, abs=1e-15)
        assert steps_table["sum_value_2"][t] == pytest.approx(got["value_2"].sum(), rel=1e-12, abs=1e-15)
        # the training loss of the step: the mean of its micro-batches' mean losses at theta_t
        with torch.no_grad():
            expected = np.mean([float(loss_fn(model_at(init, ref.params), batch_of(x, y, ids)).mean())
                                for ids in plan[t]])
        assert steps_table["train_loss"][t] == pytest.approx(expected, rel=1e-10)
    # AdamW's weight decay and momentum move theta without any sample: the base differs from theta_t
    assert np.abs(steps_table["val_loss_base"] - steps_table["val_loss"]).max() > 1e-6


# ------------------------------------------------------------------------------------------------ efficiency


@pytest.mark.parametrize("make_optimizer", [sgd, adamw], ids=["sgd", "adamw"])
def test_efficiency_residuals(tmp_path, make_optimizer):
    """residual_k = sum of values_k - (L_V(theta_t + Delta_0) - L_V(theta_{t+1})), with the losses computed here.

    Measured (8 steps, batches of 8): mean |residual_1| 3.8e-3 (SGD) / 1.2e-4 (AdamW), mean |residual_2| 4.2e-5 /
    3.3e-7, smaller at every step; asserted: second-order mean < 0.1 x first-order mean, smaller at >= 75 % of steps.
    """
    x, y, val = make_data()
    model = make_mlp()
    init = copy.deepcopy(model)
    plan = schedule(n_steps=8, batch=8, accumulate=1, n=len(y))
    steps_table, records = record_run(model, make_optimizer(model), plan, x, y, val, tmp_path / "run.h5",
                                      shapley="second")
    reference = replay(init, make_optimizer, plan, x, y, val)
    res1, res2 = [], []
    for t, ref in enumerate(reference):
        got = step_records(records, t)
        utility = ref.val_loss_base - ref.val_loss_after  # U_t(B_t) - U_t(empty), computed independently
        for order, out in ((1, res1), (2, res2)):
            expected = got[f"value_{order}"].sum() - utility
            recorded = steps_table[f"residual_{order}"][t]
            assert recorded == pytest.approx(expected, rel=1e-6, abs=1e-12), f"residual_{order}, step {t}"
            out.append(abs(recorded))
    res1, res2 = np.array(res1), np.array(res2)
    # the values of a step sum to the utility of the batch up to the Taylor error, which second order shrinks
    assert res2.mean() < 0.1 * res1.mean(), (res1, res2)
    assert (res2 < res1).mean() >= 0.75, (res1, res2)


# ------------------------------------------------------------------------------------------------ per validation point


@pytest.mark.parametrize("make_optimizer", [sgd, adamw], ids=["sgd", "adamw"])
def test_per_val_point_matrix(tmp_path, make_optimizer):
    x, y, val = make_data(n_val=5)
    model = make_mlp()
    init = copy.deepcopy(model)
    plan = schedule(n_steps=3, batch=4, accumulate=2, n=len(y))
    steps_table, records = record_run(model, make_optimizer(model), plan, x, y, val, tmp_path / "run.h5",
                                      shapley="second", per_val_point=True)
    reference = replay(init, make_optimizer, plan, x, y, val)
    assert records["value_1_per_val"].shape == (len(records["sample_id"]), 5)
    assert records["value_2_per_val"].shape == (len(records["sample_id"]), 5)
    for t, ref in enumerate(reference):
        got = step_records(records, t)
        for order in (1, 2):
            matrix = got[f"value_{order}_per_val"].astype(np.float64)  # stored as float32
            expected = getattr(ref, f"per_val_{order}")
            np.testing.assert_allclose(matrix, expected, rtol=0, atol=1e-6 * np.abs(expected).max(),
                                       err_msg=f"per_val_{order}, step {t}")
            # the utility is the mean over validation points, so the mean of a row is the sample's value
            np.testing.assert_allclose(matrix.mean(1), got[f"value_{order}"], rtol=0,
                                       atol=1e-6 * np.abs(got[f"value_{order}"]).max())


# ------------------------------------------------------------------------------------------------ exact Shapley values


def exact_shapley(utilities: np.ndarray, n: int) -> np.ndarray:
    """Shapley values from the utility of every subset (``utilities[mask]``, subsets as bit masks of n players)."""
    weights = [math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n) for k in range(n)]
    phi = np.zeros(n)
    for mask in range(1 << n):
        size = bin(mask).count("1")
        for i in range(n):
            if not mask >> i & 1:
                phi[i] += weights[size] * (utilities[mask | 1 << i] - utilities[mask])
    return phi


def subset_utilities(model, theta, c, lr, val, n) -> np.ndarray:
    """U(S) = L_V(theta) - L_V(theta - lr sum_{i in S} c_i) for every subset S of the n samples (vectorised)."""
    masks = torch.tensor([[mask >> i & 1 for i in range(n)] for mask in range(1 << n)], dtype=DTYPE)
    moved = {k: theta[k] - lr * torch.einsum("sn,n...->s...", masks, c[k]) for k in theta}

    def loss_at(params):
        out = torch.func.functional_call(model, params, (val["x"],))
        return F.cross_entropy(out, val["y"], reduction="none").mean()

    with torch.no_grad():
        losses = torch.func.vmap(loss_at)(moved)
    return (val_loss_at(model, theta, val) - losses).numpy()


def shapley_errors(tmp_path, seed: int, n: int = 8, lr: float = 0.5, n_steps: int = 3):
    """Max abs error of the recorded first/second order values against exact Shapley values, over a few steps."""
    x, y, val = make_data(n=n * n_steps, n_val=6, seed=seed)
    model = make_mlp(seed=seed + 1, hidden=16)
    init = copy.deepcopy(model)
    make = lambda m: torch.optim.SGD(m.parameters(), lr=lr)  # noqa: E731
    plan = schedule(n_steps=n_steps, batch=n, accumulate=1, n=len(y))
    steps_table, records = record_run(model, make(model), plan, x, y, val, tmp_path / f"run{seed}.h5",
                                      shapley="second")
    reference = replay(init, make, plan, x, y, val)
    errors = {1: [], 2: []}
    scales = []
    for t, ref in enumerate(reference):
        utilities = subset_utilities(init, ref.params, ref.contributions, lr, val, n)
        assert abs(utilities[0]) < 1e-12
        phi = exact_shapley(utilities, n)
        # the exact values are efficient: they sum to U(batch); and U(batch) is the store's utility of the step
        assert phi.sum() == pytest.approx(utilities[-1], rel=1e-9, abs=1e-12)
        assert utilities[-1] == pytest.approx(steps_table["val_loss_base"][t] - steps_table["val_loss_after"][t],
                                              rel=1e-9)
        got = step_records(records, t)
        scales.append(np.abs(phi).max())
        for order in (1, 2):
            errors[order].append(np.abs(got[f"value_{order}"] - phi).max())
    return max(errors[1]), max(errors[2]), max(scales)


def test_second_order_is_closer_to_exact_shapley_values(tmp_path):
    """SGD, lr 0.5, an MLP (6-16-3, tanh), batches of 8, 3 steps per seed: exact Shapley values by enumerating all
    2^8 subsets of each batch, with U(S) = L_V(theta_t) - L_V(theta_t - lr sum_{i in S} c_i).

    At this learning rate U is visibly non-linear, so the first-order value (the Shapley value of U's linearisation)
    is off by the quadratic term; the second-order value is the exact Shapley value of U's second-order expansion
    (evaluated through the midpoint gradient), leaving an error of third order in lr.
    Measured (float64, seeds 0-5): first-order max abs error 6.7e-3 .. 2.5e-2 (10-40 % of the largest |phi|),
    second-order 1.9e-4 .. 7.7e-4, ratio second/first 0.013 .. 0.035, second-order error at most 1.0 % of the
    largest |phi|. The bounds (ratio < 0.1, < 2.5 % of max |phi|) leave a margin of about 3x; a second-order value
    that used the validation gradient at theta_t, or at theta_{t+1}, fails them.
    """
    for seed in range(4):
        err1, err2, scale = shapley_errors(tmp_path, seed)
        print(f"seed {seed}: first-order max err {err1:.2e}, second-order {err2:.2e}, max |phi| {scale:.2e}")
        assert err1 > 0.05 * scale, "the first-order Taylor error should be visible at lr 0.5"
        assert err2 < 0.1 * err1
        assert err2 < 0.025 * scale


def test_norms_are_recorded_only_when_asked(tmp_path):
    """``record_norms`` is off by default (the Gram products cost 5-20% of a step): the column holds NaN and the
    reader's ``normalize="grad_norm"`` refuses with the fix; with ``record_norms=True`` it weighs each record by
    ``1/|c_i|``, the norms of the replay."""
    import inrun

    x, y, val = make_data()
    plan = schedule(n_steps=2, batch=4, accumulate=1, n=len(y))
    model = make_mlp()
    init = copy.deepcopy(model)
    _, records = record_run(model, adamw(model), plan, x, y, val, tmp_path / "off.h5", record_norms=False)
    assert np.isnan(records["grad_norm_sq"]).all()
    with inrun.open_run(tmp_path / "off.h5") as run:
        with pytest.raises(ValueError, match="record_norms=True"):
            run.sample_values(normalize="grad_norm")
    model = copy.deepcopy(init)
    record_run(model, adamw(model), plan, x, y, val, tmp_path / "on.h5", record_norms=True)
    reference = replay(init, adamw, plan, x, y, val)
    expected: dict[int, float] = {}
    for ref in reference:
        for i, value, norm_sq in zip(ref.ids, ref.value_1, ref.grad_norm_sq):
            expected[int(i)] = expected.get(int(i), 0.0) + float(value) / float(np.sqrt(norm_sq))
    with inrun.open_run(tmp_path / "on.h5") as run:
        ids, values = run.sample_values(normalize="grad_norm")
    np.testing.assert_allclose(values, [expected[int(i)] for i in ids], rtol=1e-6)
