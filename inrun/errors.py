"""Errors inrun raises. Each says what is wrong and how to fix it."""


class InRunError(Exception):
    """Base class of inrun's errors."""


class UnsupportedLayerError(InRunError, TypeError):
    """A trainable parameter lives in a module inrun cannot attribute per sample exactly."""


class NonFiniteGradientError(InRunError, FloatingPointError):
    """A layer's output gradient holds NaN or infinity."""


class BatchMismatchError(InRunError, ValueError):
    """Losses, layer inputs or validation data disagree in shape or number of samples."""


class LossShapeError(InRunError, ValueError):
    """A loss function returned something other than one loss per sample."""
