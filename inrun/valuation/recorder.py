"""The in-run recorder: hooks a model, values every optimizer step, writes the store. Framework-free.

A plain PyTorch loop drives it directly::

    recorder = InRunRecorder(model, "runs/run.h5", val_data=val_batch, loss_fn=per_sample_loss)
    recorder.start()
    for batch in loader:
        recorder.begin_microbatch(batch)          # reads the samples' dataset ids
        loss = per_sample_loss(model, batch).mean()
        loss.backward()
        recorder.end_microbatch()                 # collects the per-sample factors of this backward
        recorder.before_optimizer_step(optimizer) # values the step (parameters still at theta_t)
        optimizer.step(); optimizer.zero_grad()
        recorder.note_train_loss(loss.item())
    recorder.close()                               # final validation loss, flush, close

Integrations (:mod:`inrun.callbacks`) call the same methods from their framework's hooks.

A step's row is written once the validation loss after the step is known (at the next step, or at ``close``), so that
each row carries its efficiency residual: the values of a step should sum to ``L_V(theta_t + Delta_0) - L_V(theta_{t+1})``
up to the Taylor error.
"""

from __future__ import annotations

import math
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from inrun.engine.capture import GradientCapture
from inrun.engine.checks import RecorderChecks
from inrun.engine.projection import EmbeddingSize, ProjectionSettings, Projector, embedding_size
from inrun.errors import BatchMismatchError, InRunError, InvalidArgumentError, NonFiniteGradientError
from inrun.store.compression import stale_repack
from inrun.store.faults import fault_point
from inrun.store.paths import checkpoint_folder, checkpoint_path, new_run_id, rank_path
from inrun.store.schema import DEFAULT_RECORD_COLUMNS, DEFAULT_STEP_COLUMNS, Column, StoreIOError
from inrun.store.writer import RunWriter
from inrun.valuation.arguments import (
    check_distribution,
    check_embedding_parameters,
    check_recorder_arguments,
    leading_sizes,
    sample_ids_from,
    source_labels_from,
)
from inrun.valuation.shapley import MicroBatch, StepValues, sample_ids_of, sample_sq_sums, sources_of, value_step
from inrun.valuation.update_rules import (
    DEFAULT_ADAM_VALUES,
    check_adam_values,
    clip_coefficient,
    resolve_rule,
    update_terms,
)
from inrun.valuation.validation import LossFn, ValidationSet
from inrun.version import __version__

STEP_COLUMNS = {
    **DEFAULT_STEP_COLUMNS,
    "val_loss_base": Column(np.float64),  # L_V(theta_t + Delta_0)
    "val_loss_after": Column(np.float64),  # L_V(theta_{t+1})
    "sum_value_1": Column(np.float64),
    "sum_value_2": Column(np.float64),
    "direction_norm_sq": Column(np.float64),  # |D * g_V|^2
    "checkpoint": Column(np.int8, fill=0),  # 1: the model at the start of this step is saved (checkpoint_path)
}

SHAPLEY_ORDERS = {None: 0, "first": 1, "second": 2}


def batch_field(batch: Any, key: str) -> Tensor | None:
    """``batch[key]`` as a 1-D tensor when the batch is a dict holding it, else None."""
    if isinstance(batch, dict) and key in batch:
        value = batch[key]
        return value.reshape(-1) if isinstance(value, Tensor) else torch.as_tensor(value).reshape(-1)
    return None


@dataclass
class PendingStep:
    """A valued step waiting for the validation loss after it."""

    step: int
    lr: float
    values: StepValues
    train_loss: float = math.nan

    def as_state(self) -> dict:
        """Plain tensors and numbers only, so checkpoints load with ``torch.load(weights_only=True)``."""
        values = {
            key: (torch.from_numpy(np.asarray(value)) if isinstance(value, np.ndarray) else value)
            for key, value in vars(self.values).items()
            if key != "extras"
        }
        values["extras"] = {key: torch.from_numpy(np.asarray(v)) for key, v in self.values.extras.items()}
        return {"step": self.step, "lr": self.lr, "train_loss": self.train_loss, "values": values}

    @classmethod
    def from_state(cls, state: dict) -> "PendingStep":
        values = {key: (v.numpy() if isinstance(v, Tensor) else v) for key, v in state["values"].items()}
        values["extras"] = {key: v.numpy() for key, v in values.get("extras", {}).items()}
        return cls(state["step"], state["lr"], StepValues(**values), state["train_loss"])


