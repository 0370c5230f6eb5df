"""``DeepSpeedInRun`` under DeepSpeed ZeRO 0, 1, 2 and 3 against the same run without DeepSpeed.

The reference is a plain PyTorch loop driving ``InRunRecorder`` (same seed, same data order, same global batch). The
DeepSpeed runs happen in subprocesses (DeepSpeed initialises ``torch.distributed``, which must not leak into the
other tests): one process with RANK/WORLD_SIZE/MASTER_* set, and ``torchrun --nproc_per_node 2``. Each worker runs
every case of ``CASES`` with fresh engines in the same process and writes one store per case.

Data order: at step t, micro-batch m, the global micro-batch holds the ``MICRO * world`` consecutive ids starting at
``(t * gas + m) * MICRO * world`` (mod N) and rank r trains on the r-th block of ``MICRO`` of them. DeepSpeed averages
the ranks' mean-loss gradients and ``engine.backward`` divides by the accumulation count, so the step equals the
reference's step over the global micro-batches (mean loss / gas each), and so do the per-sample contributions.

fp32 (``FP32_TOL``): in one process every ZeRO stage gives the reference's values bit for bit (gradient clipping:
1e-7, DeepSpeed's FusedAdam: 4e-6 of the step's largest value); with two processes the all-reduce adds the ranks'
gradients in another order, measured at most 4.3e-6 of the step's largest value; the bound is 2e-5.

bf16 (``BF16_TOL``, ``BF16_SUM_TOL``): DeepSpeed keeps bf16 parameters, activations and output gradients (fp32 master
weights and gradient accumulation); the reference is fp32. bf16 keeps 8 significant bits (unit roundoff 2^-9 ~ 0.2%).
A value is a sum of products of a bf16 activation, a bf16 output gradient and a validation gradient computed through
bf16 layers, at parameters that drift by bf16 rounding every step: a few 0.2% per factor, so ~1% per value. Measured
(SGD, and Adam from its third step): at most 0.8% of the step's largest value; the bound is 2% of it, and the values
must correlate (Pearson > 0.999). Adam's first two steps are compared by their totals only: with little history its
update is ~lr * g / |g| per coordinate, so D = lr / (sqrt(v_hat) + eps) is huge wherever the batch gradient nearly
cancels, and bf16 rounding of such a g moves the per-sample split a lot (measured: 150% at step 0, 4% at step 1 with
4 samples), while the step's total -<g_V, Delta_B> stays well conditioned (measured <= 2.4%; bound 5%).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN, N_VAL, N_FEATURES, N_CLASSES = 64, 5, 6, 3
MICRO = 4  # samples per rank per micro-batch
STEPS = 4
FP32_TOL = 2e-5  # of the step's largest |value|: fp32 round-off (the ranks' all-reduce sums in another order)
BF16_TOL = 2e-2  # of the step's largest |value|, per sample (see the module docstring)
BF16_SUM_TOL = 5e-2  # relative, the step's total over all ranks
WORKER_TIMEOUT = 300


# ------------------------------------------------------------------------------------------------ data, model, cases


def make_data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N_TRAIN, N_FEATURES, generator=g)
    y = torch.randint(0, N_CLASSES, (N_TRAIN,), generator=g)
    val = {"x": torch.randn(N_VAL, N_FEATURES, generator=g), "y": torch.randint(0, N_CLASSES, (N_VAL,), generator=g)}
    return x, y, val


X, Y, VAL = make_data()


def make_model() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(N_FEATURES, 8), nn.Tanh(), nn.Linear(8, N_CLASSES))


def loss_fn(module: nn.Module, batch: dict) -> torch.Tensor:
    """Per-sample cross-entropy; inputs follow the model's dtype (bf16 under DeepSpeed's bf16 mode)."""
    dtype = next(module.parameters()).dtype
    return F.cross_entropy(module(batch["x"].to(dtype)).float(), batch["y"], reduction="none")


def batch_of(ids: torch.Tensor) -> dict:
    return {"x": X[ids], "y": Y[ids], "index": ids}


ADAMW = {"lr": 0.01, "weight_decay": 0.1}


def make_optimizer(kind: str, params):
    """The torch optimizer of a case (``fused-adamw``: DeepSpeed builds its FusedAdam from the config; the reference
    uses torch's AdamW with the same hyper-parameters)."""
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.3)
    if kind == "sgd-momentum":
        return torch.optim.SGD(params, lr=0.2, momentum=0.9, weight_decay=0.05)
    if kind == "adam-l2":
        return torch.optim.Adam(params, lr=0.01, weight_decay=0.05)
    return torch.optim.AdamW(params, **ADAMW)


