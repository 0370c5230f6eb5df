"""The engine: exact per-sample gradient algebra, captured through hooks, without materialising per-sample gradients.

Data flows bottom to top:

* :mod:`~inrun.engine.factors`: the two forms a sample's gradient contribution takes (an outer-product sum over
  positions, or a small materialised vector);
* :mod:`~inrun.engine.layers`: one handler per layer type, behind a registry, that turns a layer call's input and
  output gradient into factors;
* :mod:`~inrun.engine.algebra`: exact products between factors (Gram route or materialising, chosen by cost);
* :mod:`~inrun.engine.capture`: hooks that pair each layer call's input with its output gradient;
* :mod:`~inrun.engine.captured`: :class:`CapturedBatch`, every product of one captured batch;
* :mod:`~inrun.engine.products`: :func:`capture_batch`, :func:`grad_dots`, :func:`grad_norms`;
* :mod:`~inrun.engine.checks`: the self-checks (completeness, sample independence, per-sample spot check) and the
  public self-test :func:`check_model`;
* :mod:`~inrun.engine.projection`: seeded Kronecker projections of captured contributions (for embeddings).

Nothing here knows about optimizers, stores or frameworks.
"""

from inrun.engine.capture import Coverage, GradientCapture
from inrun.engine.captured import CapturedBatch, LossFn
from inrun.engine.checks import ModelCheck, ParameterCheck, check_model
from inrun.engine.layers import register_layer, supported_layer_names
from inrun.engine.products import capture_batch, grad_dots, grad_norms, per_sample_losses

__all__ = [
    "CapturedBatch",
    "Coverage",
    "GradientCapture",
    "LossFn",
    "ModelCheck",
    "ParameterCheck",
    "check_model",
    "capture_batch",
    "grad_dots",
    "grad_norms",
    "per_sample_losses",
    "register_layer",
    "supported_layer_names",
]
