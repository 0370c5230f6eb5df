"""Hugging Face's GPT-2 ``Conv1D``: a linear layer whose weight is stored ``[d_in, d_out]``, ``s = a W + b``.

Registered by qualified name, so transformers is never imported by inrun.
"""

from inrun.engine.layers.linear import LinearHandler
from inrun.engine.layers.registry import register_layer

register_layer("transformers.pytorch_utils.Conv1D", LinearHandler(input_major=True))
