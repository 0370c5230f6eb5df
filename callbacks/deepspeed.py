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
gradients, optimizer state and (ZeRO-3) parameters, so every rank must call them, in the same order.

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
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from inrun.errors import InRunError
from inrun.update_rules import rule_name
from inrun.recorder import InRunRecorder
from inrun.store import new_run_id
from inrun.validation import LossFn

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
_PIN = -0x1A5D  # a fake sub-module id that keeps ZeRO-3 from releasing gathered parameters while inrun works


class DeepSpeedMismatchError(InRunError, ValueError):
    """The ranks of one DeepSpeed run disagree (configuration, validation data) or a resume does not fit."""


# ------------------------------------------------------------------------------------------------ engine helpers


def _dist():
    return torch.distributed if torch.distributed.is_available() and torch.distributed.is_initialized() else None


def _all_gather_object(value: Any) -> list[Any]:
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage()) if engine.zero_optimization() else 0


def _partitioned(param: Tensor) -> bool:
    """A ZeRO-3 parameter (its own tensor is a ``[0]``-shaped placeholder outside DeepSpeed's hooks)."""
    return hasattr(param, "ds_id") and hasattr(param, "ds_tensor")


def full_shape(param: Tensor) -> torch.Size:
    return param.ds_shape if _partitioned(param) else param.shape


def deepspeed_loss_scale(engine) -> float:
    """The fp16 loss scale the backward ran with (1 for bf16 and fp32): hooks and ZeRO's gradients carry it."""
    if not engine.fp16_enabled():
        scaler = getattr(engine, "torch_autocast_z0_gradscaler", None)
        if scaler is not None and scaler.is_enabled():
            return float(scaler.get_scale())
        return 1.0
    scale = getattr(engine.optimizer, "loss_scale", None)
    if scale is None:
        scale = getattr(engine.optimizer, "cur_scale", None)
    return float(scale) if scale else 1.0


@contextmanager
def gathered_parameters(engine, module: nn.Module | None = None) -> Iterator[None]:
    """Under ZeRO-3: every parameter of ``module`` (default: the engine's) full-shaped and pinned inside the block.

    DeepSpeed's own module hooks still run inside (a forward gathers nothing, a release frees nothing), so the
    model behaves like a plain model: ``torch.autograd.grad`` returns full gradients and in-place changes that are
    undone before the end (the recorder's parameter shifts) never reach the partitions. Collective: call it on
    every rank. A no-op for ZeRO 0-2.
    """
    module = engine.module if module is None else module
    params = list({id(p): p for p in module.parameters() if _partitioned(p)}.values())
    if _zero_stage(engine) != 3 or not params or getattr(engine, "_inrun_gathered", False):
        yield
        return
    params.sort(key=lambda p: p.ds_id)  # the same order on every rank
    params[0].all_gather(param_list=params)
    for p in params:
        p.ds_active_sub_modules.add(_PIN)
    engine._inrun_gathered = True
    try:
        yield
    finally:
        engine._inrun_gathered = False
        for p in params:
            # our pin, and the ids a validation backward leaves behind (its first module's post-backward hook never
            # fires: the validation inputs need no gradient) -- between backward and step no module is active
            p.ds_active_sub_modules.clear()
        offload = getattr(engine.optimizer, "parameter_offload", None)
        if offload is not None and hasattr(offload, "partition_all_parameters"):
            offload.partition_all_parameters()
        else:
            params[0].partition(param_list=[p for p in params if not getattr(p, "ds_persist", False)])


