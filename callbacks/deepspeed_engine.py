"""The DeepSpeed engine adapter: what an ``InRunRecorder`` needs from a ``DeepSpeedEngine``, for any driver.

Full-batch gradients with ``deepspeed.utils.safe_get_full_grad`` and optimizer state with
``safe_get_full_optimizer_state`` (``param.grad`` is None under ZeRO 1-3), batched into one collective per parameter
group; the update rule and its hyper-parameters from the base optimizer (torch SGD/Adam/AdamW by class, FusedAdam /
DeepSpeedCPUAdam by ``adam_w_mode``); the fp16 loss scale; ZeRO-3 parameter gathering (every parameter gathered once
and pinned, then partitioned again unchanged bit for bit). Used by :class:`inrun.callbacks.DeepSpeedInRun` (a plain
loop) and by the Lightning callback under Lightning's DeepSpeed strategy.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from inrun.callbacks.distributed import all_ranks_true, process_group, sum_over_ranks
from inrun.valuation.recorder import InRunRecorder
from inrun.valuation.update_rules import resolve_rule, rule_name

_PIN = -0x1A5D  # a fake sub-module id that keeps ZeRO-3 from releasing gathered parameters while inrun works


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
    dist = process_group()
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
    dist = process_group()
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
    """What ``inrun.valuation.update_rules.update_terms`` reads from an optimizer, with the model's own parameters and full
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
    if rule == "rmsprop":
        return ("square_avg",) + (("momentum_buffer",) if group.get("momentum") else ()) + (
            ("grad_avg",) if group.get("centered") else ())
    if rule == "adagrad":
        return ("sum",)
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
    has_state = all_ranks_true(bool(basic.state) and steps > 0)
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

    def sum_over_ranks(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over the engine's data-parallel ranks (collective), as its gradients are reduced."""
        return sum_over_ranks(tensor, group=getattr(self.engine, "data_parallel_group", None))

    def config(self) -> dict:
        """What the store's configuration records about the engine."""
        engine = self.engine
        dist = process_group()
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
            # the self-checks run the training batch through the model: full parameters, as for validation
            recorder.checks.full_parameters = self.gathered
        if self.dp_world_size > 1:  # the step's completeness check assembles the ranks' contributions
            recorder.checks.sum_over_ranks = self.sum_over_ranks
        clip = float(self.engine.gradient_clipping() or 0.0)
        recorder.clip_norm = clip if clip > 0 else None  # DeepSpeed clips by the global norm, as clip_grad_norm_
        # the user's update_rule, else the base optimizer's; an optimizer inrun does not know is an error here
        if recorder.order > 0 or recorder.embeddings is not None:
            self.rule = resolve_rule(self.engine.basic_optimizer, recorder.update_rule)

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


def _deepspeed_version() -> str:
    try:
        import deepspeed

        return str(deepspeed.__version__)
    except Exception:  # noqa: BLE001
        return "unknown"
