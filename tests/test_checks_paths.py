"""The cheaper first-step checks catch what the earlier ones did, on each of their paths.

checked_capture takes the spot-checked samples' reference gradients from a forward and backward of each sample
ALONE when the batch's forward drew no random numbers and the sample alone has the loss it has in the batch, and from
backwards of the batch's own losses otherwise (dropout, a loss that depends on the batch); the independence probe
replays the captured forward's random state instead of running the unchanged batch again; the recorder leaves the
batch's sum check to the step in a single process. Each path is exercised here against an independent reference
(torch.func per-sample gradients, or autograd on a model known to misplace credit).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import inrun
from inrun import ExactnessError, SampleMixingError
from inrun.engine import checks
from inrun.engine.capture import GradientCapture
from inrun.valuation.recorder import InRunRecorder


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def output_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return (torch.sin(out) + out.pow(2)).reshape(out.shape[0], -1).sum(1)


class Reversed(nn.Module):
    """Samples independent, but a layer sees them in reverse order: sums add up, credit is misplaced."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.first = nn.Linear(4, 5)
        self.drop = nn.Dropout(dropout)
        self.inner = nn.Linear(5, 5)
        self.last = nn.Linear(5, 2)

    def forward(self, x):
        h = self.drop(torch.tanh(self.first(x)))
        return self.last(torch.tanh(self.inner(h.flip(0))).flip(0))


@pytest.fixture
def alone_calls(monkeypatch):
    """Whether each spot check used the samples alone (True) or the batch's own backwards (False)."""
    seen: list[bool] = []
    original = checks._alone_gradients

    def spy(*args, **kwargs):
        found = original(*args, **kwargs)
        seen.append(found is not None)
        return found

    monkeypatch.setattr(checks, "_alone_gradients", spy)
    return seen


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_misplaced_credit_is_caught_on_both_spot_paths(dropout, alone_calls):
    torch.manual_seed(3)
    model = Reversed(dropout).double().train()
    x = randn(4, 4, seed=5)
    with pytest.raises(ExactnessError, match=re.escape("'inner.")) as info:
        inrun.grad_norms(model, output_loss, x)
    assert "credit went to the wrong sample" in str(info.value)
    # without dropout the samples ran alone; with dropout (random numbers drawn) the batch's own backwards
    assert alone_calls == ([True] if dropout == 0.0 else [])


def test_a_loss_that_depends_on_the_batch_falls_back_and_stays_exact(alone_calls):
    """Each sample's loss divided by the batch size: a sample alone has another loss, so the spot check compares
    within the batch; the model is exact and passes, with the values torch.func gives."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()

    def scaled(m, x):
        return output_loss(m, x) / x.shape[0]

    x = randn(5, 4, seed=9)
    norms = inrun.grad_norms(model, scaled, x)
    assert alone_calls == [False]
    # the reference: autograd on each sample's loss as the batch defines it (torch.func would run samples alone)
    grads = [torch.autograd.grad(scaled(model, x)[i], list(model.parameters())) for i in range(5)]
    expected = torch.stack([sum(g.pow(2).sum() for g in row) for row in grads])
    assert torch.allclose(norms, expected, rtol=1e-9, atol=0)


def test_checks_without_dropout_leave_the_random_stream_and_buffers_alone():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2)).double().eval()
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    x = randn(4, 4, seed=7)
    torch.manual_seed(11)
    checked = inrun.grad_norms(model, output_loss, x)
    after_checked = torch.rand(3)
    torch.manual_seed(11)
    unchecked = inrun.grad_norms(model, output_loss, x, check=False)
    after_unchecked = torch.rand(3)
    assert torch.equal(after_checked, after_unchecked) and torch.equal(checked, unchecked)
    for k, b in model.named_buffers():
        assert torch.equal(b, buffers[k])


def test_batch_norm_in_train_mode_still_refused_after_the_samples_alone_disagree():
    """A sample alone has other batch statistics: the spot check falls back to the batch (whose graph the sample
    runs must leave intact), and the probe refuses the model."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2)).double().train()
    with pytest.raises(SampleMixingError, match="BatchNorm1d in training mode"):
        inrun.grad_norms(model, output_loss, randn(5, 4, seed=3), allow_unsupported=True)


