"""Every supported layer, every product route, against per-sample gradients from ``torch.func`` (tests/reference.py).

Each case runs one layer on its own (or behind a small Linear where the layer has no parameters of its own), with a
per-sample loss that is nonlinear in the layer's output, and checks, for the default route and for each forced route
("gram", "materialise"):

* ``dots`` between a training and a validation batch of different sizes (and, for sequences, different lengths),
* ``squared_norms``,

and, once per case: ``dot_with`` (single and stacked) against the reference per-sample gradients dotted with random
parameter-shaped tensors, ``gradient_sums`` against autograd's gradient of the summed loss, ``per_sample_gradients``,
the public ``grad_dots`` / ``grad_norms``, and the routes reported for every trainable parameter.
"""

from __future__ import annotations

import pytest
import reference as R
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import inrun
from inrun import GradientCapture, capture_batch

settings.register_profile(
    "inrun-layers",
    max_examples=20,
    deadline=None,
    derandomize=True,  # deterministic: the same examples on every run
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors],
)
FAST = settings.get_profile("inrun-layers")

DTYPES = [torch.float64, torch.float32]
TOL = {torch.float64: 1e-5, torch.float32: 1e-4}
ROUTES = (None, "gram", "materialise")




# -- harness ---------------------------------------------------------------------------------------------------------
def nonlinear_loss(out: torch.Tensor) -> torch.Tensor:
    """A per-sample loss whose output gradient differs from position to position: ``[n]``."""
    flat = out.reshape(out.shape[0], -1)
    return torch.sin(flat).sum(1) + 0.25 * flat.pow(2).sum(1)


def layer_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    return nonlinear_loss(model(batch))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = R.relative_error(actual.to(expected.dtype), expected)
    assert error < TOL[dtype], f"{what}: relative error {error:.3g} >= {TOL[dtype]}"


def check_layer(
    model: nn.Module,
    train: torch.Tensor,
    val: torch.Tensor,
    dtype: torch.dtype,
    outer: tuple[str, ...] = (),
    loss_fn=layer_loss,
    public: bool = True,
) -> None:
    """All products of ``model`` on ``train`` x ``val`` against the reference, on every route.

    ``outer`` names the parameters held as outer-product factors (weight matrices): a forced route must apply to them;
    every other trainable parameter is a flat factor and must report the route "flat".
    """
    seed = 1000 + train.shape[0] * 10 + val.shape[0]
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    ref_train = R.per_sample_grads(model, loss_fn, train)
    ref_val = R.per_sample_grads(model, loss_fn, val)
    expected_dots = R.flat(ref_train) @ R.flat(ref_val).T
    expected_norms = R.flat(ref_train).pow(2).sum(1)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}

    with GradientCapture(model) as capture:
        train_batch = capture_batch(capture, model, loss_fn, train)
        val_batch = capture_batch(capture, model, loss_fn, val)

    assert train_batch.n == train.shape[0] and val_batch.n == val.shape[0]
    for route in ROUTES:
        train_batch.force_route = route
        train_batch.routes.clear()
        dots = train_batch.dots(val_batch)
        assert dots.dtype == dtype
        assert_close(dots, expected_dots, dtype, f"dots (route {route})")
        assert sorted(train_batch.routes) == sorted(trainable), "a route for every trainable parameter"
        _check_routes(train_batch.routes, route, outer)
        train_batch.routes.clear()
        assert_close(train_batch.squared_norms(), expected_norms, dtype, f"squared norms (route {route})")
        assert sorted(train_batch.routes) == sorted(trainable)
        _check_routes(train_batch.routes, route, outer)

    generator = torch.Generator().manual_seed(seed)
    stacked = {name: torch.randn((3, *g.shape[1:]), generator=generator, dtype=dtype) for name, g in ref_train.items()}
    expected = R.reference_dot_with(ref_train, stacked)
    assert_close(train_batch.dot_with(stacked, stacked=True), expected, dtype, "dot_with (stacked)")
    single = {name: v[1] for name, v in stacked.items()}
    assert_close(train_batch.dot_with(single), expected[:, 1], dtype, "dot_with")

    sums = train_batch.gradient_sums()
    autograd_sums = R.summed_gradients(model, loss_fn, train)
    assert sorted(sums) == sorted(autograd_sums)
    assert_close(R.flat({k: v[None] for k, v in sums.items()}), R.flat({k: autograd_sums[k][None] for k in sums}), dtype, "gradient sums")
    for name in sums:
        assert sums[name].shape == autograd_sums[name].shape

    per_sample = train_batch.per_sample_gradients()
    assert_close(R.flat({k: per_sample[k] for k in ref_train}), R.flat(ref_train), dtype, "per-sample gradients")

    if public:  # the public entry points, default route
        assert_close(inrun.grad_dots(model, loss_fn, train, val), expected_dots, dtype, "grad_dots")
        assert_close(inrun.grad_norms(model, loss_fn, train), expected_norms, dtype, "grad_norms")
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), f"parameter {name} changed"
        assert p.grad is None, f"param.grad of {name} was written"


