"""The update rules read from real optimizers, checked against the optimizers themselves.

For every supported optimizer, ``update_terms`` must describe the step the optimizer is about to take:
``theta_{t+1} = theta_t + delta0 - scale * G`` with ``G = param.grad`` (ALGORITHMS.md, Notation: ``u_i = -scale c_i``).
The reference is ``optimizer.step()`` itself, run on a copy of the same parameters and state, in float64.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from inrun.valuation.update_rules import UpdateTerms, rule_name, update_terms, warn_if_unknown

SGD, ADAM, ADAMW = torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW

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


def test_unknown_optimizer_falls_back_to_sgd_with_a_warning():
    params = _params(0)
    opt = torch.optim.RMSprop(params.values(), lr=0.01)
    assert rule_name(opt).startswith("sgd-fallback")
    assert "RMSprop" in rule_name(opt)
    with pytest.warns(UserWarning, match="RMSprop"):
        warn_if_unknown(opt)
    grads = {k: torch.ones_like(p) for k, p in params.items()}
    terms = update_terms(opt, dict(params), grads)
    for t in terms.values():
        assert t.scale == pytest.approx(0.01) and t.delta0 is None


def test_known_optimizers_do_not_warn():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for opt in (torch.optim.SGD(p, lr=0.1), torch.optim.Adam(p), torch.optim.AdamW(p)):
            warn_if_unknown(opt)


def test_maximize_is_refused():
    params = _params(0)
    opt = torch.optim.SGD(params.values(), lr=0.1, maximize=True)
    with pytest.raises(NotImplementedError, match="maximize"):
        update_terms(opt, dict(params), {k: torch.ones_like(p) for k, p in params.items()})


def test_parameters_outside_the_optimizer_or_without_gradient_are_left_out():
    params = _params(0)
    opt = torch.optim.SGD([params["w"]], lr=0.1)
    terms = update_terms(opt, dict(params), {"w": torch.ones(4, 3, dtype=torch.float64)})
    assert set(terms) == {"w"}
    terms = update_terms(opt, dict(params), {})
    assert terms == {}
