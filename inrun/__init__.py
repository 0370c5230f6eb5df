"""inrun: value training data while the model trains.

The engine (this package) is framework-free: per-layer per-sample gradient algebra (:mod:`inrun.factors`,
:mod:`inrun.algebra`, :mod:`inrun.layers`), capture through hooks (:mod:`inrun.capture`), and the public products
:func:`grad_dots` and :func:`grad_norms`. Framework integrations live in :mod:`inrun.callbacks`.
"""

__version__ = "0.1.0"

from inrun.capture import Coverage, GradientCapture
from inrun.errors import (
    BatchMismatchError,
    InRunError,
    LossShapeError,
    NonFiniteGradientError,
    UnsupportedLayerError,
)
from inrun.layers import register_layer, supported_layer_names
from inrun.reader import PhaseValues, Run, open_run
from inrun.recorder import InRunRecorder
from inrun.store import IncompatibleStoreError, RunWriter, StoreError, StoreIOError, repack
from inrun.persample import CapturedBatch, capture_batch, grad_dots, grad_norms

__all__ = [
    "__version__",
    "BatchMismatchError",
    "CapturedBatch",
    "Coverage",
    "GradientCapture",
    "InRunError",
    "InRunRecorder",
    "IncompatibleStoreError",
    "RunWriter",
    "StoreError",
    "StoreIOError",
    "repack",
    "PhaseValues",
    "Run",
    "LossShapeError",
    "NonFiniteGradientError",
    "UnsupportedLayerError",
    "capture_batch",
    "grad_dots",
    "grad_norms",
    "open_run",
    "register_layer",
    "supported_layer_names",
]
