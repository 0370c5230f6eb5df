"""The update rules read from real optimizers, checked against the optimizers themselves.

For every supported optimizer, ``update_terms`` must describe the step the optimizer is about to take:
``theta_{t+1} = theta_t + delta0 - scale * G`` with ``G = param.grad`` (ALGORITHMS.md, Notation: ``u_i = -scale c_i``).
The reference is ``optimizer.step()`` itself, run on a copy of the same parameters and state, in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch

from inrun.errors import InvalidArgumentError, UnsupportedOptimizerError
from inrun.valuation.update_rules import UpdateTerms, resolve_rule, rule_name, update_terms

SGD, ADAM, ADAMW = torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW
RMSPROP, ADAGRAD = torch.optim.RMSprop, torch.optim.Adagrad

CONFIGS = {
    "sgd": (SGD, dict(lr=0.1)),
    "sgd-wd": (SGD, dict(lr=0.1, weight_decay=0.05)),
    "sgd-momentum": (SGD, dict(lr=0.1, momentum=0.9)),
    "sgd-momentum-dampening": (SGD, dict(lr=0.1, momentum=0.9, dampening=0.3)),
    "sgd-momentum-dampening-wd": (SGD, dict(lr=0.1, momentum=0.8, dampening=0.3, weight_decay=0.05)),
    "sgd-nesterov": (SGD, dict(lr=0.1, momentum=0.9, nesterov=True)),
    "sgd-nesterov-wd": (SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05)),
    "adam": (ADAM, dict(lr=0.01)),
    "adam-l2": (ADAM, dict(lr=0.01, weight_decay=0.1)),
    "adam-amsgrad": (ADAM, dict(lr=0.01, amsgrad=True)),
    "adam-amsgrad-l2": (ADAM, dict(lr=0.01, amsgrad=True, weight_decay=0.1, betas=(0.8, 0.95))),
    "adamw": (ADAMW, dict(lr=0.01, weight_decay=0.1)),
    "adam-decoupled": (ADAM, dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    "adamw-amsgrad": (ADAMW, dict(lr=0.01, weight_decay=0.1, amsgrad=True, eps=1e-6)),
    "rmsprop": (RMSPROP, dict(lr=0.01)),
    "rmsprop-wd": (RMSPROP, dict(lr=0.01, weight_decay=0.1, alpha=0.9)),
    "rmsprop-momentum": (RMSPROP, dict(lr=0.01, momentum=0.9)),
    "rmsprop-centered-momentum-wd": (RMSPROP, dict(lr=0.01, centered=True, momentum=0.8, weight_decay=0.05,
                                                   eps=1e-6)),
    "adagrad": (ADAGRAD, dict(lr=0.1)),
    "adagrad-decay-wd-init": (ADAGRAD, dict(lr=0.1, lr_decay=0.3, weight_decay=0.05, initial_accumulator_value=0.2)),
}
SGD_CONFIGS = [name for name in CONFIGS if name.startswith("sgd")]


def _params(seed: int) -> dict[str, torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.nn.Parameter(torch.randn(4, 3, generator=g, dtype=torch.float64)),
        "b": torch.nn.Parameter(torch.randn(5, generator=g, dtype=torch.float64)),
    }


def _make(name: str, params: dict[str, torch.nn.Parameter]) -> torch.optim.Optimizer:
    cls, kwargs = CONFIGS[name]
    # two groups with different learning rates: the rule must use each parameter's own group
    groups = [{"params": [params["w"]]}, {"params": [params["b"]], "lr": kwargs["lr"] * 0.37}]
    return cls(groups, **kwargs)


def _random_grads(params, generator) -> dict[str, torch.Tensor]:
    return {name: torch.randn(p.shape, generator=generator, dtype=torch.float64) for name, p in params.items()}


def _prepared(name: str, warmup_steps: int, seed: int = 0):
    """An optimizer with ``warmup_steps`` real steps behind it (so momentum / moments are non-trivial)."""
    params = _params(seed)
    opt = _make(name, params)
    g = torch.Generator().manual_seed(seed + 100)
    for _ in range(warmup_steps):
        for pname, grad in _random_grads(params, g).items():
            params[pname].grad = grad
        opt.step()
    return params, opt, g


def _step_copy(name, params, opt, grads) -> dict[str, torch.Tensor]:
    """What ``opt.step()`` does with ``grads``, on deep copies (the original parameters and state stay untouched)."""
    params2 = {pname: torch.nn.Parameter(p.detach().clone()) for pname, p in params.items()}
    opt2 = _make(name, params2)
    state = copy.deepcopy(opt.state_dict())
    opt2.load_state_dict(state)
    for name, grad in grads.items():
        params2[name].grad = grad.clone()
    opt2.step()
    return {name: p.detach() for name, p in params2.items()}


def _predicted(params, terms: dict[str, UpdateTerms], grads) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in params.items():
        term = terms[name]
        new = p.detach() - term.scale * grads[name]
        if term.delta0 is not None:
            new = new + term.delta0
        out[name] = new
    return out


@pytest.mark.parametrize("warmup_steps", [0, 1, 2])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_update_terms_reproduce_the_real_step(name, warmup_steps):
    params, opt, g = _prepared(name, warmup_steps)
    grads = _random_grads(params, g)
    for pname, grad in grads.items():
        params[pname].grad = grad.clone()
    before = {pname: p.detach().clone() for pname, p in params.items()}
    terms = update_terms(opt, dict(params), grads)
    # update_terms reads; it must not change the parameters or the optimizer state
    for pname, p in params.items():
        assert torch.equal(p.detach(), before[pname])
    assert set(terms) == set(params)
    expected = _step_copy(name, params, opt, grads)
    predicted = _predicted(params, terms, grads)
    for pname in params:
        torch.testing.assert_close(predicted[pname], expected[pname], rtol=1e-6, atol=1e-9,
                                   msg=lambda m: f"{name}, param {pname}, after {warmup_steps} steps: {m}")
    # and the real optimizer, stepped in place, agrees with the copy
    opt.step()
    for pname, p in params.items():
        torch.testing.assert_close(p.detach(), expected[pname], rtol=0, atol=0)


@pytest.mark.parametrize("warmup_steps", [0, 2])
@pytest.mark.parametrize("name", SGD_CONFIGS)
def test_sgd_update_is_linear_in_the_contributions(name, warmup_steps):
    """For SGD variants the per-sample terms do not depend on G: the step with G = c_1 + c_2 is
    ``delta0 - scale c_1 - scale c_2`` with the terms read once, for any split of G."""
    params, opt, g = _prepared(name, warmup_steps, seed=3)
    c1, c2 = _random_grads(params, g), _random_grads(params, g)
    full = {k: c1[k] + c2[k] for k in params}
    terms_full = update_terms(opt, dict(params), full)
    terms_c1 = update_terms(opt, dict(params), c1)
    for pname in params:  # the same scale and delta0 whatever the gradient
        a, b = terms_full[pname], terms_c1[pname]
        torch.testing.assert_close(torch.as_tensor(a.scale, dtype=torch.float64),
                                   torch.as_tensor(b.scale, dtype=torch.float64))
        assert (a.delta0 is None) == (b.delta0 is None)
        if a.delta0 is not None:
            torch.testing.assert_close(a.delta0, b.delta0)
    expected = _step_copy(name, params, opt, full)
    for pname, p in params.items():
        t = terms_full[pname]
        u1, u2 = -t.scale * c1[pname], -t.scale * c2[pname]
        delta0 = t.delta0 if t.delta0 is not None else 0.0
        torch.testing.assert_close(p.detach() + delta0 + u1 + u2, expected[pname], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["adam", "adamw", "adam-amsgrad-l2"])
def test_adam_scale_matches_the_fixed_state_formula(name):
    """D = lr (1-beta1)/(1-beta1^t) / (sqrt(v_t/(1-beta2^t)) + eps), v_t from the full gradient (ALGORITHMS.md)."""
    params, opt, g = _prepared(name, 2, seed=5)
    grads = _random_grads(params, g)
    terms = update_terms(opt, dict(params), grads)
    cls, kw = CONFIGS[name]
    beta1, beta2 = kw.get("betas", (0.9, 0.999))
    eps = kw.get("eps", 1e-8)
    for group in opt.param_groups:
        for p in group["params"]:
            pname = next(k for k, v in params.items() if v is p)
            state = opt.state[p]
            t = int(state["step"]) + 1
            full = grads[pname] + (kw.get("weight_decay", 0.0) * p.detach() if cls is ADAM else 0.0)
            v = beta2 * state["exp_avg_sq"] + (1 - beta2) * full**2
            if kw.get("amsgrad"):
                v = torch.maximum(state["max_exp_avg_sq"], v)
            expected = group["lr"] * (1 - beta1) / (1 - beta1**t) / ((v / (1 - beta2**t)).sqrt() + eps)
            torch.testing.assert_close(terms[pname].scale, expected, rtol=1e-10, atol=0)


def test_rule_names():
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert rule_name(torch.optim.SGD(p, lr=0.1)) == "sgd"
    assert rule_name(torch.optim.Adam(p)) == "adam"
    assert rule_name(torch.optim.AdamW(p)) == "adamw"
    assert rule_name(torch.optim.Adam(p, weight_decay=0.1, decoupled_weight_decay=True)) == "adamw"


def test_unknown_optimizer_is_refused_unless_a_rule_is_named():
    """An optimizer inrun does not know would be valued with a wrong rule: an error that names it and the fix."""
    params = _params(0)
    opt = torch.optim.NAdam(params.values(), lr=0.01)
    assert rule_name(opt) == "unsupported:NAdam"
    grads = {k: torch.ones_like(p) for k, p in params.items()}
    with pytest.raises(UnsupportedOptimizerError, match="NAdam") as info:
        update_terms(opt, dict(params), grads)
    assert "update_rule=" in str(info.value) and "'rmsprop'" in str(info.value)
    # named explicitly: the user takes responsibility for the rule
    terms = update_terms(opt, dict(params), grads, rule="sgd")
    for t in terms.values():
        assert t.scale == pytest.approx(0.01) and t.delta0 is None
    with pytest.raises(InvalidArgumentError, match="update_rule='lion'"):
        resolve_rule(opt, "lion")


def test_a_subclass_of_a_known_optimizer_is_not_assumed_to_update_like_it():
    class Doubled(torch.optim.SGD):
        def step(self, closure=None):
            for group in self.param_groups:
                group["lr"] *= 2
            return super().step(closure)

    opt = Doubled(_params(0).values(), lr=0.1)
    with pytest.raises(UnsupportedOptimizerError, match="subclasses SGD"):
        resolve_rule(opt)
    assert resolve_rule(opt, "sgd") == "sgd"


def test_known_optimizers_resolve_without_error():
    p = [torch.nn.Parameter(torch.zeros(2))]
    for opt, rule in ((torch.optim.SGD(p, lr=0.1), "sgd"), (torch.optim.Adam(p), "adam"),
                      (torch.optim.AdamW(p), "adamw"), (torch.optim.RMSprop(p), "rmsprop"),
                      (torch.optim.Adagrad(p), "adagrad")):
        assert resolve_rule(opt) == rule


def test_maximize_is_refused():
    params = _params(0)
    opt = torch.optim.SGD(params.values(), lr=0.1, maximize=True)
    with pytest.raises(UnsupportedOptimizerError, match="maximize"):
        update_terms(opt, dict(params), {k: torch.ones_like(p) for k, p in params.items()})
    with pytest.raises(UnsupportedOptimizerError, match="maximize"):  # even with a rule named
        resolve_rule(opt, "sgd")


def test_parameters_outside_the_optimizer_or_without_gradient_are_left_out():
    params = _params(0)
    opt = torch.optim.SGD([params["w"]], lr=0.1)
    terms = update_terms(opt, dict(params), {"w": torch.ones(4, 3, dtype=torch.float64)})
    assert set(terms) == {"w"}
    terms = update_terms(opt, dict(params), {})
    assert terms == {}


def _replay_scale(opt: torch.optim.Optimizer, p: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The fixed-state scale D of RMSprop / Adagrad, written from torch's documented algorithms and the optimizer's
    own state (independently of inrun's code)."""
    group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    state = opt.state.get(p, {})
    g = grad + group["weight_decay"] * p.detach()
    if isinstance(opt, RMSPROP):
        alpha = group["alpha"]
        v = alpha * state.get("square_avg", torch.zeros_like(p)) + (1 - alpha) * g * g
        if group["centered"]:
            mean = alpha * state.get("grad_avg", torch.zeros_like(p)) + (1 - alpha) * g
            v = v - mean * mean
        return group["lr"] / (v.sqrt() + group["eps"])
    t = int(state["step"]) + 1
    total = state["sum"] + g * g
    return group["lr"] / (1 + (t - 1) * group["lr_decay"]) / (total.sqrt() + group["eps"])


