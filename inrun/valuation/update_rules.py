"""How one optimizer step turns per-sample gradient contributions into parameter changes.

For every rule here the step is affine in the samples' contributions ``c_i`` (ALGORITHMS.md, Notation):

    theta_{t+1} = theta_t + Delta_0 + sum_i u_i,     u_i = -D * c_i   (elementwise, per parameter)

``D`` (the *scale*) and ``Delta_0`` (the part of the update that belongs to no sample: momentum carried over, weight
decay) are read from the optimizer's hyper-parameters and state *before* it steps, together with the full-batch
gradient ``G = sum_i c_i`` (``param.grad``).

* plain SGD: ``D = lr``; with weight decay ``Delta_0 = -lr wd theta``; momentum and Nesterov exactly.
* Adam / AdamW (fixed-state approximation, arXiv 2602.00329): the second moment of step t is computed from the full
  batch, ``v_t = beta2 v_{t-1} + (1 - beta2) g_t^2``, and held fixed, so
  ``D = lr (1 - beta1) / (1 - beta1^t) / (sqrt(v_t / (1 - beta2^t)) + eps)``.
* RMSprop (momentum, centered, weight decay) and Adagrad (lr decay, weight decay): the same fixed-state rule, the
  squared-gradient average of step t computed from the full batch and held fixed.
* any other optimizer (or a subclass of one of these, whose ``step`` may differ) is refused with
  :class:`~inrun.errors.UnsupportedOptimizerError`: values under a wrong rule would be silently wrong. A user whose
  optimizer updates like one of these names the rule (``update_rule="sgd"``, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from inrun.errors import InvalidArgumentError, UnsupportedOptimizerError


@dataclass
class UpdateTerms:
    """One parameter's step: ``u_i = -scale * c_i`` and the sample-free change ``delta0`` (None means zero)."""

    scale: Tensor | float
    delta0: Tensor | None


#: the update rules inrun knows, and what each covers
SUPPORTED_RULES = {
    "sgd": "torch.optim.SGD: plain, momentum, dampening, Nesterov, weight decay (exact)",
    "adam": "torch.optim.Adam (L2 weight decay, amsgrad), DeepSpeed FusedAdam/CPUAdam with adam_w_mode=False "
            "(fixed-state)",
    "adamw": "torch.optim.AdamW, Adam(decoupled_weight_decay=True), FusedAdam/CPUAdam with adam_w_mode=True "
             "(fixed-state)",
    "rmsprop": "torch.optim.RMSprop: momentum, centered, weight decay (fixed-state)",
    "adagrad": "torch.optim.Adagrad: lr decay, weight decay, initial accumulator (fixed-state)",
}

_RULE_OF_CLASS = {
    torch.optim.SGD: "sgd",
    torch.optim.AdamW: "adamw",
    torch.optim.RMSprop: "rmsprop",
    torch.optim.Adagrad: "adagrad",
}

UNSUPPORTED_PREFIX = "unsupported:"


def rule_name(optimizer: torch.optim.Optimizer) -> str:
    """The update rule of ``optimizer`` (a key of :data:`SUPPORTED_RULES`), or ``"unsupported:<Class>"``.

    Looked up by exact class: a subclass may override ``step`` and is not assumed to update like its parent.
    A wrapper that keeps the real optimizer in ``_optimizer`` (Lightning's ``LightningOptimizer``) is looked through.
    """
    optimizer = _unwrapped(optimizer)
    cls = type(optimizer)
    if cls is torch.optim.Adam:
        return "adamw" if optimizer.defaults.get("decoupled_weight_decay") else "adam"
    if cls in _RULE_OF_CLASS:
        return _RULE_OF_CLASS[cls]
    if hasattr(optimizer, "adam_w_mode"):  # DeepSpeed's FusedAdam and DeepSpeedCPUAdam
        return "adamw" if optimizer.adam_w_mode else "adam"
    return f"{UNSUPPORTED_PREFIX}{cls.__name__}"


