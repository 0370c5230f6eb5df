"""Every Adam value variant (``adam_values``) against an explicit replay written out independently.

The replay trains a copy of the model with the real torch optimizer, takes per-sample gradients from
``torch.func`` (tests/reference.py), and writes each variant's scale ``S`` from the optimizer's state before the step
with its own formula (docs/adam-values.md). Every variant models the same real step as
``theta_{t+1} = theta_t + Delta_0 + sum_i u_i`` with ``u_i = -S * c_i``, ``Delta_0`` the rest of the real step, so

* first order ``phi_i = <S * g_V(theta_t), c_i>``;
* second order ``phi_i = <S * g_V(theta_t + Delta_0 - S G / 2), c_i>`` = ``<S * g_V(theta_{t+1} + S G / 2), c_i>``.

The ``"jacobian"`` scale is the derivative of a written-out AdamW step with respect to the gradient, by forward-mode
autodiff (the step is elementwise, so one ``jvp`` with a tangent of ones gives the diagonal).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import inrun
from inrun.valuation.recorder import InRunRecorder
from inrun.valuation.update_rules import ADAM_VALUES, DEFAULT_ADAM_VALUES, SCALAR_ADAM_VALUES, update_terms
from tests.reference import per_sample_grads

LR, WD, BETAS, EPS = 0.01, 0.1, (0.9, 0.999), 1e-8
STEPS, BATCH, N_VAL = 3, 6, 3


def loss_fn(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def make_model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def make_data():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(STEPS * BATCH + N_VAL, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (len(x),), generator=g)
    n = STEPS * BATCH
    train = {"x": x[:n], "y": y[:n], "index": torch.arange(n)}
    val = {"x": x[n:], "y": y[n:]}
    return train, val


def batch_at(train, t):
    ids = torch.arange(t * BATCH, (t + 1) * BATCH)
    return {key: value[ids] for key, value in train.items()}



def _train_recorded(recorder, model, optimizer, train) -> None:
    """``STEPS`` optimizer steps of a plain loop driving ``recorder``, then close it."""
    recorder.start()
    for t in range(STEPS):
        batch = batch_at(train, t)
        recorder.begin_microbatch(batch)
        loss_fn(model, batch).mean().backward()
        recorder.end_microbatch()
        recorder.before_optimizer_step(optimizer)
        optimizer.step()
        optimizer.zero_grad()
    recorder.close()

def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, betas=BETAS, eps=EPS)


# --------------------------------------------------------------------------------------- the variants, written out


def adamw_update(g, p, m, v, t):
    """The AdamW step ``theta_{t+1} - theta_t`` as a function of the gradient ``g`` (torch's algorithm)."""
    b1, b2 = BETAS
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    return -LR * WD * p - LR * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + EPS)


def reference_scale(variant, p, g, state, per_sample):
    """The variant's ``S`` for parameter ``p`` with batch gradient ``g`` (``per_sample``: ``[n, *shape]`` c_i)."""
    b1, b2 = BETAS
    t = int(state["step"]) + 1 if state else 1
    m = state["exp_avg"] if state else torch.zeros_like(p)
    v_prev = state["exp_avg_sq"] if state else torch.zeros_like(p)
    a = LR * (1 - b1) / (1 - b1**t)
    v_hat = (b2 * v_prev + (1 - b2) * g**2) / (1 - b2**t)
    fixed = a / (v_hat.sqrt() + EPS)
    if variant == "fixed-state":
        return fixed
    if variant == "block":
        return torch.full_like(p, float((fixed * g**2).sum() / (g**2).sum()))
    if variant == "factored":
        if p.dim() == 2:
            rows, cols = v_hat.sum(1, keepdim=True), v_hat.sum(0, keepdim=True)
            model = rows @ cols / v_hat.sum()
        else:
            model = torch.full_like(p, float(v_hat.mean()))
        return a / (model.sqrt() + EPS)
    if variant == "floored":
        return a / (torch.maximum(v_hat, v_hat.mean()).sqrt() + EPS)
    if variant == "previous":
        floor = v_hat.mean()
        model = torch.maximum(v_prev / (1 - b2 ** (t - 1)), floor) if t > 1 else torch.full_like(p, float(floor))
        return a / (model.sqrt() + EPS)
    if variant == "noise-eps":
        sigma2 = float((per_sample**2).sum()) / p.numel()
        return a / ((v_hat + sigma2).sqrt() + EPS)
    if variant in ("jacobian", "block-jacobian"):
        _, tangent = torch.func.jvp(lambda x: adamw_update(x, p, m, v_prev, t), (g,), (torch.ones_like(g),))
        if variant == "jacobian":
            return -tangent
        return torch.full_like(p, float((-tangent * g**2).sum() / (g**2).sum()))
    raise AssertionError(variant)


