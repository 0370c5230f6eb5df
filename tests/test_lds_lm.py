"""The LM LDS benchmark values the loss its retraining measures: one recorded SGD step against autograd and removal."""

import numpy as np
import torch

import inrun
from experiments import lds_lm
from experiments.lds import per_val_values


def _flat_grad(model, loss) -> torch.Tensor:
    params = list(model.parameters())  # the tied embedding / LM head matrix once, as the optimizer sees it
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def _loss_after(s, test, step: torch.Tensor) -> np.ndarray:
    """Per-test-window loss of the initial model moved by ``step`` (a flat parameter update)."""
    model = lds_lm.make_model(s)
    with torch.no_grad():
        offset = 0
        for p in model.parameters():
            p.add_(step[offset: offset + p.numel()].view_as(p))
            offset += p.numel()
        return lds_lm.loss_fn(model, test).double().numpy()


def test_recorded_values_are_the_benchmark_loss_change(tmp_path):
    torch.manual_seed(0)
    s = lds_lm.Settings(optimizer="sgd", lr=0.005, n_train=2, test_points=2, epochs=1, batch=2)
    train, test = lds_lm.load_text_split(s)
    # the corpus puts a padded window among each source's picks: the per-window loss must average over labelled
    # positions only, in the recorder as in the retraining
    assert (train["labels"] == -100).any() and (test["labels"] == -100).any()
    lds_lm.record(s, train, test, tmp_path / "run.h5")
    with inrun.open_run(tmp_path / "run.h5") as run:
        first, second = per_val_values(run, 1, 2), per_val_values(run, 2, 2)

    model = lds_lm.make_model(s)
    grads = [_flat_grad(model, lds_lm.loss_fn(model, lds_lm.take(train, torch.tensor([i]))).sum()) for i in range(2)]
    test_grads = [_flat_grad(model, lds_lm.loss_fn(model, lds_lm.take(test, torch.tensor([j]))).sum())
                  for j in range(2)]
    # first order: lr <g_test_j, c_i> with c_i = g_i / B, the window's share of the mean-reduced batch loss
    expected = np.array([[s.lr * float(test_grads[j] @ grads[i]) / 2 for j in range(2)] for i in range(2)])
    np.testing.assert_allclose(first, expected, rtol=1e-4, atol=1e-7)

    # against the step itself, by the real test losses: with two windows the Shapley value of the step's utility
    # U(S) = L(theta) - L(theta + sum_{i in S} u_i), u_i = -lr c_i, is the mean of the two marginal contributions
    u = [-s.lr * g / 2 for g in grads]
    zero = torch.zeros_like(u[0])
    utility = {S: -_loss_after(s, test, sum((u[i] for i in S), zero)) for S in [(), (0,), (1,), (0, 1)]}
    shapley = np.stack([(utility[(i,)] - utility[()] + utility[(0, 1)] - utility[(1 - i,)]) / 2 for i in range(2)])
    assert np.all(np.abs(shapley) > 1e-3)  # a change worth comparing
    # measured: second order within 0.16% of the largest value, first order 3.3% (lr 0.005; both shrink with lr)
    scale = np.abs(shapley).max()
    np.testing.assert_allclose(second, shapley, atol=0.005 * scale)
    assert np.abs(second - shapley).max() < np.abs(first - shapley).max() / 5