def _check_routes(routes: dict[str, str], forced: str | None, outer: tuple[str, ...]) -> None:
    for name, route in routes.items():
        if name not in outer:
            assert route == "flat", f"{name}: {route}"
        elif forced is not None:
            assert route == forced, f"{name}: forced {forced}, took {route}"
        else:
            assert route in ("gram", "materialise"), f"{name}: {route}"


def _randn(generator: torch.Generator, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=dtype)


def _init(module: nn.Module, seed: int, dtype: torch.dtype) -> nn.Module:
    """Deterministic, non-trivial parameters (norm weights away from 1, biases away from 0)."""
    generator = torch.Generator().manual_seed(seed)
    module = module.to(dtype)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=dtype) * 0.7)
    return module


# -- nn.Linear -------------------------------------------------------------------------------------------------------
@st.composite
def linear_cases(draw):
    return dict(
        d_in=draw(st.integers(1, 6)),
        d_out=draw(st.integers(1, 6)),
        bias=draw(st.booleans()),
        n_train=draw(st.integers(1, 4)),
        n_val=draw(st.integers(1, 4)),
        layout=draw(st.sampled_from(["flat", "sequence", "grid"])),
        t_train=draw(st.integers(1, 5)),
        t_val=draw(st.integers(1, 5)),
        seed=draw(st.integers(0, 2**16)),
    )


def _positions(layout: str, t: int) -> tuple[int, ...]:
    return {"flat": (), "sequence": (t,), "grid": (t, 2)}[layout]


@pytest.mark.parametrize("dtype", DTYPES)
@FAST
@given(case=linear_cases())
def test_linear(dtype, case):
    g = torch.Generator().manual_seed(case["seed"])
    model = _init(nn.Linear(case["d_in"], case["d_out"], bias=case["bias"]), case["seed"], dtype)
    train = _randn(g, case["n_train"], *_positions(case["layout"], case["t_train"]), case["d_in"], dtype=dtype)
    val = _randn(g, case["n_val"], *_positions(case["layout"], case["t_val"]), case["d_in"], dtype=dtype)
    check_layer(model, train, val, dtype, outer=("weight",), public=False)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_inside_a_network_and_wide(dtype):
    """Input that requires grad (a Linear after another), sizes where the default route differs per layer."""
    g = torch.Generator().manual_seed(7)
    model = _init(nn.Sequential(nn.Linear(3, 40), nn.Tanh(), nn.Linear(40, 30), nn.Tanh(), nn.Linear(30, 2)), 7, dtype)
    train, val = _randn(g, 5, 2, 3, dtype=dtype), _randn(g, 3, 9, 3, dtype=dtype)
    check_layer(model, train, val, dtype, outer=("0.weight", "2.weight", "4.weight"))