class TiedMatmul(nn.Module):
    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(13, 8)
        self.mix = nn.Linear(8, 8)

    def forward(self, idx):
        x = self.wte(idx)
        x = x + torch.tanh(self.mix(x))
        return x @ self.wte.weight.T


def lm_loss(model, batch):
    idx = batch["idx"]
    logits = model(idx)[:, :-1]
    flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1), reduction="none")
    return flat.reshape(idx.shape[0], -1).mean(1)


def test_batch_check_without_its_sum_check_still_names_the_missing_gradient():
    """completeness=False (the recorder's batch check in one process): the spot check fails on a functional tied
    head, and the error is the sum check's (gradient used outside the module), not 'wrong sample'."""
    torch.manual_seed(0)
    model = TiedMatmul().double()
    batch = {"idx": torch.randint(0, 13, (4, 6), generator=torch.Generator().manual_seed(2))}
    with GradientCapture(model) as capture:
        with pytest.raises(ExactnessError, match=re.escape("'wte.weight'")) as info:
            checks.checked_capture(capture, model, lm_loss, batch, completeness=False)
    assert "outside the forward" in str(info.value) and "wrong sample" not in str(info.value)


def run_recorder(model, path, batches, **options):
    recorder = InRunRecorder(model, path, val_data={"idx": batches[0]["idx"][:2]}, loss_fn=lm_loss, overwrite=True,
                             **options)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder.start()
    for batch in batches:
        recorder.begin_microbatch(batch)
        lm_loss(model, batch).mean().backward()
        recorder.end_microbatch()
        recorder.before_optimizer_step(optimizer)
        optimizer.step()
        optimizer.zero_grad()
    recorder.close()
    return recorder


def batches(n_steps: int = 3, n: int = 4):
    g = torch.Generator().manual_seed(20)
    return [{"idx": torch.randint(0, 13, (n, 6), generator=g), "index": torch.arange(n) + k * n}
            for k in range(n_steps)]


class MiddleUse(nn.Module):
    """The head's weight also used functionally, for the middle samples only: the sums miss a gradient, while the
    spot-checked samples (first and last) are exact -- only a sum check sees it."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(13, 8)
        self.head = nn.Linear(8, 13, bias=False)

    def forward(self, idx):
        x = self.wte(idx)
        logits = self.head(x)
        extra = F.linear(x[1:-1], self.head.weight)
        return torch.cat([logits[:1], logits[1:-1] + extra, logits[-1:]])


def test_recorder_leaves_the_sum_check_to_the_step_and_rechecks_when_the_step_cannot(tmp_path):
    torch.manual_seed(0)
    model = MiddleUse().double()
    with GradientCapture(model) as capture:  # the batch check without its sum check passes: the spot check is blind
        checks.checked_capture(capture, model, lm_loss, batches()[0], completeness=False)
        with pytest.raises(ExactnessError, match=re.escape("'head.weight'")):
            checks.checked_capture(capture, model, lm_loss, batches()[0])
    # one process: the recorder's step check compares the sums with the optimizer's gradients and refuses
    with pytest.raises(ExactnessError, match=re.escape("'head.weight'")):
        run_recorder(model, tmp_path / "a.h5", batches())
    # when the first step is not valued (non-finite gradients), the next batch checks its own sums
    torch.manual_seed(0)
    model = MiddleUse().double()
    data = batches()
    recorder = InRunRecorder(model, tmp_path / "b.h5", val_data={"idx": data[0]["idx"][:2]}, loss_fn=lm_loss,
                             overwrite=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder.start()
    recorder.begin_microbatch(data[0])
    lm_loss(model, data[0]).mean().backward()
    recorder.end_microbatch()
    model.head.weight.grad[0, 0] = math.inf  # this step is skipped: the step check cannot run
    with pytest.warns(UserWarning):
        recorder.before_optimizer_step(optimizer)
    optimizer.zero_grad()
    assert recorder.checks.runs == {"batch": 1, "step": 0}
    with pytest.raises(ExactnessError, match=re.escape("'head.weight'")):
        recorder.begin_microbatch(data[1])  # the batch check of the next step, with its sum check
    assert recorder.checks.runs["batch"] == 2
