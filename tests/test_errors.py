"""Clear errors for what inrun cannot attribute exactly, each naming the module; partial coverage on request."""

from __future__ import annotations

import re
import warnings
from collections import OrderedDict

import pytest
import reference as R
import torch
from torch import nn

import inrun
from inrun import (
    BatchMismatchError,
    GradientCapture,
    InRunError,
    LossShapeError,
    NonFiniteGradientError,
    UnsupportedLayerError,
    capture_batch,
)


def output_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return (torch.sin(out) + out.pow(2)).reshape(out.shape[0], -1).sum(1)


def inputs(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_errors_are_inrun_errors():
    assert issubclass(UnsupportedLayerError, InRunError) and issubclass(UnsupportedLayerError, TypeError)
    assert issubclass(NonFiniteGradientError, InRunError) and issubclass(NonFiniteGradientError, FloatingPointError)
    assert issubclass(BatchMismatchError, InRunError) and issubclass(BatchMismatchError, ValueError)
    assert issubclass(LossShapeError, InRunError) and issubclass(LossShapeError, ValueError)


# -- unsupported layers ----------------------------------------------------------------------------------------------
def test_batch_norm_in_train_mode_is_refused_naming_the_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Sequential(nn.BatchNorm1d(6), nn.Tanh()), nn.Linear(6, 2)).double()
    model.train()
    with pytest.raises(UnsupportedLayerError, match=re.escape("'1.0' (BatchNorm1d)")) as info:
        GradientCapture(model)
    assert "eval()" in str(info.value)  # says how to fix it
    with pytest.raises(UnsupportedLayerError, match=re.escape("'1.0' (BatchNorm1d)")):
        inrun.grad_dots(model, output_loss, inputs(4, 4, 1), inputs(2, 4, 2))
    with pytest.raises(UnsupportedLayerError, match=re.escape("'1.0' (BatchNorm1d)")):
        inrun.grad_norms(model, output_loss, inputs(4, 4, 1))


def test_batch_norm_switched_to_train_mode_after_attaching_is_refused():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)).double()
    model.eval()
    with GradientCapture(model) as capture:
        model.train()
        with pytest.raises(UnsupportedLayerError, match=re.escape("'1' (BatchNorm1d)")):
            capture_batch(capture, model, output_loss, inputs(4, 4, 3))


def test_batch_norm_without_running_statistics_is_refused():
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, track_running_stats=False)).double().eval()
    with pytest.raises(UnsupportedLayerError, match=re.escape("'1' (BatchNorm1d)")):
        GradientCapture(model)


def test_frozen_batch_norm_in_train_mode_is_fine():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)).double().train()
    for p in model[1].parameters():
        p.requires_grad_(False)
    # no trainable parameter of its own: nothing to refuse (the batch statistics still couple the samples, so there is
    # no per-sample reference to compare with; only check that it is accepted)
    with GradientCapture(model) as capture:
        assert capture.coverage.fraction == 1.0


class Scale(nn.Module):
    """A custom module with its own parameter: inrun has no handler for it."""

    def __init__(self, d: int):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


def custom_model() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(
        OrderedDict(
            encoder=nn.Linear(5, 8),  # 48 parameters
            body=nn.Sequential(OrderedDict(act=nn.Tanh(), scale=Scale(8))),  # 8 parameters, unsupported
            head=nn.Linear(8, 3),  # 27 parameters
        )
    ).double()


def test_custom_module_with_a_parameter_is_refused_naming_it_without_the_fallback():
    model = custom_model()
    with pytest.raises(UnsupportedLayerError, match=re.escape("'body.scale' (Scale)")) as info:
        GradientCapture(model, fallback=False)
    assert "allow_unsupported=True" in str(info.value)


def test_custom_module_with_a_parameter_goes_through_the_fallback_exactly():
    model = custom_model()
    train, val = inputs(3, 5, 4), inputs(2, 5, 5)
    with GradientCapture(model) as capture:
        assert capture.coverage.fraction == 1.0 and capture.coverage.fallback_numel == 8
        assert "'body.scale' (Scale)" in capture.coverage.fallback[0]
    expected = R.reference_dots(model, output_loss, train, val)
    assert R.relative_error(inrun.grad_dots(model, output_loss, train, val), expected) < 1e-10