@dataclass(frozen=True)
class Case:
    name: str
    stage: int
    optimizer: str = "adamw"
    gas: int = 1
    bf16: bool = False
    clip: float = 0.0
    persist: bool = False  # ZeRO-3: keep DeepSpeed's default persistence threshold (tiny params stay whole)
    resume: bool = False  # close after 2 steps and go on with a new DeepSpeedInRun from state_dict()
    lightning: bool = False  # drive InRunCallback's hooks in Lightning's DeepSpeed order (see run_lightning_case)
    extras: bool = False  # also per-validation-point values and projected gradients (embeddings)


EXTRAS = {"per_val_point": True, "embeddings": {"k_rows": 4, "k_cols": 4, "seed": 5}}


CASES = [
    Case("z0-sgd", 0, "sgd"),
    Case("z0-adamw", 0),
    Case("z1-sgd", 1, "sgd-momentum"),
    Case("z1-adamw", 1),
    Case("z1-adam-l2", 1, "adam-l2"),
    Case("z2-sgd", 2, "sgd"),
    Case("z2-adamw", 2),
    Case("z2-fused-adamw", 2, "fused-adamw"),
    Case("z3-sgd", 3, "sgd-momentum"),
    Case("z3-adamw", 3),
    Case("z3-adamw-persistent", 3, persist=True),
    Case("z3-adamw-extras", 3, extras=True),
    Case("z2-adamw-gas2", 2, gas=2),
    Case("z3-sgd-gas2", 3, "sgd", gas=2),
    Case("z2-adamw-clip", 2, clip=0.05),
    Case("z2-adamw-resume", 2, resume=True),
    Case("z0-sgd-bf16", 0, "sgd", bf16=True),
    Case("z2-adamw-bf16", 2, bf16=True),
    Case("z3-sgd-bf16", 3, "sgd", bf16=True),
    Case("lightning-z2-adamw-gas2", 2, gas=2, lightning=True),
    Case("lightning-z3-sgd-gas2", 3, "sgd-momentum", gas=2, lightning=True),
]
BY_NAME = {case.name: case for case in CASES}


def ds_config(case: Case) -> dict:
    zero = {"stage": case.stage}
    if case.stage == 3 and not case.persist:
        zero["stage3_param_persistence_threshold"] = 0  # every parameter really partitioned
    config = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": case.gas,
        "gradient_clipping": case.clip,  # DeepSpeed's default is 1.0
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": case.bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if case.optimizer == "fused-adamw":
        config["optimizer"] = {"type": "AdamW", "params": ADAMW}
    return config


def plan(case: Case, world: int) -> list[list[torch.Tensor]]:
    """Global micro-batches of every step (``MICRO * world`` ids each)."""
    size = MICRO * world
    return [[torch.arange(size * (t * case.gas + m), size * (t * case.gas + m + 1)) % N_TRAIN
             for m in range(case.gas)] for t in range(STEPS)]


# ------------------------------------------------------------------------------------------------ the reference


def reference_store(case: Case, world: int, path: Path) -> Path:
    """The same run without DeepSpeed: one process, global micro-batches, mean loss / gas, fp32.

    Lightning's DeepSpeed strategy divides the loss by ``accumulate_grad_batches`` and ``engine.backward`` divides
    it again (NOTES.md): the Lightning cases train on mean loss / gas^2, and so does their reference.
    """
    divisor = case.gas**2 if case.lightning else case.gas
    from inrun.valuation.recorder import InRunRecorder

    model = make_model()
    optimizer = make_optimizer(case.optimizer, model.parameters())
    recorder = InRunRecorder(model, path, val_data=VAL, loss_fn=loss_fn, shapley="second", overwrite=True,
                             record_norms=True, **(EXTRAS if case.extras else {}))
    if case.clip:
        recorder.clip_norm = case.clip
    recorder.start()
    for micro in plan(case, world):
        for ids in micro:
            batch = batch_of(ids)
            recorder.begin_microbatch(batch)
            (loss_fn(model, batch).mean() / divisor).backward()
            recorder.end_microbatch()
        recorder.before_optimizer_step(optimizer)
        if case.clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), case.clip)
        optimizer.step()
        optimizer.zero_grad()
    recorder.close()
    return path


# ------------------------------------------------------------------------------------------------ the worker