COMPRESSIONS = ("auto", "gzip", "lzf", None)


def check_compression(compression: Any) -> str | None:
    """``compression`` if it is one of ``COMPRESSIONS``, else an :class:`InvalidArgumentError` naming it."""
    if not any(compression is c or (isinstance(compression, str) and compression == c) for c in COMPRESSIONS):
        raise InvalidArgumentError(
            f"compression must be 'auto' (gzip, or none for runs recording embeddings), 'gzip', 'lzf' or None "
            f"(the store stays uncompressed when the run closes), not {compression!r}")
    return compression


class InRunRecorder:
    """Records In-Run Data Shapley values of every optimizer step into a run store (one file per rank)."""

    def __init__(
        self,
        model: nn.Module,
        path: str | Path,
        *,
        val_data: Any = None,
        loss_fn: LossFn,
        shapley: str | None = "first",
        embeddings: "bool | dict | ProjectionSettings" = False,
        per_val_point: bool = False,
        index_key: str = "index",
        index_fn: Callable[[Any], Tensor] | None = None,
        source_key: str = "source",
        source_names: list[str] | None = None,
        record_norms: bool = False,
        allow_unsupported: bool = False,
        overwrite: bool = False,
        flush_every: int = 100,
        rank: int = 0,
        world_size: int = 1,
        run_id: str | None = None,
        gradient_divisor: float = 1.0,
        checkpoint_every: int | None = None,
        extra_config: dict | None = None,
        update_rule: str | None = None,
        adam_values: str = DEFAULT_ADAM_VALUES,
        check: bool = True,
        check_every: int | None = None,
        compression: str | None = "auto",
    ):
        # every argument is checked here, before any training step and before anything is written
        #: how the store is compressed when the run closes ("auto": gzip, or none for a run recording embeddings)
        self.compression = check_compression(compression)
        #: how Adam-family steps are split into per-sample updates (update_rules.ADAM_VALUES, docs/adam-values.md)
        self.adam_values = check_adam_values(adam_values)
        if not isinstance(model, nn.Module):
            raise InvalidArgumentError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_distribution(rank, world_size, gradient_divisor, run_id, extra_config)
        self.order, self.embeddings = check_recorder_arguments(
            path=path, val_data=val_data, loss_fn=loss_fn, shapley=shapley,
            embeddings=embeddings, per_val_point=per_val_point, index_key=index_key, index_fn=index_fn,
            source_key=source_key, source_names=source_names, record_norms=record_norms,
            allow_unsupported=allow_unsupported, overwrite=overwrite, flush_every=flush_every,
            checkpoint_every=checkpoint_every, update_rule=update_rule,
        )
        self.model = model
        self.path = rank_path(path, rank, world_size)
        self.projector: Projector | None = None
        self.per_val_point = per_val_point
        self.index_key, self.index_fn, self.source_key = index_key, index_fn, source_key
        self.source_names = source_names
        self.record_norms = record_norms
        self.overwrite, self.flush_every = overwrite, flush_every
        self.rank, self.world_size = rank, world_size
        self.run_id = run_id or new_run_id()
        #: output gradients are divided by this (data-parallel averaging across ranks: the world size)
        self.gradient_divisor = gradient_divisor
        self.extra_config = dict(extra_config or {})
        #: the update rule named by the user (None: read from the optimizer; an unknown optimizer is an error)
        self.update_rule = update_rule
        #: save the model (parameters theta_t at the start of step t) every this many steps, and the final model
        self.checkpoint_every = checkpoint_every
        self.capture = GradientCapture(model, allow_unsupported=allow_unsupported)
        self.params = dict(self.capture.parameters)
        check_embedding_parameters(self.embeddings, self.params)
        #: None when no validation data were given (``shapley=None``: embeddings only, no validation pass at all)
        self.validation = ValidationSet(val_data, loss_fn, model, self.capture) if val_data is not None else None
        self.writer: RunWriter | None = None
        self.next_step = 0
        self.pending: PendingStep | None = None
        self._microbatches: list[MicroBatch] = []
        self._current: tuple[Tensor, Tensor | None] | None = None
        self._skip_reason: str | None = None
        self._train_losses: list[float] = []
        self._resume_state: dict | None = None
        #: steps skipped before the store could be opened (an empty first batch while recording embeddings: the
        #: projection layout comes from the first captured batch); written when it opens
        self._early_skips: list[tuple[int, float, float]] = []
        self._empty_microbatches = 0  # in the current step
        self._rule: str | None = None
        self.listeners: list[Callable[[dict, dict], None]] = []
        #: optimizer steps the run will take (an integration sets it from the trainer's max steps): the projected
        #: size of the embeddings; ``embeddings={'planned_steps': N}`` takes precedence
        self.planned_steps: int | None = None
        self.embedding_size: EmbeddingSize | None = None  # stated at the first step of a run recording embeddings
        self.clip_norm: float | None = None
        #: full parameter shapes by name, for engines that partition the model's own tensors (DeepSpeed ZeRO-3 leaves
        #: them ``[0]``-shaped outside its hooks); an integration sets it, None means ``param.shape``
        self.param_shapes: dict[str, torch.Size] | None = None
        #: the self-checks (inrun.engine.checks) at the first optimizer step, then every ``check_every`` steps;
        #: ``check=False`` turns them off (unsafe: a model inrun cannot attribute exactly then gives wrong values)
        self.checks = RecorderChecks(check, check_every)
        self._check_loss_fn = loss_fn

    # -- set-up ---------------------------------------------------------------------------------------------------
    def check_output_path(self, resuming: bool) -> None:
        """Fail now, before any training, if the store exists and neither overwriting nor resuming."""
        if self.path.exists() and not (self.overwrite or resuming):
            raise FileExistsError(
                f"{self.path} already exists; pass overwrite=True to replace it, resume from a checkpoint of that "
                "run to append to it, or choose another path"
            )

    def check_optimizer(self, optimizer: torch.optim.Optimizer) -> str:
        """The update rule the steps of ``optimizer`` will be valued with; an optimizer inrun does not know is an
        :class:`~inrun.errors.UnsupportedOptimizerError` (unless ``update_rule`` names a rule). Integrations call it
        before training; a plain loop may (otherwise it runs at the first ``before_optimizer_step``)."""
        return resolve_rule(optimizer, self.update_rule)

    def start(self, device: torch.device | None = None) -> None:
        """Attach hooks and check the validation data against the model (the store opens at the first step).

        Also refuses an existing store unless overwriting or resuming (``load_state_dict`` comes before ``start``).
        """
        if self.capture._handles:
            return
        self.check_output_path(resuming=self._resume_state is not None)
        if self.validation is not None:
            device = device or next(iter(self.params.values()), next(self.model.parameters(), None)).device
            self.validation.to(device)
        self.capture.attach()
        try:
            self.checks.on_start(self, self._check_loss_fn)
            self._check_validation()
        except BaseException:
            self.capture.detach()
            raise

    def _check_validation(self) -> None:
        """Run the validation data through the model once (loss and gradient): it must fit the loss function, hold
        at least one point and give a finite loss."""
        if self.validation is None:
            return
        try:
            loss, _ = self.validation.gradient(self.params)  # fails early on validation data that does not fit
        except ZeroDivisionError:
            raise InvalidArgumentError("val_data gives 0 validation losses (loss_fn returned an empty tensor for "
                                       "it); the validation utility is a mean over points: give at least one") from None
        except InRunError as error:
            if type(error) is not InRunError:  # a named problem (layer, shape, batch structure) stays as it is
                raise
            raise InvalidArgumentError(
                f"the validation loss at the initial parameters is not finite ({error}): check val_data and "
                "loss_fn on it (NaN inputs, labels out of range, log of 0); values need a finite validation loss"
            ) from error
        if not math.isfinite(loss):
            raise InvalidArgumentError(
                f"the validation loss at the initial parameters is {loss} (NaN or infinite): check val_data and "
                "loss_fn on it (NaN inputs, labels out of range, log of 0); values need a finite validation loss"
            )

    def _open_store(self, first: MicroBatch | None, update_rule: str) -> None:
        """Create (or resume) the store; the projection layout comes from the first captured micro-batch."""
        record_columns = dict(DEFAULT_RECORD_COLUMNS)
        step_columns = dict(STEP_COLUMNS)
        if self.per_val_point and self.validation is not None:
            n_val = self.validation.num_points
            record_columns["value_1_per_val"] = Column(np.float32, (n_val,))
            if self.order == 2:
                record_columns["value_2_per_val"] = Column(np.float32, (n_val,))
        if self.embeddings is not None and first is not None:
            self.projector = Projector.build(Projector.shapes_of(first.captured), self.embeddings)
            record_columns["proj_grad"] = Column(np.dtype(self.embeddings.dtype), (self.projector.dim,))
            step_columns["proj_scale"] = Column(np.float64, (len(self.projector.layout),))
            if self._resume_state is None:
                self._check_embedding_size(record_columns)
        state = self._resume_state
        if state is not None:
            self.run_id = state["run_id"]
            self.writer = RunWriter(self.path, resume=True, run_id=self.run_id, rank=self.rank,
                                    world_size=self.world_size, flush_every=self.flush_every,
                                    compression=self._store_compression())
            pending = state.get("pending")
            self.writer.truncate_to_step(pending["step"] if pending else state["next_step"])
            self.next_step = state["next_step"]
            self.pending = PendingStep.from_state(pending) if pending else None
            return
        self.writer = RunWriter(
            self.path, run_id=self.run_id, rank=self.rank, world_size=self.world_size,
            config={**self._config(), "update_rule": update_rule},
            coverage=self.capture.coverage.as_dict(), step_columns=step_columns, record_columns=record_columns,
            overwrite=self.overwrite, flush_every=self.flush_every,
            compression=self._store_compression(),
        )
        if self.source_names:
            self.writer.write_static("sources/names", np.array(self.source_names, dtype=object))
        if self.projector is not None:
            self._write_projection(self.projector)

    def _store_compression(self) -> str | None:
        if self.compression != "auto":
            return self.compression
        # projected gradients barely compress (~10%) and gzip rewrites them at 15-30 MB/s when the run closes
        return None if self.projector is not None else "gzip"

    def _check_embedding_size(self, record_columns: dict[str, Column]) -> None:
        """State what the projected gradients will take on disk (rank 0, on stderr and in ``embedding_size``) and
        refuse to start when the planned total exceeds the free disk (unless ``check_disk=False``)."""
        assert self.projector is not None and self.embeddings is not None
        row_bytes = sum(np.dtype(c.dtype).itemsize * int(np.prod(c.shape)) for c in record_columns.values())
        per_step = sum(int(mb.sample_ids.numel()) for mb in self._microbatches) or 1
        planned = self.embeddings.planned_steps or self.planned_steps
        self.embedding_size = embedding_size(row_bytes, self.projector.dim, self.embeddings, per_step, planned)
        if self.rank == 0:
            print(f"inrun: {self.embedding_size.statement()}", file=sys.stderr)
        total = self.embedding_size.total_bytes
        folder = self.path.resolve().parent
        while not folder.exists() and folder != folder.parent:  # the store's folder is made when the store opens
            folder = folder.parent
        free = shutil.disk_usage(folder).free
        if total is not None and total > free and self.embeddings.check_disk:
            raise StoreIOError(
                f"{self.embedding_size.statement()}, but only {free / 1e9:.1f} GB are free at {self.path.parent}. "
                "Record fewer numbers (smaller k_rows/k_cols or flat_k, dtype='float16', every=k, a subset of "
                "parameters), free disk space, or pass embeddings={..., 'check_disk': False} to start anyway"
            )

    def _write_projection(self, projector: Projector) -> None:
        assert self.writer is not None
        self.writer.write_static("projection", attrs={"layout": projector.layout_json(),
                                                      "settings": projector.settings_json()})
        for position, block in enumerate(projector.layout):
            for side, matrix in zip(("rows", "cols"), projector.matrices[block.name]):
                if matrix is not None:
                    self.writer.write_static(f"projection/{position}/{side}", matrix.numpy())

    def _config(self) -> dict:
        return {
            "shapley_order": self.order,
            "embeddings": None if self.embeddings is None else vars(self.embeddings),
            "per_val_point": self.per_val_point,
            "n_val": self.validation.num_points if self.validation is not None else 0,
            # False: no validation data (embeddings only); no validation loss recorded (NaN in the steps table)
            "has_validation_data": self.validation is not None,
            "record_norms": self.record_norms,
            "adam_values": self.adam_values,
            "index_key": self.index_key,
            "checkpoint_every": self.checkpoint_every,
            "model_class": type(self.model).__name__,
            "inrun_version": __version__,
            "value_sign": "positive = reduced validation loss",
            "grad_norm_sq": "squared norm of the sample's contribution to the step's gradient",
            **self.extra_config,
        }

    # -- per micro-batch ------------------------------------------------------------------------------------------
    def sample_ids(self, batch: Any) -> Tensor:
        """The dataset ids of a batch's samples (int64, each >= 0), from ``index_fn`` or the batch's index field."""
        if self.index_fn is not None:
            return sample_ids_from(self.index_fn(batch), "returned by index_fn")
        if not isinstance(batch, dict) or self.index_key not in batch:
            raise BatchMismatchError(
                f"training batches must carry the dataset index of each sample: a dict batch with key "
                f"'{self.index_key}' (set index_key=...), or pass index_fn=lambda batch: LongTensor[n]"
            )
        return sample_ids_from(batch[self.index_key], f"batch['{self.index_key}']")

    def begin_microbatch(self, batch: Any) -> None:
        """Note the dataset ids (and source labels) of the samples about to go through forward and backward.

        Checked here, before the forward pass: ids are integers >= 0, one per sample (when the batch's other tensors
        agree on a number of samples, it must be the number of ids), source labels within ``source_names``.
        """
        ids = self.sample_ids(batch)
        skip = (self.index_key, self.source_key) if isinstance(batch, dict) else ()
        sizes = leading_sizes(batch, skip) if self.index_fn is None else set()  # index_fn: the batch may be anything
        if sizes and ids.shape[0] not in sizes:
            raise BatchMismatchError(
                f"the batch carries {ids.shape[0]} sample indices (batch['{self.index_key}']) but its tensors hold "
                f"{' or '.join(str(n) for n in sorted(sizes))} samples; give one dataset index per sample"
            )
        sources = None
        if isinstance(batch, dict) and self.source_key in batch:
            sources = source_labels_from(batch[self.source_key], ids.shape[0], self.source_key, self.source_names)
        self._current = (ids, sources)
        self.capture.batch_size = ids.shape[0]
        self.capture.discard()
        # an empty micro-batch (dropped at end_microbatch) has nothing to check, but takes part in the check's
        # collectives when an integration gave it some
        self.checks.on_microbatch(self, batch, self._check_loss_fn)

    def end_microbatch(self, grad_scale: float = 1.0) -> None:
        """Collect the per-sample factors of the backward pass just run (``grad_scale``: fp16 loss scale).

        An empty micro-batch (zero samples) contributes nothing: it is dropped, and a step made only of empty
        micro-batches is recorded as skipped.
        """
        if self._current is None:
            raise InRunError("end_microbatch() called without begin_microbatch(batch) first")
        ids, sources = self._current
        self._current = None
        if ids.shape[0] == 0:
            self.capture.discard()
            self._empty_microbatches += 1
            return
        try:
            captured = self.capture.collect(
                num_samples=ids.shape[0], grad_scale=grad_scale * self.gradient_divisor, check_finite=False
            )
        except NonFiniteGradientError as error:
            self._skip_reason = str(error)
            self.capture.discard()
            return
        except BatchMismatchError as error:
            where = "index_fn" if self.index_fn is not None else f"batch['{self.index_key}']"
            raise BatchMismatchError(
                f"the batch carries {ids.shape[0]} sample indices ({where}) but the model's layers saw another "
                f"number of samples ({str(error).split(' but ')[0]}). Either the indices are not one per sample "
                "(fix the index field or index_fn), or the model moves samples out of the first dimension (a "
                "reshape of [n, T, d] into [n*T, d] before a layer cannot be attributed per sample)"
            ) from error
        if self.param_shapes:
            captured.shapes.update({k: self.param_shapes[k] for k in captured.shapes if k in self.param_shapes})
        self._microbatches.append(MicroBatch(captured, ids, sources))

    def note_train_loss(self, loss: float) -> None:
        """The training loss of the step just taken (shown in the store and report)."""
        if self.pending is not None:
            self.pending.train_loss = float(loss)

    # -- per optimizer step ---------------------------------------------------------------------------------------
    def before_optimizer_step(
        self, optimizer: torch.optim.Optimizer, grads: dict[str, Tensor] | None = None, rule: str | None = None
    ) -> None:
        """Value the step's samples. Call after the last backward of the step, before ``optimizer.step()``.

        ``grads``: the full-batch gradient per parameter name; by default ``param.grad`` (unscaled). Gradient norm
        clipping set through ``clip_norm`` is applied to it and to the samples' contributions alike.
        ``rule``: the update rule when ``optimizer`` is a view rather than a torch optimizer (see ``update_terms``).
        """
        self.start()
        if self._rule is None:  # an unknown optimizer fails here, before anything is written
            recording = self.order > 0 or self.embeddings is not None
            self._rule = resolve_rule(optimizer, rule or self.update_rule) if recording else "none (nothing recorded)"
        if self.writer is None and (self._microbatches or self.embeddings is None):
            # with embeddings the projection layout comes from a captured batch: an empty first step waits
            self._open_store_late(self._microbatches[0] if self._microbatches else None)
        step, microbatches = self.next_step, self._microbatches
        empty, self._empty_microbatches = self._empty_microbatches, 0
        self._microbatches = []
        self.next_step += 1
        grads = grads if grads is not None else self._param_grads()
        lr = float(optimizer.param_groups[0]["lr"])
        reason = self._skip_reason or self._non_finite(grads)
        self._skip_reason = None
        if self.order == 0 and self.embeddings is None:
            return  # shapley=None without embeddings: nothing to record
        nothing = "an empty batch (0 samples)" if empty and not microbatches else "no attributed micro-batches"
        if not self._on_every_rank(reason is None and bool(microbatches)):  # split validation: all ranks or none
            reason = reason or ("another rank could not value this step (the validation set is split across ranks)"
                                if microbatches else nothing)
        valued = reason is None and bool(microbatches)
        # on every rank, also one that values nothing this step (the check's collective, when it has one)
        self.checks.on_step(self, step, [mb.captured for mb in microbatches] if valued else [], grads)
        if not valued:
            self._record_skipped(step, lr, reason or nothing)
            return
        if self.clip_norm is not None:
            coefficient = clip_coefficient(self._total_norm(grads), self.clip_norm)
            grads = {name: g * coefficient for name, g in grads.items()}
            for mb in microbatches:
                mb.captured = mb.captured.scaled(coefficient)
        # embeddings only: the update scale of the projected parameters, on the steps that are projected
        needed = grads if self.order > 0 else self._projected_grads(grads, step)
        sq_sums = sample_sq_sums(microbatches) if self.adam_values == "noise-eps" else None
        # embeddings only: the projections need each block's update scale, not the sample-free part of the step
        terms = {} if not needed else update_terms(optimizer, self.params, needed, rule=self._rule,
                                                   adam_values=self.adam_values, sample_sq_sums=sq_sums,
                                                   scale_only=self.order == 0)
        if self.order > 0:
            values = value_step(
                microbatches, terms, grads, self.validation, self.params,
                second_order=self.order == 2, per_val_point=self.per_val_point, record_norms=self.record_norms,
            )
        else:
            values = self._unvalued(microbatches)
        if self.order > 0 and not self._on_every_rank(bool(np.isfinite(values.value_1).all())):
            self._record_skipped(step, lr, "non-finite values (a non-finite layer gradient or validation loss)")
            return
        if self.projector is not None and step % self.embeddings.every == 0:
            self._add_projections(values, microbatches, terms, grads)
        if self.checkpoint_every and step % self.checkpoint_every == 0:
            values.extras["checkpoint"] = np.int8(self.save_checkpoint(step))
        self._complete_pending(values.val_loss)
        self.pending = PendingStep(step, lr, values)

    def _on_every_rank(self, flag: bool) -> bool:
        """``flag`` on every rank when the validation set is split across ranks (collective), else ``flag``."""
        validation = getattr(self, "validation", None)
        return validation.on_every_rank(flag) if validation is not None else flag

    def _projected_grads(self, grads: dict[str, Tensor], step: int) -> dict[str, Tensor]:
        """The gradients the embeddings need this step: the projected parameters' on recorded steps, else none."""
        if self.projector is None or step % self.embeddings.every != 0:
            return {}
        return {block.name: grads[block.name] for block in self.projector.layout if block.name in grads}

    def _validation_loss(self) -> float:
        """The validation loss at the current parameters; NaN without validation data."""
        return self.validation.loss() if self.validation is not None else math.nan

    def _unvalued(self, microbatches: list[MicroBatch]) -> StepValues:
        """A step with projections only (``shapley=None``): no values; the validation loss for the row when
        validation data were given (no validation pass at all without)."""
        ids, sources = sample_ids_of(microbatches), sources_of(microbatches)
        val_loss = self._validation_loss()
        nan = np.full(ids.size, np.nan)
        return StepValues(ids, sources, nan, None, nan, val_loss, val_loss, math.nan)

    def _add_projections(self, values: StepValues, microbatches: list[MicroBatch], terms: dict,
                         grads: dict[str, Tensor]) -> None:
        """Projected contributions of the step's samples, and each block's update scale.

        SGD-family rules: the learning rate (exact). Adam: the elementwise scale ``D`` is reduced to the step size
        along the gradient actually taken, ``sum(D G^2) / sum(G^2)``; a plain mean would be dominated by coordinates
        with a near-zero second moment, where ``D`` is huge but the gradient is not.
        """
        assert self.projector is not None
        parts = [self.projector.project_batch(mb.captured) for mb in microbatches]
        projected = parts[0] if len(parts) == 1 else torch.cat(parts)  # one micro-batch: no copy of [n, dim]
        values.extras["proj_grad"] = projected.cpu().numpy().astype(self.embeddings.dtype, copy=False)
        scales = []
        for block in self.projector.layout:
            scale = terms[block.name].scale if block.name in terms else math.nan
            if isinstance(scale, Tensor):
                squared = grads[block.name].double() ** 2
                total = float(squared.sum())
                scales.append(float((scale.double() * squared).sum()) / total if total > 0 else float(scale.mean()))
            else:
                scales.append(float(scale))
        values.extras["proj_scale"] = np.asarray(scales)

    def _param_grads(self) -> dict[str, Tensor]:
        return {name: p.grad.detach() for name, p in self.params.items() if p.grad is not None}

    @staticmethod
    def _non_finite(grads: dict[str, Tensor]) -> str | None:
        # one list-wide 2-norm and one host read: a NaN or infinite entry makes its tensor's norm non-finite, so
        # finite norms clear every gradient; otherwise (or an overflowing norm) the exact loop below decides and names
        # the tensor at fault
        sized = [grad for grad in grads.values() if grad.numel()]
        if sized and len({(grad.dtype, grad.device) for grad in sized}) == 1:
            if bool(torch.isfinite(torch.stack(torch._foreach_norm(sized))).all()):
                return None
        for name, grad in grads.items():
            if not bool(torch.isfinite(grad).all()):
                return f"the gradient of '{name}' holds NaN or infinity"
        return None

    @staticmethod
    def _total_norm(grads: dict[str, Tensor]) -> float:
        return float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values())))

    def _record_skipped(self, step: int, lr: float, reason: str) -> None:
        warnings.warn(f"inrun: step {step} not valued ({reason}); training goes on", stacklevel=3)
        try:
            val_loss = self._validation_loss()
        except Exception:  # noqa: BLE001 -- a broken validation pass must not stop training either
            val_loss = math.nan
        self._complete_pending(val_loss)
        if self.writer is None:  # the store opens at the first step with samples (the projection layout)
            self._early_skips.append((step, lr, val_loss))
            return
        self._write({"step": step, "lr": lr, "val_loss": val_loss, "skipped": 1}, {"sample_id": np.zeros(0, np.int64)})

    def _open_store_late(self, first: MicroBatch | None) -> None:
        """Open the store that empty first steps held back, and write their skipped rows first."""
        self._open_store(first, self._rule or "unknown")
        early, self._early_skips = self._early_skips, []
        for step, lr, val_loss in early:
            self._write({"step": step, "lr": lr, "val_loss": val_loss, "skipped": 1},
                        {"sample_id": np.zeros(0, np.int64)})

    def _complete_pending(self, val_loss_after: float) -> None:
        """Write the pending step now that the validation loss after it is known."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        v = pending.values
        utility = v.val_loss_base - val_loss_after
        row = {
            "step": pending.step,
            "lr": pending.lr,
            "train_loss": pending.train_loss,
            "val_loss": v.val_loss,
            "val_loss_base": v.val_loss_base,
            "val_loss_after": val_loss_after,
            "sum_value_1": float(v.value_1.sum()),
            "residual_1": float(v.value_1.sum()) - utility,
            "direction_norm_sq": v.direction_norm_sq,
        }
        records = {"sample_id": v.sample_ids, "source": v.sources, "value_1": v.value_1, "grad_norm_sq": v.grad_norm_sq}
        if v.value_2 is not None:
            row["sum_value_2"] = float(v.value_2.sum())
            row["residual_2"] = float(v.value_2.sum()) - utility
            records["value_2"] = v.value_2
        if "checkpoint" in v.extras:
            row["checkpoint"] = int(v.extras["checkpoint"])
        if "proj_grad" in v.extras:
            records["proj_grad"] = v.extras["proj_grad"]
            row["proj_scale"] = v.extras["proj_scale"]
        if v.per_val_1 is not None:
            records["value_1_per_val"] = v.per_val_1
        if v.per_val_2 is not None:
            records["value_2_per_val"] = v.per_val_2
        self._write(row, records)

    def _write(self, row: dict, records: dict) -> None:
        assert self.writer is not None
        self.writer.append_step(row, records)
        for listener in self.listeners:
            try:
                listener(row, records)
            except Exception as err:  # noqa: BLE001 -- the step is written; a listener (W&B) must not stop training
                failed = self.__dict__.setdefault("_failed_listeners", set())  # warn once per listener
                if id(listener) not in failed:
                    failed.add(id(listener))
                    warnings.warn(f"a recorder listener ({type(listener).__name__}) failed at step {row.get('step')}: "
                                  f"{type(err).__name__}: {err}; the step is stored and training goes on (later "
                                  "failures of this listener are not reported)", RuntimeWarning, stacklevel=2)

    # -- model checkpoints for post-hoc values -----------------------------------------------------------------------
    @property
    def checkpoint_folder(self) -> Path:
        return checkpoint_folder(self.path)

    def save_checkpoint(self, step: int) -> bool:
        """Save the model as it is now (theta at the start of ``step``); rank 0 only. Returns whether it saved."""
        if self.rank != 0:
            return False
        folder = self.checkpoint_folder
        folder.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().cpu().clone() for name, tensor in self.model.state_dict().items()}
        target = checkpoint_path(self.path, step)
        temporary = target.with_suffix(".tmp")
        try:
            torch.save({"step": step, "run_id": self.run_id, "state_dict": state}, temporary)
            temporary.replace(target)  # atomic: a crash never leaves a half-written checkpoint under the real name
        except (OSError, RuntimeError) as err:  # a full disk: nothing half-written is left, and the step's
            temporary.unlink(missing_ok=True)  # checkpoint flag is never set
            raise StoreIOError(f"saving the model checkpoint {target} of run store {self.path} failed: {err}. "
                               "Free space and resume from a checkpoint.") from err
        return True

    # -- ending, checkpoints ---------------------------------------------------------------------------------------
    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self, final: bool = True) -> None:
        """Write the last step (with the final validation loss when ``final``), commit and close the store."""
        if self.writer is None and self._early_skips:
            self._open_store_late(None)  # every step was empty: the skipped rows, without a projection layout
        if self.writer is None and final and self._resume_unfinished():
            self._open_store(None, "unknown")  # resumed from the final checkpoint, no step taken: finish the store
        if self.writer is None:
            return
        try:
            if self.pending is not None and final:
                self._complete_pending(self._validation_loss())
            if final:
                self.writer.flush()  # the last step is committed before the final checkpoint is saved
                fault_point("checkpoint")
            if final and self.checkpoint_every and self.save_checkpoint(self.next_step):
                self.writer.write_static("checkpoints", attrs={"final_step": self.next_step})
        finally:
            self.writer.close()
            self.writer = None
            self.capture.detach()

    def _resume_unfinished(self) -> bool:
        """Resumed from a checkpoint whose last step is not in the store yet (it waits for the validation loss
        after it), or whose store's compression a crash interrupted."""
        state = self._resume_state
        return state is not None and (state.get("pending") is not None or stale_repack(self.path))

    def state_dict(self) -> dict:
        """What a checkpoint needs to resume this recording without duplicating or losing steps."""
        return {
            "run_id": self.run_id,
            "next_step": self.next_step,
            "pending": self.pending.as_state() if self.pending is not None else None,
            "path": str(self.path),
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        self._resume_state = dict(state)
        self.run_id = state["run_id"]


