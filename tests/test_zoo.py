"""The model zoo (tests/zoo_models.py): every model is exact against torch.func or refused with a named reason.

For each case, ``inrun.grad_dots`` and ``inrun.grad_norms`` of the fp32 model are compared with per-sample gradients
of a float64 copy of the model from ``torch.func.grad`` run on one sample at a time (tests/reference.py; a loop
rather than vmap, which fails in Hugging Face's mask code), relative error <= 1e-5. A refused case must raise the
named error, with the named fragment in its message, from both entry points; never return values. ``check_model``
must agree with the same verdicts. A short Lightning fit with ``InRunCallback(shapley="second")`` runs on GPT-2,
Llama and BERT (its first step's first-order values against the same reference), and stops with the named reason on
the functional tied head (unless exact) and on BatchNorm in train mode. ``transformers`` is a test dependency
(pyproject.toml), so nothing here is skipped.
"""

from __future__ import annotations

import copy
import math
import warnings

import lightning as L
import numpy as np
import pytest
import reference as R
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from zoo_models import BY_NAME, CASES, ZooCase, to_double

import inrun
import inrun.errors

TOL = 1e-5  # relative error allowed in fp32 against the float64 reference
NOT_REFUSED = [case.name for case in CASES if case.expect != "refused"]
REFUSED = [case.name for case in CASES if case.expect == "refused"]


def reference(model: nn.Module, loss_fn, train, val) -> tuple[Tensor, Tensor]:
    """Per-sample gradient dots ``[n_train, n_val]`` and squared norms ``[n_train]`` of a float64 copy of the model."""
    model64 = copy.deepcopy(model).double()
    g_train = R.flat(R.per_sample_grads(model64, loss_fn, to_double(train)))
    g_val = R.flat(R.per_sample_grads(model64, loss_fn, to_double(val)))
    return g_train @ g_val.T, g_train.pow(2).sum(1)


def error_class(case: ZooCase, allow_unsupported: bool = True) -> tuple[type[Exception], ...]:
    """The error(s) that refuse ``case`` rightly."""
    classes = (getattr(inrun.errors, case.error),)
    if case.or_unsupported and not allow_unsupported:
        classes += (inrun.errors.UnsupportedLayerError,)
    return classes


def parameters_of(model: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_refused(case: ZooCase, call, allow_unsupported: bool = True) -> None:
    with pytest.raises(error_class(case, allow_unsupported)) as caught:
        call()
    assert case.fragment in str(caught.value), f"{case.name}: {case.fragment!r} not in the message: {caught.value}"


# --------------------------------------------------------------------------------------------------------------------
# exact, or refused with the named reason
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NOT_REFUSED)
def test_exact_against_torch_func(name):
    case = BY_NAME[name]
    model, loss_fn, train, val = case.build()
    before = parameters_of(model)
    try:
        dots = inrun.grad_dots(model, loss_fn, train, val)
    except inrun.errors.InRunError as error:
        if case.expect == "exact":
            raise
        assert isinstance(error, error_class(case)) and case.fragment in str(error), f"{name}: refused wrongly: {error!r}"
        assert_refused(case, lambda: inrun.grad_norms(model, loss_fn, train))
        return
    norms = inrun.grad_norms(model, loss_fn, train)
    expected_dots, expected_norms = reference(model, loss_fn, train, val)
    n_train, n_val = R.batch_size(train), R.batch_size(val)
    assert dots.shape == (n_train, n_val) and norms.shape == (n_train,)
    # a real check: distinct samples with distinct, non-zero gradients
    assert expected_dots.std() > 0 and bool((expected_norms > 0).all())
    dots_error = R.relative_error(dots.double(), expected_dots)
    norms_error = R.relative_error(norms.double(), expected_norms)
    assert dots_error <= TOL, f"{name}: grad_dots relative error {dots_error:.3g} > {TOL}"
    assert norms_error <= TOL, f"{name}: grad_norms relative error {norms_error:.3g} > {TOL}"
    for key, value in parameters_of(model).items():  # the parameters are left as they were
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("name", REFUSED)
@pytest.mark.parametrize("allow_unsupported", [False, True])
@pytest.mark.filterwarnings("ignore:inrun attributes")
def test_refused_with_the_named_reason(name, allow_unsupported):
    """Refusal wins over ``allow_unsupported``: it may leave parameters out, never let wrong values in."""
    case = BY_NAME[name]
    model, loss_fn, train, val = case.build()
    assert_refused(case, lambda: inrun.grad_dots(model, loss_fn, train, val, allow_unsupported=allow_unsupported),
                   allow_unsupported)
    assert_refused(case, lambda: inrun.grad_norms(model, loss_fn, train, allow_unsupported=allow_unsupported),
                   allow_unsupported)


def test_nanogpt_batch_equal_to_sequence_length_is_a_real_ambiguity():
    """In the n == t case the position embedding's output [t, d] has the batch size as its first dimension; the case
    must really be that (so that the exact result above is not an accident of the shapes)."""
    model, loss_fn, train, _ = BY_NAME["nanogpt_n_eq_t"].build()
    n, t = train["x"].shape
    assert n == t
    seen = []
    handle = model.transformer.wpe.register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape)))
    try:
        loss_fn(model, train)
    finally:
        handle.remove()
    assert seen == [(t, model.config.n_embd)]


# --------------------------------------------------------------------------------------------------------------------
# Lightning fits
# --------------------------------------------------------------------------------------------------------------------
LR = 0.5  # large enough that two steps move the model visibly
LIGHTNING = [case.name for case in CASES if case.lightning]