def _engine(case: Case):
    import deepspeed

    model = make_model()
    config = ds_config(case)
    if "optimizer" in config:  # DeepSpeed builds it (FusedAdam, adam_w_mode=True)
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        assert type(engine.basic_optimizer).__name__ == "FusedAdam"
    else:
        optimizer = make_optimizer(case.optimizer, model.parameters())
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def run_case(case: Case, out: Path, rank: int, world: int, *, die_at: int | None = None, flush_every: int = 100):
    """Train ``case`` under DeepSpeed with ``DeepSpeedInRun``; the store goes to ``out/<case>/run.h5``."""
    from inrun.callbacks.deepspeed import DeepSpeedInRun

    engine = _engine(case)
    path = out / case.name / "run.h5"
    options = dict(val_data=VAL, loss_fn=loss_fn, shapley="second", overwrite=True, flush_every=flush_every,
                   record_norms=True, **(EXTRAS if case.extras else {}))
    inrun_ds = DeepSpeedInRun(engine, path, **options)
    with inrun_ds:
        for t, micro in enumerate(plan(case, world)):
            if case.resume and t == 2:  # as after a crash: a checkpointed state, a fresh integration
                state = inrun_ds.state_dict()
                inrun_ds.close(final=False)
                inrun_ds = DeepSpeedInRun(engine, path, resume_state=state, **options)
            for ids in micro:
                batch = batch_of(ids[rank * MICRO:(rank + 1) * MICRO])
                inrun_ds.begin_microbatch(batch)
                loss = loss_fn(engine, batch).mean()
                if die_at is not None and t == die_at and rank == 1:
                    os.kill(os.getpid(), signal.SIGKILL)
                inrun_ds.backward(loss)
                inrun_ds.step()
    inrun_ds.close()
    return inrun_ds


def run_lightning_case(case: Case, out: Path, rank: int, world: int) -> None:
    """``InRunCallback`` under DeepSpeed, its hooks called in the order Lightning's DeepSpeed strategy calls them.

    Lightning refuses DeepSpeed without CUDA, so on CPU the trainer is a stand-in: a real ``DeepSpeedStrategy``
    subclass (the callback recognises it by type) around a real engine. Per batch, as in Lightning 2.6:
    ``on_train_batch_start``; the closure (engine forward, loss / accumulate_grad_batches, ``engine.backward``,
    ``on_after_backward``); ``on_before_optimizer_step`` (on every micro-batch under DeepSpeed); ``engine.step()``;
    ``on_train_batch_end``. tests/test_lightning_deepspeed_gpu.py runs the real Trainer on a GPU.
    """
    import lightning as L
    import torch.distributed as dist
    from lightning.pytorch.strategies import DeepSpeedStrategy

    from inrun.callbacks import InRunCallback

    class Strategy(DeepSpeedStrategy):
        def __init__(self, engine):  # noqa: D401 -- no parent set-up: it would look for CUDA
            self._engine = engine

        @property
        def deepspeed_engine(self):
            return self._engine

        def broadcast(self, obj, src: int = 0):
            box = [obj]
            dist.broadcast_object_list(box, src=src)
            return box[0]

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_model()

        def forward(self, x):
            return self.net(x)

    class Trainer:
        def __init__(self, engine):
            self.strategy = Strategy(engine)
            self.world_size, self.global_rank = world, rank
            self.accumulate_grad_batches = case.gas
            self.precision = "32-true"
            self.ckpt_path = None
            self.gradient_clip_val, self.gradient_clip_algorithm = None, None

    import deepspeed

    module = Module()
    optimizer = make_optimizer(case.optimizer, module.parameters())
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config(case))
    trainer = Trainer(engine)
    callback = InRunCallback(out / case.name / "run.h5", val_data=VAL, shapley="second",
                             loss_fn=lambda m, batch: loss_fn(m.net, batch), overwrite=True, record_norms=True)
    callback.on_fit_start(trainer, module)
    callback.on_train_start(trainer, module)
    batch_idx = 0
    for micro in plan(case, world):
        for ids in micro:
            batch = batch_of(ids[rank * MICRO:(rank + 1) * MICRO])
            callback.on_train_batch_start(trainer, module, batch, batch_idx)
            loss = loss_fn(engine, batch).mean() / case.gas
            engine.backward(loss)
            callback.on_after_backward(trainer, module)
            callback.on_before_optimizer_step(trainer, module, engine.optimizer)
            engine.step()
            callback.on_train_batch_end(trainer, module, {"loss": loss.detach()}, batch, batch_idx)
            batch_idx += 1
    callback.on_train_end(trainer, module)


