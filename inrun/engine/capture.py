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

from inrun.engine.factors import Factor, concat_factors, zero_factor
from inrun.engine.layers import handler_for, supported_layer_names
from inrun.engine.layers.registry import LayerHandler
from inrun.errors import BatchMismatchError, NonFiniteGradientError, UnsupportedLayerError


@dataclass
class Coverage:
    """Which trainable parameters inrun attributes, and which it cannot (with the reason)."""

    covered_numel: int
    total_numel: int
    unsupported: list[str] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        return self.covered_numel / self.total_numel if self.total_numel else 1.0

    def as_dict(self) -> dict:
        return {
            "covered_numel": self.covered_numel,
            "total_numel": self.total_numel,
            "fraction": self.fraction,
            "unsupported": list(self.unsupported),
        }


@dataclass
class HookedModule:
    name: str
    module: nn.Module
    handler: LayerHandler
    #: local parameter name -> canonical parameter name (the first name ``named_parameters`` gives it)
    parameters: dict[str, str]


@dataclass
class LayerCall:
    """One call of a hooked module whose output received a gradient."""

    hooked: HookedModule
    inputs: Tensor
    grad_output: Tensor
    micro_batch: int = 0


def _plan(model: nn.Module, allow_unsupported: bool) -> tuple[list[HookedModule], dict[str, nn.Parameter], Coverage]:
    names = {id(p): name for name, p in model.named_parameters()}
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    problems: list[str] = []
    unsupported_ids: set[int] = set()
    candidates: list[HookedModule] = []
    for module_name, module in model.named_modules():
        own = [(local, p) for local, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        label = f"'{module_name or '<root>'}' ({type(module).__name__})"
        handler = handler_for(module)
        reason = None
        if handler is None:
            reason = f"no inrun handler for {type(module).__name__} (supported: {', '.join(supported_layer_names())})"
        else:
            extra = [local for local, _ in own if local not in handler.parameter_names]
            reason = handler.check(module) or (f"unexpected own parameters {extra}" if extra else None)
        if reason is not None:
            problems.append(f"{label}: {reason}")
            unsupported_ids.update(id(p) for _, p in own)
            continue
        candidates.append(HookedModule(module_name, module, handler, {local: names[id(p)] for local, p in own}))
    hooked = []
    for entry in candidates:  # a parameter shared with an unsupported module is unsupported everywhere
        kept = {local: name for local, name in entry.parameters.items() if id(trainable[name]) not in unsupported_ids}
        if kept:
            hooked.append(HookedModule(entry.name, entry.module, entry.handler, kept))
    covered = {name: trainable[name] for entry in hooked for name in entry.parameters.values()}
    coverage = Coverage(
        covered_numel=sum(p.numel() for p in covered.values()),
        total_numel=sum(p.numel() for p in trainable.values()),
        unsupported=problems,
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

    def __init__(self, model: nn.Module, *, allow_unsupported: bool = False):
        self.model = model
        self.hooked, self.parameters, self.coverage = _plan(model, allow_unsupported)
        self.enabled = True
        self._batch_size: int | None = None
        self._micro_batch = 0
        self._gradient_arrived = False
        #: when True, the outputs of hooked calls are kept (see :meth:`take_outputs`)
        self.keep_outputs = False
        self._outputs: list[tuple[Tensor, int]] = []
        self._calls: list[LayerCall] = []
        self._handles: list = []

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
            expand_to = self.batch_size
            broadcast = expand_to is not None and expand_to > 1 and output.dim() > 0 and output.shape[0] == 1
            if broadcast:
                inputs = inputs.expand(expand_to, *inputs.shape[1:])
                output = output.expand(expand_to, *output.shape[1:])

            def on_grad(grad: Tensor) -> None:
                self._gradient_arrived = True
                self._calls.append(LayerCall(entry, inputs, grad.detach(), micro_batch))

            output.register_hook(on_grad)
            if self.keep_outputs and not _inside_backward():
                self._outputs.append((output, output._version))
            return output if broadcast else None

        return hook

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
        groups: dict[int, dict[str, list[Factor]]] = {}
        first_module: dict[int, str] = {}
        single = len({call.micro_batch for call in calls}) <= 1
        for call in calls:
            factors = groups.setdefault(call.micro_batch, {})
            first_module.setdefault(call.micro_batch, call.hooked.name)
            for local, factor in self._factors_of(call, grad_scale, check_finite).items():
                name = call.hooked.parameters.get(local)
                if name is None:  # a frozen or unsupported parameter of a hooked module
                    continue
                if single and num_samples is not None and factor.n != num_samples:
                    raise BatchMismatchError(
                        f"module '{call.hooked.name}' saw {factor.n} samples but there are {num_samples} losses; "
                        "inrun needs every layer input to keep the sample dimension first (a model that reshapes "
                        "[n, T, d] into [n*T, d] before a layer cannot be attributed per sample)"
                    )
                factors.setdefault(name, []).append(factor)
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
        return CapturedBatch(merged, num_samples if num_samples is not None else total, shapes)

    @staticmethod
    def _factors_of(call: LayerCall, grad_scale: float, check_finite: bool) -> dict[str, Factor]:
        grad = call.grad_output
        if check_finite and not bool(torch.isfinite(grad.sum())):  # any NaN/inf makes the sum non-finite
            raise NonFiniteGradientError(
                f"the output gradient of module '{call.hooked.name}' ({type(call.hooked.module).__name__}) holds NaN "
                "or infinity; check the loss for overflow (lower the learning rate, use loss scaling or bf16)"
            )
        grad = _compute_dtype(grad)
        if grad_scale != 1.0:
            grad = grad / grad_scale
        inputs = _compute_dtype(call.inputs)
        return call.hooked.handler.factors(call.hooked.module, inputs, grad)


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