def val_grads(model, theta, val):
    """``{name: [n_val, *shape]}`` gradients of each validation point's loss at ``theta``."""
    probe = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in probe.named_parameters():
            p.copy_(theta[name])
    return per_sample_grads(probe, loss_fn, val)


def replay(variant, train, val):
    """Per step: (value_1 [n], value_2 [n], per_val_1 [n, n_val], per_val_2) from the written-out variant."""
    model = make_model()
    optimizer = adamw(model)
    named = dict(model.named_parameters())
    out = []
    for t in range(STEPS):
        batch = batch_at(train, t)
        theta = {k: p.detach().clone() for k, p in named.items()}
        c = {k: v / BATCH for k, v in per_sample_grads(model, loss_fn, {"x": batch["x"], "y": batch["y"]}).items()}
        G = {k: c[k].sum(0) for k in named}
        scale = {k: reference_scale(variant, named[k].detach(), G[k], optimizer.state.get(named[k]), c[k])
                 for k in named}
        loss_fn(model, batch).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        theta_next = {k: p.detach().clone() for k, p in named.items()}
        mid = {k: theta_next[k] + scale[k] * G[k] / 2 for k in named}
        g1, g2 = val_grads(model, theta, val), val_grads(model, mid, val)

        def values(gv):
            return sum(c[k].reshape(BATCH, -1) @ (scale[k] * gv[k]).reshape(N_VAL, -1).T for k in named)

        per1, per2 = values(g1), values(g2)
        out.append((per1.mean(1).numpy(), per2.mean(1).numpy(), per1.numpy(), per2.numpy()))
    return out


def record(variant, train, val, path):
    model = make_model()
    optimizer = adamw(model)
    recorder = InRunRecorder(model, path, val_data=val, loss_fn=loss_fn, shapley="second", per_val_point=True,
                             overwrite=True, adam_values=variant)
    _train_recorded(recorder, model, optimizer, train)


@pytest.mark.parametrize("variant", list(ADAM_VALUES) + ["block, direct route", "block, ghost route"])
def test_recorded_values_match_the_written_out_variant(variant, tmp_path, monkeypatch):
    """Scalar-scale variants value by ghost dot products or, where that costs more (many validation points against
    narrow layers), by products with the scaled validation gradient: both routes are checked."""
    if variant.startswith("block, "):
        from inrun.valuation import shapley

        monkeypatch.setattr(shapley, "_ghost_pays", lambda *args, ghost=variant.endswith("ghost route"): ghost)
        variant = "block"
    train, val = make_data()
    record(variant, train, val, tmp_path / "run.h5")
    expected = replay(variant, train, val)
    with inrun.open_run(tmp_path / "run.h5") as run:
        assert run.config["adam_values"] == variant
        records = run.records(["step", "sample_id", "value_1", "value_2", "value_1_per_val", "value_2_per_val"])
    for t, (v1, v2, p1, p2) in enumerate(expected):
        rows = records["step"] == t
        assert list(records["sample_id"][rows]) == list(range(t * BATCH, (t + 1) * BATCH))
        for got, want, what in ((records["value_1"][rows], v1, "value_1"), (records["value_2"][rows], v2, "value_2"),
                                (records["value_1_per_val"][rows], p1, "per_val_1"),
                                (records["value_2_per_val"][rows], p2, "per_val_2")):
            scale = np.abs(want).max()
            assert scale > 0
            # per-validation-point columns are stored in float32
            tol = 1e-6 if what.startswith("per_val") else 1e-9
            np.testing.assert_allclose(got, want, rtol=0, atol=tol * scale, err_msg=f"{variant} {what} step {t}")