def _all_min(flag: bool) -> bool:
    """``flag`` on every rank (a collective): the same answer everywhere before a rank-dependent branch."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def _batched_full_tensors(engine, params: list[Tensor], keys: tuple[str, ...]) -> list[list[Tensor]] | None:
    """The full fp32 tensor of every ``key`` ("grad" or an optimizer-state key) of every parameter, in ONE collective.

    ``safe_get_full_grad`` / ``safe_get_full_optimizer_state`` issue one collective per parameter and key (a full-size
    all-reduce under ZeRO 1/2): ~2/3 of inrun's per-step time on a small model. This does what they do for all
    parameters at once, from the same fragments DeepSpeed keeps. ``None`` where it does not apply (no partitioned
    state: ZeRO 0 in fp32; NVMe swapping; several process groups): callers then fall back to the ``safe_get_*``
    functions. Whether it applies depends only on the engine's structure, so every rank takes the same branch.
    """
    if not params or not keys:
        return [[] for _ in keys]
    stage = _zero_stage(engine)
    if stage == 3:
        return _batched_zero3(engine, params, keys)
    if all(hasattr(p, "_hp_mapping") and hasattr(p, "_dp_group") for p in params):
        return _batched_fragments(params, keys)
    return None


def _batched_fragments(params: list[Tensor], keys: tuple[str, ...]) -> list[list[Tensor]] | None:
    """ZeRO 1/2 and DeepSpeed's BF16 optimizer: each rank fills the fragments it owns, one all-reduce (sum)."""
    dist = _dist()
    groups = {id(p._dp_group) for p in params}
    if len(groups) != 1:
        return None
    sizes = [p.numel() for p in params]
    total = sum(sizes)
    buffer = torch.zeros(len(keys) * total, dtype=torch.float32, device=params[0].device)
    for k, key in enumerate(keys):
        offset = k * total
        for param, size in zip(params, sizes):
            mapping = param._hp_mapping
            if key == "grad" and getattr(param, "_hp_grad", None) is None and param.grad is not None:
                if dist is None or dist.get_rank(group=param._dp_group) == 0:  # a local, already reduced gradient
                    buffer[offset:offset + size] = param.grad.detach().float().reshape(-1)
            elif mapping is not None:
                address = mapping.lp_fragment_address
                if key == "grad":
                    fragment = mapping.get_lp_grad_fragment(param._index_in_param_group).to(torch.float32).flatten()
                    if fragment.numel() == size:  # BF16: a full accumulation buffer, only the owned fragment counts
                        fragment = fragment.narrow(0, address.start, address.numel)
                else:
                    fragment = mapping.get_hp_fragment(key).flatten()
                buffer[offset + address.start:offset + address.start + address.numel] = fragment
            offset += size
    if dist is not None and dist.get_world_size(group=params[0]._dp_group) > 1:
        dist.all_reduce(buffer, group=params[0]._dp_group)
    out, offset = [], 0
    for _ in keys:
        tensors = []
        for param, size in zip(params, sizes):
            tensors.append(buffer[offset:offset + size].view(param.shape))
            offset += size
        out.append(tensors)
    return out


def _batched_zero3(engine, params: list[Tensor], keys: tuple[str, ...]) -> list[list[Tensor]] | None:
    """ZeRO-3: every rank concatenates its fp32 partitions, one all-gather, each parameter is cut out again."""
    dist = _dist()
    optimizer = engine.optimizer
    needed = ("_get_fp32_grad_state_partition", "_get_fp32_opt_state_partition", "_get_param_partition_group")
    if not all(hasattr(optimizer, name) for name in needed) or getattr(optimizer, "optimizer_swapper", None):
        return None
    groups = {id(optimizer._get_param_partition_group(p)) for p in params}
    if len(groups) != 1 or not all(hasattr(p, "ds_numel") for p in params):
        return None
    group = optimizer._get_param_partition_group(params[0])
    parts = []
    for key in keys:
        for param in params:
            if key == "grad":
                part, _ = optimizer._get_fp32_grad_state_partition(param, release_swap_buffers=True)
            else:
                part, _ = optimizer._get_fp32_opt_state_partition(param, True, key)
            parts.append(part.detach().to(torch.float32).flatten())
    local = torch.cat(parts)
    world = dist.get_world_size(group=group) if dist is not None else 1
    if world > 1:
        gathered = torch.empty(world * local.numel(), dtype=local.dtype, device=local.device)
        dist.all_gather_into_tensor(gathered, local, group=group)
    else:
        gathered = local
    table = gathered.view(world, local.numel())  # row r: rank r's partitions; a parameter is its columns, row-major
    out, column = [], 0
    for _ in keys:
        tensors = []
        for param, part in zip(params, parts):
            width = part.numel()
            tensors.append(table[:, column:column + width].reshape(-1)[: param.ds_numel].view(param.ds_shape))
            column += width
        out.append(tensors)
        parts = parts[len(params):]
    return out