def test_subclass_of_a_supported_layer_goes_through_the_fallback():
    """Lookup of dedicated handlers is by exact type (a subclass may change forward): the fallback runs its own
    forward, so whatever it does is differentiated."""

    class ScaledLinear(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 3), ScaledLinear(3, 2)).double()
    with pytest.raises(UnsupportedLayerError, match=re.escape("'1' (ScaledLinear)")):
        GradientCapture(model, fallback=False)
    x = inputs(4, 3, 11)
    assert R.relative_error(inrun.grad_norms(model, output_loss, x), R.reference_norms(model, output_loss, x)) < 1e-10


def test_allow_unsupported_warns_and_attributes_the_rest():
    model = custom_model()
    train, val = inputs(4, 5, 6), inputs(3, 5, 7)
    with pytest.warns(UserWarning, match=re.escape("attributes 90.4% of trainable parameters")) as record:
        capture = GradientCapture(model, allow_unsupported=True, fallback=False)
    assert any("body.scale" in str(w.message) for w in record)
    # by hand: encoder 5*8 + 8 = 48, head 8*3 + 3 = 27 covered; the Scale's 8 not
    assert capture.coverage.covered_numel == 75 and capture.coverage.total_numel == 83
    assert capture.coverage.fraction == pytest.approx(75 / 83, abs=1e-12)
    assert len(capture.coverage.unsupported) == 1 and "body.scale" in capture.coverage.unsupported[0]
    assert sorted(capture.parameters) == ["encoder.bias", "encoder.weight", "head.bias", "head.weight"]

    covered = ["encoder.weight", "encoder.bias", "head.weight", "head.bias"]
    ref_train = R.per_sample_grads(model, output_loss, train)
    ref_val = R.per_sample_grads(model, output_loss, val)
    expected = R.flat({k: ref_train[k] for k in covered}) @ R.flat({k: ref_val[k] for k in covered}).T
    everything = R.flat(ref_train) @ R.flat(ref_val).T
    assert R.relative_error(expected, everything) > 1e-3, "the unsupported parameter must matter for this check"

    with capture:
        train_batch = capture_batch(capture, model, output_loss, train)
        val_batch = capture_batch(capture, model, output_loss, val)
    assert R.relative_error(train_batch.dots(val_batch), expected) < 1e-10
    assert sorted(train_batch.routes) == sorted(covered)
    # with the fallback (the default) nothing is left out
    assert R.relative_error(inrun.grad_dots(model, output_loss, train, val, allow_unsupported=True), everything) < 1e-10


