"""TracIn, LoGra and DataInf (inrun.posthoc.baselines) against direct numpy implementations of ALGORITHMS.md's formulas.

The projected vectors the references use are computed independently: per-sample gradients from ``torch.func``
(tests/reference.py) projected with the matrices read from the store with h5py; step sizes and stored projected
contributions are read with h5py. Sign convention: positive = the sample helped (helpfulness = minus the
influence-function value as the formulas write it).
"""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

import inrun
from inrun.engine.projection import BlockLayout
from inrun.posthoc import baselines
from tests.reference import per_sample_grads
from tests.test_embeddings import loss_fn, project, read_layout, read_records, record

DAMPING = 0.1


@pytest.fixture(scope="module")
def run_data(tmp_path_factory):
    rec = record(tmp_path_factory.mktemp("baselines") / "run.h5", embeddings={"k_rows": 2, "k_cols": 3})
    layout, mats = read_layout(rec.path)
    records = read_records(rec.path)
    with h5py.File(rec.path, "r") as f:
        scales = f["steps/proj_scale"][()]
    test = project(per_sample_grads(rec.model, loss_fn, rec.test), layout, mats)
    train = project(per_sample_grads(rec.model, loss_fn, {"x": rec.x, "y": rec.y}), layout, mats)
    return rec, layout, records, scales, test, train


def blocks(layout):
    return [slice(b["offset"], b["offset"] + b["k_rows"] * b["k_cols"]) for b in layout]


def as_block_layout(layout):
    return [BlockLayout(**b) for b in layout]


# ------------------------------------------------------------------------------------------------ references


def reference_tracin(records, scales, test, layout):
    """sum_t eta_t <P g_test, P c_i(t)> per block, summed over each sample's occurrences: {id: [n_test]}."""
    out = {}
    for row, (i, s) in enumerate(zip(records["sample_id"], records["step"])):
        value = sum(scales[s, b] * (records["proj_grad"][row, sl].astype(np.float64) @ test[:, sl].T)
                    for b, sl in enumerate(blocks(layout)))
        out[int(i)] = out.get(int(i), 0.0) + value
    return out


def reference_logra(train, test, layout, block_diagonal=True):
    parts = blocks(layout) if block_diagonal else [slice(0, train.shape[1])]
    total = np.zeros((len(train), len(test)))
    for sl in parts:
        g, v = train[:, sl], test[:, sl]
        fisher = g.T @ g / len(g)
        lam = DAMPING * np.trace(fisher) / fisher.shape[0]
        total += g @ np.linalg.inv(fisher + lam * np.eye(fisher.shape[0])) @ v.T  # = -(influence)
    return total


def reference_datainf(train, test, layout):
    n = len(train)
    total = np.zeros((n, len(test)))
    for sl in blocks(layout):
        g = train[:, sl]
        lam = DAMPING * np.mean(g**2)
        for j in range(len(test)):
            v = test[j, sl]
            hvp = np.zeros_like(v)
            for i in range(n):
                hvp += v - (v @ g[i]) / (lam + g[i] @ g[i]) * g[i]
            hvp /= n * lam
            influence = -(g @ hvp)
            total[:, j] += -influence
    return total


# ------------------------------------------------------------------------------------------------ tests


