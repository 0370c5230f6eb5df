"""inrun: value training data while the model trains.

This module is the thin front end: every public name below is imported from the subpackage that owns it on first
use, so ``import inrun`` is cheap and reading a store (``inrun.open_run``) never imports torch. The subpackages follow
the data's way through the system, each layer importing only the ones below it:

* :mod:`inrun.engine`: exact per-sample gradient algebra captured through hooks (``grad_dots``, ``grad_norms``);
* :mod:`inrun.store`: the crash-safe HDF5 store and its reader (``open_run``); no torch;
* :mod:`inrun.valuation`: update rules, the validation utility, In-Run Data Shapley per step, ``InRunRecorder``;
* :mod:`inrun.posthoc`: data value embeddings, post-hoc values for later test points, baselines;
* :mod:`inrun.cli`: the ``inrun`` console command (``report``, ``export``);
* :mod:`inrun.callbacks`: Lightning, DeepSpeed and W&B integrations (source in the top-level ``callbacks/``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from inrun.errors import (
    BatchMismatchError,
    InRunError,
    InvalidArgumentError,
    LossShapeError,
    NonFiniteGradientError,
    UnsupportedLayerError,
    UnsupportedOptimizerError,
)
from inrun.version import __version__

#: public name -> the module that defines it
_EXPORTS = {
    "CapturedBatch": "inrun.engine.captured",
    "Coverage": "inrun.engine.capture",
    "GradientCapture": "inrun.engine.capture",
    "capture_batch": "inrun.engine.products",
    "grad_dots": "inrun.engine.products",
    "grad_norms": "inrun.engine.products",
    "check_model": "inrun.engine.checks",
    "ModelCheck": "inrun.engine.checks",
    "ParameterCheck": "inrun.engine.checks",
    "ExactnessError": "inrun.errors",
    "SampleMixingError": "inrun.errors",
    "register_layer": "inrun.engine.layers",
    "supported_layer_names": "inrun.engine.layers",
    "IncompatibleStoreError": "inrun.store.schema",
    "StoreError": "inrun.store.schema",
    "StoreIOError": "inrun.store.schema",
    "RunWriter": "inrun.store.writer",
    "repack": "inrun.store.compression",
    "PhaseValues": "inrun.store.reader",
    "Run": "inrun.store.reader",
    "open_run": "inrun.store.reader",
    "InRunRecorder": "inrun.valuation.recorder",
}
#: attribute -> module: the subpackages, and the short names the README used before the layout by concern
_MODULES = {
    "engine": "inrun.engine",
    "store": "inrun.store",
    "valuation": "inrun.valuation",
    "posthoc": "inrun.posthoc",
    "cli": "inrun.cli",
    "callbacks": "inrun.callbacks",
    "errors": "inrun.errors",
    "embeddings": "inrun.posthoc",
    "baselines": "inrun.posthoc.baselines",
}

__all__ = [
    "__version__",
    "BatchMismatchError",
    "InRunError",
    "InvalidArgumentError",
    "LossShapeError",
    "NonFiniteGradientError",
    "UnsupportedLayerError",
    "UnsupportedOptimizerError",
    *_EXPORTS,
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    else:
        raise AttributeError(f"module 'inrun' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_MODULES))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    # ruff: noqa: F401
    from inrun.engine.capture import Coverage, GradientCapture
    from inrun.engine.captured import CapturedBatch
    from inrun.engine.checks import ModelCheck, ParameterCheck, check_model
    from inrun.engine.layers import register_layer, supported_layer_names
    from inrun.engine.products import capture_batch, grad_dots, grad_norms
    from inrun.errors import ExactnessError, SampleMixingError
    from inrun.store.compression import repack
    from inrun.store.reader import PhaseValues, Run, open_run
    from inrun.store.schema import IncompatibleStoreError, StoreError, StoreIOError
    from inrun.store.writer import RunWriter
    from inrun.valuation.recorder import InRunRecorder