@pytest.mark.parametrize("variant", ADAM_VALUES)
def test_every_variant_describes_the_real_step(variant):
    """``theta + delta0 - scale * G`` is the step AdamW takes, whatever the split into per-sample updates."""
    train, _ = make_data()
    model = make_model()
    optimizer = adamw(model)
    params = dict(model.named_parameters())
    for t in range(STEPS):
        loss_fn(model, batch_at(train, t)).mean().backward()
        grads = {k: p.grad.detach().clone() for k, p in params.items()}
        sums = {k: 1.0 for k in params}
        terms = update_terms(optimizer, params, grads, adam_values=variant, sample_sq_sums=sums)
        before = {k: p.detach().clone() for k, p in params.items()}
        optimizer.step()
        optimizer.zero_grad()
        for k, p in params.items():
            term = terms[k]
            predicted = before[k] - term.scale * grads[k] + (term.delta0 if term.delta0 is not None else 0.0)
            torch.testing.assert_close(predicted, p.detach(), rtol=1e-9, atol=1e-12)
            assert isinstance(term.scale, float) == (variant in SCALAR_ADAM_VALUES)


def test_first_adam_step_fixed_state_is_dominated_by_cancelling_coordinates():
    """Why the default is not the fixed-state rule: at step 1, ``v_hat = G^2`` so ``D = lr / (|G| + eps)``; where a
    coordinate's per-sample contributions cancel, ``D |c_i|`` is far above anything the real step can do (``lr``
    per coordinate); the block scale stays at the size of the step."""
    train, _ = make_data()
    model = make_model()
    optimizer = adamw(model)
    params = dict(model.named_parameters())
    batch = batch_at(train, 0)
    c = {k: v / BATCH for k, v in per_sample_grads(model, loss_fn, {"x": batch["x"], "y": batch["y"]}).items()}
    grads = {k: c[k].sum(0) for k in params}
    fixed = update_terms(optimizer, params, grads, adam_values="fixed-state")
    block = update_terms(optimizer, params, grads, adam_values="block")
    worst_fixed = max(float((fixed[k].scale * c[k].abs()).max()) for k in params)
    worst_block = max(float((block[k].scale * c[k].abs()).max()) for k in params)
    assert worst_fixed > 1.5 * LR  # one sample "moves" a coordinate further than the whole step can
    assert worst_block < worst_fixed


def test_default_and_bad_names():
    assert DEFAULT_ADAM_VALUES in ADAM_VALUES and "fixed-state" in ADAM_VALUES
    train, val = make_data()
    # CONTRACT.md: Adam/AdamW are valued by the fixed-state rule unless another variant is asked for by name
    assert InRunRecorder(make_model(), "unused.h5", val_data=val, loss_fn=loss_fn).adam_values == "fixed-state"
    with pytest.raises(ValueError, match="adam_values"):
        InRunRecorder(make_model(), "unused.h5", val_data=val, loss_fn=loss_fn, adam_values="exact")


# --------------------------------------------------------------------------------------- post-hoc and TracInCP


def record_with_checkpoints(path, *, checkpoint_every, adam_values=DEFAULT_ADAM_VALUES):
    train, val = make_data()
    model = make_model()
    optimizer = adamw(model)
    recorder = InRunRecorder(model, path, val_data=val, loss_fn=loss_fn, shapley="second", per_val_point=True,
                             overwrite=True, adam_values=adam_values, embeddings={"k_rows": 64, "k_cols": 64},
                             checkpoint_every=checkpoint_every)
    _train_recorded(recorder, model, optimizer, train)
    return model, train, val


def in_run_matrix(run, order):
    records = run.records(["sample_id", f"value_{order}_per_val"])
    ids, inverse = np.unique(records["sample_id"], return_inverse=True)
    out = np.zeros((ids.size, records[f"value_{order}_per_val"].shape[1]))
    np.add.at(out, inverse.reshape(-1), records[f"value_{order}_per_val"])
    return out


