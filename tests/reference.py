"""Independent references: per-sample gradients from ``torch.func.grad``, one sample at a time.

Nothing here uses inrun's code. A model is run functionally on a single-sample slice of the batch; the references are
therefore exact for any model whose samples do not interact.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn


def slice_batch(batch: Any, i: int) -> Any:
    """The i-th sample of a tensor, tuple or dict batch, keeping a leading batch dimension of 1."""
    if isinstance(batch, Tensor):
        return batch[i : i + 1]
    if isinstance(batch, dict):
        return {key: slice_batch(value, i) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(slice_batch(value, i) for value in batch)
    return batch


def batch_size(batch: Any) -> int:
    if isinstance(batch, Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return batch_size(next(iter(batch.values())))
    return batch_size(batch[0])


def per_sample_grads(model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor], batch: Any) -> dict[str, Tensor]:
    """``{name: [n, *param.shape]}`` for every trainable parameter (tied parameters appear once)."""
    params = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    frozen = {name: p.detach() for name, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())

    class Functional(nn.Module):
        def __init__(self, values):
            super().__init__()
            self.values = values

        def forward(self, *args, **kwargs):
            return torch.func.functional_call(model, (self.values, frozen, buffers), args, kwargs, tie_weights=True)

    def single_loss(values: dict[str, Tensor], sample: Any) -> Tensor:
        return loss_fn(Functional(values), sample)[0]

    grads = [torch.func.grad(single_loss)(params, slice_batch(batch, i)) for i in range(batch_size(batch))]
    return {name: torch.stack([g[name] for g in grads]) for name in params}


def flat(grads: dict[str, Tensor]) -> Tensor:
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1)


def reference_dots(model, loss_fn, train_batch, val_batch) -> Tensor:
    return flat(per_sample_grads(model, loss_fn, train_batch)) @ flat(per_sample_grads(model, loss_fn, val_batch)).T


def reference_norms(model, loss_fn, batch) -> Tensor:
    return flat(per_sample_grads(model, loss_fn, batch)).pow(2).sum(1)


def relative_error(actual: Tensor, expected: Tensor) -> float:
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def summed_gradients(model: nn.Module, loss_fn: Callable[[nn.Module, Any], Tensor], batch: Any) -> dict[str, Tensor]:
    """Autograd's gradient of the summed per-sample losses, ``{name: param-shaped}`` (zeros for unused parameters)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(loss_fn(model, batch).sum(), list(params.values()), allow_unused=True)
    return {name: torch.zeros_like(p) if g is None else g.detach() for (name, p), g in zip(params.items(), grads)}


def reference_dot_with(grads: dict[str, Tensor], vectors: dict[str, Tensor]) -> Tensor:
    """``<g_i, v_m>`` summed over parameters, for stacked vectors ``{name: [m, *param.shape]}``: ``[n, m]``."""
    total = None
    for name, vector in vectors.items():
        part = grads[name].reshape(grads[name].shape[0], -1) @ vector.reshape(vector.shape[0], -1).T
        total = part if total is None else total + part
    assert total is not None
    return total
