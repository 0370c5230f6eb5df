"""Checks of everything a user passes to the recorder and its integrations, before any training step.

Each check raises :class:`~inrun.errors.InvalidArgumentError` with a message that names the argument, what was given
and the fix. The model-free checks (:func:`check_recorder_arguments`) run in the constructors of
``InRunRecorder``, ``InRunCallback`` and ``DeepSpeedInRun`` in milliseconds; what needs the model (embedding
parameter names, the validation data through the loss function, the optimizer) is checked as soon as the model or
optimizer is known, still before the first optimizer step and before the store is created.

Per-batch fields (sample ids, source labels) are checked as each micro-batch begins, before its forward pass:
:func:`sample_ids_from` and :func:`source_labels_from`. Sample ids are dataset indices: integers with
``0 <= id < 2**63`` (the store keeps them as int64; ids above ``2**53`` are exact too, nothing goes through float).
"""

from __future__ import annotations

import math
import numbers
import os
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from inrun.engine.projection import ProjectionSettings
from inrun.errors import BatchMismatchError, InvalidArgumentError
from inrun.valuation.update_rules import check_rule_name

SHAPLEY_ORDERS = {None: 0, "first": 1, "second": 2}
PROJECTION_KINDS = ("gaussian", "orthogonal")
EMBEDDING_DTYPES = ("float32", "float16")
INT64_MAX = 2**63 - 1