# -- nn.Embedding ----------------------------------------------------------------------------------------------------
@st.composite
def embedding_cases(draw):
    vocab = draw(st.integers(1, 8))
    return dict(
        vocab=vocab,
        dim=draw(st.integers(1, 5)),
        padding_idx=draw(st.one_of(st.none(), st.integers(0, vocab - 1))),
        n_train=draw(st.integers(1, 4)),
        n_val=draw(st.integers(1, 4)),
        sequence=draw(st.booleans()),
        t_train=draw(st.integers(1, 6)),
        t_val=draw(st.integers(1, 6)),
        seed=draw(st.integers(0, 2**16)),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@FAST
@given(case=embedding_cases())
def test_embedding(dtype, case):
    g = torch.Generator().manual_seed(case["seed"])
    model = _init(nn.Embedding(case["vocab"], case["dim"], padding_idx=case["padding_idx"]), case["seed"], dtype)

    def ids(n, t):
        shape = (n, t) if case["sequence"] else (n,)
        return torch.randint(0, case["vocab"], shape, generator=g)

    check_layer(model, ids(case["n_train"], case["t_train"]), ids(case["n_val"], case["t_val"]), dtype, outer=("weight",), public=False)


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_padding_rows_get_nothing(dtype):
    """Ids that are all padding: the per-sample gradient is exactly zero (PyTorch never updates padding_idx)."""
    model = _init(nn.Embedding(6, 3, padding_idx=2), 3, dtype)
    train = torch.tensor([[2, 2, 2], [1, 2, 5], [2, 0, 0]])
    val = torch.tensor([[2, 2], [0, 5]])
    check_layer(model, train, val, dtype, outer=("weight",))
    norms = inrun.grad_norms(model, layer_loss, train)
    assert norms[0] == 0
    with GradientCapture(model) as capture:
        grads = capture_batch(capture, model, layer_loss, train).per_sample_gradients()["weight"]
    assert torch.all(grads[:, 2] == 0)


# -- Conv2d ----------------------------------------------------------------------------------------------------------
@st.composite
def conv2d_cases(draw):
    groups = draw(st.sampled_from([1, 1, 2]))
    padding = draw(st.sampled_from([0, 1, (1, 2), "same", "valid"]))
    stride = 1 if padding == "same" else draw(st.sampled_from([1, 2, (2, 1)]))
    return dict(
        groups=groups,
        c_in=groups * draw(st.integers(1, 2)),
        c_out=groups * draw(st.integers(1, 2)),
        kernel=draw(st.sampled_from([1, 2, 3, (1, 3)])),
        stride=stride,
        dilation=draw(st.sampled_from([1, 2])),
        padding=padding,
        padding_mode=draw(st.sampled_from(["zeros", "zeros", "reflect", "circular", "replicate"])),
        bias=draw(st.booleans()),
        n_train=draw(st.integers(1, 3)),
        n_val=draw(st.integers(1, 3)),
        hw_train=(draw(st.integers(3, 6)), draw(st.integers(3, 6))),
        hw_val=(draw(st.integers(3, 6)), draw(st.integers(3, 6))),
        seed=draw(st.integers(0, 2**16)),
    )


def _conv_fits(conv: nn.Conv2d | nn.Conv1d, spatial: tuple[int, ...]) -> bool:
    """Whether a convolution accepts inputs of this size (at least one output position, padding modes' limits)."""
    if isinstance(conv.padding, str):
        pads = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation)] if conv.padding == "same" else [0] * len(spatial)
        halves = [(p + 1) // 2 for p in pads]
    else:
        pads = [2 * p for p in conv.padding]
        halves = list(conv.padding)
    for size, pad, half, k, d in zip(spatial, pads, halves, conv.kernel_size, conv.dilation):
        if size + pad < d * (k - 1) + 1:
            return False
        if conv.padding_mode == "reflect" and half >= size:
            return False
        if conv.padding_mode == "circular" and half > size:
            return False
    return True


@pytest.mark.parametrize("dtype", DTYPES)
@FAST
@given(case=conv2d_cases())
@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
def test_conv2d(dtype, case):
    conv = nn.Conv2d(
        case["c_in"], case["c_out"], case["kernel"], stride=case["stride"], padding=case["padding"],
        dilation=case["dilation"], groups=case["groups"], bias=case["bias"], padding_mode=case["padding_mode"],
    )
    assume(_conv_fits(conv, case["hw_train"]) and _conv_fits(conv, case["hw_val"]))
    g = torch.Generator().manual_seed(case["seed"])
    model = _init(conv, case["seed"], dtype)
    train = _randn(g, case["n_train"], case["c_in"], *case["hw_train"], dtype=dtype)
    val = _randn(g, case["n_val"], case["c_in"], *case["hw_val"], dtype=dtype)
    # grouped convolutions are materialised block by block: a flat factor
    check_layer(model, train, val, dtype, outer=("weight",) if case["groups"] == 1 else (), public=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3),
        dict(kernel_size=3, stride=2, padding=1, bias=False),
        dict(kernel_size=2, dilation=2, padding="same", padding_mode="reflect"),
        dict(kernel_size=3, padding=2, padding_mode="circular"),
        dict(kernel_size=3, padding=1, padding_mode="replicate"),
        dict(kernel_size=4, padding="same"),
        dict(kernel_size=2, padding="valid", groups=2),
        dict(kernel_size=3, padding=1, groups=4, stride=2),
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
def test_conv1d(dtype, kwargs):
    conv = nn.Conv1d(4, 4, **kwargs)
    model = _init(conv, 11, dtype)
    g = torch.Generator().manual_seed(12)
    train, val = _randn(g, 3, 4, 7, dtype=dtype), _randn(g, 2, 4, 5, dtype=dtype)
    check_layer(model, train, val, dtype, outer=("weight",) if conv.groups == 1 else ())


# -- normalisation layers --------------------------------------------------------------------------------------------
@st.composite
def layer_norm_cases(draw):
    return dict(
        shape=draw(st.sampled_from([(2,), (3,), (5,), (2, 3)])),
        bias=draw(st.booleans()),
        eps=draw(st.sampled_from([1e-5, 0.1])),
        sequence=draw(st.booleans()),
        n_train=draw(st.integers(1, 4)),
        n_val=draw(st.integers(1, 4)),
        t_train=draw(st.integers(1, 5)),
        t_val=draw(st.integers(1, 5)),
        seed=draw(st.integers(0, 2**16)),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@FAST
@given(case=layer_norm_cases())
def test_layer_norm(dtype, case):
    g = torch.Generator().manual_seed(case["seed"])
    model = _init(nn.LayerNorm(case["shape"], eps=case["eps"], bias=case["bias"]), case["seed"], dtype)

    def inputs(n, t):
        return _randn(g, n, *((t,) if case["sequence"] else ()), *case["shape"], dtype=dtype)

    check_layer(model, inputs(case["n_train"], case["t_train"]), inputs(case["n_val"], case["t_val"]), dtype, public=False)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_without_affine_behind_linear(dtype):
    """A LayerNorm with no parameters is not hooked; the Linear before it is still exact."""
    model = _init(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4, elementwise_affine=False)), 5, dtype)
    g = torch.Generator().manual_seed(5)
    check_layer(model, _randn(g, 3, 2, 3, dtype=dtype), _randn(g, 2, 4, 3, dtype=dtype), dtype, outer=("0.weight",))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,eps,sequence", [((4,), None, True), ((4,), 0.5, False), ((2, 3), 1e-6, True)])
