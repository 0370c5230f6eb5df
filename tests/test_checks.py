"""The self-checks: never silently wrong. Each pattern that used to give wrong values is now exact or refused.

Expected values come from torch.func per-sample references (tests/reference.py) or from autograd on the real model;
every refusal test also shows that, with the checks off, the values would have been wrong (so the check is needed).
"""

from __future__ import annotations

import re
import warnings

import pytest
import reference as R
import torch
import torch.nn.functional as F
from torch import nn

import inrun
from inrun import ExactnessError, InvalidArgumentError, SampleMixingError
from inrun.valuation.recorder import InRunRecorder


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def ids(n: int, t: int, seed: int, vocab: int = 13) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


class TiedLM(nn.Module):
    """A tiny LM whose head reuses the token embedding: through a module (fine) or functionally (invisible)."""

    def __init__(self, head: str = "module", vocab: int = 13, d: int = 8):
        super().__init__()
        self.style = head
        self.wte = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        if head == "module":
            self.lm_head = nn.Linear(d, vocab, bias=False)
            self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        x = self.wte(idx)
        x = x + torch.tanh(self.mix(x))
        if self.style == "matmul":
            return x @ self.wte.weight.T
        if self.style == "linear":
            return F.linear(x, self.wte.weight)
        return self.lm_head(x)


def lm_loss(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    logits = model(idx)[:, :-1]
    flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1), reduction="none")
    return flat.reshape(idx.shape[0], -1).mean(1)


def tied(style: str) -> nn.Module:
    torch.manual_seed(0)
    return TiedLM(style).double()


@pytest.mark.parametrize("style", ["matmul", "linear"])
def test_functional_tied_head_is_refused_naming_the_parameter(style):
    model = tied(style)
    train, val = ids(4, 6, 1), ids(2, 6, 2)
    expected = R.reference_dots(model, lm_loss, train, val)
    unchecked = inrun.grad_dots(model, lm_loss, train, val, check=False)
    assert R.relative_error(unchecked, expected) > 1e-2, "without the checks the values are wrong"
    for call in (lambda: inrun.grad_dots(model, lm_loss, train, val), lambda: inrun.grad_norms(model, lm_loss, train)):
        with pytest.raises(ExactnessError, match=re.escape("'wte.weight'")) as info:
            call()
        message = str(info.value)
        assert "outside the forward of module 'wte' (Embedding)" in message
        assert "self.lm_head.weight = self.wte.weight" in message  # the fix


def test_tied_head_through_a_module_is_exact():
    model = tied("module")
    train, val = ids(4, 6, 1), ids(2, 6, 2)
    assert R.relative_error(inrun.grad_dots(model, lm_loss, train, val),
                            R.reference_dots(model, lm_loss, train, val)) < 1e-10


def output_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return (torch.sin(out) + out.pow(2)).reshape(out.shape[0], -1).sum(1)