def deepspeed_full_gradients(
    engine, named_params: dict[str, Tensor], loss_scale: float | None = None
) -> dict[str, Tensor]:
    """The full (all ranks averaged, unscaled) gradient of each named parameter, before ``engine.step()``.

    Collective under ZeRO 1-3 (one all-reduce or all-gather for all parameters; per parameter with
    ``deepspeed.utils.safe_get_full_grad`` where the batched path does not apply): every rank calls it for the same
    parameters in the same order.
    """
    from deepspeed.utils import safe_get_full_grad

    scale = deepspeed_loss_scale(engine) if loss_scale is None else loss_scale
    names = [name for name, param in named_params.items() if param.requires_grad]
    batched = _batched_full_tensors(engine, [named_params[n] for n in names], ("grad",))
    if batched is not None:
        found = dict(zip(names, batched[0]))
    else:
        found = {name: safe_get_full_grad(named_params[name]) for name in names}
    grads: dict[str, Tensor] = {}
    for name, grad in found.items():
        if grad is None:
            continue
        grad = grad.detach().float().reshape(full_shape(named_params[name]))
        grads[name] = grad / scale if scale != 1.0 else grad
    return grads


def deepspeed_update_rule(optimizer: torch.optim.Optimizer) -> str:
    """The inrun update rule of a base optimizer (torch's, or DeepSpeed's FusedAdam/DeepSpeedCPUAdam)."""
    return rule_name(optimizer)


class OptimizerView:
    """What ``inrun.update_rules.update_terms`` reads from an optimizer, with the model's own parameters and full
    (gathered) state tensors: ``param_groups`` (hyper-parameters + ``params``) and ``state[param]``."""

    def __init__(self, param_groups: list[dict], state: dict[Tensor, dict], basic: torch.optim.Optimizer):
        self.param_groups = param_groups
        self.state = state
        self.defaults = dict(getattr(basic, "defaults", {}))
        self.basic = basic


def _model_param_groups(engine) -> list[list[Tensor]]:
    """The model's parameters of each base-optimizer parameter group (DeepSpeed replaces the groups' tensors)."""
    basic, wrapper = engine.basic_optimizer, engine.optimizer
    n_groups = len(basic.param_groups)
    groups: list[list[Tensor]] = [[] for _ in range(n_groups)]
    if hasattr(wrapper, "sub_group_to_group_id") and hasattr(wrapper, "fp16_groups"):  # ZeRO-3
        for index, sub_group in enumerate(wrapper.fp16_groups):
            groups[wrapper.sub_group_to_group_id[index]].extend(sub_group)
        return groups
    for attribute in ("bit16_groups", "bf16_groups", "fp16_groups"):  # ZeRO 1/2, BF16_Optimizer, FP16_Optimizer
        found = getattr(wrapper, attribute, None)
        if found is not None and len(found) == n_groups:
            return [list(group) for group in found]
    return [list(group["params"]) for group in basic.param_groups]  # ZeRO 0 in fp32: the model's own tensors


def _applied_steps(engine) -> int:
    """Optimizer steps already applied (Adam's bias-correction count), from the base optimizer's own counter."""
    basic = engine.basic_optimizer
    counts = []
    for group in basic.param_groups:
        if "step" in group:  # FusedAdam keeps one count per group
            counts.append(int(group["step"]))
    for state in basic.state.values():
        if "step" in state:
            step = state["step"]
            counts.append(int(step.item()) if isinstance(step, Tensor) else int(step))
    if counts:
        return max(counts)
    return max(0, int(engine.global_steps) - int(getattr(engine, "skipped_steps", 0))) if basic.state else 0


def _state_keys(rule: str, group: dict) -> tuple[str, ...]:
    if rule in ("adam", "adamw"):
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group.get("amsgrad") else ("exp_avg", "exp_avg_sq")
    if rule == "sgd" and group.get("momentum"):
        return ("momentum_buffer",)
    return ()