def test_rms_norm(dtype, shape, eps, sequence):
    model = _init(nn.RMSNorm(shape, eps=eps), 21, dtype)
    g = torch.Generator().manual_seed(22)
    train = _randn(g, 3, *((5,) if sequence else ()), *shape, dtype=dtype)
    val = _randn(g, 2, *((2,) if sequence else ()), *shape, dtype=dtype)
    check_layer(model, train, val, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "groups,channels,spatial,affine",
    [(2, 4, (3, 3), True), (1, 3, (5,), True), (3, 3, (2, 2, 2), True), (2, 4, (4,), False)],
)
def test_group_norm(dtype, groups, channels, spatial, affine):
    layers = [nn.Conv1d(channels, channels, 1)] if not affine else []
    layers.append(nn.GroupNorm(groups, channels, affine=affine))
    model = _init(nn.Sequential(*layers), 31, dtype)
    g = torch.Generator().manual_seed(32)
    train = _randn(g, 3, channels, *spatial, dtype=dtype)
    val = _randn(g, 2, channels, *[s + 1 for s in spatial], dtype=dtype)
    check_layer(model, train, val, dtype, outer=("0.weight",) if not affine else ())


def _eval_batch_norm(module: nn.Module, seed: int, dtype: torch.dtype) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    module = _init(module, seed, dtype)
    with torch.no_grad():
        module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator, dtype=dtype))
        module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator, dtype=dtype) + 0.5)
    return module.eval()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "cls,train_shape,val_shape",
    [
        (nn.BatchNorm1d, (4, 3), (2, 3)),
        (nn.BatchNorm1d, (3, 3, 5), (2, 3, 2)),
        (nn.BatchNorm2d, (3, 3, 2, 4), (2, 3, 3, 3)),
        (nn.BatchNorm3d, (2, 3, 2, 2, 3), (3, 3, 1, 2, 2)),
    ],
)
def test_batch_norm_eval(dtype, cls, train_shape, val_shape):
    model = _eval_batch_norm(cls(3), 41, dtype)
    running = (model.running_mean.clone(), model.running_var.clone())
    g = torch.Generator().manual_seed(42)
    check_layer(model, _randn(g, *train_shape, dtype=dtype), _randn(g, *val_shape, dtype=dtype), dtype)
    assert torch.equal(model.running_mean, running[0]) and torch.equal(model.running_var, running[1])