def _shown(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def positive_int(name: str, value: Any, *, optional: bool = False, fix: str = "") -> int | None:
    """``value`` as an int >= 1 (None allowed when ``optional``); else an error naming ``name``."""
    if value is None and optional:
        return None
    if not _is_int(value) or value < 1:
        allowed = "a positive integer" + (" or None" if optional else "")
        raise InvalidArgumentError(f"{name} must be {allowed}, got {_shown(value)}" + (f"; {fix}" if fix else ""))
    return int(value)


def shapley_order(shapley: Any) -> int:
    """0, 1 or 2 for ``shapley`` None, "first" or "second"."""
    if isinstance(shapley, str) or shapley is None:
        if shapley in SHAPLEY_ORDERS:
            return SHAPLEY_ORDERS[shapley]
    raise InvalidArgumentError(
        f"shapley must be 'first', 'second' or None (no values: embeddings only, or nothing), got {_shown(shapley)}"
    )


def embedding_settings(embeddings: Any) -> ProjectionSettings | None:
    """The projection settings ``embeddings`` asks for (None: no embeddings), every field checked."""
    if embeddings is None or embeddings is False:
        return None
    if embeddings is True:
        return ProjectionSettings()
    known = [f.name for f in fields(ProjectionSettings)]
    if isinstance(embeddings, ProjectionSettings):
        settings = embeddings
    elif isinstance(embeddings, Mapping):
        unknown = [key for key in embeddings if key not in known]
        if unknown:
            raise InvalidArgumentError(
                f"embeddings has unknown key(s) {unknown}; the projection settings are {known}"
            )
        values = dict(embeddings)
        parameters = values.get("parameters")
        if isinstance(parameters, str):
            raise InvalidArgumentError(
                f"embeddings['parameters'] must be a list of parameter names, got the string {parameters!r}; "
                f"write ['{parameters}']"
            )
        if parameters is not None:
            try:
                values["parameters"] = tuple(parameters)
            except TypeError:
                raise InvalidArgumentError(
                    f"embeddings['parameters'] must be a list of parameter names or None, got {_shown(parameters)}"
                ) from None
        settings = ProjectionSettings(**values)
    else:
        raise InvalidArgumentError(
            f"embeddings must be True/False, a dict of projection settings ({', '.join(known)}) or a "
            f"ProjectionSettings, got {_shown(embeddings)}"
        )
    for name in ("k_rows", "k_cols"):
        positive_int(f"embeddings['{name}']", getattr(settings, name), fix="the projected size per layer side")
    positive_int("embeddings['every']", settings.every, fix="every=1 records every step, every=k every k-th step")
    if settings.kind not in PROJECTION_KINDS:
        raise InvalidArgumentError(f"embeddings['kind'] must be one of {PROJECTION_KINDS}, got {_shown(settings.kind)}")
    if settings.dtype not in EMBEDDING_DTYPES:
        raise InvalidArgumentError(f"embeddings['dtype'] must be 'float32' or 'float16', got {_shown(settings.dtype)}")
    for name, fix in (("flat_k", "flat parameters with more entries are projected to it; None keeps k_rows*k_cols"),
                      ("planned_steps", "the optimizer steps the run will take, for the size statement; or None")):
        if getattr(settings, name) is not None:
            positive_int(f"embeddings['{name}']", getattr(settings, name), fix=fix)
    if not isinstance(settings.check_disk, bool):
        raise InvalidArgumentError(f"embeddings['check_disk'] must be True or False, got {_shown(settings.check_disk)}")
    if not _is_int(settings.seed) or settings.seed < 0:
        raise InvalidArgumentError(f"embeddings['seed'] must be an integer >= 0, got {_shown(settings.seed)}")
    if settings.parameters is not None:
        if not settings.parameters or not all(isinstance(p, str) for p in settings.parameters):
            raise InvalidArgumentError(
                f"embeddings['parameters'] must be a non-empty list of parameter names (or None: every attributed "
                f"parameter), got {_shown(list(settings.parameters))}"
            )
    return settings


def check_embedding_parameters(settings: ProjectionSettings | None, attributed: Mapping[str, Any]) -> None:
    """Every name in ``embeddings['parameters']`` must be an attributed parameter of the model."""
    if settings is None or settings.parameters is None:
        return
    missing = [name for name in settings.parameters if name not in attributed]
    if missing:
        names = list(attributed)
        shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
        raise InvalidArgumentError(
            f"embeddings['parameters'] names {missing}, which the model has no attributed parameter of; "
            f"use names from model.named_parameters(): {shown}"
        )


def check_store_path(path: str | Path) -> Path:
    """Fail now if the store at ``path`` could not be created: its folder must exist or be creatable, and be
    writable. Nothing is created (a probe file is written in the nearest existing folder and removed at once)."""
    if not isinstance(path, (str, os.PathLike)) or str(path) == "":
        raise InvalidArgumentError(f"path must be a file name such as 'runs/run.h5', got {_shown(path)}")
    path = Path(path)
    if path.is_dir():
        raise InvalidArgumentError(f"path {str(path)!r} is a folder; give the store's file name, e.g. {str(path / 'run.h5')!r}")
    folder = path.parent.absolute()
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise InvalidArgumentError(
            f"cannot create the store {str(path)!r}: {str(existing)!r} is a file, not a folder; choose another path"
        )
    try:
        handle, probe = tempfile.mkstemp(prefix=".inrun-write-test-", dir=existing)
    except OSError as error:
        raise InvalidArgumentError(
            f"cannot create the store {str(path)!r}: the folder {str(existing)!r} is not writable "
            f"({error.strerror or error}); choose a writable path"
        ) from None
    os.close(handle)
    os.unlink(probe)
    return path


def _flag(name: str, value: Any) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidArgumentError(f"{name} must be True or False, got {_shown(value)}")


def check_source_names(source_names: Any) -> list[str] | None:
    if source_names is None:
        return None
    if isinstance(source_names, (str, bytes)) or not isinstance(source_names, (list, tuple)):
        raise InvalidArgumentError(
            f"source_names must be a list of names (source label k is named source_names[k]), got "
            f"{_shown(source_names)}" + (f"; write [{source_names!r}]" if isinstance(source_names, str) else "")
        )
    if not source_names or not all(isinstance(name, str) and name for name in source_names):
        raise InvalidArgumentError(f"source_names must be a non-empty list of non-empty strings, got {_shown(source_names)}")
    if len(set(source_names)) != len(source_names):
        raise InvalidArgumentError(f"source_names holds duplicates: {_shown(source_names)}; each source needs its own name")
    return list(source_names)


def check_recorder_arguments(
    *,
    path: Any,
    val_data: Any,
    loss_fn: Any,
    shapley: Any,
    embeddings: Any,
    per_val_point: Any = False,
    index_key: Any = "index",
    index_fn: Any = None,
    source_key: Any = "source",
    source_names: Any = None,
    record_norms: Any = False,
    allow_unsupported: Any = False,
    overwrite: Any = False,
    flush_every: Any = 100,
    checkpoint_every: Any = None,
    update_rule: Any = None,
    loss_fn_optional: bool = False,
) -> tuple[int, ProjectionSettings | None]:
    """Check every argument that needs no model; return the Shapley order and the projection settings.

    ``val_data`` is checked for presence only (its batches are checked by
    :func:`inrun.valuation.validation.validation_batches`). ``loss_fn_optional``: the Lightning callback may take
    the module's ``per_sample_loss`` instead.
    """
    order = shapley_order(shapley)
    settings = embedding_settings(embeddings)
    if val_data is None and order > 0:
        raise InvalidArgumentError(
            f"shapley={shapley!r} needs val_data (the validation batch, a list of batches or a loader: the values "
            "are reductions of its loss); pass val_data=..., or shapley=None with embeddings=True to record "
            "projected gradients only (test points chosen after training)"
        )
    if loss_fn is None and not loss_fn_optional or loss_fn is not None and not callable(loss_fn):
        raise InvalidArgumentError(
            f"loss_fn must be a function loss_fn(model, batch) -> Tensor[n] (one loss per sample), got {_shown(loss_fn)}"
        )
    for name, value in (("per_val_point", per_val_point), ("record_norms", record_norms),
                        ("allow_unsupported", allow_unsupported), ("overwrite", overwrite)):
        _flag(name, value)
    if per_val_point and order == 0:
        raise InvalidArgumentError("per_val_point=True records values per validation point, which shapley=None does "
                                   "not compute; pass shapley='first' or 'second', or per_val_point=False")
    for name, value in (("index_key", index_key), ("source_key", source_key)):
        if not isinstance(value, str) or not value:
            raise InvalidArgumentError(f"{name} must be the (string) key of a dict batch, got {_shown(value)}")
    if index_fn is not None and not callable(index_fn):
        raise InvalidArgumentError(
            f"index_fn must be a function index_fn(batch) -> LongTensor[n] of dataset indices, got {_shown(index_fn)}"
        )
    check_source_names(source_names)
    positive_int("flush_every", flush_every, fix="the number of steps buffered between commits (default 100)")
    positive_int("checkpoint_every", checkpoint_every, optional=True,
                 fix="save the model every k steps with checkpoint_every=k, or pass None for no checkpoints")
    check_rule_name(update_rule)
    check_store_path(path)
    return order, settings


def check_distribution(rank: Any, world_size: Any, gradient_divisor: Any, run_id: Any, extra_config: Any) -> None:
    """The recorder's process-related arguments (set by the integrations)."""
    positive_int("world_size", world_size)
    if not _is_int(rank) or not 0 <= rank < world_size:
        raise InvalidArgumentError(f"rank must be an integer in [0, world_size={world_size}), got {_shown(rank)}")
    if isinstance(gradient_divisor, bool) or not isinstance(gradient_divisor, numbers.Real) or not (
            math.isfinite(gradient_divisor) and gradient_divisor > 0):
        raise InvalidArgumentError(f"gradient_divisor must be a finite number > 0, got {_shown(gradient_divisor)}")
    if run_id is not None and (not isinstance(run_id, str) or not run_id):
        raise InvalidArgumentError(f"run_id must be a non-empty string or None, got {_shown(run_id)}")
    if extra_config is not None and not isinstance(extra_config, Mapping):
        raise InvalidArgumentError(f"extra_config must be a dict or None, got {_shown(extra_config)}")


# -- per micro-batch -------------------------------------------------------------------------------------------------
def _integer_tensor(value: Any, what: str, fix: str) -> Tensor:
    """``value`` (a tensor, array, sequence or int) as an int64 tensor, refusing anything that is not integral."""
    if isinstance(value, Tensor):
        if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            raise InvalidArgumentError(f"{what} must be integers, got a {value.dtype} tensor {_shown(value)}; {fix}")
        if value.device.type == "meta":
            raise InvalidArgumentError(f"{what} is a tensor on the 'meta' device (no values); {fix}")
        if value.dtype == getattr(torch, "uint64", None):  # above 2**63 - 1 it would wrap to negative ids
            return _integer_tensor(value.detach().cpu().numpy(), what, fix)
        return value.detach().reshape(-1).to("cpu", torch.int64)
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "u" and value.size and int(value.max()) > INT64_MAX:
            raise InvalidArgumentError(f"{what} holds {int(value.max())}, above the int64 range of the store; {fix}")
        if value.dtype.kind not in "iu":
            raise InvalidArgumentError(f"{what} must be integers, got a numpy {value.dtype} array {_shown(value)}; {fix}")
        return torch.from_numpy(value.reshape(-1).astype(np.int64))
    if _is_int(value):
        value = [value]
    if isinstance(value, (list, tuple, range)):
        bad = [v for v in value if not _is_int(v)]
        if bad:
            raise InvalidArgumentError(
                f"{what} must be integers, got {type(bad[0]).__name__} {_shown(bad[0])} (in {_shown(value)}); {fix}"
            )
        big = [int(v) for v in value if not -INT64_MAX - 1 <= int(v) <= INT64_MAX]
        if big:
            raise InvalidArgumentError(f"{what} holds {big[0]}, outside the int64 range of the store; {fix}")
        return torch.tensor([int(v) for v in value], dtype=torch.int64)
    raise InvalidArgumentError(f"{what} must be an integer tensor or a sequence of integers, got {_shown(value)}; {fix}")


def sample_ids_from(value: Any, where: str) -> Tensor:
    """The dataset indices of a micro-batch's samples as an int64 tensor; ``where`` says where they came from."""
    fix = "give each sample's dataset index as a non-negative integer (e.g. a LongTensor of indices)"
    ids = _integer_tensor(value, f"the sample indices ({where})", fix)
    negative = ids < 0
    if bool(negative.any()):
        shown = ids[negative][:5].tolist()
        raise InvalidArgumentError(f"the sample indices ({where}) must be >= 0, got {shown}; {fix}")
    return ids


def source_labels_from(value: Any, num_samples: int, source_key: str, source_names: list[str] | None) -> Tensor:
    """A micro-batch's source labels as an int64 tensor, one per sample, within ``source_names`` when given."""
    where = f"batch['{source_key}']"
    fix = ("give each sample's source as an integer k naming source_names[k]" if source_names is not None
           else "give each sample's source as an integer >= 0 (and pass source_names=[...] to name them)")
    labels = _integer_tensor(value, f"the source labels ({where})", fix)
    if labels.numel() != num_samples:
        raise BatchMismatchError(
            f"the batch carries {labels.numel()} source labels ({where}) for {num_samples} samples; give one label "
            "per sample"
        )
    high = len(source_names) if source_names is not None else 2**31
    outside = (labels < 0) | (labels >= high)
    if bool(outside.any()):
        shown = labels[outside][:5].tolist()
        within = f"0..{high - 1} (source_names has {high})" if source_names is not None else ">= 0"
        raise InvalidArgumentError(f"the source labels ({where}) must be in {within}, got {shown}; {fix}")
    return labels


def leading_sizes(batch: Any, skip: tuple[str, ...] = ()) -> set[int]:
    """The leading dimensions of the tensors in a (nested) batch, leaving out the top-level keys in ``skip``."""
    sizes: set[int] = set()

    def visit(value: Any) -> None:
        if isinstance(value, Tensor):
            if value.dim() > 0:
                sizes.add(int(value.shape[0]))
        elif isinstance(value, Mapping):
            for item in value.values():
                visit(item)
        elif isinstance(value, (tuple, list)):
            for item in value:
                visit(item)

    if isinstance(batch, Mapping):
        for key, value in batch.items():
            if key not in skip:
                visit(value)
    else:
        visit(batch)
    return sizes
