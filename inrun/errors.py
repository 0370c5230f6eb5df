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


class InvalidArgumentError(InRunError, ValueError, TypeError):
    """An argument (or a batch's index or source field) inrun cannot use: wrong type, out of range, or inconsistent.

    Raised before any training step; the message names the argument, what was given and the fix. A ``ValueError``
    and a ``TypeError`` both, so code that catches either keeps working.
    """


class UnsupportedOptimizerError(InvalidArgumentError):
    """An optimizer whose update rule inrun does not know (values would be wrong); name a rule with ``update_rule``."""


class ExactnessError(InRunError, RuntimeError):
    """A self-check found captured per-sample gradients that disagree with autograd (a parameter used outside its
    module's forward, a lookup broadcast over the batch that looks per-sample, ...). The message names the
    parameter, the likely cause and the fix; values computed anyway would be silently wrong."""


class SampleMixingError(InRunError, ValueError):
    """The model couples the samples of a batch (BatchNorm in training mode, an in-batch loss): changing one sample
    moved another sample's loss, so no sample has a gradient of its own. Refused whatever ``allow_unsupported`` says."""