class TiedToCustom(nn.Module):
    """A Linear whose weight is also used by a custom module: the shared parameter is unsupported everywhere."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.first = nn.Linear(4, 4)  # weight 16 (shared, unsupported), bias 4 (covered)
        self.custom = nn.Module()
        self.custom.matrix = self.first.weight
        self.last = nn.Linear(4, 2)  # 10 covered

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.first(x))
        return self.last(h @ self.custom.matrix)


def test_parameter_shared_with_an_unsupported_module_is_not_attributed():
    model = TiedToCustom().double()
    with pytest.raises(UnsupportedLayerError, match=re.escape("'custom' (Module)")):
        GradientCapture(model, fallback=False)
    with pytest.warns(UserWarning):
        capture = GradientCapture(model, allow_unsupported=True, fallback=False)
    assert sorted(capture.parameters) == ["first.bias", "last.bias", "last.weight"]
    assert capture.coverage.fraction == pytest.approx(14 / 30, abs=1e-12)
    train, val = inputs(3, 4, 8), inputs(2, 4, 9)
    ref_train, ref_val = R.per_sample_grads(model, output_loss, train), R.per_sample_grads(model, output_loss, val)
    covered = ["first.bias", "last.weight", "last.bias"]
    expected = R.flat({k: ref_train[k] for k in covered}) @ R.flat({k: ref_val[k] for k in covered}).T
    with capture:
        got = capture_batch(capture, model, output_loss, train).dots(capture_batch(capture, model, output_loss, val))
    assert R.relative_error(got, expected) < 1e-10


def test_parameter_used_outside_any_forward_is_an_exactness_error():
    """``h @ self.custom.matrix`` (the matrix is also the first Linear's weight): the use outside any module's forward
    is invisible to hooks; the completeness check names the parameter and the fix instead of returning wrong values."""
    model = TiedToCustom().double()
    with pytest.raises(inrun.ExactnessError, match=re.escape("'first.weight'")) as info:
        inrun.grad_dots(model, output_loss, inputs(3, 4, 8), inputs(2, 4, 9))
    assert "outside" in str(info.value) and "requires_grad_(False)" in str(info.value)


def test_embedding_scale_grad_by_freq_is_refused():
    model = nn.Sequential(OrderedDict(tokens=nn.Embedding(10, 4, scale_grad_by_freq=True), head=nn.Linear(4, 2)))
    with pytest.raises(UnsupportedLayerError, match=re.escape("'tokens' (Embedding)")) as info:
        GradientCapture(model)
    assert "scale_grad_by_freq" in str(info.value)
    ids = torch.randint(0, 10, (3, 5), generator=torch.Generator().manual_seed(10))
    with pytest.raises(UnsupportedLayerError, match="scale_grad_by_freq"):
        inrun.grad_norms(model, output_loss, ids)


# -- loss shape ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "reduce,shape",
    [(lambda losses: losses.mean(), "()"), (lambda losses: losses[:, None], "(4, 1)"), (lambda losses: losses.reshape(2, 2), "(2, 2)")],
    ids=["scalar", "n-by-1", "matrix"],
)
def test_loss_must_be_one_per_sample(reduce, shape):
    torch.manual_seed(4)
    model = nn.Linear(3, 2).double()

    def bad_loss(m, x):
        return reduce(output_loss(m, x))

    x = inputs(4, 3, 11)
    with pytest.raises(LossShapeError, match=re.escape(shape)):
        inrun.grad_dots(model, bad_loss, x, x)
    with pytest.raises(LossShapeError, match=re.escape(shape)):
        inrun.grad_norms(model, bad_loss, x)
    with GradientCapture(model) as capture:
        with pytest.raises(LossShapeError):
            capture_batch(capture, model, bad_loss, x)


def test_loss_that_is_not_a_tensor_or_needs_no_grad():
    model = nn.Linear(3, 2).double()
    x = inputs(4, 3, 12)
    with pytest.raises(LossShapeError, match="list"):
        inrun.grad_norms(model, lambda m, b: output_loss(m, b).detach().tolist(), x)
    with pytest.raises(LossShapeError, match="require grad"):
        inrun.grad_norms(model, lambda m, b: output_loss(m, b).detach(), x)


def test_non_finite_loss_is_refused():
    model = nn.Linear(3, 2).double()
    x = inputs(4, 3, 13)
    with pytest.raises(InRunError, match=r"samples \[2\]"):
        inrun.grad_norms(model, lambda m, b: output_loss(m, b) * torch.tensor([1.0, 1.0, float("inf"), 1.0]), x)


# -- non-finite gradients --------------------------------------------------------------------------------------------
class PoisonGradient(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``value`` (NaN or infinity) in backward."""

    @staticmethod
    def forward(ctx, x, value):
        ctx.value = value
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.value, None


class Poisoned(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        torch.manual_seed(5)
        self.value = value
        self.body = nn.Sequential(OrderedDict(proj=nn.Linear(3, 4)))

    def forward(self, x):
        return PoisonGradient.apply(self.body(x), self.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_output_gradient_names_the_module(value):
    model = Poisoned(value).double()
    x = inputs(3, 3, 14)
    with pytest.raises(NonFiniteGradientError, match=re.escape("'body.proj' (Linear)")):
        inrun.grad_norms(model, output_loss, x)
    with pytest.raises(NonFiniteGradientError, match=re.escape("'body.proj' (Linear)")):
        inrun.grad_dots(model, output_loss, x, x)
    assert all(not m._forward_hooks for m in model.modules()), "hooks left behind after the error"


def test_non_finite_gradient_from_a_finite_loss():
    """sqrt at 0: the loss is finite (0) but its gradient is not."""
    model = nn.Sequential(OrderedDict(enc=nn.Linear(3, 4))).double()
    with torch.no_grad():
        model.enc.weight.zero_()
        model.enc.bias.zero_()

    def norm_loss(m, x):
        return m(x).pow(2).sum(1).sqrt()

    x = inputs(3, 3, 15)
    assert torch.isfinite(norm_loss(model, x)).all()
    with pytest.raises(NonFiniteGradientError, match=re.escape("'enc' (Linear)")):
        inrun.grad_norms(model, norm_loss, x)


# -- batch mismatches ------------------------------------------------------------------------------------------------
class FlattensTheBatch(nn.Module):
    """Reshapes ``[n, T, d]`` to ``[n*T, d]`` before a Linear: the Linear no longer sees samples."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.embed = nn.Embedding(10, 4)
        self.mix = nn.Linear(4, 3)

    def forward(self, ids):
        n, t = ids.shape
        h = self.embed(ids).reshape(n * t, 4)
        return self.mix(h).reshape(n, t, 3)


def test_flattening_the_batch_is_a_batch_mismatch():
    model = FlattensTheBatch().double()
    ids = torch.randint(0, 10, (3, 5), generator=torch.Generator().manual_seed(16))
    with pytest.raises(BatchMismatchError, match=re.escape("'mix' saw 15 samples but there are 3 losses")) as info:
        inrun.grad_dots(model, output_loss, ids, ids, check=False)
    assert "input [15, 4], output [15, 3]" in str(info.value)  # the shapes, not a guess
    with pytest.raises(BatchMismatchError, match="'mix'"):
        inrun.grad_norms(model, output_loss, ids, check=False)
    assert all(not m._forward_hooks for m in model.modules()), "hooks left behind after the error"


def test_flattening_the_batch_is_exact_through_the_fallback_with_the_checks():
    """The checks' one-sample probe sees that 'mix' does not follow the batch and attributes it by the fallback at
    the nearest module that does (here the whole model): exact, and the cost shows in the coverage report."""
    model = FlattensTheBatch().double()
    ids = torch.randint(0, 10, (3, 5), generator=torch.Generator().manual_seed(16))
    val = torch.randint(0, 10, (2, 5), generator=torch.Generator().manual_seed(17))
    got = inrun.grad_dots(model, output_loss, ids, val)
    assert R.relative_error(got, R.reference_dots(model, output_loss, ids, val)) < 1e-10


def test_micro_batches_of_different_sizes_in_one_collect_are_joined_not_merged():
    """Two backward passes of 3 and 2 samples (sequence lengths 3 and 4) collected at once: 5 separate samples."""
    torch.manual_seed(7)
    model = nn.Linear(3, 2).double()
    first, second = inputs(3, 3, 17), torch.randn(2, 4, 3, dtype=torch.float64)
    with GradientCapture(model) as capture:
        output_loss(model, first).sum().backward()
        output_loss(model, second).sum().backward()
        batch = capture.collect()
    assert batch.n == 5
    expected = torch.cat([R.reference_norms(model, output_loss, first), R.reference_norms(model, output_loss, second)])
    assert R.relative_error(batch.squared_norms(), expected) < 1e-10


# -- misuse of a captured batch --------------------------------------------------------------------------------------
def test_dot_with_a_wrong_shape_and_unknown_route_are_refused():
    torch.manual_seed(8)
    model = nn.Linear(3, 2).double()
    with GradientCapture(model) as capture:
        batch = capture_batch(capture, model, output_loss, inputs(4, 3, 19))
    with pytest.raises(InRunError, match="weight"):
        batch.dot_with({"weight": torch.zeros(3, 2, dtype=torch.float64)})
    batch.force_route = "fastest"
    with pytest.raises(ValueError, match="fastest"):
        batch.dots(batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fully supported model warns about nothing
        GradientCapture(model)