def test_posthoc_reproduces_block_values_of_an_adamw_run(tmp_path):
    """With whole projections and every-step checkpoints, post-hoc first-order values of an AdamW run equal the
    in-run values recorded with the ``"block"`` variant (the same per-tensor scale)."""
    model, _, val = record_with_checkpoints(tmp_path / "run.h5", checkpoint_every=1, adam_values="block")
    with inrun.open_run(tmp_path / "run.h5") as run:
        result = run.posthoc_values(model, loss_fn, val)
        expected = in_run_matrix(run, 1)
    assert result.second_order_fallbacks == 0 and result.fallback_note() is None
    np.testing.assert_allclose(result.first, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_second_order_fallback_is_reported(tmp_path):
    from inrun.cli import posthoc_lines, posthoc_path

    # checkpoints at steps 0, 2 and the final 3: steps 0 and 1 have no midpoint, step 2 has (2, 3)
    model, _, val = record_with_checkpoints(tmp_path / "run.h5", checkpoint_every=2)
    with inrun.open_run(tmp_path / "run.h5") as run:
        with pytest.warns(UserWarning, match="fell back to first order at 2 of 3 steps"):
            result = run.posthoc_values(model, loss_fn, val)
        assert result.second_order_fallbacks == 2
        np.testing.assert_array_equal(result.step_second[:2], result.step_first[:2])
        assert not np.allclose(result.step_second[2], result.step_first[2])
        result.save(posthoc_path(run))
        lines = posthoc_lines(run, top=2)
    assert any("second order fell back to first order at 2 of 3 steps" in line for line in lines), lines


def tracin_cp_reference(checkpoints, train, val, step_sizes) -> np.ndarray:
    """sum_c (sum of ``step_sizes(start, end, name)`` over the steps checkpoint c stands for) / n_train
    * <g_test(theta_c), g_i(theta_c)> per parameter, from torch.func per-sample gradients at each saved checkpoint."""
    n = len(train["y"])
    expected = np.zeros((n, N_VAL))
    starts = [s for s in sorted(checkpoints) if s < STEPS]
    for position, start in enumerate(starts):
        end = starts[position + 1] if position + 1 < len(starts) else STEPS
        probe = make_model()
        probe.load_state_dict(torch.load(checkpoints[start], weights_only=True)["state_dict"])
        g_train = per_sample_grads(probe, loss_fn, {"x": train["x"], "y": train["y"]})
        g_test = per_sample_grads(probe, loss_fn, val)
        for name in g_train:
            weight = np.sum(step_sizes(start, end, name)) / n
            expected += weight * (g_train[name].reshape(n, -1) @ g_test[name].reshape(N_VAL, -1).T).numpy()
    return expected


def test_tracin_cp_against_per_sample_gradients_at_each_checkpoint(tmp_path):
    """TracInCP = sum_c w_c <g_test(theta_c), g_i(theta_c)>, w_c = (sum of the block scales of the steps checkpoint
    c stands for) / n_train, from torch.func per-sample gradients at each saved checkpoint (whole projections)."""
    from inrun.posthoc.baselines import tracin_cp
    from inrun.posthoc.record import load_projector
    from inrun.store.paths import find_checkpoints

    model, train, val = record_with_checkpoints(tmp_path / "run.h5", checkpoint_every=2)
    final = {k: v.clone() for k, v in model.state_dict().items()}
    with inrun.open_run(tmp_path / "run.h5") as run:
        got = tracin_cp(run, model, loss_fn, val, train)
        checkpoints = find_checkpoints(run)
        scales = np.asarray(run.steps["proj_scale"], np.float64)  # [steps, blocks]
        layout = [block.name for block in load_projector(run).layout]  # the order of proj_scale's columns
    for k, v in model.state_dict().items():  # the model is restored
        assert torch.equal(v, final[k])
    column = {name: b for b, name in enumerate(layout)}
    expected = tracin_cp_reference(  # a parameter without a block is not valued: weight 0
        checkpoints, train, val, lambda start, end, name: scales[start:end, column[name]] if name in column else 0.0)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * np.abs(expected).max())


def test_report_does_not_show_post_hoc_values_of_an_earlier_run(tmp_path):
    """Post-hoc values saved next to a store belong to that run: after the store is recorded again at the same path
    (overwrite=True, a new run id), ``inrun report`` says so instead of showing the earlier run's values as this
    run's; for the run they were computed for, it shows them."""
    from inrun.cli import posthoc_lines, posthoc_path
    from inrun.posthoc.values import PosthocValues

    path = tmp_path / "run.h5"
    model, _, val = record_with_checkpoints(path, checkpoint_every=1)
    with inrun.open_run(path) as run:
        run.posthoc_values(model, loss_fn, val).save(posthoc_path(run))
        first_id = run.run_id
        assert any("post-hoc top" in line for line in posthoc_lines(run, top=2))
    assert PosthocValues.load(posthoc_path(run)).run_id == first_id
    record_with_checkpoints(path, checkpoint_every=1)  # the same path, recorded again
    with inrun.open_run(path) as run:
        assert run.run_id != first_id
        lines = posthoc_lines(run, top=2)
    assert len(lines) == 1 and "not shown" in lines[0] and first_id in lines[0], lines
