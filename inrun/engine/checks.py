"""Self-checks that need no knowledge of the model: inrun's values are exact, or inrun refuses.

Three checks, each catching what the others cannot:

* *gradient completeness* (:func:`check_completeness`): per parameter, the sum over samples of the captured
  per-sample contributions must equal autograd's batch gradient. A parameter also used outside its module's forward
  (``F.linear(x, self.wte.weight)``, ``x @ wte.weight.T``) receives gradient inrun never sees: the sums differ.
* *sample independence* (:func:`probe_independence`): replace sample 0 of the batch by a copy of the first sample
  that differs from it (in every tensor whose leading dimension is the batch size) and run the model again with the same random state; no other
  sample's loss may move. BatchNorm in training mode, in-batch losses and anything else that mixes samples fails it,
  and is refused whatever ``allow_unsupported`` says (:class:`~inrun.errors.SampleMixingError`).
* *per-sample spot check* (:func:`check_samples`): autograd's gradient of one or two single samples' losses against
  the engine's values for those samples: the squared norm and the inner product with the batch gradient. Each sample
  runs alone when the batch's forward drew no random numbers and the sample alone has its loss in the batch (a
  forward and backward of one sample); otherwise its loss is differentiated in the batch's own forward (same dropout
  masks). The sum check cannot see a contribution credited to the wrong sample (a
  lookup broadcast over the batch read as per-sample); this can.

:func:`checked_capture` runs all three around one captured batch (what ``grad_dots``/``grad_norms`` and the recorder's
first step use); :func:`check_model` is the public self-test with a per-parameter table against ``torch.func``.
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Mapping

import torch
from torch import Tensor, nn

from inrun.engine.algebra import parameter_fixed_dots, parameter_squared_norms
from inrun.engine.capture import GradientCapture
from inrun.engine.captured import CapturedBatch, LossFn
from inrun.engine.factors import Factor, FlatFactor, IndexSide, dense_reference
from inrun.errors import ExactnessError, InRunError, SampleMixingError

#: relative tolerance of the completeness and spot checks by the lowest precision involved
CHECK_TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-3}
LOW_PRECISION_TOLERANCE = 5e-2
#: relative tolerance of check_model's comparison with torch.func
MODEL_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}
#: relative change of another sample's loss that counts as mixing
MIXING_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}


#: float32 products on a GPU with TF32 enabled (cuDNN convolutions use it by default) carry ~1e-3 relative errors
TF32_TOLERANCE = 1e-2


def tolerance(dtype: torch.dtype, table: Mapping[torch.dtype, float] = CHECK_TOLERANCE, *,
              device: torch.device | None = None) -> float:
    found = table.get(dtype, LOW_PRECISION_TOLERANCE)
    if dtype == torch.float32 and device is not None and device.type == "cuda" and _tf32_enabled():
        found = max(found, TF32_TOLERANCE)
    return found


def _tf32_enabled() -> bool:
    return bool(torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32
                or torch.get_float32_matmul_precision() != "highest")


# -- batches ---------------------------------------------------------------------------------------------------------
def _map_batch(batch: Any, n: int, fn) -> Any:
    """Apply ``fn`` to every tensor of a (nested) batch whose leading dimension is ``n``."""
    if isinstance(batch, Tensor):
        return fn(batch) if batch.dim() > 0 and batch.shape[0] == n else batch
    if isinstance(batch, Mapping):
        return type(batch)({k: _map_batch(v, n, fn) for k, v in batch.items()}) if isinstance(batch, dict) else \
            {k: _map_batch(v, n, fn) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple
        return type(batch)(*(_map_batch(v, n, fn) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_map_batch(v, n, fn) for v in batch)
    return batch


def slice_batch(batch: Any, n: int, i: int) -> Any:
    """Sample ``i`` of a batch of ``n``, keeping a leading dimension of 1."""
    return _map_batch(batch, n, lambda t: t[i : i + 1])


def _replace_sample(batch: Any, n: int, target: int, source: int) -> Any:
    def replace(t: Tensor) -> Tensor:
        t = t.clone()
        t[target] = t[source]
        return t

    return _map_batch(batch, n, replace)


class _SameRandomness:
    """Runs several forwards from the same random state and leaves the global state (and buffers) as found."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.devices = sorted({b.device for b in list(model.parameters()) + list(model.buffers())
                               if b.device.type == "cuda"}, key=str)

    def __enter__(self):
        self._fork = torch.random.fork_rng(devices=self.devices)
        self._fork.__enter__()
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in self.devices]
        self.buffers = {name: b.detach().clone() for name, b in self.model.named_buffers()}
        return self

    def rewind(self) -> None:
        torch.set_rng_state(self.cpu)
        for device, state in zip(self.devices, self.cuda):
            torch.cuda.set_rng_state(state, device)

    def restore_buffers(self) -> None:
        with torch.no_grad():
            for name, b in self.model.named_buffers():
                saved = self.buffers.get(name)
                if saved is not None and saved.shape == b.shape:
                    b.copy_(saved)

    def __exit__(self, *exc):
        self.restore_buffers()
        return self._fork.__exit__(*exc)


# -- sample independence ---------------------------------------------------------------------------------------------
def probe_independence(model: nn.Module, loss_fn: LossFn, batch: Any, n: int | None = None) -> str | None:
    """Why the samples of ``batch`` are coupled, or None when changing sample 0 moves no other sample's loss.

    Two forwards without gradients from the same random state (same dropout masks); buffers (BatchNorm's running
    statistics) are restored afterwards.
    """
    from inrun.engine.products import infer_batch_size

    n = n if n is not None else infer_batch_size(batch)
    if n is None or n < 2:
        return None
    source = _differing_sample(batch, n)
    if source is None:
        return None  # every sample equals sample 0: nothing to change
    changed = _replace_sample(batch, n, 0, source)
    with _SameRandomness(model) as same, torch.no_grad():
        same.rewind()
        before = loss_fn(model, batch)
        same.restore_buffers()
        same.rewind()
        after = loss_fn(model, changed)
    if not isinstance(before, Tensor) or not isinstance(after, Tensor):
        return None
    return _mixing_reason(model, before.detach(), after.detach(), n)


