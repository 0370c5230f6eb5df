"""``InRunCallback``: In-Run Data Shapley inside a Lightning ``Trainer`` (a thin adapter over ``InRunRecorder``).

Hook order it relies on (NOTES.md): the loss is already divided by ``accumulate_grad_batches`` when backward runs, so
the captured contributions carry every factor; ``on_before_optimizer_step`` fires once per optimizer step with
unscaled gradients and the step's learning rate; callback state is restored before ``on_train_start`` under every
strategy, so the store is opened there.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import lightning as L
from torch import Tensor

from inrun.callbacks.distributed import all_gather_object, split_validation, sum_over_ranks
from inrun.engine.checks import validate_check_every
from inrun.store.paths import new_run_id
from inrun.valuation.arguments import check_recorder_arguments
from inrun.valuation.recorder import InRunRecorder, check_compression
from inrun.valuation.update_rules import DEFAULT_ADAM_VALUES, check_adam_values
from inrun.valuation.validation import LossFn, validation_batches


def _module_loss(module: L.LightningModule, batch: Any) -> Tensor:
    return module.per_sample_loss(batch)


class InRunCallback(L.Callback):
    """Record In-Run Data Shapley values of every training sample at every optimizer step into an HDF5 store.

    Args:
        path: the store (``.h5``); with several processes, one file per rank (``run.rank0.h5``, ...).
        val_data: the validation batch, a list of batches or a loader; the utility is the mean loss over its points.
            Needed for values; with ``shapley=None`` it may be left out (embeddings only: no validation pass).
        shapley: ``"first"``, ``"second"`` (adds the midpoint second-order value) or None (no values).
        embeddings: record projected per-sample gradients for data value embeddings: True (64 x 64 per layer), or
            a dict / :class:`inrun.engine.projection.ProjectionSettings` (``k_rows``, ``k_cols``, ``kind``, ``seed``,
            ``dtype``, ``every``, ``parameters``).
        loss_fn: ``loss_fn(module, batch) -> Tensor[n]``; default: the module's ``per_sample_loss(batch)``.
        per_val_point: also record the ``[batch, n_val]`` matrix of values per validation point.
        record_norms: also record each sample's squared gradient norm (``grad_norm_sq``, for
            ``normalize="grad_norm"``); off by default, as it costs 5-20% of a training step.
        index_key / index_fn: where a batch keeps its samples' dataset indices.
        source_key / source_names: optional per-sample source (domain) labels and their names.
        overwrite: replace an existing store; otherwise an existing store is an error unless resuming.
        flush_every: steps buffered between commits to disk.
        checkpoint_every: save the model every this many steps (and at the end) next to the store, for post-hoc
            values of test points chosen after training (``run.posthoc_values``).
        wandb: a :class:`inrun.callbacks.WandbInfluenceLogger`, True (log to the trainer's W&B logger) or None.
        update_rule: the rule to value the optimizer's steps with (``"sgd"``, ``"adam"``, ``"adamw"``,
            ``"rmsprop"``, ``"adagrad"``); None reads it from the optimizer, and an optimizer inrun does not know is
            an error before training (name its rule here if it updates exactly like one of these).
        adam_values: how Adam-family steps are split into per-sample updates (docs/adam-values.md): ``"fixed-state"``
            (default: the exact elementwise fixed-state rule) or ``"block"`` (one step size per parameter tensor:
            ranks data better by retraining, at SGD cost, but not the fixed-state values); the store's config
            records it.
        check / check_every: the self-checks (gradient completeness, sample independence, a per-sample spot check)
            run at the first optimizer step and, with ``check_every=k``, every k steps; ``check=False`` turns them off
            (unsafe: a model pattern inrun cannot attribute exactly then gives wrong values without an error).
        compression: how the store is rewritten when the run closes: ``"auto"`` (default: gzip, or none for a run
            recording embeddings), ``"gzip"``, ``"lzf"`` or None (stays uncompressed: no close-time rewrite, which
            for a very large store takes minutes and as much free disk again).
        split_validation: with several processes (DDP, DeepSpeed), each rank evaluates its share of the validation
            points and collectives assemble the rest (the values are those of one process; every rank must pass the
            same ``val_data``, which is checked). False: every rank evaluates every point.

    Every argument is checked here (and what needs the model or optimizer in ``on_fit_start``), before any training
    step and before the store is created: a bad one raises :class:`inrun.InvalidArgumentError` naming it.
    """

    def __init__(
        self,
        path: str | Path,
        val_data: Any = None,
        shapley: str | None = "first",
        embeddings: bool | dict = False,
        *,
        loss_fn: LossFn | None = None,
        per_val_point: bool = False,
        index_key: str = "index",
        index_fn: Callable[[Any], Tensor] | None = None,
        source_key: str = "source",
        source_names: list[str] | None = None,
        record_norms: bool = False,
        allow_unsupported: bool = False,
        overwrite: bool = False,
        flush_every: int = 100,
        checkpoint_every: int | None = None,
        wandb: Any = None,
        split_validation: bool = True,
        update_rule: str | None = None,
        adam_values: str = DEFAULT_ADAM_VALUES,
        check: bool = True,
        check_every: int | None = None,
        compression: str | None = "auto",
    ):
        super().__init__()
        check_adam_values(adam_values)
        check_compression(compression)
        validate_check_every(check_every)
        check_recorder_arguments(
            path=path, val_data=val_data, loss_fn=loss_fn, shapley=shapley, embeddings=embeddings,
            per_val_point=per_val_point, index_key=index_key, index_fn=index_fn, source_key=source_key,
            source_names=source_names, record_norms=record_norms, allow_unsupported=allow_unsupported,
            overwrite=overwrite, flush_every=flush_every, checkpoint_every=checkpoint_every, update_rule=update_rule,
            loss_fn_optional=True,
        )
        self.path = Path(path)
        # split into batches and checked now (a loader is iterated once, here)
        self.val_data = validation_batches(val_data) if val_data is not None else None
        self.shapley = shapley
        self.loss_fn = loss_fn
        self.options = dict(
            embeddings=embeddings, per_val_point=per_val_point, index_key=index_key, index_fn=index_fn, source_key=source_key,
            source_names=source_names, record_norms=record_norms, allow_unsupported=allow_unsupported,
            overwrite=overwrite, flush_every=flush_every, checkpoint_every=checkpoint_every, update_rule=update_rule,
            adam_values=adam_values, check=check, check_every=check_every, compression=compression,
        )
        self.wandb = wandb
        self.split_validation = split_validation
        self.recorder: InRunRecorder | None = None
        self._restored: dict | None = None
        self._step_losses: list[float] = []
        self._noted_step = 0
        self._deepspeed = None  # a DeepSpeedAdapter under Lightning's DeepSpeedStrategy

    # -- set-up ---------------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._train_started = False
        loss_fn = self.loss_fn
        if loss_fn is None:
            if not callable(getattr(pl_module, "per_sample_loss", None)):
                raise AttributeError(
                    f"{type(pl_module).__name__} has no per_sample_loss(batch) -> Tensor[n]; add that method or pass "
                    "loss_fn=lambda module, batch: ... (one loss per sample) to InRunCallback"
                )
            loss_fn = _module_loss
        run_id = trainer.strategy.broadcast(new_run_id() if self._restored is None else self._restored["run_id"])
        world = trainer.world_size
        self._deepspeed = _deepspeed_adapter(trainer)
        extra = {"framework": "lightning", "accumulate_grad_batches": trainer.accumulate_grad_batches,
                 "world_size": world, "precision": str(trainer.precision)}
        if self._deepspeed is not None:
            extra.update({**self._deepspeed.config(), "strategy": "deepspeed"})
        with self._gathered():  # ZeRO-3: full parameter shapes for the coverage count
            self.recorder = InRunRecorder(
                pl_module, self.path, val_data=self.val_data, loss_fn=loss_fn, shapley=self.shapley,
                rank=trainer.global_rank, world_size=world, run_id=run_id,
                gradient_divisor=float(world) if world > 1 else 1.0, extra_config=extra, **self.options,
            )
        self.recorder.check_output_path(resuming=trainer.ckpt_path is not None or self._restored is not None)
        self._configure_clipping(trainer)
        if self._deepspeed is not None:
            self._deepspeed.prepare(self.recorder)  # ZeRO-3 shapes; DeepSpeed's own gradient clipping; update rule
        else:
            if world > 1:  # DDP: the step's completeness check assembles the ranks' contributions (one all-reduce)
                self.recorder.checks.sum_over_ranks = sum_over_ranks
            if self.recorder.order > 0 or self.recorder.embeddings is not None:
                for optimizer in trainer.optimizers:  # an optimizer inrun does not know fails here, before training
                    self.recorder.check_optimizer(optimizer)
        if self.wandb is not None and trainer.global_rank == 0:
            from inrun.callbacks.wandb_logging import attach_wandb

            attach_wandb(self, trainer)

    def _configure_clipping(self, trainer: L.Trainer) -> None:
        clip = trainer.gradient_clip_val
        if not clip:
            return
        if trainer.gradient_clip_algorithm in (None, "norm"):
            self.recorder.clip_norm = float(clip)
        else:
            warnings.warn(
                "gradient clipping by value is not affine in the samples' gradients; inrun values ignore it",
                stacklevel=2,
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._train_started = True
        if self._restored is not None:
            state = self._own_state(trainer.global_rank)
            if state.get("world_size", trainer.world_size) != trainer.world_size:
                raise RuntimeError(
                    f"the checkpoint was recorded with {state['world_size']} processes and this run has "
                    f"{trainer.world_size}; resume with the same number, or start a new store"
                )
            self.recorder.load_state_dict(state)
        max_steps = getattr(trainer, "max_steps", None)
        max_steps = max_steps if max_steps and max_steps > 0 else None
        try:
            planned = max_steps or int(trainer.estimated_stepping_batches)
        except Exception:  # noqa: BLE001 -- an unsized dataloader (or a trainer without it): no size projection
            planned = None
        self.recorder.planned_steps = planned if planned and planned < 2**62 else None  # the embeddings' total
        with self._gathered():
            self.recorder.start(device=pl_module.device)
        split_validation(self.recorder, self.split_validation)  # collective with several processes

    # -- per micro-batch / step -----------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        self.recorder.begin_microbatch(batch)

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        scale = self._deepspeed.loss_scale() if self._deepspeed is not None else _loss_scale(trainer)
        self.recorder.end_microbatch(grad_scale=scale)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if self._deepspeed is not None:
            # fires on every micro-batch under DeepSpeed: values the step at the accumulation boundary only, from
            # DeepSpeed's full gradients and optimizer state (param.grad is None under ZeRO)
            self._deepspeed.value_step(self.recorder)
            return
        self.recorder.before_optimizer_step(optimizer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor):
            # automatic optimization hands over the loss already divided by accumulate_grad_batches: undo that
            scale = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
            self._step_losses.append(float(loss.detach()) * scale)
        if self.recorder.next_step != self._noted_step and self._step_losses:  # an optimizer step just happened
            self.recorder.note_train_loss(sum(self._step_losses) / len(self._step_losses))
            self._step_losses, self._noted_step = [], self.recorder.next_step

    # -- ending -----------------------------------------------------------------------------------------------------
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.recorder is not None:
            with self._gathered():
                self.recorder.close(final=True)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resume from the final checkpoint has no step left, and Lightning then skips on_train_start/_end; the
        # last step, which waits in that checkpoint for the validation loss after it, is written here.
        if self.recorder is not None and self._restored is not None and not getattr(self, "_train_started", True):
            self.on_train_start(trainer, pl_module)
            self.on_train_end(trainer, pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self.recorder is not None and self.recorder.writer is not None:
            self.recorder.close(final=False)  # commit what was recorded; the store stays readable

    # -- checkpoints -------------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.recorder is not None:
            self.recorder.flush()  # the store always holds every step the checkpoint has seen

    def state_dict(self) -> dict:
        """The recorder's resume state. With several processes, every rank's (a collective call: Lightning builds
        a checkpoint's callback states on every rank but saves rank 0's), so each rank resumes its own samples."""
        if self.recorder is None:
            return dict(self._restored or {})
        state = self.recorder.state_dict()
        gathered = all_gather_object(state)
        if len(gathered) > 1:
            return {"run_id": state["run_id"], "per_rank": gathered}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored = dict(state_dict)

    def _own_state(self, rank: int) -> dict:
        """This rank's part of a restored state (a single-process state serves rank 0)."""
        assert self._restored is not None
        if "per_rank" not in self._restored:
            if rank != 0:
                raise RuntimeError(
                    "the checkpoint holds the inrun state of one process only; resume it with one process, or "
                    "resume from a checkpoint saved by this version of inrun with the same number of processes"
                )
            return self._restored
        states = self._restored["per_rank"]
        if rank >= len(states):
            raise RuntimeError(
                f"the checkpoint was saved by {len(states)} processes and this run has more; resume with the same "
                "number of processes, or start a new store"
            )
        return states[rank]

    def _gathered(self):
        """Under DeepSpeed ZeRO-3: the model's parameters full-shaped inside the block (collective)."""
        return self._deepspeed.gathered() if self._deepspeed is not None else nullcontext()


def _deepspeed_adapter(trainer: L.Trainer):
    """A ``DeepSpeedAdapter`` of the trainer's engine under Lightning's ``DeepSpeedStrategy``, else None."""
    try:
        from lightning.pytorch.strategies import DeepSpeedStrategy
    except ImportError:  # pragma: no cover
        return None
    if not isinstance(trainer.strategy, DeepSpeedStrategy):
        return None
    from inrun.callbacks.deepspeed_engine import DeepSpeedAdapter

    return DeepSpeedAdapter(trainer.strategy.deepspeed_engine)


def _loss_scale(trainer: L.Trainer) -> float:
    """The fp16 grad scaler's current scale (hooks see gradients multiplied by it), else 1."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is not None and getattr(scaler, "is_enabled", lambda: False)():
        return float(scaler.get_scale())
    return 1.0
