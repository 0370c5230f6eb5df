"""The generic fallback: exact per-sample gradients of any module's own parameters with ``torch.func``.

A module with trainable parameters of its own and no dedicated handler (an RMSNorm class of some library, a
``LayerNorm`` written by hand, ViT's class token and position embeddings, a learned position tensor, ...) is
attributed by re-running just that module on its captured inputs: per sample, the vector-Jacobian product of
``functional_call(module, own_params, inputs_i)`` with that sample's output gradient is the sample's gradient of the
module's own parameters (the technique Opacus uses for layers without a grad sampler). The result is materialised
(:class:`~inrun.engine.factors.FlatFactor`): such parameters are small (norm scales, tokens, biases).

Two ways to run it, tried in order:

* ``vmap``: one vectorised pass over the samples, each run on its own (inputs whose sample dimension is the batch are
  split, every other input is shared). Refuses modules that draw random numbers (``randomness="error"``) or branch
  on values; then
* ``batched``: the module re-runs once on the whole batch with the random state of the original call restored (so
  dropout masks are the same), and the per-sample gradients come from a batched backward whose output gradients are
  zero outside one sample (``is_grads_batched``), a chunk of samples at a time. Costlier (a backward per sample),
  exact for any module that treats samples independently.

A *unit* handler (``unit=True``) attributes the parameters of the module's whole subtree: ``nn.MultiheadAttention``
uses ``out_proj.weight`` inside ``F.multi_head_attention_forward``, so ``out_proj.forward`` never runs and the two
must be differentiated together.

While the fallback re-runs a module the capture is disabled, so hooks on its children record nothing. Dedicated
handlers stay the fast path; the coverage report counts the parameters that go through here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from inrun.engine.layers.registry import register_layer

#: bytes of batched output gradients one chunk of the batched route may hold
BATCHED_CHUNK_BYTES = 256 << 20


def is_fallback(handler: Any) -> bool:
    return isinstance(handler, FallbackHandler)


class FallbackHandler:
    """Per-sample gradients of a module's own parameters (its subtree's with ``unit=True``) by ``torch.func``."""

    #: None: every own trainable parameter, whatever its name
    parameter_names = None
    #: the module with all its descendants' parameters is one unit (descendants are not hooked on their own)
    unit = False

    def __init__(self, unit: bool = False):
        self.unit = unit

    def check(self, module: nn.Module) -> str | None:
        return None

    def factors(self, module: nn.Module, inputs: Tensor, grad_output: Tensor):  # pragma: no cover - protocol only
        raise TypeError("the fallback handler works from a whole call (see per_sample_gradients)")

    # -- layout of one call ---------------------------------------------------------------------------------------
    def input_dims(self, module: nn.Module, args: tuple, kwargs: dict, n: int) -> tuple[list, list]:
        """Sample dimension (or None: shared by the batch) of every tensor in ``args`` and ``kwargs``."""

        def dim(value: Any) -> int | None:
            return 0 if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == n else None

        return [dim(a) for a in args], [dim(v) for v in kwargs.values()]

    def output_dim(self, module: nn.Module, position: int) -> int:
        """Sample dimension of the ``position``-th tensor of the module's (flattened) output."""
        return 0

    # -- per-sample gradients -------------------------------------------------------------------------------------
    def per_sample_gradients(
        self,
        module: nn.Module,
        params: dict[str, Tensor],
        args: tuple,
        kwargs: dict,
        grads: dict[int, Tensor],
        n: int,
        rng_state: tuple | None,
    ) -> dict[str, Tensor]:
        """``{local name: [n, *shape]}`` from one call's inputs and the gradients of its output tensors.

        ``grads``: position in the flattened output -> that output's gradient with the sample dimension of size ``n``
        (outputs shared by the batch arrive expanded along a new or size-1 leading dimension).
        """
        try:
            return self._vmapped(module, params, args, kwargs, grads, n)
        except Exception:  # random numbers, value-dependent control flow, inputs vmap cannot split: the batched route
            return self._batched(module, params, args, kwargs, grads, n, rng_state)

    def _vmapped(self, module, params, args, kwargs, grads, n) -> dict[str, Tensor]:
        arg_dims, kwarg_dims = self.input_dims(module, args, kwargs, n)
        keys = list(kwargs)
        positions = sorted(grads)
        out_dims = [self.output_dim(module, p) for p in positions]

        def one(batched_args: tuple, batched_kwargs: dict, cotangents: tuple) -> dict[str, Tensor]:
            call_args = tuple(a.unsqueeze(d) if d is not None else a for a, d in zip(batched_args, arg_dims))
            call_kwargs = {
                k: (v.unsqueeze(d) if d is not None else v) for (k, v), d in zip(batched_kwargs.items(), kwarg_dims)
            }

            def outputs(values: dict[str, Tensor]) -> tuple[Tensor, ...]:
                flat, _ = tree_flatten(torch.func.functional_call(module, values, call_args, call_kwargs))
                return tuple(flat[p] for p in positions)

            outs, pullback = torch.func.vjp(outputs, params)
            return pullback(tuple(c.reshape(o.shape).to(o.dtype) for c, o in zip(cotangents, outs)))[0]

        in_dims = (
            tuple(arg_dims),
            {k: d for k, d in zip(keys, kwarg_dims)},
            tuple(out_dims),
        )
        run = torch.func.vmap(one, in_dims=in_dims, randomness="error")
        with torch.no_grad():
            return run(tuple(args), dict(kwargs), tuple(grads[p] for p in positions))

    def _batched(self, module, params, args, kwargs, grads, n, rng_state) -> dict[str, Tensor]:
        devices = [d for d in _cuda_devices(args, kwargs)]
        with torch.random.fork_rng(devices=devices, enabled=True):
            if rng_state is not None:
                cpu_state, cuda_states = rng_state
                torch.set_rng_state(cpu_state)
                for device, state in cuda_states:
                    torch.cuda.set_rng_state(state, device)
            with torch.enable_grad():
                leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
                flat, _ = tree_flatten(torch.func.functional_call(module, leaves, args, kwargs))
        positions = sorted(grads)
        outs = [flat[p] for p in positions]
        builders = [self._cotangent_builder(o, grads[p], self.output_dim(module, p), n) for o, p in zip(outs, positions)]
        per_sample_bytes = sum(o.numel() * o.element_size() for o in outs) or 1
        chunk = max(1, min(n, BATCHED_CHUNK_BYTES // per_sample_bytes))
        names = list(leaves)
        pieces: dict[str, list[Tensor]] = {k: [] for k in names}
        for start in range(0, n, chunk):
            samples = range(start, min(n, start + chunk))
            cotangents = [torch.stack([build(i) for i in samples]) for build in builders]
            try:
                found = torch.autograd.grad(outs, [leaves[k] for k in names], cotangents, retain_graph=True,
                                            allow_unused=True, is_grads_batched=True)
            except RuntimeError:  # an op without a batching rule for its backward: one sample at a time
                rows = [torch.autograd.grad(outs, [leaves[k] for k in names], [c[j] for c in cotangents],
                                            retain_graph=True, allow_unused=True) for j in range(len(samples))]
                found = [None if rows[0][m] is None else torch.stack([r[m] for r in rows]) for m in range(len(names))]
            for k, g in zip(names, found):
                pieces[k].append(torch.zeros(len(samples), *leaves[k].shape, dtype=leaves[k].dtype,
                                             device=leaves[k].device) if g is None else g.detach())
        return {k: torch.cat(v) for k, v in pieces.items()}

    @staticmethod
    def _cotangent_builder(output: Tensor, grad: Tensor, sample_dim: int, n: int):
        """A function ``i -> output-shaped gradient of sample i alone``."""
        if tuple(output.shape) == tuple(grad.shape):  # the output has the batch along ``sample_dim``

            def batched(i: int) -> Tensor:
                cotangent = torch.zeros_like(output)
                index = [slice(None)] * output.dim()
                index[sample_dim] = slice(i, i + 1)
                cotangent[tuple(index)] = grad[tuple(index)].to(output.dtype)
                return cotangent

            return batched
        if output.numel() * n == grad.numel():  # shared by the batch, arrived expanded along the leading dimension
            return lambda i: grad[i].reshape(output.shape).to(output.dtype)
        raise ValueError(f"output of shape {tuple(output.shape)} and its gradient {tuple(grad.shape)} do not match "
                         f"a batch of {n} samples")


def _cuda_devices(args: tuple, kwargs: dict) -> list[torch.device]:
    flat, _ = tree_flatten((args, kwargs))
    return sorted({t.device for t in flat if isinstance(t, Tensor) and t.device.type == "cuda"}, key=str)


class MultiheadAttentionHandler(FallbackHandler):
    """``nn.MultiheadAttention`` as one unit: ``in_proj_*`` (or ``q/k/v_proj_weight``), ``bias_k/v`` and ``out_proj``.

    Its inputs are ``[T, n, d]`` unless ``batch_first``; masks: ``key_padding_mask [n, S]`` per sample, a 2-D
    ``attn_mask`` shared, a 3-D one (``[n * heads, T, S]``) left to the batched route.
    """

    NAMES = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")

    def __init__(self):
        super().__init__(unit=True)

    def input_dims(self, module, args, kwargs, n):
        sequence = 0 if module.batch_first else 1

        def dim(name: str, value: Any) -> int | None:
            if not isinstance(value, Tensor):
                return None
            if name in ("query", "key", "value"):
                return sequence if value.dim() == 3 else None
            if name == "key_padding_mask":
                return 0 if value.dim() == 2 else None
            if name == "attn_mask" and value.dim() == 3:
                raise ValueError("a per-sample-and-head attn_mask is left to the batched route")
            return None

        arg_dims = [dim(self.NAMES[i] if i < len(self.NAMES) else "", a) for i, a in enumerate(args)]
        return arg_dims, [dim(k, v) for k, v in kwargs.items()]

    def output_dim(self, module, position):
        return 0 if position > 0 or module.batch_first else 1


FALLBACK = FallbackHandler()
register_layer(nn.MultiheadAttention, MultiheadAttentionHandler())
