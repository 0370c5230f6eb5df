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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from inrun.engine.capture import GradientCapture
from inrun.engine.projection import ProjectionSettings, Projector
from inrun.errors import BatchMismatchError, InRunError, NonFiniteGradientError
from inrun.store.paths import checkpoint_folder, checkpoint_path, new_run_id, rank_path
from inrun.store.schema import DEFAULT_RECORD_COLUMNS, DEFAULT_STEP_COLUMNS, Column
from inrun.store.writer import RunWriter
from inrun.valuation.shapley import MicroBatch, StepValues, sample_ids_of, sources_of, value_step
from inrun.valuation.update_rules import clip_coefficient, rule_name, update_terms, warn_if_unknown
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


class InRunRecorder:
    """Records In-Run Data Shapley values of every optimizer step into a run store (one file per rank)."""

    def __init__(
        self,
        model: nn.Module,
        path: str | Path,
        *,
        val_data: Any,
        loss_fn: LossFn,
        shapley: str | None = "first",
        embeddings: "bool | dict | ProjectionSettings" = False,
        per_val_point: bool = False,
        index_key: str = "index",
        index_fn: Callable[[Any], Tensor] | None = None,
        source_key: str = "source",
        source_names: list[str] | None = None,
        record_norms: bool = True,
        allow_unsupported: bool = False,
        overwrite: bool = False,
        flush_every: int = 100,
        rank: int = 0,
        world_size: int = 1,
        run_id: str | None = None,
        gradient_divisor: float = 1.0,
        checkpoint_every: int | None = None,
        extra_config: dict | None = None,
    ):
        if shapley not in SHAPLEY_ORDERS:
            raise ValueError(f"shapley must be 'first', 'second' or None, got {shapley!r}")
        self.model = model
        self.path = rank_path(path, rank, world_size)
        self.order = SHAPLEY_ORDERS[shapley]
        self.embeddings = ProjectionSettings.from_any(embeddings) if embeddings else None
        if self.embeddings is not None and self.embeddings.dtype not in ("float32", "float16"):
            raise ValueError(f"embeddings dtype must be 'float32' or 'float16', got {self.embeddings.dtype!r}")
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
        #: save the model (parameters theta_t at the start of step t) every this many steps, and the final model
        self.checkpoint_every = checkpoint_every
        self.capture = GradientCapture(model, allow_unsupported=allow_unsupported)
        self.params = dict(self.capture.parameters)
        self.validation = ValidationSet(val_data, loss_fn, model, self.capture)
        self.writer: RunWriter | None = None
        self.next_step = 0
        self.pending: PendingStep | None = None
        self._microbatches: list[MicroBatch] = []
        self._current: tuple[Tensor, Tensor | None] | None = None
        self._skip_reason: str | None = None
        self._train_losses: list[float] = []
        self._resume_state: dict | None = None
        self.listeners: list[Callable[[dict, dict], None]] = []
        self.clip_norm: float | None = None
        #: full parameter shapes by name, for engines that partition the model's own tensors (DeepSpeed ZeRO-3 leaves
        #: them ``[0]``-shaped outside its hooks); an integration sets it, None means ``param.shape``
        self.param_shapes: dict[str, torch.Size] | None = None

    # -- set-up ---------------------------------------------------------------------------------------------------
    def check_output_path(self, resuming: bool) -> None:
        """Fail now, before any training, if the store exists and neither overwriting nor resuming."""
        if self.path.exists() and not (self.overwrite or resuming):
            raise FileExistsError(
                f"{self.path} already exists; pass overwrite=True to replace it, resume from a checkpoint of that "
                "run to append to it, or choose another path"
            )

    def start(self, device: torch.device | None = None) -> None:
        """Attach hooks and check the validation data against the model (the store opens at the first step)."""
        if self.capture._handles:
            return
        device = device or next(iter(self.params.values())).device
        self.validation.to(device)
        self.capture.attach()
        self.validation.gradient(self.params)  # fails early on validation data that does not fit

    def _open_store(self, first: MicroBatch | None, update_rule: str) -> None:
        """Create (or resume) the store; the projection layout comes from the first captured micro-batch."""
        record_columns = dict(DEFAULT_RECORD_COLUMNS)
        step_columns = dict(STEP_COLUMNS)
        if self.per_val_point:
            n_val = self.validation.num_points
            record_columns["value_1_per_val"] = Column(np.float32, (n_val,))
            if self.order == 2:
                record_columns["value_2_per_val"] = Column(np.float32, (n_val,))
        if self.embeddings is not None and first is not None:
            self.projector = Projector.build(Projector.shapes_of(first.captured), self.embeddings)
            record_columns["proj_grad"] = Column(np.dtype(self.embeddings.dtype), (self.projector.dim,))
            step_columns["proj_scale"] = Column(np.float64, (len(self.projector.layout),))
        state = self._resume_state
        if state is not None:
            self.run_id = state["run_id"]
            self.writer = RunWriter(self.path, resume=True, run_id=self.run_id, rank=self.rank,
                                    world_size=self.world_size, flush_every=self.flush_every)
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
            # projected gradients barely compress (~10%) and gzip rewrites them at 15-30 MB/s when the run closes
            compression=None if self.projector is not None else "gzip",
        )
        if self.source_names:
            self.writer.write_static("sources/names", np.array(self.source_names, dtype=object))
        if self.projector is not None:
            self._write_projection(self.projector)

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
            "n_val": self.validation.num_points,
            "record_norms": self.record_norms,
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
        ids = self.index_fn(batch) if self.index_fn is not None else batch_field(batch, self.index_key)
        if ids is None:
            raise BatchMismatchError(
                f"training batches must carry the dataset index of each sample: a dict batch with key "
                f"'{self.index_key}' (set index_key=...), or pass index_fn=lambda batch: LongTensor[n]"
            )
        return torch.as_tensor(ids).reshape(-1).long()

    def begin_microbatch(self, batch: Any) -> None:
        """Note the dataset ids (and source labels) of the samples about to go through forward and backward."""
        ids = self.sample_ids(batch)
        self._current = (ids, batch_field(batch, self.source_key))
        self.capture.batch_size = ids.shape[0]
        self.capture.discard()

    def end_microbatch(self, grad_scale: float = 1.0) -> None:
        """Collect the per-sample factors of the backward pass just run (``grad_scale``: fp16 loss scale)."""
        if self._current is None:
            raise InRunError("end_microbatch() called without begin_microbatch(batch) first")
        ids, sources = self._current
        self._current = None
        try:
            captured = self.capture.collect(
                num_samples=ids.shape[0], grad_scale=grad_scale * self.gradient_divisor, check_finite=False
            )
        except NonFiniteGradientError as error:
            self._skip_reason = str(error)
            self.capture.discard()
            return
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
        if self.writer is None:
            if rule is None:
                warn_if_unknown(optimizer)
            self._open_store(self._microbatches[0] if self._microbatches else None, rule or rule_name(optimizer))
        step, microbatches = self.next_step, self._microbatches
        self._microbatches = []
        self.next_step += 1
        grads = grads if grads is not None else self._param_grads()
        lr = float(optimizer.param_groups[0]["lr"])
        reason = self._skip_reason or self._non_finite(grads)
        self._skip_reason = None
        if self.order == 0 and self.projector is None:
            return  # shapley=None without embeddings: nothing to record
        if not self._on_every_rank(reason is None and bool(microbatches)):  # split validation: all ranks or none
            reason = reason or ("another rank could not value this step (the validation set is split across ranks)"
                                if microbatches else "no attributed micro-batches")
        if reason is not None or not microbatches:
            self._record_skipped(step, lr, reason or "no attributed micro-batches")
            return
        if self.clip_norm is not None:
            coefficient = clip_coefficient(self._total_norm(grads), self.clip_norm)
            grads = {name: g * coefficient for name, g in grads.items()}
            for mb in microbatches:
                mb.captured = mb.captured.scaled(coefficient)
        terms = update_terms(optimizer, self.params, grads, rule=rule)
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

    def _unvalued(self, microbatches: list[MicroBatch]) -> StepValues:
        """A step with projections only (``shapley=None``): no values, still the validation loss for the row."""
        ids, sources = sample_ids_of(microbatches), sources_of(microbatches)
        val_loss = self.validation.loss()
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
        projected = torch.cat([self.projector.project_batch(mb.captured) for mb in microbatches])
        values.extras["proj_grad"] = projected.cpu().numpy().astype(self.embeddings.dtype)
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
            val_loss = self.validation.loss()
        except Exception:  # noqa: BLE001 -- a broken validation pass must not stop training either
            val_loss = math.nan
        self._complete_pending(val_loss)
        self._write({"step": step, "lr": lr, "val_loss": val_loss, "skipped": 1}, {"sample_id": np.zeros(0, np.int64)})

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
            listener(row, records)

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
        torch.save({"step": step, "run_id": self.run_id, "state_dict": state}, temporary)
        temporary.replace(target)  # atomic: a crash never leaves a half-written checkpoint under the real name
        return True

    # -- ending, checkpoints ---------------------------------------------------------------------------------------
    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self, final: bool = True) -> None:
        """Write the last step (with the final validation loss when ``final``), commit and close the store."""
        if self.writer is None:
            return
        try:
            if self.pending is not None and final:
                self._complete_pending(self.validation.loss())
            if final and self.checkpoint_every and self.save_checkpoint(self.next_step):
                self.writer.write_static("checkpoints", attrs={"final_step": self.next_step})
        finally:
            self.writer.close()
            self.writer = None
            self.capture.detach()

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