class Samples(Dataset):
    """The samples of a dict batch, one dict each, with its dataset index."""

    def __init__(self, batch: dict):
        self.batch = batch

    def __len__(self):
        return R.batch_size(self.batch)

    def __getitem__(self, i):
        return {**{key: value[i] for key, value in self.batch.items()}, "index": i}


class ZooModule(L.LightningModule):
    def __init__(self, model: nn.Module, loss_fn):
        super().__init__()
        self.model = model
        self.zoo_loss = loss_fn

    def per_sample_loss(self, batch):
        return self.zoo_loss(self.model, batch)

    def training_step(self, batch, batch_idx):
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def as_dict_batch(loss_fn, batch):
    """A tuple batch ``(x, y)`` as a dict (the Lightning test's dataset adds an index to dict samples)."""
    if isinstance(batch, dict):
        return loss_fn, batch
    return (lambda model, b: loss_fn(model, (b["x"], b["y"]))), {"x": batch[0], "y": batch[1]}


def fit(model: nn.Module, loss_fn, train: dict, val: dict, path, batch: int) -> None:
    from inrun.callbacks import InRunCallback

    callback = InRunCallback(path, val_data=val, shapley="second", overwrite=True)
    trainer = L.Trainer(callbacks=[callback], accelerator="cpu", devices=1, max_epochs=1, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(ZooModule(model, loss_fn), DataLoader(Samples(train), batch_size=batch, shuffle=False))


@pytest.mark.parametrize("name", LIGHTNING)
def test_lightning_fit(name, tmp_path):
    """Exact models: the fit's first step against the reference; refused ones: the fit stops with the reason."""
    case = BY_NAME[name]
    model, tuple_loss, train, val = case.build()
    loss_fn, train = as_dict_batch(tuple_loss, train)
    _, val = as_dict_batch(tuple_loss, val)
    batch, n = 2, R.batch_size(train)
    path = tmp_path / f"{name}.h5"
    if case.expect == "refused":
        assert_refused(case, lambda: fit(model, loss_fn, train, val, path, batch), allow_unsupported=False)
        return
    first_batch = {key: value[:batch] for key, value in train.items()}
    g_first = R.flat(R.per_sample_grads(copy.deepcopy(model).double(), loss_fn, to_double(first_batch)))
    g_val = R.flat(R.per_sample_grads(copy.deepcopy(model).double(), loss_fn, to_double(val)))
    # SGD, mean loss over the batch: phi_i = lr <g_i / B, mean_j g_val_j> (shared/ALGORITHMS.md)
    expected_first = (LR / batch) * g_first @ g_val.mean(0)
    try:
        fit(model, loss_fn, train, val, path, batch)
    except inrun.errors.InRunError as error:
        if case.expect == "exact":
            raise
        assert isinstance(error, error_class(case)) and case.fragment in str(error), f"{name}: refused wrongly: {error!r}"
        return

    with inrun.open_run(path) as run:
        assert run.num_steps == math.ceil(n / batch)
        ids, values = run.sample_values(order=2)
        assert sorted(ids.tolist()) == list(range(n)) and np.isfinite(values).all()
        step_ids, first = run.step_values(0, order=1)
        _, second = run.step_values(0, order=2)
    np.testing.assert_array_equal(step_ids, np.arange(batch))
    assert np.isfinite(second).all()
    error = R.relative_error(torch.as_tensor(first, dtype=torch.float64), expected_first)
    assert error <= TOL, f"{name}: first step's first-order values, relative error {error:.3g} > {TOL}"


# --------------------------------------------------------------------------------------------------------------------
# the self-test agrees
# --------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [case.name for case in CASES])
def test_check_model_agrees(name):
    """``inrun.check_model`` calls a model exact exactly when the products above are exact, and names the reason
    (the refused case's fragment) when it is not."""
    case = BY_NAME[name]
    model, loss_fn, train, val = case.build()
    check = inrun.check_model(model, loss_fn, train, print_table=False)
    trainable = sorted(k for k, p in model.named_parameters() if p.requires_grad)
    assert sorted(row.parameter for row in check.rows) == trainable
    if case.expect == "refused" or (case.expect == "exact-or-refused" and not check.ok):
        assert not check.ok
        assert case.fragment in str(check), f"{name}: {case.fragment!r} not in check_model's table:\n{check}"
        if case.error == "SampleMixingError":
            assert check.mixing is not None and case.fragment in check.mixing
        else:
            assert any(case.fragment in row.parameter and not row.exact for row in check.rows)
        return
    assert check.ok, f"{name}: check_model says not exact:\n{check}"
    assert check.mixing is None
    assert all(row.exact and row.route in ("ghost", "materialised", "fallback") for row in check.rows)
    # check_model's per-parameter error is relative to that parameter's largest per-sample gradient; a parameter
    # whose true gradient is zero (an attention key bias: softmax ignores a shift shared by all keys) shows fp32
    # noise against a floor there (up to ~7e-6 on ViT), hence 10x the products' tolerance
    assert max(row.max_rel_error for row in check.rows) <= 10 * TOL


def test_check_model_routes_the_norm_scales_and_bare_parameters_through_the_fallback():
    model, loss_fn, train, _ = BY_NAME["llama"].build()
    llama = inrun.check_model(model, loss_fn, train, print_table=False)
    norms = [row for row in llama.rows if row.layer == "LlamaRMSNorm"]
    assert len(norms) == 5 and {row.route for row in norms} == {"fallback"}
    assert {row.route for row in llama.rows if row.layer == "Linear"} <= {"ghost", "materialised"}
    model, loss_fn, train, _ = BY_NAME["vit"].build()
    vit = {row.parameter: row for row in inrun.check_model(model, loss_fn, train, print_table=False).rows}
    for name in ("vit.embeddings.cls_token", "vit.embeddings.position_embeddings"):
        assert vit[name].route == "fallback" and vit[name].exact
