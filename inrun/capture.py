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

from inrun.errors import BatchMismatchError, NonFiniteGradientError, UnsupportedLayerError
from inrun.factors import Factor
from inrun.layers import handler_for, supported_layer_names
from inrun.layers.registry import LayerHandler


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
            "supported one, register a handler (inrun.layers.register_layer), or pass allow_unsupported=True to "
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
    recorded calls into a :class:`~inrun.persample.CapturedBatch` of per-sample gradient factors and clears them.
    """

    def __init__(self, model: nn.Module, *, allow_unsupported: bool = False):
        self.model = model
        self.hooked, self.parameters, self.coverage = _plan(model, allow_unsupported)
        self.enabled = True
        #: samples in the batch being run, when known; lets a call with a batch dimension of 1 be expanded
        self.batch_size: int | None = None
        self._calls: list[LayerCall] = []
        self._handles: list = []

    # -- hooks -------------------------------------------------------------------------------------------------
    def attach(self) -> "GradientCapture":
        if not self._handles:
            for entry in self.hooked:
                self._handles.append(entry.module.register_forward_hook(self._forward_hook(entry)))
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
        def hook(module: nn.Module, args: tuple, output) -> None:
            if not self.enabled or not torch.is_grad_enabled():
                return
            if not isinstance(output, Tensor) or not output.requires_grad:
                return
            problem = entry.handler.check(module)
            if problem is not None:
                raise UnsupportedLayerError(f"'{entry.name}' ({type(module).__name__}): {problem}")
            inputs = args[0].detach()
            expand_to = self.batch_size
            broadcast = expand_to is not None and expand_to > 1 and output.dim() > 0 and output.shape[0] == 1
            if broadcast:
                inputs = inputs.expand(expand_to, *inputs.shape[1:])
                output = output.expand(expand_to, *output.shape[1:])

            def on_grad(grad: Tensor) -> None:
                self._calls.append(LayerCall(entry, inputs, grad.detach()))

            output.register_hook(on_grad)
            return output if broadcast else None

        return hook

    # -- results -----------------------------------------------------------------------------------------------
    @property
    def pending_calls(self) -> int:
        return len(self._calls)

    def discard(self) -> None:
        """Drop recorded calls (for example after a backward pass that should not be attributed)."""
        self._calls.clear()

    def collect(self, num_samples: int | None = None, *, grad_scale: float = 1.0):
        """Turn the calls recorded since the last collect into per-sample factors.

        ``grad_scale`` is divided out of every output gradient (the loss scale of fp16 mixed precision).
        ``num_samples``, when given, is checked against every layer's sample dimension.
        """
        from inrun.persample import CapturedBatch

        calls, self._calls = self._calls, []
        factors: dict[str, list[Factor]] = {}
        sizes: set[int] = set()
        for call in calls:
            for local, factor in self._factors_of(call, grad_scale).items():
                name = call.hooked.parameters.get(local)
                if name is None:  # frozen or unsupported parameter of a hooked module
                    continue
                if num_samples is not None and factor.n != num_samples:
                    raise BatchMismatchError(
                        f"module '{call.hooked.name}' saw {factor.n} samples but there are {num_samples} losses; "
                        "inrun needs every layer input to keep the sample dimension first (a model that reshapes "
                        "[n, T, d] into [n*T, d] before a layer cannot be attributed per sample)"
                    )
                sizes.add(factor.n)
                factors.setdefault(name, []).append(factor)
        if len(sizes) > 1:
            raise BatchMismatchError(f"hooked layers saw different numbers of samples: {sorted(sizes)}")
        n = num_samples if num_samples is not None else (sizes.pop() if sizes else 0)
        shapes = {name: self.parameters[name].shape for name in self.parameters}
        return CapturedBatch(factors, n, shapes)

    @staticmethod
    def _factors_of(call: LayerCall, grad_scale: float) -> dict[str, Factor]:
        grad = call.grad_output
        if not bool(torch.isfinite(grad).all()):
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
