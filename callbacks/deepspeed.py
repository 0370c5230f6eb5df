"""``DeepSpeedInRun``: In-Run Data Shapley inside a plain DeepSpeed training loop (ZeRO 0, 1, 2 and 3).

Attach it to the engine after ``deepspeed.initialize`` and route three calls of the loop through it::

    import deepspeed
    from inrun.callbacks import DeepSpeedInRun

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False   # CPU: skips a one-minute JIT compile
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                           config="configs/deepspeed_zero2.json")

    def per_sample_loss(module, batch):                    # one loss per sample, no reduction
        return F.cross_entropy(module(batch["x"]), batch["y"], reduction="none")

    inrun_ds = DeepSpeedInRun(engine, "runs/ds.h5", val_data=val_batch, loss_fn=per_sample_loss, shapley="second")
    for batch in loader:                                   # this rank's micro-batches; dict batches carry "index"
        inrun_ds.begin_microbatch(batch)                   # before the forward: the samples' dataset ids
        loss = per_sample_loss(engine, batch).mean()       # the forward through the engine, as before
        inrun_ds.backward(loss)                            # = engine.backward(loss) + collect per-sample factors
        inrun_ds.step()                                    # = value the step at a boundary + engine.step()
    inrun_ds.close()                                       # on every rank: final validation loss, commit, close

    run = inrun.open_run("runs/ds.h5")                     # finds runs/ds.rank0.h5, runs/ds.rank1.h5, ...

``with DeepSpeedInRun(...) as inrun_ds:`` closes on leaving the block; after an exception it commits what was
recorded without the final validation pass (no collective calls, so a dead peer cannot hang it). Loops that call
``engine.backward`` / ``engine.step`` themselves call ``inrun_ds.end_microbatch()`` after the backward and
``inrun_ds.before_step()`` before ``engine.step()`` (then ``inrun_ds.after_step()`` to note the training loss).

What it reads from the engine (nothing to configure twice):

* the step boundary: ``engine.is_gradient_accumulation_boundary()`` (gradient accumulation is DeepSpeed's; the
  per-sample contributions carry its ``1/gradient_accumulation_steps`` because they come from the real backward);
* the data-parallel world size: DeepSpeed averages gradients over ``engine.dp_world_size`` ranks, so each rank's
  captured contributions are divided by it (``gradient_divisor``); every rank values its own samples;
* the fp16 loss scale (captured output gradients and ZeRO's gradients are divided by it; bf16 and fp32 have none);
* the full-batch gradient of every parameter with ``deepspeed.utils.safe_get_full_grad`` and the optimizer state
  with ``safe_get_full_optimizer_state`` (``param.grad`` is None under ZeRO 1-3);
* the update rule and its hyper-parameters from the base optimizer (``engine.basic_optimizer``): torch
  SGD / Adam / AdamW by class, DeepSpeed's FusedAdam / DeepSpeedCPUAdam by ``adam_w_mode``; lr, betas, eps,
  weight decay, momentum per parameter group; gradient clipping (``engine.gradient_clipping()``).

Collective calls: the constructor, ``step``/``before_step`` at a boundary, ``state_dict`` and ``close`` gather
gradients, optimizer state and (ZeRO-3) parameters, and ``begin_microbatch`` does at the first micro-batch of a checked
step (the self-checks below), so every rank must call them, in the same order.

Self-checks (``check=True``, the default; inrun/engine/checks.py): at the first optimizer step (and every
``check_every`` steps) the first micro-batch goes through the batch check before its forward -- under ZeRO-3 inside
the gathered-parameters context, so the model has its full parameters -- and at the step every rank's summed
per-sample contributions are assembled with one all-reduce over the data-parallel group and compared with
DeepSpeed's averaged gradient. A rank whose check fails raises; the others learn it and raise too.

ZeRO-3: outside DeepSpeed's module hooks a parameter is ``[0]``-shaped. For the valuation of a step (and for the
validation passes at start and close) every parameter is gathered once and pinned, so the validation forward and
backward, the parameter shifts of the second-order value and the update rule see full tensors; afterwards the
parameters are partitioned again, unchanged bit for bit. The recorder already holds several full-size tensors per
step (gradient, validation gradient, update scale), so gathering the model costs one more full copy, not a new
order of memory.

Validation: ``loss_fn(engine.module, batch)`` on the unwrapped module, in eval mode, with ``torch.autograd.grad``:
the engine's forward would attach its backward bookkeeping (accumulation scaling, ZeRO's reduction epilogue) and
``autograd.grad`` never fires DeepSpeed's gradient-reduction hooks, so the training gradients stay untouched.

Resuming: ``state_dict()`` (collective, identical on every rank) holds every rank's recorder state; store it in
the checkpoint (``engine.save_checkpoint(d, client_state={"inrun": inrun_ds.state_dict()})``) and pass it back as
``DeepSpeedInRun(..., resume_state=client_state["inrun"])``. The store keeps one file per rank, so a run cannot
change its world size: resuming with another one raises and says so; record the continuation into a new store
(another ``path``, no ``resume_state``) and open the two runs separately.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from inrun.callbacks.deepspeed_engine import (  # the engine adapter's public names stay importable from here
    DeepSpeedAdapter,
    OptimizerView,
    deepspeed_full_gradients,
    deepspeed_loss_scale,
    deepspeed_optimizer_view,
    deepspeed_update_rule,
    full_shape,
    gathered_parameters,
)
from inrun.callbacks.distributed import all_gather_object, process_group
from inrun.callbacks.distributed import split_validation as split_validation_set
from inrun.engine.checks import validate_check_every
from inrun.errors import InRunError
from inrun.store.paths import new_run_id
from inrun.valuation.recorder import InRunRecorder, check_compression
from inrun.valuation.update_rules import DEFAULT_ADAM_VALUES, check_adam_values
from inrun.valuation.validation import LossFn

__all__ = [
    "DeepSpeedAdapter",
    "DeepSpeedInRun",
    "DeepSpeedMismatchError",
    "OptimizerView",
    "deepspeed_full_gradients",
    "deepspeed_loss_scale",
    "deepspeed_optimizer_view",
    "deepspeed_update_rule",
    "gathered_parameters",
]


STATE_FORMAT = "inrun.deepspeed/1"


class DeepSpeedMismatchError(InRunError, ValueError):
    """The ranks of one DeepSpeed run disagree (configuration, validation data) or a resume does not fit."""


def _tensor_digest(data: Any, digest) -> None:
    if isinstance(data, Tensor):
        t = data.detach().cpu().contiguous()
        digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(data, dict):
        for key in sorted(data, key=str):
            digest.update(str(key).encode())
            _tensor_digest(data[key], digest)
    elif isinstance(data, (list, tuple)):
        for item in data:
            _tensor_digest(item, digest)
    else:
        digest.update(repr(data).encode())


class DeepSpeedInRun:
    """Record In-Run Data Shapley values of every training sample at every optimizer step of a DeepSpeed engine.

    Args:
        engine: the ``DeepSpeedEngine`` from ``deepspeed.initialize`` (data parallel; ZeRO stage 0-3).
        path: the store; one file per rank (``run.rank0.h5``, ...) when there are several ranks.
        val_data: the validation batch, a list of batches or a loader (the same on every rank; checked). Needed for
            values; with ``shapley=None`` it may be left out (embeddings only: no validation pass).
        loss_fn: ``loss_fn(module, batch) -> Tensor[n]``, one loss per sample; called with ``engine.module``.
        shapley: ``"first"``, ``"second"`` (adds the midpoint second-order value) or None.
        embeddings: record projected per-sample gradients (True, a dict or ``ProjectionSettings``).
        resume_state: a previous ``state_dict()`` (from the checkpoint) to continue the same store.
        split_validation: with several processes, each rank evaluates its share of the validation points and
            collectives assemble what the values need (the values are those of one process); False: every rank
            evaluates every point.
        Other keyword arguments go to :class:`inrun.valuation.recorder.InRunRecorder` (``per_val_point``, ``index_key``,
        ``index_fn``, ``source_key``, ``source_names``, ``record_norms``, ``allow_unsupported``, ``overwrite``,
        ``flush_every``, ``checkpoint_every``, ``update_rule``, ``compression``: ``"auto"``, ``"gzip"``, ``"lzf"`` or
        None to keep the store uncompressed when the run closes). Every argument is checked before the first step (an
        optimizer inrun does not know is an error unless ``update_rule`` names its rule); the store is created at
        the first step.
    """

    def __init__(
        self,
        engine,
        path: str | Path,
        val_data: Any = None,
        loss_fn: LossFn | None = None,
        shapley: str | None = "first",
        embeddings: Any = False,
        *,
        resume_state: dict | None = None,
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
        split_validation: bool = True,
        update_rule: str | None = None,
        adam_values: str = DEFAULT_ADAM_VALUES,
        check: bool = True,
        check_every: int | None = None,
        compression: str | None = "auto",
    ):
        check_adam_values(adam_values)
        check_compression(compression)
        validate_check_every(check_every)
        self.adapter = DeepSpeedAdapter(engine)
        self.engine = engine
        self.model: nn.Module = engine.module
        self.stage = self.adapter.stage
        dist = process_group()
        self.rank = dist.get_rank() if dist is not None else 0
        self.world_size = dist.get_world_size() if dist is not None else 1
        self._losses: list[float] = []
        self._closed = False
        self._check_resume(resume_state)
        run_id = resume_state["run_id"] if resume_state is not None else new_run_id()
        run_id = self._broadcast(run_id)
        extra = {"framework": "deepspeed", **self.adapter.config()}
        options = dict(per_val_point=per_val_point, index_key=index_key, index_fn=index_fn, source_key=source_key,
                       source_names=source_names, record_norms=record_norms, allow_unsupported=allow_unsupported,
                       overwrite=overwrite, flush_every=flush_every, update_rule=update_rule,
                       adam_values=adam_values, check=check, check_every=check_every, compression=compression)
        if checkpoint_every is not None:  # model snapshots for post-hoc values (rank 0; full tensors under ZeRO-3)
            options["checkpoint_every"] = checkpoint_every

        def build() -> InRunRecorder:
            with self.gathered():  # ZeRO-3: full shapes for the coverage count and the validation check
                recorder = InRunRecorder(
                    self.model, path, val_data=val_data, loss_fn=loss_fn, shapley=shapley, embeddings=embeddings,
                    rank=self.rank, world_size=self.world_size, run_id=run_id,
                    gradient_divisor=float(self.adapter.dp_world_size), extra_config=extra, **options,
                )
                try:
                    self.adapter.prepare(recorder)
                    recorder.check_output_path(resuming=resume_state is not None)
                    if resume_state is not None:
                        recorder.load_state_dict(resume_state["ranks"][self.rank])
                    recorder.start(device=engine.device)
                except BaseException:
                    recorder.capture.detach()  # no stale hooks on the model
                    raise
            return recorder

        self.recorder: InRunRecorder = self._agree("setting up inrun", build)  # every argument checked in there
        self.rule = self.adapter.rule  # the user's update_rule, else the base optimizer's (checked by prepare)
        self._check_ranks_agree(shapley, embeddings, per_val_point, index_key, path, overwrite)
        split_validation_set(self.recorder, split_validation, checked=True)  # the check above compared the data

    # -- collective set-up helpers ----------------------------------------------------------------------------------
    def gathered(self):
        """ZeRO-3: all parameters full-shaped inside the block (collective); otherwise nothing."""
        return self.adapter.gathered()

    def _broadcast(self, value: Any) -> Any:
        dist = process_group()
        if dist is None or self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _agree(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on every rank; if it fails on any rank, raise on every rank (no rank is left waiting)."""
        result, error = None, None
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 -- re-raised below, on every rank
            error = exc
        messages = all_gather_object(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        failed = {rank: message for rank, message in enumerate(messages) if message is not None}
        if failed:
            details = "; ".join(f"rank {rank}: {message}" for rank, message in failed.items())
            raise DeepSpeedMismatchError(f"{what} failed on rank(s) {sorted(failed)}: {details}")
        return result

    def _check_resume(self, state: dict | None) -> bool:
        if state is None:
            return False
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise DeepSpeedMismatchError("resume_state is not a DeepSpeedInRun.state_dict() (format "
                                         f"{state.get('format') if isinstance(state, dict) else type(state)!r})")
        if state["world_size"] != self.world_size:
            files = ", ".join(Path(s["path"]).name for s in state["ranks"])
            raise DeepSpeedMismatchError(
                f"the inrun state in this checkpoint was recorded with world size {state['world_size']} (one store "
                f"file per rank: {files}), but this run has world size {self.world_size}. A store cannot change its "
                "number of rank files: resume with the same number of processes, or record the continuation into a "
                "new store (another path, no resume_state) and open the two runs separately with inrun.open_run"
            )
        return True

    def _check_ranks_agree(self, shapley, embeddings, per_val_point, index_key, path, overwrite) -> None:
        """Every rank must record the same kind of run against the same validation data."""
        digest = hashlib.sha256()
        validation = self.recorder.validation  # None: no validation data (embeddings only)
        for batch in validation.batches if validation is not None else []:
            _tensor_digest(batch, digest)
        embed = self.recorder.embeddings
        mine = {
            "shapley": shapley,
            "embeddings": None if embed is None else sorted(vars(embed).items()),
            "per_val_point": per_val_point,
            "index_key": index_key,
            "store path": str(Path(path)),
            "overwrite": overwrite,
            "number of validation points": validation.num_points if validation is not None else 0,
            "validation data (sha256)": digest.hexdigest()[:16],
            "run id": self.recorder.run_id,
            "trainable parameters": sorted((n, tuple(s)) for n, s in
                                           ((n, full_shape(p)) for n, p in self.recorder.params.items())),
        }
        everyone = all_gather_object(mine)
        differ = [key for key in mine if any(other[key] != everyone[0][key] for other in everyone)]
        if differ:
            lines = []
            for key in differ:
                shown = [str(other[key]) for other in everyone]
                shown = [s if len(s) < 80 else s[:77] + "..." for s in shown]
                lines.append(f"{key}: " + ", ".join(f"rank {r}={s}" for r, s in enumerate(shown)))
            self.recorder.close(final=False)
            self.recorder.capture.detach()
            raise DeepSpeedMismatchError(
                "the ranks of this DeepSpeed run configured inrun differently; every rank must pass the same "
                "settings and the same validation data:\n  " + "\n  ".join(lines)
            )

    # -- per micro-batch ------------------------------------------------------------------------------------------
    def begin_microbatch(self, batch: Any) -> None:
        """Before the forward of a micro-batch: the dataset ids (and source labels) of this rank's samples."""
        self.recorder.begin_microbatch(batch)

    def end_microbatch(self) -> None:
        """After ``engine.backward(loss)``: collect the micro-batch's per-sample factors (loss scale divided out)."""
        self.recorder.end_microbatch(grad_scale=self.adapter.loss_scale())

    def backward(self, loss: Tensor, **kwargs) -> Tensor:
        """``engine.backward(loss)`` then :meth:`end_microbatch`; returns what the engine returns."""
        out = self.engine.backward(loss, **kwargs)
        self._losses.append(float(loss.detach().float()))
        self.end_microbatch()
        return out

    # -- per optimizer step ---------------------------------------------------------------------------------------
    def before_step(self) -> bool:
        """Value the step if this micro-batch ends one (call before ``engine.step()``); True at a boundary.

        Collective at a boundary (gradients, optimizer state, ZeRO-3 parameters): every rank calls it.
        """
        return self.adapter.value_step(self.recorder)

    def after_step(self) -> None:
        """After ``engine.step()`` at a boundary: note this rank's mean micro-batch loss for the step's row."""
        if self._losses:
            self.recorder.note_train_loss(sum(self._losses) / len(self._losses))
        self._losses = []

    def step(self, **kwargs) -> bool:
        """:meth:`before_step`, ``engine.step()``, :meth:`after_step`; True when an optimizer step was taken."""
        boundary = self.before_step()
        self.engine.step(**kwargs)
        if boundary:
            self.after_step()
        return boundary

    # -- ending, checkpoints ---------------------------------------------------------------------------------------
    def close(self, final: bool = True) -> None:
        """Write the last step (with the final validation loss when ``final``), commit and close the store.

        With ``final`` (the default) collective under ZeRO-3: every rank calls it.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if final:
                with self.gathered():
                    self.recorder.close(final=True)
            else:
                self.recorder.close(final=False)
        finally:
            self.recorder.capture.detach()  # also when no step was recorded (the store was never opened)

    def __enter__(self) -> "DeepSpeedInRun":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(final=exc_type is None)

    def flush(self) -> None:
        self.recorder.flush()

    def state_dict(self) -> dict:
        """Every rank's recorder state (collective; the same dict on every rank), after committing the store."""
        self.recorder.flush()
        ranks = all_gather_object(self.recorder.state_dict())
        return {"format": STATE_FORMAT, "world_size": self.world_size, "run_id": self.recorder.run_id,
                "zero_stage": self.stage, "ranks": ranks}

    @property
    def path(self) -> Path:
        """This rank's store file."""
        return self.recorder.path