def test_batch_norm_in_train_mode_is_refused_even_with_allow_unsupported():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2)).double().train()
    x = randn(5, 4, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        unchecked = inrun.grad_norms(model, output_loss, x, allow_unsupported=True, check=False)
        with pytest.raises(SampleMixingError, match="BatchNorm1d in training mode") as info:
            inrun.grad_norms(model, output_loss, x, allow_unsupported=True)
    assert "whatever allow_unsupported says" in str(info.value) and ".eval()" in str(info.value)
    assert unchecked.shape == (5,)  # the unchecked call would have returned numbers


def test_in_batch_loss_is_refused():
    """A contrastive loss whose normaliser runs over the batch: each sample's loss depends on the others."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 3)).double()

    def in_batch_loss(m, x):
        scores = m(x) @ m(x).T
        return -torch.diagonal(scores.log_softmax(1))

    with pytest.raises(SampleMixingError, match="changing sample 0 of the batch changed sample"):
        inrun.grad_norms(model, in_batch_loss, randn(4, 4, seed=4))


def test_independence_probe_copies_a_sample_that_differs():
    """Samples 0 and 1 identical: copying 1 over 0 would change nothing; the probe takes the first that differs."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double().train()
    x = randn(4, 3, seed=15)
    x[1] = x[0]
    reason = inrun.engine.checks.probe_independence(model, output_loss, x)
    assert reason is not None and "BatchNorm1d" in reason
    same = randn(1, 3, seed=16).expand(4, 3).clone()
    assert inrun.engine.checks.probe_independence(model, output_loss, same) is None  # nothing to change


class Reversed(nn.Module):
    """Samples independent, but a layer sees them in reverse order: the sums add up, the credit is misplaced."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 5)
        self.inner = nn.Linear(5, 5)
        self.last = nn.Linear(5, 2)

    def forward(self, x):
        h = torch.tanh(self.first(x))
        return self.last(torch.tanh(self.inner(h.flip(0))).flip(0))


def test_credit_to_the_wrong_sample_is_caught_by_the_spot_check():
    torch.manual_seed(3)
    model = Reversed().double()
    x, v = randn(4, 4, seed=5), randn(2, 4, seed=6)
    assert R.relative_error(inrun.grad_dots(model, output_loss, x, v, check=False),
                            R.reference_dots(model, output_loss, x, v)) > 1e-2
    with pytest.raises(ExactnessError, match=re.escape("'inner.")) as info:
        inrun.grad_dots(model, output_loss, x, v)
    assert "credit went to the wrong sample" in str(info.value)


def test_checks_leave_param_grad_parameters_and_random_state_alone():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.3), nn.Tanh(), nn.Linear(6, 2)).double().train()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    torch.manual_seed(11)
    inrun.grad_norms(model, output_loss, randn(4, 4, seed=7))
    after_checked = torch.rand(3)
    torch.manual_seed(11)
    inrun.grad_norms(model, output_loss, randn(4, 4, seed=7), check=False)
    after_unchecked = torch.rand(3)
    # the checks draw no random numbers of their own (dropout replays use the saved state): same stream afterwards
    assert torch.equal(after_checked, after_unchecked)
    for k, p in model.named_parameters():
        assert torch.equal(p, before[k]) and torch.equal(p.grad, torch.full_like(p, 0.25))


# -- check_model ------------------------------------------------------------------------------------------------------
def test_check_model_table():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.RMSNorm(6), nn.Tanh(), nn.Linear(6, 2)).double()
    check = inrun.check_model(model, output_loss, randn(4, 4, seed=8), print_table=False)
    assert check.ok and check.mixing is None
    rows = {row.parameter: row for row in check.rows}
    assert sorted(rows) == sorted(name for name, _ in model.named_parameters())
    assert rows["1.weight"].route == "materialised" and rows["1.weight"].layer == "RMSNorm"
    assert all(row.exact and row.max_rel_error < 1e-12 and row.reason == "" for row in check.rows)
    assert "verdict: exact" in str(check)
    assert check.total_numel == 30 + 6 + 14 and check.fallback_numel == 0


def test_check_model_names_what_is_wrong():
    check = inrun.check_model(tied("matmul"), lm_loss, ids(4, 6, 1), print_table=False)
    rows = {row.parameter: row for row in check.rows}
    assert not check.ok and not rows["wte.weight"].exact and rows["wte.weight"].max_rel_error > 1e-2
    assert "outside its module's forward" in rows["wte.weight"].reason
    assert rows["mix.weight"].exact and rows["mix.weight"].route in ("ghost", "materialised")

    torch.manual_seed(6)
    bn = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)).double().train()
    check = inrun.check_model(bn, output_loss, randn(5, 4, seed=9), allow_unsupported=True, print_table=False)
    assert not check.ok and "BatchNorm1d in training mode" in check.mixing
    refused = [row for row in check.rows if row.route == "refused"]
    assert {row.parameter for row in refused} == {"1.weight", "1.bias"} and all(r.exact is None for r in refused)
    assert bn.training  # modes restored


def test_check_model_refused_rows_and_allow_unsupported():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Embedding(10, 4, scale_grad_by_freq=True), nn.Linear(4, 2)).double()
    batch = ids(3, 5, 10, vocab=10)
    strict = inrun.check_model(model, output_loss, batch, print_table=False)
    lenient = inrun.check_model(model, output_loss, batch, allow_unsupported=True, print_table=False)
    assert not strict.ok and lenient.ok
    row = next(r for r in lenient.rows if r.parameter == "0.weight")
    assert row.route == "refused" and "scale_grad_by_freq" in row.reason


# -- the recorder's first-step check ------------------------------------------------------------------------------------
def recorder_batches(n_steps: int = 2, n: int = 4):
    g = torch.Generator().manual_seed(20)
    return [{"idx": torch.randint(0, 13, (n, 6), generator=g), "index": torch.arange(n) + k * n} for k in range(n_steps)]


def dict_loss(model, batch):
    return lm_loss(model, batch["idx"])


def run_recorder(model, path, **options):
    recorder = InRunRecorder(model, path, val_data={"idx": ids(2, 6, 3)}, loss_fn=dict_loss, overwrite=True, **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder.start()
    for batch in recorder_batches():
        recorder.begin_microbatch(batch)
        dict_loss(model, batch).mean().backward()
        recorder.end_microbatch()
        recorder.before_optimizer_step(optimizer)
        optimizer.step()
        optimizer.zero_grad()
    recorder.close()
    return {k: p.detach().clone() for k, p in model.named_parameters()}


def test_recorder_refuses_at_the_first_step(tmp_path):
    with pytest.raises(ExactnessError, match=re.escape("'wte.weight'")):
        run_recorder(tied("matmul"), tmp_path / "a.h5")
    run_recorder(tied("matmul"), tmp_path / "b.h5", check=False)  # documented as unsafe: records without checks


def test_recorder_checks_change_nothing(tmp_path):
    """Same parameters after training and the same recorded values with the checks on and off."""
    with_checks = run_recorder(tied("module"), tmp_path / "c.h5", check_every=1)
    without = run_recorder(tied("module"), tmp_path / "d.h5", check=False)
    for k in with_checks:
        assert torch.equal(with_checks[k], without[k])
    a, b = inrun.open_run(tmp_path / "c.h5"), inrun.open_run(tmp_path / "d.h5")
    assert a.num_steps == b.num_steps == 2
    for t in range(2):
        assert (a.step_values(t)[1] == b.step_values(t)[1]).all()


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_check_every_must_be_a_positive_integer(tmp_path, bad):
    with pytest.raises(InvalidArgumentError, match="check_every"):
        InRunRecorder(tied("module"), tmp_path / "e.h5", val_data={"idx": ids(2, 6, 3)}, loss_fn=dict_loss,
                      check_every=bad)
