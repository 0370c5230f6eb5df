"""Framework integrations for inrun (installed as ``inrun.callbacks``; source in the top-level ``callbacks/``)."""

from inrun.callbacks.lightning import InRunCallback

__all__ = ["InRunCallback"]