# -- transformers' GPT-2 Conv1D --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_hf_conv1d(dtype):
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    layer = pytorch_utils.Conv1D(5, 3)  # nf (out) = 5, nx (in) = 3; weight [3, 5]
    model = _init(layer, 51, dtype)
    g = torch.Generator().manual_seed(52)
    check_layer(model, _randn(g, 3, 4, 3, dtype=dtype), _randn(g, 2, 6, 3, dtype=dtype), dtype, outer=("weight",))
    check_layer(model, _randn(g, 4, 3, dtype=dtype), _randn(g, 1, 3, dtype=dtype), dtype, outer=("weight",))


# -- route choice ----------------------------------------------------------------------------------------------------
def test_default_route_follows_cost_and_memory_budget():
    """Short sequences through a wide layer take the Gram route; long ones through a narrow layer materialise; a
    memory budget of zero forces the Gram route. Results are the same."""
    torch.manual_seed(0)
    wide = nn.Linear(64, 64).double()
    narrow = nn.Linear(2, 2).double()
    short = torch.randn(4, 1, 64, dtype=torch.float64)
    long = torch.randn(4, 30, 2, dtype=torch.float64)
    for model, x, expected in ((wide, short, "gram"), (narrow, long, "materialise")):
        with GradientCapture(model) as capture:
            batch = capture_batch(capture, model, layer_loss, x)
        reference = R.reference_dots(model, layer_loss, x, x)
        assert R.relative_error(batch.dots(batch), reference) < 1e-10
        assert batch.routes["weight"] == expected
        batch.memory_budget = 0
        assert R.relative_error(batch.dots(batch), reference) < 1e-10
        assert batch.routes["weight"] == "gram"
        assert batch.routes["bias"] == "flat"
