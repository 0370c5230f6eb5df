"""The registry of layer handlers: which module types inrun attributes exactly, and how.

A handler turns one call of a module -- the input it saw and the gradient of its output -- into per-sample gradient
factors (:mod:`inrun.engine.factors`) for each of the module's own parameters. Supporting a new layer type is one file: write
a :class:`LayerHandler` and call :func:`register_layer`. Lookup is by exact type (a subclass may change ``forward``),
or by qualified class name for optional dependencies such as Hugging Face's ``Conv1D``.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor, nn

from inrun.engine.factors import Factor


class LayerHandler(Protocol):
    """How to attribute one module type's parameters per sample."""

    #: local names of the parameters this handler attributes (those the module has and that are not None)
    parameter_names: tuple[str, ...]

    def check(self, module: nn.Module) -> str | None:
        """A message saying why this module cannot be attributed exactly right now, or None when it can."""

    def factors(self, module: nn.Module, inputs: Tensor, grad_output: Tensor) -> dict[str, Factor]:
        """Per-sample factors for each own trainable parameter, from one call's input and output gradient."""


_BY_TYPE: dict[type, LayerHandler] = {}
_BY_NAME: dict[str, LayerHandler] = {}


def register_layer(module_type: type | str, handler: LayerHandler) -> None:
    """Register ``handler`` for a module type (or its qualified name ``"package.module.Class"``)."""
    if isinstance(module_type, str):
        _BY_NAME[module_type] = handler
    else:
        _BY_TYPE[module_type] = handler


def handler_for(module: nn.Module) -> LayerHandler | None:
    """The handler for this module's exact type, or None if inrun cannot attribute it."""
    cls = type(module)
    found = _BY_TYPE.get(cls)
    if found is None:
        found = _BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
    return found


def supported_layer_names() -> list[str]:
    return sorted({t.__name__ for t in _BY_TYPE} | {name.rsplit(".", 1)[-1] for name in _BY_NAME})


def sample_major(tensor: Tensor, features: int | None = None) -> Tensor:
    """Reshape ``[n, ..., d]`` to ``[n, T, d]`` (``T`` = all positions between batch and feature dims)."""
    if tensor.dim() < 2:
        raise ValueError(f"expected a batched input with a sample dimension first, got shape {tuple(tensor.shape)}")
    d = tensor.shape[-1] if features is None else features
    return tensor.reshape(tensor.shape[0], -1, d)