def test_tracin_matches_formula(run_data):
    rec, layout, records, scales, test, _ = run_data
    expected = reference_tracin(records, scales, test, layout)
    with inrun.open_run(rec.path) as run:
        got = baselines.tracin(run, rec.model, loss_fn, rec.test)
        ids = run.sample_ids
        rows = baselines.tracin(run, rec.model, loss_fn, rec.test, per_occurrence=True)
    assert got.shape == (len(ids), len(test))
    np.testing.assert_allclose(got, np.stack([expected[int(i)] for i in ids]), rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(rows.sum(0), got.sum(0), rtol=1e-10)
    # DVEmb with H = 0 is TracIn
    pure = baselines.tracin_scores(records["proj_grad"], scales[records["step"]], test, as_block_layout(layout))
    np.testing.assert_allclose(pure, rows, rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("block_diagonal", [True, False])
@pytest.mark.parametrize("subset", [None, 4])
def test_logra_matches_formula(run_data, block_diagonal, subset):
    """n = 24 > k (direct solve) and n = 4 < k (the Woodbury route) both match the explicit inverse."""
    rec, layout, _, _, test, train = run_data
    ids = torch.arange(len(rec.x)) if subset is None else torch.tensor([3, 11, 17, 20])
    expected = reference_logra(train[ids.numpy()], test, layout, block_diagonal)
    data = [{"x": rec.x[ids[:2]], "y": rec.y[ids[:2]], "index": ids[:2]},
            {"x": rec.x[ids[2:]], "y": rec.y[ids[2:]], "index": ids[2:]}]
    with inrun.open_run(rec.path) as run:
        got = baselines.logra(run, rec.model, loss_fn, rec.test, data, damping=DAMPING, block_diagonal=block_diagonal)
        order = run.sample_ids
    seen = np.isin(order, ids.numpy())
    assert np.isnan(got[~seen]).all()
    np.testing.assert_allclose(got[seen], expected[np.argsort(ids.numpy())], rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("subset", [None, 4])
def test_datainf_matches_formula(run_data, subset):
    rec, layout, _, _, test, train = run_data
    ids = np.arange(len(rec.x)) if subset is None else np.array([3, 11, 17, 20])
    expected = reference_datainf(train[ids], test, layout)
    with inrun.open_run(rec.path) as run:
        grads = baselines.training_gradients(run, rec.model, loss_fn,
                                             {"x": rec.x[ids], "y": rec.y[ids], "index": torch.as_tensor(ids)})
        np.testing.assert_allclose(grads[1], train[ids], rtol=1e-5, atol=1e-10)
        got = baselines.datainf(run, rec.model, loss_fn, rec.test, gradients=grads, damping=DAMPING)
        seen = np.isin(run.sample_ids, ids)
    np.testing.assert_allclose(got[seen], expected, rtol=1e-5, atol=1e-10)


def test_training_gradients_keep_one_row_per_id_and_need_indices(run_data):
    rec, _, _, _, _, train = run_data
    with inrun.open_run(rec.path) as run:
        twice = [{"x": rec.x[:5], "y": rec.y[:5], "index": torch.arange(5)},
                 {"x": rec.x[2:7], "y": rec.y[2:7], "index": torch.arange(2, 7)}]
        ids, grads = baselines.training_gradients(run, rec.model, loss_fn, twice)
        np.testing.assert_array_equal(ids, np.arange(7))
        np.testing.assert_allclose(grads, train[:7], rtol=1e-5, atol=1e-10)
        with pytest.raises(inrun.posthoc.EmbeddingsError, match="dataset indices"):
            baselines.training_gradients(run, rec.model, loss_fn, {"x": rec.x, "y": rec.y})
        ids, grads = baselines.training_gradients(run, rec.model, loss_fn, {"x": rec.x[:3], "y": rec.y[:3]},
                                                  index_fn=lambda batch: torch.tensor([9, 8, 7]))
        np.testing.assert_array_equal(ids, [7, 8, 9])
        np.testing.assert_allclose(grads, train[:3][::-1], rtol=1e-5, atol=1e-10)


def test_tracin_cp_with_learning_rate_step_sizes(tmp_path):
    """``step_size="lr"``: TracInCP as defined, sum_c (sum of the learning rates of the steps c stands for) / n
    * <g_test(theta_c), g_i(theta_c)>, one weight for every layer, from torch.func per-sample gradients at each
    saved checkpoint of an AdamW run (where the recorded update scales differ from the learning rate)."""
    from inrun.store.paths import find_checkpoints
    from tests.test_adam_values import loss_fn as adam_loss
    from tests.test_adam_values import record_with_checkpoints, tracin_cp_reference

    model, train, val = record_with_checkpoints(tmp_path / "run.h5", checkpoint_every=2)
    with inrun.open_run(tmp_path / "run.h5") as run:
        got = baselines.tracin_cp(run, model, adam_loss, val, train, step_size="lr")
        by_update = baselines.tracin_cp(run, model, adam_loss, val, train)
        checkpoints = find_checkpoints(run)
        lrs = np.asarray(run.steps["lr"], np.float64)
        with pytest.raises(inrun.errors.InvalidArgumentError, match="step_size='adam'"):
            baselines.tracin_cp(run, model, adam_loss, val, train, step_size="adam")
    expected = tracin_cp_reference(checkpoints, train, val, lambda start, end, name: lrs[start:end])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6 * np.abs(expected).max())
    assert not np.allclose(by_update, expected, rtol=0, atol=1e-3 * np.abs(expected).max())  # Adam: they differ
