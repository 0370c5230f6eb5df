"""Per-layer handlers, one file per layer type, all registered on import.

Modules with no dedicated handler go through the generic :mod:`~inrun.engine.layers.fallback` (torch.func).
"""

from inrun.engine.layers import conv, conv1d_hf, embedding, fallback, linear, normalization  # noqa: F401  (registration)
from inrun.engine.layers.fallback import FallbackHandler
from inrun.engine.layers.registry import LayerHandler, handler_for, register_layer, supported_layer_names

__all__ = ["FallbackHandler", "LayerHandler", "handler_for", "register_layer", "supported_layer_names"]
