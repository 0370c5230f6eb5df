"""Framework integrations for inrun (installed as ``inrun.callbacks``; source in the top-level ``callbacks/``).

The names load on first use (PEP 562), so that a DeepSpeed loop does not import Lightning (~7 s on a busy 2-core
machine) and a Lightning fit does not import DeepSpeed.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "DeepSpeedAdapter": "inrun.callbacks.deepspeed_engine",
    "DeepSpeedInRun": "inrun.callbacks.deepspeed",
    "DeepSpeedMismatchError": "inrun.callbacks.deepspeed",
    "InRunCallback": "inrun.callbacks.lightning",
    "WandbInfluenceLogger": "inrun.callbacks.wandb_logging",
    "log_posthoc": "inrun.callbacks.wandb_logging",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'inrun.callbacks' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
