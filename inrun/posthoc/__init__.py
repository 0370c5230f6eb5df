"""After training: data value embeddings, post-hoc In-Run Shapley for new test points, and baselines.

* :mod:`~inrun.posthoc.record`: a run's recorded projection and projected gradients, and projected test gradients;
* :mod:`~inrun.posthoc.build`: the streaming, resumable backward recursion that builds the embeddings
  (``python -m inrun.posthoc.build RUN``);
* :mod:`~inrun.posthoc.embeddings`: queries on them (trajectory-specific leave-one-out, per-step influence);
* :mod:`~inrun.posthoc.values`: post-hoc first/second-order In-Run Shapley from checkpoints;
* :mod:`~inrun.posthoc.baselines`: TracIn, LoGra-style influence and DataInf from the same record.

The reader (:class:`inrun.store.Run`) offers ``trajectory_loo`` and ``posthoc_values`` as methods; it reaches this
package through one late import, so the store never imports it at load time.
"""

from inrun.posthoc.build import build_embeddings, default_embeddings_path
from inrun.posthoc.embeddings import Embeddings, open_embeddings, step_influence, trajectory_loo
from inrun.posthoc.record import (
    EmbeddingsError,
    has_embeddings,
    load_projector,
    project_test_gradients,
    read_projection,
)
from inrun.posthoc.values import CheckpointError, PosthocValues, posthoc_values

__all__ = [
    "CheckpointError",
    "Embeddings",
    "EmbeddingsError",
    "PosthocValues",
    "build_embeddings",
    "default_embeddings_path",
    "has_embeddings",
    "load_projector",
    "open_embeddings",
    "posthoc_values",
    "project_test_gradients",
    "read_projection",
    "step_influence",
    "trajectory_loo",
]