@pytest.mark.parametrize("name", ["rmsprop-centered-momentum-wd", "rmsprop", "adagrad-decay-wd-init"])
def test_recorded_values_of_rmsprop_and_adagrad_match_an_independent_replay(tmp_path, name):
    """First-order values phi_i = <D * g_V, c_i> of a recorded run against per-sample gradients from torch.func,
    the validation gradient from autograd and D from the optimizer's state, step by step."""
    import reference as R
    import torch.nn.functional as F
    from torch import nn

    import inrun
    from inrun import InRunRecorder

    def loss_fn(model, batch):
        return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")

    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(12, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (12,), generator=g)
    val = {"x": torch.randn(4, 3, generator=g, dtype=torch.float64), "y": torch.randint(0, 3, (4,), generator=g)}
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    cls, kwargs = CONFIGS[name]
    opt = cls(model.parameters(), **kwargs)
    recorder = InRunRecorder(model, tmp_path / "run.h5", val_data=val, loss_fn=loss_fn, shapley="first")
    recorder.start()
    expected = []
    for ids in (torch.arange(0, 4), torch.arange(4, 8), torch.arange(8, 12)):
        batch = {"x": x[ids], "y": y[ids], "index": ids}
        recorder.capture.enabled = False  # the references run without inrun's hooks
        per_sample = R.per_sample_grads(model, loss_fn, batch)
        val_grad = dict(zip([n for n, _ in model.named_parameters()],
                            torch.autograd.grad(loss_fn(model, val).mean(), list(model.parameters()))))
        recorder.capture.enabled = True
        recorder.begin_microbatch(batch)
        loss_fn(model, batch).mean().backward()
        recorder.end_microbatch()
        step = torch.zeros(4, dtype=torch.float64)
        for pname, p in model.named_parameters():
            direction = _replay_scale(opt, p, p.grad) * val_grad[pname]
            step += (per_sample[pname] / 4 * direction).reshape(4, -1).sum(1)
        expected.append(step)
        recorder.before_optimizer_step(opt)
        opt.step()
        opt.zero_grad()
    recorder.close()
    with inrun.open_run(tmp_path / "run.h5") as run:
        assert run.config["update_rule"] == cls.__name__.lower()
        for t, reference in enumerate(expected):
            _, values = run.step_values(t)
            torch.testing.assert_close(torch.as_tensor(values), reference, rtol=1e-9, atol=1e-12)


def test_lightning_optimizer_wrapper_is_looked_through():
    """Lightning's LightningOptimizer is a dynamic subclass of the optimizer it wraps: the wrapped one decides."""
    from lightning.pytorch.core.optimizer import LightningOptimizer

    p = [torch.nn.Parameter(torch.zeros(2))]
    assert resolve_rule(LightningOptimizer(torch.optim.AdamW(p))) == "adamw"
    with pytest.raises(UnsupportedOptimizerError, match="NAdam"):
        resolve_rule(LightningOptimizer(torch.optim.NAdam(p)))
