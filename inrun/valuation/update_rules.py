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
* any other optimizer: the SGD rule with the group's learning rate, with a warning; the store records it as such.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class UpdateTerms:
    """One parameter's step: ``u_i = -scale * c_i`` and the sample-free change ``delta0`` (None means zero)."""

    scale: Tensor | float
    delta0: Tensor | None


def rule_name(optimizer: torch.optim.Optimizer) -> str:
    """``"sgd"``, ``"adam"``, ``"adamw"`` or ``"sgd-fallback:<Class>"`` for an optimizer inrun does not know."""
    if isinstance(optimizer, torch.optim.AdamW):
        return "adamw"
    if isinstance(optimizer, torch.optim.Adam):
        return "adamw" if optimizer.defaults.get("decoupled_weight_decay") else "adam"
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd"
    if hasattr(optimizer, "adam_w_mode"):  # DeepSpeed's FusedAdam and DeepSpeedCPUAdam
        return "adamw" if optimizer.adam_w_mode else "adam"
    return f"sgd-fallback:{type(optimizer).__name__}"


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


def _adam_terms(param: Tensor, grad: Tensor, state: dict, group: dict, decoupled: bool) -> UpdateTerms:
    lr, eps, wd = group["lr"], group["eps"], group.get("weight_decay", 0.0)
    beta1, beta2 = group["betas"]
    step = _step_count(state) + 1
    full = grad if (decoupled or not wd) else grad + wd * param
    exp_avg = state.get("exp_avg", torch.zeros_like(param))
    exp_avg_sq = state.get("exp_avg_sq", torch.zeros_like(param))
    second = beta2 * exp_avg_sq + (1 - beta2) * full * full
    if group.get("amsgrad"):
        second = torch.maximum(state.get("max_exp_avg_sq", torch.zeros_like(param)), second)
    first_correction = 1 - beta1**step
    denominator = (second / (1 - beta2**step)).sqrt() + eps
    scale = lr * (1 - beta1) / first_correction / denominator
    base_moment = beta1 * exp_avg
    if wd and not decoupled:
        base_moment = base_moment + (1 - beta1) * wd * param
    delta0 = -lr * base_moment / first_correction / denominator
    if wd and decoupled:
        delta0 = delta0 - lr * wd * param
    return UpdateTerms(scale, delta0)


def update_terms(
    optimizer: torch.optim.Optimizer, params: dict[str, Tensor], grads: dict[str, Tensor], rule: str | None = None
) -> dict[str, UpdateTerms]:
    """The step's ``UpdateTerms`` for each named parameter that the optimizer updates (call before it steps).

    ``optimizer`` needs only ``param_groups`` (hyper-parameters and the model's parameters) and ``state`` (per
    parameter, full tensors): an engine that partitions its optimizer (DeepSpeed ZeRO) passes a view with gathered
    state and names the ``rule`` ("sgd", "adam" or "adamw") itself.
    """
    rule = rule or rule_name(optimizer)
    names = {id(p): name for name, p in params.items()}
    found: dict[str, UpdateTerms] = {}
    for group in optimizer.param_groups:
        if group.get("maximize"):
            raise NotImplementedError("inrun does not support maximize=True optimizers")
        for param in group["params"]:
            name = names.get(id(param))
            if name is None or name not in grads:
                continue
            state = optimizer.state.get(param, {})
            grad = grads[name]
            with torch.no_grad():
                if rule in ("adam", "adamw"):
                    found[name] = _adam_terms(param, grad, state, group, decoupled=rule == "adamw")
                elif rule == "sgd":
                    found[name] = _sgd_terms(param, grad, state, group)
                else:
                    found[name] = UpdateTerms(group["lr"], None)
    return found


def warn_if_unknown(optimizer: torch.optim.Optimizer) -> None:
    rule = rule_name(optimizer)
    if rule.startswith("sgd-fallback"):
        warnings.warn(
            f"inrun does not know the update rule of {type(optimizer).__name__}; values use the plain SGD rule "
            "(u_i = -lr c_i) and the store records update_rule='" + rule + "'",
            stacklevel=3,
        )


def clip_coefficient(total_norm: float, max_norm: float) -> float:
    """The factor ``torch.nn.utils.clip_grad_norm_`` multiplies gradients by."""
    return min(1.0, max_norm / (total_norm + 1e-6)) if math.isfinite(total_norm) else 1.0