def deepspeed_optimizer_view(engine, params: dict[str, Tensor], rule: str | None = None) -> OptimizerView:
    """An ``OptimizerView`` of the engine's optimizer for the named model parameters (before ``engine.step()``).

    Full optimizer state as ``deepspeed.utils.safe_get_full_optimizer_state`` gives it, batched into one collective
    per parameter group (collective under ZeRO 1-3: every rank calls this with the same parameters).
    """
    from deepspeed.utils import safe_get_full_optimizer_state

    basic = engine.basic_optimizer
    rule = rule or deepspeed_update_rule(basic)
    wanted = {id(p) for p in params.values()}
    steps = _applied_steps(engine)
    # every rank's partitions step together, so "there is state" agrees across ranks; check it anyway, a collective
    # asked for on some ranks only would hang
    has_state = _all_min(bool(basic.state) and steps > 0)
    groups, state = [], {}
    for hyper, members in zip(basic.param_groups, _model_param_groups(engine)):
        group = {key: value for key, value in hyper.items() if key != "params"}
        group["params"] = [p for p in members if id(p) in wanted]
        groups.append(group)
        keys = _state_keys(rule, group) if has_state else ()
        batched = _batched_full_tensors(engine, group["params"], keys)
        for index, param in enumerate(group["params"]):
            entry: dict[str, Any] = {"step": steps}
            for k, key in enumerate(keys):
                if batched is not None:
                    value = batched[k][index]
                else:
                    value = safe_get_full_optimizer_state(param, key)
                    if value is None:  # ZeRO 0 without a wrapper: the base optimizer holds the model's tensors
                        value = basic.state.get(param, {}).get(key)
                if value is not None:
                    entry[key] = value.detach().float().reshape(full_shape(param))
            state[param] = entry
    return OptimizerView(groups, state, basic)


class DeepSpeedAdapter:
    """What an ``InRunRecorder`` needs from a DeepSpeed engine, for any driver (a plain loop, Lightning).

    ``prepare(recorder)`` once after building the recorder (ZeRO-3 shapes, DeepSpeed's gradient clipping);
    ``gathered()`` around anything that runs the validation data through the model (recorder construction, ``start``,
    ``close``); ``loss_scale()`` for ``end_microbatch``; ``value_step(recorder)`` before every ``engine.step()``: it
    values the step at the accumulation boundary only and is collective there.
    """

    def __init__(self, engine):
        if getattr(engine, "mp_world_size", 1) > 1 or getattr(engine, "pipeline_parallelism", False):
            raise NotImplementedError("inrun supports data-parallel DeepSpeed (ZeRO 0-3); not model or pipeline "
                                      "parallelism")
        self.engine = engine
        self.stage = _zero_stage(engine)
        self.rule = deepspeed_update_rule(engine.basic_optimizer)
        self.dp_world_size = int(getattr(engine, "dp_world_size", 1))

    def gathered(self):
        """ZeRO-3: all parameters full-shaped inside the block (collective); otherwise nothing."""
        return gathered_parameters(self.engine) if self.stage == 3 else nullcontext()

    def loss_scale(self) -> float:
        return deepspeed_loss_scale(self.engine)

    def config(self) -> dict:
        """What the store's configuration records about the engine."""
        engine = self.engine
        dist = _dist()
        return {
            "deepspeed_version": _deepspeed_version(),
            "zero_stage": self.stage,
            "world_size": dist.get_world_size() if dist is not None else 1,
            "dp_world_size": self.dp_world_size,
            "gradient_accumulation_steps": int(engine.gradient_accumulation_steps()),
            "train_micro_batch_size_per_gpu": int(engine.train_micro_batch_size_per_gpu()),
            "train_batch_size": int(engine.train_batch_size()),
            "precision": "fp16" if engine.fp16_enabled() else "bf16" if engine.bfloat16_enabled() else "fp32",
            "gradient_clipping": float(engine.gradient_clipping() or 0.0),
            "optimizer": type(engine.basic_optimizer).__name__,
        }

    def prepare(self, recorder: InRunRecorder) -> None:
        if self.stage == 3:
            recorder.param_shapes = {name: full_shape(p) for name, p in recorder.params.items()}
        clip = float(self.engine.gradient_clipping() or 0.0)
        recorder.clip_norm = clip if clip > 0 else None  # DeepSpeed clips by the global norm, as clip_grad_norm_
        if self.rule.startswith("sgd-fallback"):
            warnings.warn(f"inrun does not know the update rule of {type(self.engine.basic_optimizer).__name__}; "
                          f"values use the plain SGD rule and the store records update_rule='{self.rule}'",
                          stacklevel=3)

    def is_boundary(self) -> bool:
        return bool(self.engine.is_gradient_accumulation_boundary())

    def value_step(self, recorder: InRunRecorder) -> bool:
        """Value the step if this micro-batch ends one (before ``engine.step()``); True at a boundary."""
        if not self.is_boundary():
            return False
        named = {name: p for name, p in recorder.model.named_parameters() if p.requires_grad}
        grads = deepspeed_full_gradients(self.engine, named)
        view = deepspeed_optimizer_view(self.engine, recorder.params, rule=self.rule)
        with self.gathered():
            recorder.before_optimizer_step(view, grads=grads, rule=self.rule)
        return True


