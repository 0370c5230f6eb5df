"""Framework integrations for inrun (installed as ``inrun.callbacks``; source in the top-level ``callbacks/``)."""

from inrun.callbacks.deepspeed import DeepSpeedInRun, DeepSpeedMismatchError
from inrun.callbacks.deepspeed_engine import DeepSpeedAdapter
from inrun.callbacks.lightning import InRunCallback
from inrun.callbacks.wandb_logging import WandbInfluenceLogger, log_posthoc

__all__ = [
    "DeepSpeedAdapter",
    "DeepSpeedInRun",
    "DeepSpeedMismatchError",
    "InRunCallback",
    "WandbInfluenceLogger",
    "log_posthoc",
]
