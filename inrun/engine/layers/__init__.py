"""Per-layer handlers, one file per layer type, all registered on import."""

from inrun.engine.layers import conv, conv1d_hf, embedding, linear, normalization  # noqa: F401  (registration)
from inrun.engine.layers.registry import LayerHandler, handler_for, register_layer, supported_layer_names

__all__ = ["LayerHandler", "handler_for", "register_layer", "supported_layer_names"]
