"""Capturing layer inputs and output gradients with hooks, robust to what real training code does.

A forward hook on every supported module keeps the call's input and registers a tensor hook on its output; the
tensor hook receives the output gradient during backward and records the pair. Pairing through the output's own
hook (rather than appending inputs in forward) means:

* activation checkpointing never double counts: the recomputed forward's outputs receive no gradient;
* in-place operations after a layer (``ReLU(inplace=True)``) and ``torch.compile`` graph breaks are harmless;
* a module called several times in one forward yields one record per call;
* a call shared by the whole batch (GPT-2's position embedding sees ids ``[1, T]`` and its output is broadcast over
  the batch) has its output expanded to the batch size, so that each sample's output gradient stays its own;
* ``param.grad`` is never read, so partitioned gradients (ZeRO) do not matter.

Hooks must be attached before the first forward of a compiled model.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from inrun.engine.factors import Factor, FlatFactor, concat_factors, zero_factor
from inrun.engine.layers import handler_for, supported_layer_names
from inrun.engine.layers.fallback import FALLBACK, FallbackHandler, is_fallback
from inrun.engine.layers.registry import LayerHandler
from inrun.errors import BatchMismatchError, NonFiniteGradientError, UnsupportedLayerError


@dataclass
class Coverage:
    """Which trainable parameters inrun attributes, and which it cannot (with the reason)."""

    covered_numel: int
    total_numel: int
    unsupported: list[str] = field(default_factory=list)
    #: covered elements that go through the generic torch.func fallback (slower than a dedicated handler)
    fallback_numel: int = 0
    #: the modules attributed by the fallback, as "'name' (Class): k parameters"
    fallback: list[str] = field(default_factory=list)
    #: parameter name -> why it is not attributed (only with ``allow_unsupported``)
    refused: dict[str, str] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return self.covered_numel / self.total_numel if self.total_numel else 1.0

    def as_dict(self) -> dict:
        return {
            "covered_numel": self.covered_numel,
            "total_numel": self.total_numel,
            "fraction": self.fraction,
            "unsupported": list(self.unsupported),
            "fallback_numel": self.fallback_numel,
            "fallback": list(self.fallback),
        }


@dataclass
class HookedModule:
    name: str
    module: nn.Module
    handler: LayerHandler
    #: local parameter name -> canonical parameter name (the first name ``named_parameters`` gives it)
    parameters: dict[str, str]

    @property
    def route(self) -> str:
        """"fallback" for the generic torch.func handler, "dedicated" otherwise."""
        return "fallback" if is_fallback(self.handler) else "dedicated"


@dataclass
class LayerCall:
    """One call of a hooked module whose output received a gradient.

    Dedicated handlers use ``inputs`` (the first input) and ``grad_output``; the fallback uses the whole call:
    ``args``/``kwargs`` (detached), the gradients of its output tensors by position in the flattened output
    (``grads``) and the random state before the call (``rng``).
    """

    hooked: HookedModule
    inputs: Tensor | None
    grad_output: Tensor | None
    micro_batch: int = 0
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    grads: dict[int, Tensor] = field(default_factory=dict)
    rng: tuple | None = None
    #: shapes seen in forward (for error messages)
    input_shape: tuple | None = None
    output_shape: tuple | None = None


def _plan(
    model: nn.Module, allow_unsupported: bool, fallback: bool = True
) -> tuple[list[HookedModule], dict[str, nn.Parameter], Coverage]:
    names = {id(p): name for name, p in model.named_parameters()}
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    problems: list[str] = []
    unsupported_ids: set[int] = set()
    candidates: list[HookedModule] = []
    inside_unit: set[int] = set()  # modules whose parameters a unit handler above them attributes
    refused: dict[str, str] = {}
    for module_name, module in model.named_modules():
        if id(module) in inside_unit:
            continue
        handler = handler_for(module)
        unit = is_fallback(handler) and handler.unit
        own = [(local, p) for local, p in module.named_parameters(recurse=unit) if p.requires_grad]
        if unit:
            inside_unit.update(id(m) for m in module.modules() if m is not module)
        if not own:
            continue
        label = f"'{module_name or '<root>'}' ({type(module).__name__})"
        reason = None
        if handler is None and fallback:
            handler = FALLBACK
        if handler is None:
            reason = f"no inrun handler for {type(module).__name__} (supported: {', '.join(supported_layer_names())})"
        else:
            allowed = handler.parameter_names
            extra = [] if allowed is None else [local for local, _ in own if local not in allowed]
            reason = handler.check(module) or (f"unexpected own parameters {extra}" if extra else None)
        if reason is not None:
            problems.append(f"{label}: {reason}")
            unsupported_ids.update(id(p) for _, p in own)
            refused.update({names[id(p)]: f"{label}: {reason}" for _, p in own})
            continue
        candidates.append(HookedModule(module_name, module, handler, {local: names[id(p)] for local, p in own}))
    hooked = []
    for entry in candidates:  # a parameter shared with an unsupported module is unsupported everywhere
        kept = {local: name for local, name in entry.parameters.items() if id(trainable[name]) not in unsupported_ids}
        if kept:
            hooked.append(HookedModule(entry.name, entry.module, entry.handler, kept))
    covered = {name: trainable[name] for entry in hooked for name in entry.parameters.values()}
    through_fallback = {name: trainable[name] for entry in hooked if entry.route == "fallback"
                        for name in entry.parameters.values()}
    coverage = Coverage(
        covered_numel=sum(p.numel() for p in covered.values()),
        total_numel=sum(p.numel() for p in trainable.values()),
        unsupported=problems,
        fallback_numel=sum(p.numel() for p in through_fallback.values()),
        fallback=[f"'{entry.name or '<root>'}' ({type(entry.module).__name__}): "
                  f"{sum(trainable[k].numel() for k in entry.parameters.values())} parameters"
                  for entry in hooked if entry.route == "fallback"],
        refused={name: refused.get(name, "shared with a module inrun cannot attribute") for name in trainable
                 if name not in covered},
    )
    if problems and not allow_unsupported:
        raise UnsupportedLayerError(
            "inrun cannot attribute these trainable parameters exactly per sample:\n  - "
            + "\n  - ".join(problems)
            + "\nFix: freeze them (requires_grad_(False)), switch BatchNorm to eval(), replace the layer with a "
            "supported one, register a handler (inrun.register_layer), or pass allow_unsupported=True to "
            "attribute only the supported parameters (the covered fraction is then reported)."
        )
    if problems:
        warnings.warn(
            f"inrun attributes {coverage.fraction:.1%} of trainable parameters; skipped: " + "; ".join(problems),
            stacklevel=3,
        )
    return hooked, covered, coverage


class GradientCapture:
    """Hooks a model's supported layers and records their inputs and output gradients, call by call.

    Use as a context manager (or :meth:`attach` / :meth:`detach`). After a backward pass, :meth:`collect` turns the
    recorded calls into a :class:`~inrun.engine.captured.CapturedBatch` of per-sample gradient factors and clears them.
    """

    def __init__(self, model: nn.Module, *, allow_unsupported: bool = False, fallback: bool = True):
        self.model = model
        self.hooked, self.parameters, self.coverage = _plan(model, allow_unsupported, fallback)
        self.enabled = True
        self._batch_size: int | None = None
        self._micro_batch = 0
        self._gradient_arrived = False
        #: when True, the outputs of hooked calls are kept (see :meth:`take_outputs`)
        self.keep_outputs = False
        self._outputs: list[tuple[Tensor, int]] = []
        self._calls: list[LayerCall] = []
        self._handles: list = []
        #: modules found (by :meth:`adopt_probe`) to be called with ids shared by the whole batch: their output is
        #: expanded to the batch even when the ids' length equals the batch size
        self.shared: set[str] = set()

    @property
    def batch_size(self) -> int | None:
        """Samples in the micro-batch about to run, when known.

        Setting it starts a new micro-batch: calls recorded afterwards belong to new samples, so several micro-batches
        (gradient accumulation) collected at once are joined along the sample axis. A forward pass that starts after
        a backward pass (outside it) also starts a new micro-batch. It also lets a call with a batch
        dimension of 1 (a position embedding broadcast over the batch) be expanded to the batch.
        """
        return self._batch_size

    @batch_size.setter
    def batch_size(self, value: int | None) -> None:
        self._batch_size = value
        self._micro_batch += 1
        self._gradient_arrived = False

    # -- hooks -------------------------------------------------------------------------------------------------
    def attach(self) -> "GradientCapture":
        if not self._handles:
            for entry in self.hooked:
                if entry.route == "fallback":
                    pre_hook, hook = self._fallback_hooks(entry)
                    self._handles.append(entry.module.register_forward_pre_hook(pre_hook))
                else:
                    hook = self._forward_hook(entry)
                self._handles.append(entry.module.register_forward_hook(hook, with_kwargs=True))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._calls.clear()

    def __enter__(self) -> "GradientCapture":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def _forward_hook(self, entry: HookedModule):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
            if not self.enabled or not torch.is_grad_enabled():
                return
            if not isinstance(output, Tensor) or not output.requires_grad:
                return
            problem = entry.handler.check(module)
            if problem is not None:
                raise UnsupportedLayerError(f"'{entry.name}' ({type(module).__name__}): {problem}")
            first = args[0] if args else next(iter(kwargs.values()), None)
            if not isinstance(first, Tensor):
                return
            inputs = first.detach()
            if self._gradient_arrived and not _inside_backward():
                # a forward pass after a backward pass: new samples (gradient accumulation)
                self._micro_batch += 1
                self._gradient_arrived = False
            micro_batch = self._micro_batch
            shapes = (tuple(first.shape), tuple(output.shape))
            expand_to = self.batch_size
            broadcast = expand_to is not None and expand_to > 1 and output.dim() > 0 and output.shape[0] == 1
            if broadcast:  # a call shared by the batch ([1, t] position ids): each sample gets its own gradient
                inputs = inputs.expand(expand_to, *inputs.shape[1:])
                output = output.expand(expand_to, *output.shape[1:])
            elif (expand_to is not None and expand_to > 1 and inputs.dim() == 1 and not inputs.is_floating_point()
                  and (inputs.shape[0] != expand_to or entry.name in self.shared)):
                # ids without a batch dimension (nanoGPT's ``wpe(torch.arange(t))``) broadcast over the batch
                # (t == n cannot be told apart from a per-sample lookup by shape; the per-sample check catches it)
                broadcast = True
                inputs = inputs.unsqueeze(0).expand(expand_to, -1)
                output = output.unsqueeze(0).expand(expand_to, *output.shape)

            def on_grad(grad: Tensor) -> None:
                self._gradient_arrived = True
                call = LayerCall(entry, inputs, grad.detach(), micro_batch, input_shape=shapes[0],
                                 output_shape=shapes[1])
                self._calls.append(call)

            output.register_hook(on_grad)
            if self.keep_outputs and not _inside_backward():
                self._outputs.append((output, output._version))
            return output if broadcast else None

        return hook

    def _fallback_hooks(self, entry: HookedModule):
        """Hooks for a module attributed by the fallback: keep the whole call (args, kwargs, random state) and the
        gradient of every output tensor."""
        saved: list[tuple | None] = []

        def pre_hook(module: nn.Module, args: tuple) -> None:
            if not self.enabled or not torch.is_grad_enabled():
                return
            saved[:] = [_rng_state(args)]  # one pending call per module (a failed forward leaves nothing stale)

        def hook(module: nn.Module, args: tuple, kwargs: dict, output):
            rng = saved.pop() if saved else None
            if not self.enabled or not torch.is_grad_enabled():
                return None
            flat, spec = tree_flatten(output)
            slots = [k for k, o in enumerate(flat) if isinstance(o, Tensor) and o.requires_grad]
            if not slots:
                return None
            if self._gradient_arrived and not _inside_backward():
                self._micro_batch += 1
                self._gradient_arrived = False
            detached_args, detached_kwargs = tree_map(lambda v: v.detach() if isinstance(v, Tensor) else v,
                                                      (args, kwargs))
            first = next((v for v in tree_flatten((args, kwargs))[0] if isinstance(v, Tensor)), None)
            call = LayerCall(entry, None, None, self._micro_batch, args=detached_args, kwargs=detached_kwargs,
                             rng=rng, input_shape=None if first is None else tuple(first.shape),
                             output_shape=tuple(flat[slots[0]].shape))
            expand_to = self.batch_size
            replaced = False
            for k in slots:
                out = flat[k]
                if (expand_to is not None and expand_to > 1 and out.dim() > 0 and out.shape[0] == 1
                        and entry.handler.output_dim(module, k) == 0):
                    out = out.expand(expand_to, *out.shape[1:])  # shared by the batch: per-sample gradients
                    flat[k], replaced = out, True

                def on_grad(grad: Tensor, k: int = k) -> None:
                    self._gradient_arrived = True
                    if not call.grads:
                        self._calls.append(call)
                    call.grads[k] = grad.detach()

                out.register_hook(on_grad)
                if self.keep_outputs and not _inside_backward():
                    self._outputs.append((out, out._version))
            return tree_unflatten(flat, spec) if replaced else None

        return pre_hook, hook

    # -- what a probe with another batch size showed ------------------------------------------------------------
    def adopt_probe(self, leading: dict[str, tuple[int, int, bool] | None]) -> list[str]:
        """Use the first-input shapes seen in a forward of a batch of ONE sample to tell shared calls apart.

        ``leading``: module name -> (leading size, number of dimensions, floating point) of its first input tensor
        in that forward. A hooked module whose input does not follow the batch size (its leading size is not 1 for a
        batch of 1) is computed once for the whole batch: 1-D ids (nanoGPT's ``wpe(torch.arange(t))``) are expanded
        to the batch even when ``t`` equals the batch size; any other such module (T5's relative attention bias,
        ids ``[q, k]``) has its parameters attributed by the fallback at its nearest ancestor whose input follows the
        batch, where every sample's gradient is its own. Returns the rerouted modules' names.
        """
        moved = []
        for entry in list(self.hooked):
            seen = leading.get(entry.name)
            if entry.route == "fallback" or seen is None or seen[0] == 1:
                continue
            size, dims, floating = seen
            if dims == 1 and not floating:
                self.shared.add(entry.name)
                continue
            ancestor = self._ancestor_following_batch(entry.name, leading)
            if ancestor is not None:
                self._reroute(entry, ancestor)
                moved.append(entry.name)
        return moved

    def _ancestor_following_batch(self, name: str, leading: dict) -> str | None:
        parts = name.split(".") if name else []
        for cut in range(len(parts) - 1, -1, -1):
            candidate = ".".join(parts[:cut])
            seen = leading.get(candidate)
            hooked = next((e for e in self.hooked if e.name == candidate), None)
            if seen is not None and seen[0] == 1 and (hooked is None or hooked.route == "fallback"):
                return candidate
        return None

    def _reroute(self, entry: HookedModule, ancestor_name: str) -> None:
        attached = bool(self._handles)
        if attached:
            self.detach()
        prefix = entry.name[len(ancestor_name) + 1:] if ancestor_name else entry.name
        moved = {f"{prefix}.{local}": name for local, name in entry.parameters.items()}
        self.hooked.remove(entry)
        existing = next((e for e in self.hooked if e.name == ancestor_name), None)
        if existing is not None:
            existing.parameters.update(moved)
            if not existing.handler.unit:
                existing.handler = FallbackHandler(unit=True)
        else:
            ancestor = self.model.get_submodule(ancestor_name)
            self.hooked.append(HookedModule(ancestor_name, ancestor, FallbackHandler(unit=True), moved))
        self.coverage.fallback_numel += sum(self.parameters[k].numel() for k in moved.values())
        self.coverage.fallback.append(f"'{ancestor_name or '<root>'}' ({type(self.model.get_submodule(ancestor_name)).__name__}): "
                                      f"{', '.join(moved.values())} (called once for the whole batch in "
                                      f"'{entry.name}')")
        if attached:
            self.attach()

    # -- results -----------------------------------------------------------------------------------------------
    @property
    def pending_calls(self) -> int:
        """Calls recorded since the last collect (one per hooked call whose output received a gradient)."""
        return len(self._calls)

    def discard(self) -> None:
        """Drop recorded calls (for example after a backward pass that should not be attributed)."""
        self._calls.clear()
        self._outputs.clear()

    def take_outputs(self) -> list[Tensor] | None:
        """The outputs of the hooked calls since the last take (kept while ``keep_outputs``): differentiating the
        loss with respect to these alone fires every hook without computing any weight gradient. None when an
        output was modified in place afterwards (``ReLU(inplace=True)``): its gradient would be the wrong one."""
        outputs, self._outputs = self._outputs, []
        if any(output._version != version for output, version in outputs):
            return None
        return [output for output, _ in outputs]

    def collect(self, num_samples: int | None = None, *, grad_scale: float = 1.0, check_finite: bool = True):
        """Turn the calls recorded since the last collect into per-sample factors.

        ``grad_scale`` is divided out of every output gradient (the loss scale of fp16 mixed precision).
        ``num_samples``, when given, is checked against every layer's sample dimension.
        ``check_finite`` checks every output gradient for NaN/inf (callers that check the full gradient instead,
        where any non-finite output gradient ends up, can skip it).
        """
        from inrun.engine.captured import CapturedBatch

        calls, self._calls = self._calls, []
        precision = _lowest_precision(calls)
        groups: dict[int, dict[str, list[Factor]]] = {}
        first_module: dict[int, str] = {}
        single = len({call.micro_batch for call in calls}) <= 1
        enabled, self.enabled = self.enabled, False  # the fallback re-runs modules: their children must not record
        try:
            for call in calls:
                factors = groups.setdefault(call.micro_batch, {})
                first_module.setdefault(call.micro_batch, call.hooked.name)
                for local, factor in self._factors_of(call, grad_scale, check_finite, num_samples).items():
                    name = call.hooked.parameters.get(local)
                    if name is None:  # a frozen or unsupported parameter of a hooked module
                        continue
                    if single and num_samples is not None and factor.n != num_samples:
                        raise BatchMismatchError(_mismatch_message(call, factor.n, num_samples))
                    factors.setdefault(name, []).append(factor)
        finally:
            self.enabled = enabled
        sizes = [_group_size(group) for _, group in sorted(groups.items())]
        total = sum(sizes)
        if num_samples is not None and groups and total != num_samples:
            seen = (f"module '{first_module[min(groups)]}' saw {total} samples" if len(groups) == 1
                    else f"the hooked layers saw {total} samples in {len(groups)} micro-batches")
            raise BatchMismatchError(
                f"{seen} but there are {num_samples} losses; inrun needs every layer input to keep the sample "
                "dimension first (a model that reshapes [n, T, d] into [n*T, d] before a layer cannot be attributed "
                "per sample)"
            )
        shapes = {name: self.parameters[name].shape for name in self.parameters}
        merged = join_micro_batches([group for _, group in sorted(groups.items())], sizes)
        captured = CapturedBatch(merged, num_samples if num_samples is not None else total, shapes)
        captured.precision = precision
        return captured

    def _factors_of(self, call: LayerCall, grad_scale: float, check_finite: bool,
                    num_samples: int | None = None) -> dict[str, Factor]:
        if call.grad_output is None:
            return self._fallback_factors(call, grad_scale, check_finite, num_samples)
        grad = call.grad_output
        if check_finite:
            _check_finite(call, grad)
        grad = _compute_dtype(grad)
        if grad_scale != 1.0:
            grad = grad / grad_scale
        inputs = _compute_dtype(call.inputs)
        return call.hooked.handler.factors(call.hooked.module, inputs, grad)

    def _fallback_factors(self, call: LayerCall, grad_scale: float, check_finite: bool,
                          num_samples: int | None) -> dict[str, Factor]:
        entry, module = call.hooked, call.hooked.module
        handler = entry.handler
        grads = {}
        sizes = set()
        for k, grad in call.grads.items():
            if check_finite:
                _check_finite(call, grad)
            grad = grad / grad_scale if grad_scale != 1.0 else grad
            grads[k] = grad
            sample_dim = handler.output_dim(module, k)
            sizes.add(grad.shape[sample_dim] if grad.dim() > sample_dim else 0)
        n = num_samples if num_samples is not None and num_samples in sizes else max(sizes)
        if len(sizes) > 1 or n == 0:
            raise BatchMismatchError(_mismatch_message(call, sorted(sizes)[0], num_samples or n))
        params = {local: p.detach() for local, p in module.named_parameters(recurse=handler.unit)
                  if local in entry.parameters}
        found = handler.per_sample_gradients(module, params, call.args, call.kwargs, grads, n, call.rng)
        return {local: FlatFactor(_compute_dtype(g).reshape(n, -1)) for local, g in found.items()}


def _lowest_precision(calls: list[LayerCall]) -> torch.dtype | None:
    """The least precise floating dtype among the calls' output gradients and inputs (bf16 under autocast)."""
    dtypes = set()
    for call in calls:
        for tensor in (call.grad_output, call.inputs, *call.grads.values()):
            if isinstance(tensor, Tensor) and tensor.is_floating_point():
                dtypes.add(tensor.dtype)
    return max(dtypes, key=lambda d: torch.finfo(d).eps) if dtypes else None


def _check_finite(call: LayerCall, grad: Tensor) -> None:
    if not bool(torch.isfinite(grad.sum())):  # any NaN/inf makes the sum non-finite
        raise NonFiniteGradientError(
            f"the output gradient of module '{call.hooked.name}' ({type(call.hooked.module).__name__}) holds NaN "
            "or infinity; check the loss for overflow (lower the learning rate, use loss scaling or bf16)"
        )


def _mismatch_message(call: LayerCall, seen: int, expected: int) -> str:
    """A sample-count mismatch, with the shapes the module saw and the two causes it can have."""
    module = call.hooked.module
    shapes = ""
    if call.input_shape is not None:
        shapes = f": input {list(call.input_shape)}, output {list(call.output_shape or ())}"
    return (
        f"module '{call.hooked.name}' saw {seen} samples but there are {expected} losses ({type(module).__name__}"
        f"{shapes}): inrun reads the first dimension of a layer's input and output as the sample dimension. "
        "Either the module is computed once for the whole batch and broadcast over it in a way inrun cannot split "
        "per sample (a relative-position bias over [query, key] positions: freeze it with requires_grad_(False)), "
        "or the model merges or reorders samples before it (a model that reshapes [n, T, d] into [n*T, d] before a "
        "layer, a sequence-first layout [T, n, d]): keep the sample dimension first, or freeze the module's "
        "parameters."
    )


def _rng_state(args: tuple) -> tuple:
    """The random state before a call (CPU, and every CUDA device an input lives on), to replay its dropout."""
    cuda = sorted({a.device for a in args if isinstance(a, Tensor) and a.device.type == "cuda"}, key=str)
    return torch.get_rng_state(), [(d, torch.cuda.get_rng_state(d)) for d in cuda]


def _compute_dtype(tensor: Tensor) -> Tensor:
    """Upcast half precision (bf16/fp16 autocast) to float32 before any sums or Gram products."""
    if tensor.is_floating_point() and tensor.element_size() < 4:
        return tensor.float()
    return tensor


def _inside_backward() -> bool:
    """True while autograd runs a backward pass (activation checkpointing recomputes forwards there)."""
    return torch._C._current_graph_task_id() != -1


def _group_size(factors: dict[str, list[Factor]]) -> int:
    """The number of samples one micro-batch's factors cover (all must agree)."""
    sizes = {factor.n for uses in factors.values() for factor in uses}
    if len(sizes) > 1:
        raise BatchMismatchError(
            f"hooked layers saw different numbers of samples in one forward pass: {sorted(sizes)}; inrun needs "
            "every layer input to keep the sample dimension first"
        )
    return sizes.pop() if sizes else 0


def join_micro_batches(groups: list[dict[str, list[Factor]]], sizes: list[int]) -> dict[str, list[Factor]]:
    """Join micro-batches along the sample axis: use k of a parameter is use k of each micro-batch, stacked.

    A micro-batch with fewer uses of a parameter gets zero factors; sequences of different lengths are padded with
    zero positions (which contribute nothing).
    """
    if len(groups) <= 1:
        return groups[0] if groups else {}
    names = list(dict.fromkeys(name for group in groups for name in group))
    joined: dict[str, list[Factor]] = {}
    for name in names:
        uses = max(len(group.get(name, [])) for group in groups)
        template = next(group[name][0] for group in groups if name in group)
        joined[name] = [
            concat_factors([
                group[name][k] if k < len(group.get(name, [])) else zero_factor(template, size)
                for group, size in zip(groups, sizes)
            ])
            for k in range(uses)
        ]
    return joined