def _unwrapped(optimizer):
    inner = getattr(optimizer, "_optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def check_rule_name(update_rule: str | None, argument: str = "update_rule") -> str | None:
    """``update_rule`` itself when it is None or a supported rule; otherwise a clear error."""
    if update_rule is None or (isinstance(update_rule, str) and update_rule in SUPPORTED_RULES):
        return update_rule
    raise InvalidArgumentError(
        f"{argument}={update_rule!r} is not an update rule inrun knows; use one of "
        + ", ".join(repr(rule) for rule in SUPPORTED_RULES) + " (or None: read it from the optimizer)"
    )


def resolve_rule(optimizer: torch.optim.Optimizer, update_rule: str | None = None) -> str:
    """The rule to value ``optimizer``'s steps with: ``update_rule`` when the user named one, else the optimizer's
    own; an optimizer inrun does not know, or an option that changes the update (``maximize``), is an error."""
    for group in getattr(optimizer, "param_groups", []):
        if group.get("maximize"):
            raise UnsupportedOptimizerError(
                f"{type(optimizer).__name__}(maximize=True) ascends the loss; inrun values descent steps only: "
                "minimise the negated objective instead"
            )
    if check_rule_name(update_rule) is not None:
        return update_rule  # type: ignore[return-value]
    rule = rule_name(optimizer)
    if rule.startswith(UNSUPPORTED_PREFIX):
        cls = type(_unwrapped(optimizer))
        parent = next((base.__name__ for base in cls.__mro__[1:] if base in _RULE_OF_CLASS or base is torch.optim.Adam),
                      None)
        why = (f"it subclasses {parent}, and a subclass may change the step" if parent is not None
               else "values computed with another optimizer's rule would be wrong")
        raise UnsupportedOptimizerError(
            f"inrun has no update rule for {cls.__module__}.{cls.__name__} ({why}). Supported: "
            + "; ".join(f"'{name}' = {what}" for name, what in SUPPORTED_RULES.items())
            + ". If this optimizer updates exactly like one of them, name it: update_rule='sgd' (or 'adam', ...)"
        )
    return rule


def _step_count(state: dict) -> int:
    step = state.get("step", 0)
    return int(step.item()) if isinstance(step, Tensor) else int(step)


def _sgd_terms(param: Tensor, grad: Tensor, state: dict, group: dict) -> UpdateTerms:
    lr, wd = group["lr"], group.get("weight_decay", 0.0)
    momentum, dampening, nesterov = group.get("momentum", 0.0), group.get("dampening", 0.0), group.get("nesterov")
    decay = wd * param if wd else None
    if not momentum:
        return UpdateTerms(lr, None if decay is None else -lr * decay)
    previous = state.get("momentum_buffer")
    if previous is None:  # the first step copies the gradient into the buffer
        buffer_scale, buffer_base = 1.0, decay
    else:
        buffer_scale = 1.0 - dampening
        buffer_base = momentum * previous + (buffer_scale * decay if decay is not None else 0.0)
    if nesterov:
        scale = 1.0 + momentum * buffer_scale
        base = (decay if decay is not None else 0.0) + (momentum * buffer_base if buffer_base is not None else 0.0)
    else:
        scale, base = buffer_scale, buffer_base
    if isinstance(base, float):
        base = None
    return UpdateTerms(lr * scale, None if base is None else -lr * base)


#: How an Adam-family step is turned into per-sample updates ``u_i = -scale * c_i`` (docs/adam-values.md). Every
#: variant describes the same real step: ``delta0`` takes whatever part of it the samples' modelled updates leave out.
#:
#: * ``"fixed-state"`` (default, the rule CONTRACT.md and ALGORITHMS.md name): the exact fixed-state linearisation
#:   ``D = lr (1-b1)/(1-b1^t) / (sqrt(v_hat_t) + eps)``, elementwise (arXiv 2602.00329): one weight-sized product per
#:   layer; at the first steps ``v_hat = G^2`` makes ``D`` huge where the samples' gradients cancel, and those
#:   coordinates dominate the values.
#: * ``"block"`` (opt-in): one scale per parameter tensor, the step size along the gradient actually taken,
#:   ``s = sum(D G^2) / sum(G^2)`` with ``D`` the fixed-state scale. Ranks data best by retraining (LDS,
#:   docs/adam-values.md) and values by ghost dot products with the validation points' factors, at the cost of SGD,
#:   but it is not the fixed-state values (per-step Pearson ~.93 on the main job), so it is not the default.
#: * ``"factored"``: ``D`` from a rank-1 (Adafactor-style) model of ``v_hat``: ``v ~ rowsum (x) colsum / sum``.
#: * ``"floored"``: ``v_hat`` floored at its mean over the tensor.
#: * ``"previous"``: the second moment of the previous state, floored at the mean of the current one.
#: * ``"noise-eps"``: ``sqrt(v_hat + sigma^2)``, ``sigma^2 = sum_i |c_i|^2 / numel``, the per-coordinate variance of
#:   the batch gradient the samples' own contributions imply.
#: * ``"jacobian"``: the derivative of the real Adam step with respect to the gradient, the second moment's
#:   dependence included (elementwise).
#: * ``"block-jacobian"``: the ``"block"`` summary of the ``"jacobian"`` scale, ``sum(J G^2) / sum(G^2)``.
ADAM_VALUES = ("block", "fixed-state", "factored", "floored", "previous", "noise-eps", "jacobian", "block-jacobian")
DEFAULT_ADAM_VALUES = "fixed-state"
#: variants whose scale is one number per parameter (values by ghost dot products)
SCALAR_ADAM_VALUES = ("block", "block-jacobian")


def check_adam_values(adam_values: str) -> str:
    """``adam_values`` if it names a variant, else an ``InvalidArgumentError`` (a ValueError) naming the choices."""
    if adam_values not in ADAM_VALUES:
        raise InvalidArgumentError(
            f"adam_values must be one of {', '.join(map(repr, ADAM_VALUES))}, got {adam_values!r}; "
            f"{DEFAULT_ADAM_VALUES!r} (the exact fixed-state rule) is the default and 'block' the cheaper per-tensor scale")
    return adam_values


def block_scale(scale: Tensor, grad: Tensor) -> float:
    """``sum(D G^2) / sum(G^2)``: the step size along the gradient taken (the mean of ``D`` where ``G`` is zero)."""
    squared = grad.double().square()
    total = float(squared.sum())
    return float((scale.double() * squared).sum()) / total if total > 0 else float(scale.double().mean())


def _adam_terms(param: Tensor, grad: Tensor, state: dict, group: dict, decoupled: bool, variant: str = "fixed-state",
                sample_sq_sum: float | None = None) -> UpdateTerms:
    """The real Adam/AdamW step as ``delta0 - D * G`` (fixed-state ``D``), then re-split for ``variant``.

    In place where it can be: the scale, ``delta0`` and (Adam with L2 decay) the decayed gradient are the only
    parameter-sized tensors allocated.
    """
    lr, eps, wd = group["lr"], group["eps"], group.get("weight_decay", 0.0)
    beta1, beta2 = group["betas"]
    step = _step_count(state) + 1
    full = grad if (decoupled or not wd) else grad + wd * param
    exp_avg, exp_avg_sq = state.get("exp_avg"), state.get("exp_avg_sq")
    second = exp_avg_sq * beta2 if exp_avg_sq is not None else torch.zeros_like(param)
    second.addcmul_(full, full, value=1 - beta2)  # v_t from the full batch
    if group.get("amsgrad") and state.get("max_exp_avg_sq") is not None:
        torch.maximum(state["max_exp_avg_sq"], second, out=second)
    bias2 = 1 - beta2**step
    first_correction = 1 - beta1**step
    numerator = lr * (1 - beta1) / first_correction
    v_hat = second.div_(bias2)  # v_hat (in place)
    if variant == "block":
        return _adam_block_terms(param, grad, full, exp_avg, v_hat, group, decoupled, numerator, first_correction)
    jacobian_term = None
    if variant in ("jacobian", "block-jacobian"):  # d/dG of sqrt(v_hat) times the momentum the step divides
        if exp_avg is not None:
            momentum = (exp_avg * beta1).add_(full, alpha=1 - beta1)
        else:
            momentum = full * (1 - beta1)
        jacobian_term = momentum.mul_(full).mul_(lr * (1 - beta2) / (first_correction * bias2))
    denominator = v_hat.sqrt()
    if jacobian_term is not None:
        safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
        jacobian_term.div_(safe).mul_(denominator > 0)
    denominator.add_(eps)
    scale = denominator.reciprocal_().mul_(numerator)  # D, in the denominator's storage
    # delta0 = -lr / bc1 / (sqrt(v_hat) + eps) * (beta1 m + (1 - beta1) wd theta [L2]) - lr wd theta [decoupled]
    delta0 = None
    if exp_avg is not None and beta1:
        delta0 = torch.mul(exp_avg, scale).mul_(-beta1 / (1 - beta1))
    if wd and not decoupled:
        delta0 = -wd * param * scale if delta0 is None else delta0.addcmul_(param, scale, value=-wd)
    if wd and decoupled:
        delta0 = -lr * wd * param if delta0 is None else delta0.add_(param, alpha=-lr * wd)
    if variant == "fixed-state":
        return UpdateTerms(scale, delta0)
    if variant == "block":
        modelled: Tensor | float = block_scale(scale, grad)
    elif variant in ("jacobian", "block-jacobian"):
        # D - lr m f (1 - b2) / (bc1 bc2 sqrt(v_hat) s^2), with 1 / s^2 = D^2 / numerator^2
        modelled = scale - jacobian_term.mul_(scale).mul_(scale).div_(numerator**2)
        if variant == "block-jacobian":
            modelled = block_scale(modelled, grad)
    else:
        v_hat = (1.0 / scale * numerator - eps).clamp_(min=0).square_()  # v_hat again, from D
        if variant == "floored":
            v_model = v_hat.clamp(min=float(v_hat.mean()))
        elif variant == "previous":
            if exp_avg_sq is not None and step > 1:
                v_model = (exp_avg_sq / (1 - beta2 ** (step - 1))).clamp_(min=float(v_hat.mean()))
            else:
                v_model = torch.full_like(v_hat, float(v_hat.mean()))
        elif variant == "factored":
            if param.dim() >= 2:
                matrix = v_hat.reshape(param.shape[0], -1)
                rows, cols = matrix.sum(1), matrix.sum(0)
                total = rows.sum().clamp(min=torch.finfo(v_hat.dtype).tiny)
                v_model = (rows[:, None] * cols[None, :] / total).reshape(param.shape)
            else:
                v_model = torch.full_like(v_hat, float(v_hat.mean()))
        elif variant == "noise-eps":
            if sample_sq_sum is None:
                raise ValueError("adam_values='noise-eps' needs the samples' squared contributions per parameter")
            v_model = v_hat + sample_sq_sum / param.numel()
        else:
            raise ValueError(check_adam_values(variant))
        modelled = v_model.sqrt_().add_(eps).reciprocal_().mul_(numerator)
    # the same real step: delta0 absorbs (modelled - D) * G
    correction = grad * (modelled - scale) if isinstance(modelled, Tensor) else grad * modelled - grad * scale
    delta0 = correction if delta0 is None else delta0.add_(correction)
    return UpdateTerms(modelled, delta0)


def _adam_block_terms(param: Tensor, grad: Tensor, full: Tensor, exp_avg: Tensor | None, v_hat: Tensor, group: dict,
                      decoupled: bool, numerator: float, first_correction: float) -> UpdateTerms:
    """``"block"`` without the elementwise scale as a tensor: ``s = numerator sum(G^2 / denominator) / sum(G^2)`` and
    ``delta0 = (the real step) + s G``; three parameter-sized tensors, about ten passes over them."""
    lr, eps, wd = group["lr"], group["eps"], group.get("weight_decay", 0.0)
    beta1 = group["betas"][0]
    denominator = v_hat.sqrt_().add_(eps)  # in v_hat's storage
    flat = grad.reshape(-1)
    total = float(torch.dot(flat, flat))  # BLAS dot products: no float64 copies of the tensor
    if total > 0:
        scale = numerator * float(torch.dot(torch.div(grad, denominator).reshape(-1), flat)) / total
    else:
        scale = numerator * float(denominator.reciprocal().mean()) if grad.numel() else numerator
    # the real step: -lr / bc1 * (beta1 m + (1 - beta1) full) / denominator [- lr wd theta, decoupled]
    delta0 = torch.mul(full, 1 - beta1)
    if exp_avg is not None:
        delta0.add_(exp_avg, alpha=beta1)
    delta0.div_(denominator).mul_(-lr / first_correction)
    if wd and decoupled:
        delta0.add_(param, alpha=-lr * wd)
    delta0.add_(grad, alpha=scale)  # minus the samples' modelled part, -s G
    return UpdateTerms(scale, delta0)


#: Adam variants with a batched path over a parameter group (:func:`_adam_group_terms`)
BATCHED_ADAM_VALUES = ("block", "fixed-state")


def _adam_group_terms(members: list[tuple[str, Tensor]], grads: dict[str, Tensor], states: dict, group: dict,
                      decoupled: bool, variant: str, scale_only: bool) -> dict[str, UpdateTerms]:
    """:func:`_adam_terms` for every ``(name, param)`` of one parameter group, ``variant`` ``"block"`` or
    ``"fixed-state"`` and no amsgrad, with list-wide ``torch._foreach_*`` calls that apply the same operations in the
    same order to each tensor (identical results, far fewer Python-level calls on models with many small tensors)."""
    if not members:
        return {}
    lr, eps, wd = group["lr"], group["eps"], group.get("weight_decay", 0.0)
    beta1, beta2 = group["betas"]
    names = [name for name, _ in members]
    params = [param for _, param in members]
    grad_list = [grads[name] for name in names]
    state_list = [states.get(param, {}) for param in params]
    steps = [_step_count(state) + 1 for state in state_list]
    fulls = grad_list if (decoupled or not wd) else torch._foreach_add(grad_list, torch._foreach_mul(params, wd))
    exp_avgs = [state.get("exp_avg") for state in state_list]
    squares = [state.get("exp_avg_sq") for state in state_list]
    held = [k for k, square in enumerate(squares) if square is not None]
    # v_{t-1} beta2 in new tensors (the optimizer's state is only read); zeros before the first step
    scaled = iter(torch._foreach_mul([squares[k] for k in held], beta2) if held else [])
    seconds: list[Tensor] = [next(scaled) if square is not None else torch.zeros_like(param)
                             for square, param in zip(squares, params)]
    torch._foreach_addcmul_(seconds, fulls, fulls, value=1 - beta2)  # v_t from the full batch
    first_corrections = [1 - beta1**step for step in steps]
    numerators = [lr * (1 - beta1) / correction for correction in first_corrections]
    torch._foreach_div_(seconds, [1 - beta2**step for step in steps])  # v_hat (in place)
    torch._foreach_sqrt_(seconds)
    torch._foreach_add_(seconds, eps)  # the denominator sqrt(v_hat) + eps, in v_hat's storage
    denominators = seconds
    found: dict[str, UpdateTerms] = {}
    if variant == "block":
        quotients = torch._foreach_div(grad_list, denominators)
        scales = []
        for grad, quotient, denominator, numerator in zip(grad_list, quotients, denominators, numerators):
            flat = grad.reshape(-1)
            total = float(torch.dot(flat, flat))  # BLAS dot products: no float64 copies of the tensor
            if total > 0:
                scales.append(numerator * float(torch.dot(quotient.reshape(-1), flat)) / total)
            else:
                scales.append(numerator * float(denominator.reciprocal().mean()) if grad.numel() else numerator)
        del quotients
        if scale_only:
            return {name: UpdateTerms(scale, None) for name, scale in zip(names, scales)}
        # the real step: -lr / bc1 * (beta1 m + (1 - beta1) full) / denominator [- lr wd theta, decoupled]
        deltas = torch._foreach_mul(fulls, 1 - beta1)
        moving = [k for k, exp_avg in enumerate(exp_avgs) if exp_avg is not None]
        if moving:
            torch._foreach_add_([deltas[k] for k in moving], [exp_avgs[k] for k in moving], alpha=beta1)
        torch._foreach_div_(deltas, denominators)
        torch._foreach_mul_(deltas, [-lr / correction for correction in first_corrections])
        if wd and decoupled:
            torch._foreach_add_(deltas, params, alpha=-lr * wd)
        for name, delta0, grad, scale in zip(names, deltas, grad_list, scales):
            delta0.add_(grad, alpha=scale)  # minus the samples' modelled part, -s G
            found[name] = UpdateTerms(scale, delta0)
        return found
    # fixed-state: D = numerator / (sqrt(v_hat) + eps), elementwise
    torch._foreach_reciprocal_(denominators)
    torch._foreach_mul_(denominators, numerators)
    scales = denominators
    if scale_only:
        return {name: UpdateTerms(scale, None) for name, scale in zip(names, scales)}
    # delta0 = -lr / bc1 / (sqrt(v_hat) + eps) * (beta1 m + (1 - beta1) wd theta [L2]) - lr wd theta [decoupled]
    deltas: list[Tensor | None] = [None] * len(names)
    moving = [k for k, exp_avg in enumerate(exp_avgs) if exp_avg is not None] if beta1 else []
    if moving:
        products = torch._foreach_mul([exp_avgs[k] for k in moving], [scales[k] for k in moving])
        torch._foreach_mul_(products, -beta1 / (1 - beta1))
        for k, product in zip(moving, products):
            deltas[k] = product
    for k, (param, scale) in enumerate(zip(params, scales)):
        delta0 = deltas[k]
        if wd and not decoupled:
            delta0 = -wd * param * scale if delta0 is None else delta0.addcmul_(param, scale, value=-wd)
        if wd and decoupled:
            delta0 = -lr * wd * param if delta0 is None else delta0.add_(param, alpha=-lr * wd)
        found[names[k]] = UpdateTerms(scale, delta0)
    return found


def update_terms(
    optimizer: torch.optim.Optimizer, params: dict[str, Tensor], grads: dict[str, Tensor], rule: str | None = None,
    *, adam_values: str = "fixed-state", sample_sq_sums: dict[str, float] | None = None, scale_only: bool = False,
) -> dict[str, UpdateTerms]:
    """The step's ``UpdateTerms`` for each named parameter that the optimizer updates (call before it steps).

    Every variant reproduces the real step: ``theta_{t+1} = theta_t + delta0 - scale * G``. ``adam_values`` chooses
    how an Adam-family step is split into per-sample updates (:data:`ADAM_VALUES`; SGD-family rules have one exact
    split); ``sample_sq_sums``: ``sum_i |c_i|^2`` per parameter name, needed by ``"noise-eps"`` only.

    ``optimizer`` needs only ``param_groups`` (hyper-parameters and the model's parameters) and ``state`` (per
    parameter, full tensors): an engine that partitions its optimizer (DeepSpeed ZeRO) passes a view with gathered
    state and names the ``rule`` ("sgd", "adam" or "adamw") itself.

    ``scale_only``: a caller that needs the scale alone (embeddings-only recording) may get ``delta0=None`` where
    computing it would cost a parameter-sized pass (the ``"block"`` and ``"fixed-state"`` Adam variants); the terms
    then describe the samples' part of the step only.

    Adam's ``"block"`` and ``"fixed-state"`` variants (without amsgrad) are computed for a whole parameter group at
    once with ``torch._foreach_*`` operations, the same arithmetic as :func:`_adam_terms` per tensor (bit for bit):
    about a dozen fused calls per group instead of a dozen small ones per parameter.
    """
    rule = resolve_rule(optimizer, rule)
    check_adam_values(adam_values)
    names = {id(p): name for name, p in params.items()}
    found: dict[str, UpdateTerms] = {}
    for group in optimizer.param_groups:
        if rule in ("adam", "adamw") and adam_values in BATCHED_ADAM_VALUES and not group.get("amsgrad"):
            members = [(names[id(param)], param) for param in group["params"]
                       if id(param) in names and names[id(param)] in grads]
            with torch.no_grad():
                found.update(_adam_group_terms(members, grads, optimizer.state, group, rule == "adamw", adam_values,
                                               scale_only))
            continue
        for param in group["params"]:
            name = names.get(id(param))
            if name is None or name not in grads:
                continue
            state = optimizer.state.get(param, {})
            grad = grads[name]
            with torch.no_grad():
                if rule in ("adam", "adamw"):
                    found[name] = _adam_terms(param, grad, state, group, decoupled=rule == "adamw",
                                              variant=adam_values,
                                              sample_sq_sum=(sample_sq_sums or {}).get(name))
                elif rule == "sgd":
                    found[name] = _sgd_terms(param, grad, state, group)
                elif rule == "rmsprop":
                    found[name] = _rmsprop_terms(param, grad, state, group)
                else:
                    found[name] = _adagrad_terms(param, grad, state, group)
    return found


def _rmsprop_terms(param: Tensor, grad: Tensor, state: dict, group: dict) -> UpdateTerms:
    """RMSprop with its square average (and centred mean) of step t from the full batch, held fixed:
    ``D = lr / (sqrt(v_t [- m_t^2]) + eps)``; momentum carries ``-lr momentum buf`` and weight decay ``-D wd theta``."""
    lr, alpha, eps, wd = group["lr"], group["alpha"], group["eps"], group.get("weight_decay", 0.0)
    momentum = group.get("momentum", 0.0)
    full = grad + wd * param if wd else grad
    square = alpha * state.get("square_avg", torch.zeros_like(param)) + (1 - alpha) * full * full
    if group.get("centered"):
        mean = alpha * state.get("grad_avg", torch.zeros_like(param)) + (1 - alpha) * full
        square = square - mean * mean
    inverse = 1.0 / (square.sqrt() + eps)
    scale = lr * inverse
    delta0 = -scale * wd * param if wd else None
    if momentum:
        carried = -lr * momentum * state.get("momentum_buffer", torch.zeros_like(param))
        delta0 = carried if delta0 is None else delta0 + carried
    return UpdateTerms(scale, delta0)


def _adagrad_terms(param: Tensor, grad: Tensor, state: dict, group: dict) -> UpdateTerms:
    """Adagrad with its sum of squares of step t from the full batch, held fixed:
    ``D = lr_t / (sqrt(s_{t-1} + g_t^2) + eps)`` with ``lr_t = lr / (1 + (t - 1) lr_decay)``; weight decay ``-D wd theta``."""
    lr, eps, wd, decay = group["lr"], group["eps"], group.get("weight_decay", 0.0), group.get("lr_decay", 0.0)
    step = _step_count(state) + 1
    full = grad + wd * param if wd else grad
    previous = state.get("sum")
    if previous is None:
        previous = torch.full_like(param, float(group.get("initial_accumulator_value", 0.0)))
    scale = lr / (1 + (step - 1) * decay) / ((previous + full * full).sqrt() + eps)
    return UpdateTerms(scale, -scale * wd * param if wd else None)


def clip_coefficient(total_norm: float, max_norm: float) -> float:
    """The factor ``torch.nn.utils.clip_grad_norm_`` multiplies gradients by."""
    return min(1.0, max_norm / (total_norm + 1e-6)) if math.isfinite(total_norm) else 1.0