def _mixing_reason(model: nn.Module, before: Any, after: Any, n: int) -> str | None:
    """Why the samples are coupled, from the losses of the batch (``before``) and of the batch with sample 0
    changed (``after``, same random state); None when no other sample's loss moved."""
    if not isinstance(before, Tensor) or not isinstance(after, Tensor):
        return None
    if before.shape != (n,) or after.shape != (n,):
        return None  # the loss function's own checks report a wrong shape
    if not (bool(torch.isfinite(before).all()) and bool(torch.isfinite(after).all())):
        return None  # non-finite losses have their own error
    others = torch.arange(1, n, device=before.device)
    moved = (after[others] - before[others]).abs().double()
    scale = before[others].abs().double().clamp_min(1e-30) + 1e-6 * before.abs().double().max()
    worst = int(torch.argmax(moved / scale))
    relative = float(moved[worst] / scale[worst])
    if math.isfinite(relative) and relative <= tolerance(before.dtype, MIXING_TOLERANCE):
        return None
    sample = int(others[worst])
    coupled = [type(m).__name__ for m in model.modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    hint = (f" The model has {', '.join(sorted(set(coupled)))} in training mode, which normalises with statistics of "
            "the whole batch: call .eval() on it (running statistics) or replace it by GroupNorm/LayerNorm."
            if coupled else
            " Something couples the samples: batch statistics (BatchNorm in training mode), a loss computed across "
            "the batch (contrastive, in-batch negatives), or attention across the batch dimension.")
    return (f"changing sample 0 of the batch changed sample {sample}'s loss from {float(before[sample]):.6g} to "
            f"{float(after[sample]):.6g} (relative {relative:.2g}) with the same random state, so no sample has a "
            f"gradient of its own.{hint}")


def _differing_sample(batch: Any, n: int) -> int | None:
    """The first sample after 0 whose tensors differ from sample 0's (the probe copies it over sample 0)."""
    rows: list[Tensor] = []
    _map_batch(batch, n, lambda t: rows.append(t) or t)
    for j in range(1, n):
        if any(not torch.equal(t[0], t[j]) for t in rows):
            return j
    return None


def require_independence(model: nn.Module, loss_fn: LossFn, batch: Any, n: int | None = None) -> None:
    reason = probe_independence(model, loss_fn, batch, n)
    if reason is not None:
        raise SampleMixingError("inrun refuses this model whatever allow_unsupported says: " + reason)


# -- which calls follow the batch ------------------------------------------------------------------------------------
def probe_shapes(capture: GradientCapture, model: nn.Module, loss_fn: LossFn, batch: Any, n: int | None) -> None:
    """Run sample 0 alone (no gradients, same random state, buffers restored) and record the leading size of every
    module's first input; :meth:`GradientCapture.adopt_probe` then treats calls that do not follow the batch as
    shared by it. This tells nanoGPT's ``wpe(torch.arange(t))`` with ``t == n`` from a per-sample lookup, which no
    rule on shapes of one batch can."""
    if n is None or n < 2:
        return
    leading: dict[str, tuple[int, int, bool] | None] = {}
    handles = []
    for name, module in model.named_modules():
        def hook(module, args, kwargs, output, name=name):
            if name in leading:
                return
            first = next((v for v in [*args, *kwargs.values()] if isinstance(v, Tensor)), None)
            leading[name] = (None if first is None or first.dim() == 0
                             else (first.shape[0], first.dim(), first.is_floating_point()))

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        with _SameRandomness(model) as same, torch.no_grad():
            same.rewind()
            loss_fn(model, slice_batch(batch, n, 0))
    except Exception:  # noqa: BLE001 - a model that cannot run one sample alone: no probe, the other checks remain
        return
    finally:
        for handle in handles:
            handle.remove()
    capture.adopt_probe(leading)


# -- completeness and spot checks ------------------------------------------------------------------------------------
def _owner(capture: GradientCapture, name: str) -> str:
    for entry in capture.hooked:
        if name in entry.parameters.values():
            return f"module '{entry.name or '<root>'}' ({type(entry.module).__name__})"
    return "its module"


def _precision(*tensors: Tensor) -> torch.dtype:
    dtypes = [t.dtype for t in tensors if t.is_floating_point()]
    return min(dtypes, key=lambda d: torch.finfo(d).eps * -1) if dtypes else torch.float32


def check_completeness(
    capture: GradientCapture, captured: CapturedBatch | list[CapturedBatch], grads: Mapping[str, Tensor]
) -> None:
    """Raise :class:`ExactnessError` for the first parameter whose per-sample contributions (summed over the
    captured micro-batches) do not add up to autograd's batch gradient ``grads[name]`` (parameters missing from
    ``grads`` are skipped)."""
    parts = captured if isinstance(captured, list) else [captured]
    compare_sums(capture, contribution_sums(parts), grads, [p.precision for p in parts if p.precision is not None])


def contribution_sums(parts: list[CapturedBatch]) -> dict[str, Tensor]:
    """Per parameter, the sum over the samples of ``parts`` of their captured contributions (parameter-shaped)."""
    sums: dict[str, Tensor] = {}
    for part in parts:
        for name, value in part.gradient_sums().items():
            sums[name] = value if name not in sums else sums[name] + value
    return sums


def compare_sums(capture: GradientCapture, sums: Mapping[str, Tensor], grads: Mapping[str, Tensor],
                 low: list[torch.dtype] = ()) -> None:
    """Raise :class:`ExactnessError` for the first parameter of ``capture`` in ``grads`` whose summed contributions
    ``sums[name]`` (absent: none captured) differ from ``grads[name]`` beyond the tolerance of the lowest precision
    involved (``low``: the captured factors' precisions)."""
    names = [name for name in capture.parameters if name in grads]
    if not names:
        return
    total = math.sqrt(sum(float(grads[k].double().pow(2).sum()) for k in names))
    numel = sum(grads[k].numel() for k in names)
    for name in names:
        expected = grads[name].detach().double().reshape(-1)
        found = sums.get(name)
        got = (found.detach().double().reshape(-1).to(expected.device) if found is not None
               else torch.zeros_like(expected))
        dtype = _precision(grads[name], *(found,) if found is not None else (), *(torch.empty(0, dtype=d) for d in low))
        floor = 1e-3 * total * math.sqrt(expected.numel() / numel)
        scale = max(float(expected.norm()), float(got.norm())) + floor
        difference = float((got - expected).norm())
        if scale > 0 and difference > tolerance(dtype, device=grads[name].device) * scale:
            raise ExactnessError(_completeness_message(capture, name, difference / scale, found is None))


def _completeness_message(capture: GradientCapture, name: str, relative: float, never_seen: bool) -> str:
    owner = _owner(capture, name)
    seen = ("no call of it received a gradient, yet autograd gives the parameter one" if never_seen else
            f"the sum over samples of its per-sample gradients differs from autograd's batch gradient by {relative:.3g} "
            "(relative)")
    return (
        f"parameter '{name}' cannot be attributed exactly: {seen}. Likely cause: the parameter is used outside the "
        f"forward of {owner}, which inrun hooks -- a functional use of a tied or shared weight such as "
        "`F.linear(x, self.wte.weight)` or `x @ self.wte.weight.T`, or a parameter read directly by another module. "
        "Fix: route every use through a module call (for a tied LM head: `self.lm_head = nn.Linear(d, vocab, "
        "bias=False)`, `self.lm_head.weight = self.wte.weight`, `logits = self.lm_head(x)`), or freeze the parameter "
        "(requires_grad_(False))."
    )


def check_samples(
    capture: GradientCapture,
    captured: CapturedBatch,
    samples: list[int],
    sample_grads: list[Mapping[str, Tensor]],
    batch_grads: Mapping[str, Tensor],
) -> None:
    """Compare, per parameter, the engine's squared norm and inner product with the batch gradient of each sample in
    ``samples`` with autograd's gradient of that sample's loss alone (``sample_grads``)."""
    index = torch.tensor(samples)
    rows = []  # (name, engine norms [k], engine dots [k], reference norms [k], reference dots [k], tolerance)
    for name, uses in captured.factors.items():
        if name not in batch_grads:
            continue
        local = [f.select(index.to(_device_of(f))) for f in uses]
        norms = parameter_squared_norms(local, memory_budget=captured.memory_budget)[0].double().cpu()
        direction = batch_grads[name].detach().reshape(1, *captured.shapes[name])
        dots = parameter_fixed_dots(local, direction.to(_dtype_of(uses[0]))).double()[:, 0].cpu()
        # the reference's norms and inner products in the gradients' own precision (float32 sums of squares and
        # products err by ~1e-6 relative, far inside the float32 tolerance; float64 stays float64)
        flat_batch = batch_grads[name].detach().reshape(-1)
        rows_k = [sample_grads[k].get(name) for k in range(len(samples))]
        stacked = torch.stack([torch.zeros_like(flat_batch) if g is None else
                               g.detach().reshape(-1).to(flat_batch) for g in rows_k])
        ref_norms = stacked.pow(2).sum(1).double().tolist()
        ref_dots = (stacked @ flat_batch).double().tolist()
        dtype = _precision(batch_grads[name], _reference(uses[0]),
                           *(() if captured.precision is None else (torch.empty(0, dtype=captured.precision),)))
        rows.append((name, norms, dots, ref_norms, ref_dots, tolerance(dtype, device=batch_grads[name].device),
                     float(flat_batch.norm())))
    # a parameter whose gradient is a negligible part of the sample's (a key bias, ~0 up to rounding) is judged
    # against the whole: rounding there cannot move any value
    totals = [sum(row[3][k] for row in rows) for k in range(len(samples))]
    batch_norm = math.sqrt(sum(row[6] ** 2 for row in rows))
    for name, norms, dots, ref_norms, ref_dots, tol, _ in rows:
        for k, i in enumerate(samples):
            norm_scale = max(ref_norms[k], float(norms[k])) + 1e-4 * totals[k] + 1e-300
            dot_scale = math.sqrt(max(ref_norms[k], float(norms[k])) + 1e-4 * totals[k]) * batch_norm + 1e-300
            norm_off = abs(float(norms[k]) - ref_norms[k]) / norm_scale
            dot_off = abs(float(dots[k]) - ref_dots[k]) / dot_scale
            if norm_off > 3 * tol or dot_off > 3 * tol:
                raise ExactnessError(_spot_message(capture, name, i, float(norms[k]), ref_norms[k], float(dots[k]),
                                                   ref_dots[k]))


def _spot_message(capture, name, i, norm, ref_norm, dot, ref_dot) -> str:
    owner = _owner(capture, name)
    shapes = ""
    for entry in capture.hooked:
        if name in entry.parameters.values():
            shapes = f" ({owner})"
    return (
        f"parameter '{name}'{shapes}: the gradient inrun credits to sample {i} disagrees with autograd's gradient of "
        f"that sample's loss alone (squared norm {norm:.6g} vs {ref_norm:.6g}; inner product with the batch gradient "
        f"{dot:.6g} vs {ref_dot:.6g}), although the per-sample gradients add up: credit went to the wrong sample. "
        "Likely cause: the module is called without the batch dimension and its first dimension happens to equal the "
        "batch size (nanoGPT's `self.wpe(torch.arange(t))` with t == batch size reads as a per-sample lookup), or the "
        "model reorders samples. Fix: give such inputs a batch dimension of 1 (`torch.arange(t)[None]`), or use a "
        "batch size different from that dimension; or freeze the parameter (requires_grad_(False))."
    )


def _reference(factor: Factor) -> Tensor:
    return dense_reference(factor)


def _device_of(factor: Factor) -> torch.device:
    if isinstance(factor, FlatFactor):
        return factor.data.device
    side = factor.rows
    return side.ids.device if isinstance(side, IndexSide) else side.data.device


def _dtype_of(factor) -> torch.dtype:
    return _reference(factor).dtype


def spot_samples(n: int, count: int = 2) -> list[int]:
    """The samples the spot check recomputes: the first and the last."""
    return sorted({0, n - 1})[:count] if n > 0 else []


# -- one checked batch -----------------------------------------------------------------------------------------------
def _rng_states(devices: list[torch.device]) -> list[Tensor]:
    return [torch.get_rng_state(), *(torch.cuda.get_rng_state(d) for d in devices)]


def _restore_rng(devices: list[torch.device], states: list[Tensor]) -> None:
    torch.set_rng_state(states[0])
    for device, state in zip(devices, states[1:]):
        torch.cuda.set_rng_state(state, device)


def _restore_buffers(model: nn.Module, saved: Mapping[str, Tensor]) -> None:
    """Copy back the buffers that changed (only those: a buffer saved for a backward still to run, such as
    position ids, keeps its version)."""
    with torch.no_grad():
        for name, b in model.named_buffers():
            found = saved.get(name)
            if found is not None and found.shape == b.shape and not torch.equal(found, b):
                b.copy_(found)


def _buffers(model: nn.Module) -> dict[str, Tensor]:
    return {name: b.detach().clone() for name, b in model.named_buffers()}


def _mixing_after(capture: GradientCapture, model: nn.Module, loss_fn: LossFn, batch: Any, n: int, before: Tensor,
                  devices: list[torch.device], rng: list[Tensor], buffers: Mapping[str, Tensor]) -> str | None:
    """The independence probe with the captured forward's losses as the unchanged run: one more forward, of the
    changed batch, from the random state and buffers that forward started from (capture off: nothing recorded),
    with gradients enabled as that forward was (same code paths: no inference-only fast path)."""
    source = _differing_sample(batch, n)
    if source is None:
        return None
    changed = _replace_sample(batch, n, 0, source)
    _restore_buffers(model, buffers)
    _restore_rng(devices, rng)
    enabled, capture.enabled = capture.enabled, False
    try:
        after = loss_fn(model, changed)
    finally:
        capture.enabled = enabled
    return _mixing_reason(model, before, after.detach() if isinstance(after, Tensor) else after, n)


def _alone_gradients(capture: GradientCapture, model: nn.Module, loss_fn: LossFn, batch: Any, n: int,
                     samples: list[int], checked: list[Tensor], losses: Tensor, budget: float = math.inf
                     ) -> list | None:
    """Autograd's gradients of each spot-checked sample run ALONE (a batch of one: a forward and a backward of one
    sample each instead of a backward of the whole batch per sample). Only valid when the batch's forward drew no
    random numbers (checked by the caller) and each sample alone has the loss it has in the batch (checked here);
    None otherwise, and the caller differentiates the batch's own losses instead. A sample alone that took longer
    than ``budget`` seconds (what a backward of the batch took: small models are bound by per-call overheads, not
    by the batch size) ends the list early; the caller takes the remaining samples from the batch."""
    import time

    tol = tolerance(losses.dtype, MIXING_TOLERANCE)
    found = []
    enabled, capture.enabled = capture.enabled, False
    devices = _SameRandomness(model).devices
    rng = _rng_states(devices)
    # the samples run on copies of the buffers: the originals may be saved for the batch's backward still to come
    # (BatchNorm's running statistics), where an in-place restore would invalidate the graph
    originals = _swap_buffers(model)
    try:
        for i in samples:
            start = time.perf_counter()
            one = loss_fn(model, slice_batch(batch, n, i))
            if not isinstance(one, Tensor) or one.shape != (1,) or not one.requires_grad:
                return None
            expected = losses[i].detach()
            if float((one.detach()[0] - expected).abs()) > tol * float(expected.abs().clamp_min(1e-30)):
                return None  # the sample alone is not the sample in the batch: compare in the batch
            found.append(torch.autograd.grad(one[0], checked, allow_unused=True))
            if time.perf_counter() - start > budget:
                break
    except Exception:  # noqa: BLE001 - a model that cannot run one sample alone: the batch's own backwards
        return None
    finally:
        capture.enabled = enabled
        _put_back_buffers(originals)
        _restore_rng(devices, rng)
    return found


def _swap_buffers(model: nn.Module) -> list[tuple[nn.Module, str, Tensor]]:
    """Give every module copies of its buffers (one copy per shared buffer); the originals, to put back."""
    copies: dict[int, Tensor] = {}
    originals = []
    for module in model.modules():
        for name, b in list(module._buffers.items()):
            if b is None:
                continue
            originals.append((module, name, b))
            module._buffers[name] = copies.setdefault(id(b), b.detach().clone())
    return originals


def _put_back_buffers(originals: list[tuple[nn.Module, str, Tensor]]) -> None:
    for module, name, b in originals:
        module._buffers[name] = b


def checked_capture(
    capture: GradientCapture, model: nn.Module, loss_fn: LossFn, batch: Any, *, spot: int = 2, independence: bool = True,
    completeness: bool = True, alone: bool = True,
) -> CapturedBatch:
    """Like :func:`~inrun.engine.products.capture_batch`, and check the result: sample independence, completeness
    against autograd's batch gradient (from the same backward), and the spot check of ``spot`` samples. Raises on
    any failure. ``completeness=False`` leaves the sum check to the caller (the recorder compares at the step with
    the optimizer's gradients); a spot-check failure still runs it first, so that the error names the right cause.
    ``alone=False`` never runs spot-checked samples alone: the path taken then depends on nothing timed, which ranks
    that must enter the same collectives (a ZeRO-3 forward gathers parameters) need.

    Cost: a one-sample shape probe, one forward and backward (the capture's, also to the parameters), one forward of
    the batch with sample 0 changed (the unchanged run is the captured forward, replayed from its random state), and
    per spot-checked sample a forward and backward of that sample alone -- or, when the forward draws random numbers
    (dropout) or a sample alone has another loss than in the batch, a backward of the whole batch per sample.
    """
    import time

    from inrun.engine.products import _backward_keeping_grads, infer_batch_size, per_sample_losses

    n = infer_batch_size(batch)
    probe_shapes(capture, model, loss_fn, batch, n)
    params = dict(capture.parameters)
    names, checked = list(params), list(params.values())
    devices = _SameRandomness(model).devices
    rng_before = _rng_states(devices)
    buffers_before = _buffers(model) if independence else {}
    capture.discard()
    capture.batch_size = n
    capture.keep_outputs = True
    try:
        losses = per_sample_losses(model, loss_fn, batch)  # first: a wrong shape or a non-finite loss has its own error
    finally:
        capture.keep_outputs = False
    rng_after = _rng_states(devices)
    outputs = capture.take_outputs()
    # differentiate down to the hooked outputs (fires every hook) and to the parameters (the batch gradient)
    targets = outputs if outputs is not None else checked
    samples = spot_samples(losses.shape[0], spot) if spot else []
    batch_grads = None
    backward_seconds = math.inf
    if targets or checked:
        try:
            start = time.perf_counter()
            batch_grads = torch.autograd.grad(losses.sum(), targets + checked, allow_unused=True,
                                              retain_graph=bool(samples))[len(targets):]
            backward_seconds = time.perf_counter() - start
        except RuntimeError as error:
            if "reentrant" not in str(error).lower() and ".grad()" not in str(error):
                raise
            # reentrant activation checkpointing refuses autograd.grad: a real backward, param.grad restored
            capture.discard()
            capture.batch_size = n
            losses = per_sample_losses(model, loss_fn, batch)
            _backward_keeping_grads(losses.sum(), checked)
            rng_after = None  # two forwards ran: the independence probe runs on its own
    captured = capture.collect(num_samples=losses.shape[0])
    captured.losses = losses.detach()
    sample_grads = None
    if samples and batch_grads is not None:  # before the probe below runs the model again
        random = rng_after is None or any(not torch.equal(a, b) for a, b in zip(rng_before, rng_after))
        exact_types = (None, torch.float32, torch.float64)  # half precision rounds a batch of one differently
        if alone and not random and captured.precision in exact_types and losses.dtype in exact_types:
            sample_grads = _alone_gradients(capture, model, loss_fn, batch, captured.n, samples, checked, losses,
                                            budget=backward_seconds)
        sample_grads = sample_grads or []
        if len(sample_grads) < len(samples):  # the same forward (same dropout masks): a backward of the batch each
            rest = samples[len(sample_grads):]
            try:
                sample_grads += [torch.autograd.grad(losses[i], checked, allow_unused=True,
                                                     retain_graph=k + 1 < len(rest))
                                 for k, i in enumerate(rest)]
            finally:
                capture.discard()  # the single-sample backwards fired the hooks again
    del losses  # frees the graph kept for the spot check
    if independence:
        if rng_after is None:
            require_independence(model, loss_fn, batch, captured.n)
        elif captured.n >= 2:
            buffers_after = _buffers(model)
            try:
                reason = _mixing_after(capture, model, loss_fn, batch, captured.n, captured.losses, devices,
                                       rng_before, buffers_before)
            finally:
                _restore_buffers(model, buffers_after)
                _restore_rng(devices, rng_after)  # as after an unchecked capture: the forward's draws, no more
            if reason is not None:
                raise SampleMixingError("inrun refuses this model whatever allow_unsupported says: " + reason)
    if batch_grads is None:
        return captured
    grads = {k: g for k, g in zip(names, batch_grads) if g is not None}
    grads.update({k: torch.zeros_like(params[k]) for k, g in zip(names, batch_grads) if g is None})
    if completeness:
        check_completeness(capture, captured, grads)
    if sample_grads is not None:
        per_sample = [{k: g for k, g in zip(names, row) if g is not None} for row in sample_grads]
        try:
            check_samples(capture, captured, samples, per_sample, grads)
        except ExactnessError:
            if not completeness:
                check_completeness(capture, captured, grads)  # missing gradient, not misplaced: say so
            raise
    return captured


# -- the recorder's checks -------------------------------------------------------------------------------------------
def validate_check_every(check_every: Any) -> None:
    if check_every is not None and (isinstance(check_every, bool) or not isinstance(check_every, int)
                                    or check_every < 1):
        from inrun.errors import InvalidArgumentError

        raise InvalidArgumentError(f"check_every must be a positive number of optimizer steps or None, got "
                                   f"{check_every!r}; for example check_every=1000 re-checks every 1000 steps")


class RecorderChecks:
    """When and how the recorder checks: at its first optimizer step always, then every ``every`` steps.

    At the first micro-batch of a checked step the training batch goes through :func:`checked_capture` before the
    real forward (independence, completeness against autograd's batch gradient, spot check; parameters and
    ``param.grad`` untouched; random state and buffers as after an unchecked capture of the batch). In a single
    process with full parameters the batch's completeness check is left to the step (the same sums against the
    optimizer's gradients); when the step cannot compare them the next batch check does its own. At the step itself the captured contributions of the real
    backward are compared with the gradients the optimizer is given. Failures raise; a loss function that cannot take
    a training batch only skips the batch part, with a warning.

    The engine knows no distributed framework: an integration hands it two callables.

    * ``full_parameters()``: a context manager inside which the model's parameters have their full shapes (DeepSpeed
      ZeRO-3 gathers them: a collective). The batch check and the shape probe run inside it.
    * ``sum_over_ranks(tensor) -> tensor``: the sum of ``tensor`` over the data-parallel ranks (a collective). With
      it, several ranks check the step together: each rank sums its captured contributions per parameter (they
      already carry the data-parallel ``1 / world`` of the averaged gradient: the recorder's ``gradient_divisor``),
      one call assembles the ranks' sums, and every rank compares the result with the averaged gradient the optimizer
      is given (identical data on every rank, so every rank reaches the same verdict). The batch check's outcome is
      agreed through it too (three numbers), so that every rank raises when one does. Without it, a run with
      several ranks skips the step check (the batch check, local to each rank, still runs).

    Every rank makes the same calls in the same order: :meth:`on_microbatch` enters the context and the agreement at
    the first micro-batch of a checked step even when that micro-batch is empty on this rank, and :meth:`on_step`
    makes its one collective call at every checked step, whether or not this rank has anything to value (a rank with
    nothing then contributes zeros and the comparison is skipped on every rank).
    """

    def __init__(self, enabled: bool, every: int | None):
        validate_check_every(every)
        self.enabled, self.every = enabled, every
        self.first_step: int | None = None
        self.batch_checked_step: int | None = None
        self.seconds = 0.0
        #: how many times each check ran on this rank: "batch" (checked_capture), "step" (completeness at the step)
        self.runs = {"batch": 0, "step": 0}
        #: set by an integration: a context manager factory giving the parameters their full shapes (collective)
        self.full_parameters: Callable[[], ContextManager[Any]] | None = None
        #: set by an integration with several data-parallel ranks: the sum of a tensor over the ranks (collective)
        self.sum_over_ranks: Callable[[Tensor], Tensor] | None = None
        #: the step whose batch check left completeness to the step check (single process: the step compares the
        #: same sums with the optimizer's own gradients); a step check that cannot run then re-checks the next batch
        self.deferred_step: int | None = None
        self._redo = False

    def due(self, step: int) -> bool:
        if not self.enabled:
            return False
        if self.first_step is None or self._redo:
            return True
        return step == self.first_step or (self.every is not None and step % self.every == 0)

    def _context(self) -> ContextManager[Any]:
        return self.full_parameters() if self.full_parameters is not None else nullcontext()

    def on_start(self, recorder: Any, loss_fn: LossFn | None) -> None:
        """Probe the shapes with the first validation batch before any validation pass uses the capture (a lookup
        shared by the batch whose length equals the number of validation points is then read right)."""
        validation = getattr(recorder, "validation", None)
        batches = getattr(validation, "batches", None)
        if not self.enabled or not batches or loss_fn is None:
            return
        from inrun.engine.products import infer_batch_size

        with self._context():
            probe_shapes(recorder.capture, recorder.model, loss_fn, batches[0], infer_batch_size(batches[0]))

    def on_microbatch(self, recorder: Any, batch: Any, loss_fn: LossFn | None) -> None:
        """The batch check, at the first micro-batch of a checked step (call it for empty micro-batches too: with
        an integration's collectives every rank must take part)."""
        import time

        step = recorder.next_step
        if not self.due(step) or self.batch_checked_step == step or loss_fn is None:
            return
        capture = recorder.capture
        size = capture.batch_size
        if size == 0 and self.sum_over_ranks is None:
            return  # nothing to check, no rank to keep in step with: the step's next micro-batch is checked
        self.batch_checked_step = step
        if self.first_step is None:
            self.first_step = step
        start = time.perf_counter()
        failure: BaseException | None = None
        # a single process with full parameters compares the step's captured sums with the gradients handed to the
        # optimizer: the batch's own sum check would repeat it (one more product per layer), so it is left to the step
        defer = (not self._redo and self.sum_over_ranks is None and self.full_parameters is None
                 and getattr(recorder, "world_size", 1) == 1)
        self._redo = False
        try:
            with self._context():
                if size != 0:
                    # with collectives (several ranks, ZeRO-3's gathers) the path must not depend on timings: no
                    # samples run alone (whether the second one does is decided by a clock, per rank)
                    distributed = self.sum_over_ranks is not None or self.full_parameters is not None
                    failure = self._batch_check(capture, recorder.model, loss_fn, batch, completeness=not defer,
                                                alone=not distributed)
                    self.runs["batch"] += 1
                    self.deferred_step = step if defer else None
        finally:
            capture.discard()
            capture.batch_size = size  # a new micro-batch for the real forward
        try:
            failure = self._agree(recorder, failure, step)
        finally:
            self.seconds += time.perf_counter() - start
        if failure is not None:
            raise failure

    @staticmethod
    def _batch_check(capture: GradientCapture, model: nn.Module, loss_fn: LossFn, batch: Any, *,
                     completeness: bool = True, alone: bool = True) -> BaseException | None:
        """Run :func:`checked_capture`; the error to raise, or None (a loss function that cannot take the training
        batch, or an unexpected failure of the check itself, only warns: the check never breaks a working run)."""
        try:
            checked_capture(capture, model, loss_fn, batch, completeness=completeness, alone=alone)
        except (ExactnessError, SampleMixingError) as error:
            return error
        except InRunError as error:
            if "loss" not in type(error).__name__.lower():
                return error
            warnings.warn(f"inrun skipped the first-step batch check: loss_fn failed on a training batch ({error})",
                          stacklevel=4)
        except Exception as error:  # noqa: BLE001 - the check must never break a run that would otherwise work
            warnings.warn(f"inrun skipped the first-step batch check: {type(error).__name__}: {error}", stacklevel=4)
        return None

    def _agree(self, recorder: Any, failure: BaseException | None, step: int) -> BaseException | None:
        """With several ranks, every rank learns whether any rank's batch check failed (and the parameter its error
        names), and raises then too: one sum of [mixing, exactness, other errors, one slot per parameter]."""
        if self.sum_over_ranks is None:
            return failure
        import re

        kinds = (SampleMixingError, ExactnessError)
        names = list(recorder.capture.parameters)
        flags = torch.zeros(3 + len(names), dtype=torch.float64, device=_collective_device(recorder))
        if failure is not None:
            flags[next((k for k, kind in enumerate(kinds) if isinstance(failure, kind)), 2)] = 1.0
            named = re.match(r"parameter '([^']+)'", str(failure))
            if named is not None and named.group(1) in names:
                flags[3 + names.index(named.group(1))] = 1.0
        found = [int(v) for v in self.sum_over_ranks(flags).tolist()]
        if failure is not None or not any(found[:3]):
            return failure
        kind = next((kinds[k] for k in range(2) if found[k]), InRunError)
        named = [repr(name) for name, count in zip(names, found[3:]) if count]
        return kind(f"inrun's self-check at step {step} failed on {sum(found[:3])} other rank(s) of this data-parallel "
                    f"run{' for parameter ' + ', '.join(named) if named else ''} (this rank's own samples passed); "
                    "the error raised there says why and gives the fix")

    def on_step(self, recorder: Any, step: int, captured: list[CapturedBatch], grads: Mapping[str, Tensor]) -> None:
        """The completeness check at the step: ``captured`` is this rank's micro-batches of the step (empty when it
        values nothing: with ``sum_over_ranks`` call it anyway, every rank must take part), ``grads`` the gradients
        handed to the optimizer (averaged over the ranks)."""
        import time

        if not self.due(step):
            return
        if self.first_step is None:
            self.first_step = step
        deferred, self.deferred_step = self.deferred_step == step, None
        start = time.perf_counter()
        try:
            if self.sum_over_ranks is not None:
                self._step_over_ranks(recorder, captured, grads)
                return
            if getattr(recorder, "world_size", 1) != 1 or not captured:
                self._redo = deferred  # the batch left its sum check to this step, which cannot run: next batch
                return  # several ranks without a collective: the gradients are averaged over contributions unseen
            shapes = captured[0].shapes
            usable = {k: g for k, g in grads.items() if k in shapes and tuple(g.shape) == tuple(shapes[k])}
            # a parameter the step cannot compare (no gradient of its shape) gets its sum check at the next batch
            self._redo = deferred and any(k not in usable for k in recorder.capture.parameters)
            self.runs["step"] += 1
            check_completeness(recorder.capture, captured, usable)
        finally:
            self.seconds += time.perf_counter() - start

    def _step_over_ranks(self, recorder: Any, captured: list[CapturedBatch], grads: Mapping[str, Tensor]) -> None:
        """One collective: [ranks, ranks valuing the step, per parameter: ranks that captured it, summed
        contributions of every parameter]; the same layout on every rank (the recorder's parameters, full shapes)."""
        capture = recorder.capture
        full = getattr(recorder, "param_shapes", None) or {}
        shapes = {name: torch.Size(full.get(name, p.shape)) for name, p in capture.parameters.items()}
        names = list(shapes)
        dtype = torch.float64 if any(p.dtype == torch.float64 for p in capture.parameters.values()) else torch.float32
        sizes = [shapes[name].numel() for name in names]
        head = 2 + len(names)
        buffer = torch.zeros(head + sum(sizes), dtype=dtype, device=_collective_device(recorder))
        buffer[0] = 1.0
        local = contribution_sums(captured) if captured else {}
        if captured:
            buffer[1] = 1.0
        offset = head
        for k, (name, size) in enumerate(zip(names, sizes)):
            if name in local:
                buffer[2 + k] = 1.0
                buffer[offset:offset + size] = local[name].detach().reshape(-1).to(buffer)
            offset += size
        total = self.sum_over_ranks(buffer)
        if float(total[1]) != float(total[0]):
            return  # some rank values nothing this step (skipped there): no rank compares
        sums, offset = {}, head
        for k, (name, size) in enumerate(zip(names, sizes)):
            if float(total[2 + k]) > 0:
                sums[name] = total[offset:offset + size].view(shapes[name])
            offset += size
        usable = {k: grads[k] for k in names if k in grads and tuple(grads[k].shape) == tuple(shapes[k])}
        self.runs["step"] += 1
        compare_sums(capture, sums, usable, [p.precision for p in captured if p.precision is not None])


def _collective_device(recorder: Any) -> torch.device:
    """Where the collectives' tensors live: the parameters' device (a CUDA device under NCCL, the CPU under gloo)."""
    param = next(iter(recorder.capture.parameters.values()), None)
    return param.device if param is not None else torch.device("cpu")


# -- the public self-test --------------------------------------------------------------------------------------------
ROUTE_NAMES = {"gram": "ghost", "materialise": "materialised", "flat": "materialised"}


@dataclass
class ParameterCheck:
    """One row of :func:`check_model`'s table."""

    parameter: str
    module: str
    layer: str
    #: "ghost" (Gram products, nothing materialised), "materialised" (a dedicated handler forms the per-sample
    #: gradients), "fallback" (the generic torch.func handler) or "refused"
    route: str
    #: None for refused parameters
    exact: bool | None
    #: largest over samples of |engine - torch.func| / (largest torch.func per-sample gradient norm), this parameter
    max_rel_error: float
    #: why the parameter is refused or not exact ("" when exact)
    reason: str = ""


@dataclass
class ModelCheck:
    """What :func:`check_model` found: ``ok`` when every trainable parameter is exact (refused ones allowed only with
    ``allow_unsupported``) and the samples are independent."""

    ok: bool
    rows: list[ParameterCheck] = field(default_factory=list)
    #: why the samples are coupled (refused whatever allow_unsupported says), or None
    mixing: str | None = None
    #: an error the engine raised on the batch (the rows then say which parameters it concerns)
    error: str | None = None
    #: trainable parameter elements in all, and how many of them go through the generic fallback (its cost)
    total_numel: int = 0
    fallback_numel: int = 0

    def __str__(self) -> str:
        header = ("parameter", "module", "layer", "route", "exact", "max rel. error", "reason")
        body = [
            (r.parameter, r.module, r.layer, r.route, "-" if r.exact is None else ("yes" if r.exact else "NO"),
             "-" if r.exact is None else f"{r.max_rel_error:.1e}", r.reason)
            for r in self.rows
        ]
        widths = [max(len(str(row[c])) for row in [header, *body]) for c in range(len(header) - 1)]
        lines = ["  ".join(str(v).ljust(w) for v, w in zip(row[:-1], widths)) + "  " + row[-1] for row in [header, *body]]
        counts: dict[str, int] = {}
        for r in self.rows:
            counts[r.route] = counts.get(r.route, 0) + 1
        lines.append("routes: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + " parameter tensors"
                     + (f"; {self.fallback_numel:,} of {self.total_numel:,} parameter elements through the fallback"
                        if self.total_numel else ""))
        lines.append("samples independent: " + ("yes" if self.mixing is None else "NO -- " + self.mixing))
        if self.error:
            lines.append("engine error: " + self.error)
        lines.append("verdict: " + ("exact" if self.ok else "NOT usable as is (see the rows marked NO / refused)"))
        return "\n".join(lines)


def _reference_per_sample(model: nn.Module, loss_fn: LossFn, batch: Any, n: int,
                          params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Per-sample gradients by ``torch.func.grad`` of ``functional_call``, one sample at a time (the model runs on a
    batch of one, so nothing about the batch can leak into a sample's gradient)."""
    values = {k: p.detach() for k, p in params.items()}

    class Functional(nn.Module):
        def __init__(self, current):
            super().__init__()
            self.current = current

        def forward(self, *args, **kwargs):
            return torch.func.functional_call(model, self.current, args, kwargs, tie_weights=True, strict=False)

        def __getattr__(self, name):  # loss functions may read attributes of the model (a config, a head)
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(model, name)

    def single(current: dict[str, Tensor], sample: Any) -> Tensor:
        return loss_fn(Functional(current), sample)[0]

    rows = [torch.func.grad(single)(values, slice_batch(batch, n, i)) for i in range(n)]
    return {k: torch.stack([row[k] for row in rows]) for k in values}


#: models up to this many parameters get their torch.func reference from a float64 copy
FLOAT64_REFERENCE_NUMEL = 50_000_000


def _to_float64(batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return batch.double() if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: _to_float64(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)) and not hasattr(batch, "_fields"):
        return type(batch)(_to_float64(v) for v in batch)
    return batch


def _accurate_reference(model: nn.Module, loss_fn: LossFn, batch: Any, n: int,
                        trainable: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The torch.func reference, from a float64 copy of a small lower-precision model (so that the error reported is
    the engine's, not the reference's own rounding); otherwise in the model's precision."""
    import copy

    numel = sum(p.numel() for p in trainable.values())
    if all(p.dtype == torch.float64 for p in trainable.values()) or numel > FLOAT64_REFERENCE_NUMEL:
        return _reference_per_sample(model, loss_fn, batch, n, trainable)
    try:
        twin = copy.deepcopy(model).double()
    except Exception:  # noqa: BLE001 - a model that cannot be copied: the reference in its own precision
        return _reference_per_sample(model, loss_fn, batch, n, trainable)
    ids = {id(p): name for name, p in model.named_parameters()}
    twin_params = {ids[id(p)]: q for p, q in zip(model.parameters(), twin.parameters()) if id(p) in ids}
    wanted = {name: twin_params[name] for name in trainable if name in twin_params}
    found = _reference_per_sample(twin, loss_fn, _to_float64(batch), n, wanted)
    return {name: found[name] if name in found else torch.zeros(n, *trainable[name].shape, dtype=torch.float64)
            for name in trainable}


def check_model(
    model: nn.Module, loss_fn: LossFn, batch: Any, *, allow_unsupported: bool = False, print_table: bool = True
) -> ModelCheck:
    """Run inrun on ``batch`` and compare every trainable parameter's per-sample gradients with ``torch.func``.

    Probes sample independence in the model's current mode (same random state for both forwards), then compares in
    eval mode (dropout off; the reference runs each sample on its own). Returns a :class:`ModelCheck` whose rows say,
    per parameter, the route (ghost / materialised / fallback / refused), whether it is exact and why not; prints the
    table unless ``print_table=False``. Keep the batch small (the reference takes one gradient per sample).
    """
    from inrun.engine.products import capture_batch, infer_batch_size

    n = infer_batch_size(batch)
    if n is None:
        raise InRunError("check_model needs a batch with a leading sample dimension (a tensor, or a dict/tuple of them)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        capture = GradientCapture(model, allow_unsupported=True)
    mixing = probe_independence(model, loss_fn, batch, n)
    owners = {}
    for module_name, module in model.named_modules():
        for local, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), (module_name or "<root>", type(module).__name__))
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    routes_by_name = {name: entry.route for entry in capture.hooked for name in entry.parameters.values()}
    modes = {m: m.training for m in model.modules()}
    error = None
    engine: dict[str, Tensor] = {}
    routes: dict[str, str] = {}
    try:
        model.eval()
        try:
            probe_shapes(capture, model, loss_fn, batch, n)
            routes_by_name = {name: entry.route for entry in capture.hooked for name in entry.parameters.values()}
            with capture:
                captured = capture_batch(capture, model, loss_fn, batch)
            captured.squared_norms()  # fills the routes
            routes = dict(captured.routes)
            engine = captured.per_sample_gradients()
        except InRunError as caught:
            error = f"{type(caught).__name__}: {caught}"
        covered = {k: trainable[k] for k in capture.parameters}
        reference = _accurate_reference(model, loss_fn, batch, n, trainable)
    finally:
        for m, mode in modes.items():
            m.train(mode)
    rows = []
    # a parameter whose gradient is a negligible part of every sample's (a key bias: zero up to rounding) is judged
    # against the whole sample's gradient
    whole = math.sqrt(float(max(sum(r.detach().double().reshape(n, -1).pow(2).sum(1) for r in reference.values()))))
    for name, p in trainable.items():
        module_name, layer = owners.get(id(p), ("?", "?"))
        if name not in covered:
            rows.append(ParameterCheck(name, module_name, layer, "refused", None, math.nan,
                                       capture.coverage.refused.get(name, "not attributed")))
            continue
        route = "fallback" if routes_by_name.get(name) == "fallback" else \
            ROUTE_NAMES.get(routes.get(name, ""), "ghost" if "gram" in routes.get(name, "") else "materialised")
        expected = reference[name].detach().double().reshape(n, -1)
        got = engine.get(name)
        if got is None:
            reason = ("not computed: the engine raised an error (below)" if error else
                      "no call of its module received a gradient (used outside its module's forward?)")
            rows.append(ParameterCheck(name, module_name, layer, route, False, math.inf, reason))
            continue
        got = got.detach().double().reshape(n, -1).to(expected.device)
        scale = max(float(expected.norm(dim=1).max()), 1e-6 * whole)
        worst = float((got - expected).norm(dim=1).max())
        relative = worst / scale if scale > 0 else (0.0 if worst == 0 else math.inf)
        exact = relative <= tolerance(p.dtype, MODEL_TOLERANCE, device=p.device)
        reason = "" if exact else _inexact_reason(got, expected)
        rows.append(ParameterCheck(name, module_name, layer, route, exact, relative, reason))
    refused_ok = allow_unsupported or all(r.route != "refused" for r in rows)
    ok = mixing is None and error is None and refused_ok and all(r.exact for r in rows if r.route != "refused")
    result = ModelCheck(ok, rows, mixing, error, total_numel=sum(p.numel() for p in trainable.values()),
                        fallback_numel=capture.coverage.fallback_numel)
    if print_table:
        print(result)
    return result


def _inexact_reason(got: Tensor, expected: Tensor) -> str:
    """Tell a wrong split between samples (sums agree) from gradient missing altogether (sums differ)."""
    total = float(expected.sum(0).norm()) + 1e-30
    if float((got.sum(0) - expected.sum(0)).norm()) <= 1e-6 * total + 1e-12:
        return ("the per-sample gradients add up but are credited to the wrong samples (a module called without "
                "the batch dimension whose first dimension equals the batch size?)")
    return ("the per-sample gradients do not add up to the batch gradient: the parameter is used outside its "
            "module's forward (a functional use of a tied weight, `x @ self.wte.weight.T`?)")