def _expect_error(fn) -> str:
    try:
        fn()
    except Exception as error:  # noqa: BLE001
        return f"{type(error).__name__}: {error}"
    return "no error"


def worker(out: Path, mode: str, foreign_state: str | None) -> None:
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    import torch.distributed as dist

    from inrun.callbacks.deepspeed import DeepSpeedInRun

    rank, world = dist.get_rank(), dist.get_world_size()
    result: dict = {"rank": rank, "world": world, "errors": {}}
    if mode == "die":
        run_case(BY_NAME["z2-adamw"], out, rank, world, die_at=3, flush_every=1)
        return
    for case in CASES:
        (run_lightning_case if case.lightning else run_case)(case, out, rank, world)
    # a state to resume from, recorded with this world size
    engine = _engine(BY_NAME["z2-sgd"])
    with DeepSpeedInRun(engine, out / "state-run" / "run.h5", val_data=VAL, loss_fn=loss_fn) as inrun_ds:
        batch = batch_of(torch.arange(rank * MICRO, (rank + 1) * MICRO))
        inrun_ds.begin_microbatch(batch)
        inrun_ds.backward(loss_fn(engine, batch).mean())
        inrun_ds.step()
        state = inrun_ds.state_dict()
    if rank == 0:
        torch.save(state, out / f"state-world{world}.pt")
    if foreign_state:  # resuming a run recorded with another world size
        state = torch.load(foreign_state, weights_only=True)
        result["errors"]["resume"] = _expect_error(lambda: DeepSpeedInRun(
            engine, Path(foreign_state).parent / "state-run" / "run.h5", val_data=VAL, loss_fn=loss_fn,
            resume_state=state))
    if world > 1:  # ranks that disagree
        short_val = {k: v[: N_VAL - rank] for k, v in VAL.items()}
        result["errors"]["val_size"] = _expect_error(lambda: DeepSpeedInRun(
            engine, out / "mismatch" / "run.h5", val_data=short_val, loss_fn=loss_fn, overwrite=True))
        result["errors"]["shapley"] = _expect_error(lambda: DeepSpeedInRun(
            engine, out / "mismatch" / "run.h5", val_data=VAL, loss_fn=loss_fn, overwrite=True,
            shapley="first" if rank == 0 else "second"))
        bad_val = VAL if rank == 0 else {"inputs": VAL["x"]}
        result["errors"]["bad_val"] = _expect_error(lambda: DeepSpeedInRun(
            engine, out / "mismatch" / "run.h5", val_data=bad_val, loss_fn=loss_fn, overwrite=True))
        dist.barrier()  # the three failures above left every rank in step: one more collective must work
    (out / f"result.rank{rank}.json").write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------------ running workers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)
    return env