# ------------------------------------------------------------------------------------------------ the integration


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
        val_data: the validation batch, a list of batches or a loader (the same on every rank; checked).
        loss_fn: ``loss_fn(module, batch) -> Tensor[n]``, one loss per sample; called with ``engine.module``.
        shapley: ``"first"``, ``"second"`` (adds the midpoint second-order value) or None.
        embeddings: record projected per-sample gradients (True, a dict or ``ProjectionSettings``).
        resume_state: a previous ``state_dict()`` (from the checkpoint) to continue the same store.
        Other keyword arguments go to :class:`inrun.recorder.InRunRecorder` (``per_val_point``, ``index_key``,
        ``index_fn``, ``source_key``, ``source_names``, ``record_norms``, ``allow_unsupported``, ``overwrite``,
        ``flush_every``, ``checkpoint_every``).
    """

    def __init__(
        self,
        engine,
        path: str | Path,
        val_data: Any,
        loss_fn: LossFn,
        shapley: str | None = "first",
        embeddings: Any = False,
        *,
        resume_state: dict | None = None,
        per_val_point: bool = False,
        index_key: str = "index",
        index_fn: Callable[[Any], Tensor] | None = None,
        source_key: str = "source",
        source_names: list[str] | None = None,
        record_norms: bool = True,
        allow_unsupported: bool = False,
        overwrite: bool = False,
        flush_every: int = 100,
        checkpoint_every: int | None = None,
    ):
        self.adapter = DeepSpeedAdapter(engine)
        self.engine = engine
        self.model: nn.Module = engine.module
        self.stage = self.adapter.stage
        dist = _dist()
        self.rank = dist.get_rank() if dist is not None else 0
        self.world_size = dist.get_world_size() if dist is not None else 1
        self.rule = self.adapter.rule
        self._losses: list[float] = []
        self._closed = False
        self._check_resume(resume_state)
        run_id = resume_state["run_id"] if resume_state is not None else new_run_id()
        run_id = self._broadcast(run_id)
        extra = {"framework": "deepspeed", **self.adapter.config()}
        options = dict(per_val_point=per_val_point, index_key=index_key, index_fn=index_fn, source_key=source_key,
                       source_names=source_names, record_norms=record_norms, allow_unsupported=allow_unsupported,
                       overwrite=overwrite, flush_every=flush_every)
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

        self.recorder: InRunRecorder = self._agree("setting up inrun", build)
        self._check_ranks_agree(shapley, embeddings, per_val_point, index_key, path, overwrite)

    # -- collective set-up helpers ----------------------------------------------------------------------------------
    def gathered(self):
        """ZeRO-3: all parameters full-shaped inside the block (collective); otherwise nothing."""
        return self.adapter.gathered()

    def _broadcast(self, value: Any) -> Any:
        dist = _dist()
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
        messages = _all_gather_object(None if error is None else f"{type(error).__name__}: {error}")
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
        for batch in self.recorder.validation.batches:
            _tensor_digest(batch, digest)
        embed = self.recorder.embeddings
        mine = {
            "shapley": shapley,
            "embeddings": None if embed is None else sorted(vars(embed).items()),
            "per_val_point": per_val_point,
            "index_key": index_key,
            "store path": str(Path(path)),
            "overwrite": overwrite,
            "number of validation points": self.recorder.validation.num_points,
            "validation data (sha256)": digest.hexdigest()[:16],
            "run id": self.recorder.run_id,
            "trainable parameters": sorted((n, tuple(s)) for n, s in
                                           ((n, full_shape(p)) for n, p in self.recorder.params.items())),
        }
        everyone = _all_gather_object(mine)
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
        ranks = _all_gather_object(self.recorder.state_dict())
        return {"format": STATE_FORMAT, "world_size": self.world_size, "run_id": self.recorder.run_id,
                "zero_stage": self.stage, "ranks": ranks}

    @property
    def path(self) -> Path:
        """This rank's store file."""
        return self.recorder.path


def _deepspeed_version() -> str:
    try:
        import deepspeed

        return str(deepspeed.__version__)
    except Exception:  # noqa: BLE001
        return "unknown"