def launch(out: Path, world: int, mode: str = "main", foreign_state: Path | None = None, check: bool = True):
    script = [str(Path(__file__).resolve()), "--worker", str(out), mode]
    script += [str(foreign_state)] if foreign_state else []
    env = _env()
    if world == 1:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                   "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *script]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=WORKER_TIMEOUT, env=env, cwd=out)
    if check:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return proc


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ds1")
    launch(out, 1)
    return out


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, one_process) -> Path:
    out = tmp_path_factory.mktemp("ds2")
    launch(out, 2, foreign_state=one_process / "state-world1.pt")
    return out


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Reference stores per (case, world), computed once (bf16 cases share their fp32 reference)."""
    folder = tmp_path_factory.mktemp("ref")
    cache: dict = {}

    def get(case: Case, world: int) -> Path:
        fp32 = Case(case.name + "-ref", case.stage, case.optimizer, case.gas, clip=case.clip, lightning=case.lightning,
                    extras=case.extras)
        key = (fp32.optimizer.replace("fused-", ""), fp32.gas, fp32.clip, fp32.lightning, case.extras, world)
        if key not in cache:
            cache[key] = reference_store(fp32, world, folder / f"ref-{len(cache)}.h5")
        return cache[key]

    return get


# ------------------------------------------------------------------------------------------------ comparisons


def read_ranks(folder: Path, world: int):
    from tests.test_inrun_values import read_store

    if world == 1:
        return [read_store(folder / "run.h5")]
    return [read_store(folder / f"run.rank{r}.h5") for r in range(world)]


def union_of_step(ranks, t: int) -> dict[str, np.ndarray]:
    from tests.test_inrun_values import step_records

    columns = [k for k in ("sample_id", "value_1", "value_2", "grad_norm_sq", "value_1_per_val", "value_2_per_val",
                           "proj_grad") if k in ranks[0][1]]
    union = {k: np.concatenate([step_records(records, t)[k] for _, records in ranks]) for k in columns}
    order = np.argsort(union["sample_id"], kind="stable")
    return {k: v[order] for k, v in union.items()}


def compare(case: Case, world: int, out: Path, reference: Path) -> dict[str, float]:
    """Assert the DeepSpeed run's values equal the reference's; return the largest relative errors seen."""
    from tests.test_inrun_values import read_store, step_records

    ranks = read_ranks(out / case.name, world)
    ref_steps, ref_records = read_store(reference)
    worst = {"value_1": 0.0, "value_2": 0.0}
    for steps, _ in ranks:
        assert list(steps["step"]) == list(range(STEPS)) and not steps["skipped"].any()
    first = 2 if case.bf16 and case.optimizer == "adamw" else 0  # see the module docstring
    for t in range(STEPS):
        got = union_of_step(ranks, t)
        want = step_records(ref_records, t)
        order = np.argsort(want["sample_id"], kind="stable")
        want = {k: v[order] for k, v in want.items()}
        np.testing.assert_array_equal(got["sample_id"], want["sample_id"], err_msg=f"{case.name} step {t}")
        for column in ("value_1", "value_2"):
            if case.bf16:
                total, expected = got[column].sum(), want[column].sum()
                assert abs(total - expected) <= BF16_SUM_TOL * abs(expected), (case.name, world, column, t)
            if t < first:
                continue
            scale = np.abs(want[column]).max()
            error = np.abs(got[column] - want[column]).max() / scale
            worst[column] = max(worst[column], error)
            tol = BF16_TOL if case.bf16 else FP32_TOL
            assert error <= tol, f"{case.name} (world {world}) {column} step {t}: relative error {error:.2e} > {tol}"
            if case.bf16:
                assert np.corrcoef(got[column], want[column])[0, 1] > 0.999, (case.name, column, t)
        if not case.bf16:
            np.testing.assert_allclose(got["grad_norm_sq"], want["grad_norm_sq"], rtol=1e-4, err_msg=case.name)
        if case.extras:  # [n, n_val] values and [n, k] projections, recorded from the same factors
            for column in ("value_1_per_val", "value_2_per_val", "proj_grad"):
                scale = np.abs(want[column]).max()
                np.testing.assert_allclose(got[column], want[column], rtol=0, atol=1e-5 * scale,
                                           err_msg=f"{case.name} {column} step {t}")
    for steps, _ in ranks:  # every rank evaluates the same validation losses
        for column in ("val_loss", "val_loss_base", "val_loss_after"):
            np.testing.assert_allclose(steps[column], ref_steps[column], rtol=2e-2 if case.bf16 else 1e-5,
                                       err_msg=f"{case.name} {column}")
    return worst


FP32_CASES = [case for case in CASES if not case.bf16]
BF16_CASES = [case for case in CASES if case.bf16]


@pytest.mark.slow
@pytest.mark.parametrize("case", FP32_CASES, ids=lambda c: c.name)
def test_one_process_matches_plain_pytorch(one_process, references, case):
    compare(case, 1, one_process, references(case, 1))


@pytest.mark.slow
@pytest.mark.parametrize("case", FP32_CASES, ids=lambda c: c.name)
def test_two_processes_match_plain_pytorch(two_processes, references, case):
    compare(case, 2, two_processes, references(case, 2))


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("case", BF16_CASES, ids=lambda c: c.name)
def test_bf16_close_to_fp32(one_process, two_processes, references, case, world):
    out = one_process if world == 1 else two_processes
    compare(case, world, out, references(case, world))


@pytest.mark.slow
def test_open_run_reads_the_ranks_as_one_run(two_processes, references):
    import inrun

    case = BY_NAME["z3-adamw"]
    with inrun.open_run(references(case, 2)) as ref:
        ids_ref, values_ref = ref.sample_values(order=2)
    for where in (two_processes / case.name, two_processes / case.name / "run.h5"):
        with inrun.open_run(where) as run:
            assert run.world_size == 2 and run.num_steps == STEPS
            assert run.num_records == STEPS * 2 * MICRO
            ids, values = run.sample_values(order=2)
            np.testing.assert_array_equal(ids, ids_ref)
            np.testing.assert_allclose(values, values_ref, rtol=0, atol=FP32_TOL * np.abs(values_ref).max())
            config = run.config
            assert config["framework"] == "deepspeed" and config["zero_stage"] == 3 and config["world_size"] == 2
            assert config["dp_world_size"] == 2 and config["update_rule"] == "adamw"


@pytest.mark.slow
def test_store_config_names_stage_and_world(one_process):
    import inrun

    with inrun.open_run(one_process / "z2-adamw-gas2" / "run.h5") as run:
        config = run.config
    assert (config["zero_stage"], config["world_size"], config["gradient_accumulation_steps"]) == (2, 1, 2)
    assert config["precision"] == "fp32" and config["optimizer"] == "AdamW"


def _errors(folder: Path, world: int) -> list[dict]:
    return [json.loads((folder / f"result.rank{r}.json").read_text())["errors"] for r in range(world)]


@pytest.mark.slow
def test_mismatched_ranks_fail_clearly_on_every_rank(two_processes):
    for errors in _errors(two_processes, 2):
        assert "DeepSpeedMismatchError" in errors["val_size"] and "number of validation points" in errors["val_size"]
        assert "DeepSpeedMismatchError" in errors["shapley"] and "shapley" in errors["shapley"]
    bad = _errors(two_processes, 2)
    assert "failed on rank(s) [1]" in bad[0]["bad_val"]  # rank 0 hears why rank 1 failed
    assert "BatchMismatchError" in bad[1]["bad_val"]  # rank 1 raises its own error


@pytest.mark.slow
def test_resume_with_another_world_size_is_refused(two_processes):
    for errors in _errors(two_processes, 2):
        message = errors["resume"]
        assert "DeepSpeedMismatchError" in message and "world size 1" in message and "world size 2" in message
        assert "new store" in message


@pytest.mark.slow
def test_a_rank_dying_leaves_the_other_stores_readable(tmp_path, references):
    import inrun
    from tests.test_inrun_values import read_store

    proc = launch(tmp_path, 2, mode="die", check=False)
    assert proc.returncode != 0
    folder = tmp_path / "z2-adamw"
    steps, _ = read_store(folder / "run.rank0.h5")  # committed after every step (flush_every=1)
    assert list(steps["step"]) == [0, 1]  # step 2 waited for the validation loss after it; step 3 never ended
    with inrun.open_run(folder) as run:  # the killed rank's file is readable too, up to its last commit
        assert run.world_size == 2 and run.num_steps == 2
    ref_steps, ref_records = read_store(references(BY_NAME["z2-adamw"], 2))
    ranks = read_ranks(folder, 2)
    for t in range(2):
        got = union_of_step(ranks, t)
        from tests.test_inrun_values import step_records

        want = step_records(ref_records, t)
        np.testing.assert_allclose(got["value_1"], want["value_1"][np.argsort(want["sample_id"])],
                                   atol=FP32_TOL * np.abs(want["value_1"]).max())


# ------------------------------------------------------------------------------------------------ without DeepSpeed


def test_update_rule_from_the_base_optimizer():
    from inrun.callbacks.deepspeed_engine import deepspeed_update_rule

    params = [nn.Parameter(torch.zeros(2))]
    assert deepspeed_update_rule(torch.optim.SGD(params, lr=0.1)) == "sgd"
    assert deepspeed_update_rule(torch.optim.Adam(params)) == "adam"
    assert deepspeed_update_rule(torch.optim.AdamW(params)) == "adamw"

    class FusedLike(torch.optim.Optimizer):  # DeepSpeed's FusedAdam / DeepSpeedCPUAdam expose adam_w_mode
        def __init__(self, params, adam_w_mode):
            super().__init__(params, {"lr": 0.1})
            self.adam_w_mode = adam_w_mode

    assert deepspeed_update_rule(FusedLike(params, True)) == "adamw"
    assert deepspeed_update_rule(FusedLike(params, False)) == "adam"
    assert deepspeed_update_rule(torch.optim.Adagrad(params)) == "adagrad"
    assert deepspeed_update_rule(torch.optim.NAdam(params)) == "unsupported:NAdam"  # refused by DeepSpeedInRun


# ------------------------------------------------------------------------------------------------ entry point

if __name__ == "__main__" and "--worker" in sys.argv:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)
    args = sys.argv[sys.argv.index("--worker") + 1:]
    worker(Path(args[0]), args[1], args[2] if len(args) > 2 else None)
