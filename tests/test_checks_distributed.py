"""The self-checks under DeepSpeed ZeRO-2/3 and with several ranks (DeepSpeed and Lightning DDP, CPU, gloo).

Under ZeRO-3 the batch check runs the training batch through the model inside the integration's gathered-parameters
context; with several ranks the step's completeness check sums every rank's captured contributions with one
collective and compares them with the averaged gradient. Shown here, in one process and with ``torchrun`` (two):

* a functional tied head (``F.linear(x, self.wte.weight)``, issue 10's silent error) is refused with an
  ``ExactnessError`` naming ``wte.weight`` under ZeRO-3 (one and two processes) and ZeRO-2 (two processes);
* an L2 penalty added to the training loss but not to ``loss_fn`` passes the batch check (which sees ``loss_fn``
  only) and is refused by the step check, which sees the gradient the optimizer is given: with two ranks, under
  ZeRO-2 and Lightning DDP. A step check that compared one rank's contributions with the averaged gradient would
  refuse the correct model below; one that skipped the collective would let this one through;
* a correct model (the tied head through a module call) passes, both checks ran (counted), and its recorded values are
  those of the same run with ``check=False``, bit for bit.

Everything runs in two launches started together (one process; two with torchrun), each worker running all its
cases with fresh engines.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
VOCAB, D, T, MICRO, STEPS, N_TRAIN = 13, 8, 6, 3, 3, 24
PENALTY = 0.05  # the L2 penalty's weight: its gradient 2 * PENALTY * w is far beyond the check's tolerance
WORKER_TIMEOUT = 300


def make_data():
    g = torch.Generator().manual_seed(4)
    return torch.randint(0, VOCAB, (N_TRAIN, T), generator=g), {"idx": torch.randint(0, VOCAB, (4, T), generator=g)}


TRAIN, VAL = make_data()


class TiedLM(nn.Module):
    """A tiny LM whose head reuses the token embedding: through a module call (exact) or functionally (refused)."""

    def __init__(self, head: str):
        super().__init__()
        self.functional = head == "functional"
        self.wte = nn.Embedding(VOCAB, D)
        self.mix = nn.Linear(D, D)
        if not self.functional:
            self.lm_head = nn.Linear(D, VOCAB, bias=False)
            self.lm_head.weight = self.wte.weight

    def forward(self, idx):
        x = self.wte(idx)
        x = x + torch.tanh(self.mix(x))
        return F.linear(x, self.wte.weight) if self.functional else self.lm_head(x)


def make_model(head: str) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return TiedLM(head)


def loss_fn(module: nn.Module, batch: dict) -> torch.Tensor:
    idx = batch["idx"]
    logits = module(idx)[:, :-1]
    flat = F.cross_entropy(logits.reshape(-1, VOCAB), idx[:, 1:].reshape(-1), reduction="none")
    return flat.reshape(idx.shape[0], -1).mean(1)


def rank_batch(t: int, rank: int, world: int) -> dict:
    """Rank ``rank``'s micro-batch of step ``t``: the rank-th block of ``MICRO`` of the step's global batch."""
    ids = (torch.arange(MICRO) + (t * world + rank) * MICRO) % N_TRAIN
    return {"idx": TRAIN[ids], "index": ids}


# (name, ZeRO stage or "ddp", head, penalty, check, worlds it runs with)
CASES = [
    ("z3-functional", 3, "functional", False, True, (1, 2)),
    ("z3-module", 3, "module", False, True, (1, 2)),
    ("z3-module-unchecked", 3, "module", False, False, (1, 2)),
    ("z2-functional", 2, "functional", False, True, (2,)),
    ("z2-penalty", 2, "module", True, True, (2,)),
    ("z2-module", 2, "module", False, True, (2,)),
    ("z2-module-unchecked", 2, "module", False, False, (2,)),
    ("ddp-penalty", "ddp", "module", True, True, (2,)),
    ("ddp-module", "ddp", "module", False, True, (2,)),
    ("ddp-module-unchecked", "ddp", "module", False, False, (2,)),
]


# ------------------------------------------------------------------------------------------------ the workers


def run_deepspeed(name, stage, head, penalty, check, out: Path, rank: int, world: int) -> dict:
    import deepspeed

    from inrun.callbacks.deepspeed import DeepSpeedInRun

    model = make_model(head)
    config = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3
                                                       else {})},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9, "wall_clock_breakdown": False}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.5),
                                           config=config)
    inrun_ds = DeepSpeedInRun(engine, out / name / "run.h5", val_data=VAL, loss_fn=loss_fn, shapley="second",
                              overwrite=True, check=check, record_norms=True)
    try:
        for t in range(STEPS):
            batch = rank_batch(t, rank, world)
            inrun_ds.begin_microbatch(batch)
            loss = loss_fn(engine, batch).mean()
            if penalty:  # in the training loss only (ZeRO-2: the module's parameters are whole on every rank)
                loss = loss + PENALTY * engine.module.mix.weight.pow(2).sum()
            inrun_ds.backward(loss)
            inrun_ds.step()
        inrun_ds.close()
    except Exception as error:  # noqa: BLE001 -- reported to the test
        inrun_ds.close(final=False)
        return {"error": f"{type(error).__name__}: {error}", "runs": dict(inrun_ds.recorder.checks.runs)}
    return {"error": None, "runs": dict(inrun_ds.recorder.checks.runs)}


def run_ddp(name, head, penalty, check, out: Path, rank: int, world: int) -> dict:
    """Lightning DDP inside the torchrun worker (Lightning sees torchrun's environment and starts no processes)."""
    import lightning as L
    from torch.utils.data import DataLoader

    from inrun.callbacks import InRunCallback

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_model(head)

        def per_sample_loss(self, batch):
            return loss_fn(self.net, batch)

        def training_step(self, batch, batch_idx):
            loss = self.per_sample_loss(batch).mean()
            return loss + PENALTY * self.net.mix.weight.pow(2).sum() if penalty else loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

        def train_dataloader(self):
            return DataLoader([rank_batch(t, rank, world) for t in range(STEPS)], batch_size=None)

    callback = InRunCallback(out / name / "run.h5", val_data=VAL, shapley="second", overwrite=True, check=check,
                             record_norms=True)
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy="ddp", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, max_steps=STEPS,
                        use_distributed_sampler=False, callbacks=[callback])
    try:
        trainer.fit(Module())
    except Exception as error:  # noqa: BLE001 -- reported to the test
        return {"error": f"{type(error).__name__}: {error}", "runs": dict(callback.recorder.checks.runs)}
    return {"error": None, "runs": dict(callback.recorder.checks.runs)}


def worker(out: Path) -> None:
    import warnings

    import deepspeed

    warnings.simplefilter("ignore")
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # skips a one-minute JIT compile on CPU
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    print(f"rank {rank}: set up in {time.perf_counter() - START:.1f} s", flush=True)
    for name, stage, head, penalty, check, worlds in CASES:
        if world not in worlds:
            continue
        began = time.perf_counter()
        if stage == "ddp":
            results[name] = run_ddp(name, head, penalty, check, out, rank, world)
        else:
            results[name] = run_deepspeed(name, stage, head, penalty, check, out, rank, world)
        dist.barrier()  # every rank finished the case (a refused run leaves no collective behind)
        print(f"rank {rank}: {name} in {time.perf_counter() - began:.1f} s", flush=True)
    (out / f"result.rank{rank}.json").write_text(json.dumps(results))


# ------------------------------------------------------------------------------------------------ launching


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(out: Path, world: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT),
           "WANDB_MODE": "offline"}
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    script = [str(Path(__file__).resolve()), "--worker", str(out)]
    if world == 1:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        command = [sys.executable, *script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
                   "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *script]
    # a session of its own: a launch that must be stopped is stopped with its workers (torchrun's children)
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=out,
                            start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def finish(proc: subprocess.Popen, out: Path, world: int) -> list[dict]:
    try:
        stdout, stderr = proc.communicate(timeout=WORKER_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stdout[-4000:] + stderr[-8000:]
    return [json.loads((out / f"result.rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """world -> (output folder, each rank's results by case); the two launches run at the same time (most of each is
    importing DeepSpeed and Lightning)."""
    outs = {world: tmp_path_factory.mktemp(f"checks{world}") for world in (1, 2)}
    procs = {world: start(out, world) for world, out in outs.items()}
    try:
        return {world: (outs[world], finish(procs[world], outs[world], world)) for world in (1, 2)}
    finally:
        for proc in procs.values():  # one launch failed: the other is not left running
            stop(proc)


def cases(*names_and_worlds):
    return pytest.mark.parametrize("name,world", names_and_worlds, ids=[f"{n}-world{w}" for n, w in names_and_worlds])


# ------------------------------------------------------------------------------------------------ the tests


@pytest.mark.slow
@cases(("z3-functional", 1), ("z3-functional", 2), ("z2-functional", 2))
def test_functional_tied_head_is_refused_on_every_rank(runs, name, world):
    for result in runs[world][1]:
        error = result[name]["error"]
        assert error is not None and error.startswith("ExactnessError"), error
        assert "'wte.weight'" in error and "self.lm_head.weight = self.wte.weight" in error, error
        assert result[name]["runs"]["step"] == 0  # refused at the first micro-batch, before any step


@pytest.mark.slow
@cases(("z2-penalty", 2), ("ddp-penalty", 2))
def test_a_penalty_outside_loss_fn_is_refused_by_the_step_check_over_ranks(runs, name, world):
    for result in runs[world][1]:
        error, counts = result[name]["error"], result[name]["runs"]
        assert error is not None and "ExactnessError" in error, error
        assert "'mix.weight'" in error or "'net.mix.weight'" in error, error
        assert counts == {"batch": 1, "step": 1}, counts  # the batch check passed; the step check refused


def read_store(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The committed part of a store's ``steps`` and ``records`` tables, with plain h5py."""
    import h5py

    with h5py.File(path, "r") as f:
        n_steps, n_rows = int(f.attrs["committed_steps"]), int(f.attrs["committed_rows"])
        return ({k: f["steps"][k][:n_steps] for k in f["steps"]}, {k: f["records"][k][:n_rows] for k in f["records"]})


def _values(folder: Path, world: int) -> list[np.ndarray]:
    files = [folder / "run.h5"] if world == 1 else [folder / f"run.rank{r}.h5" for r in range(world)]
    out = []
    for path in files:
        steps, records = read_store(path)
        assert list(steps["step"]) == list(range(STEPS)) and not steps["skipped"].any()
        out += [records[k] for k in ("step", "sample_id", "value_1", "value_2", "grad_norm_sq")]
    return out


@pytest.mark.slow
@cases(("z3-module", 1), ("z3-module", 2), ("z2-module", 2), ("ddp-module", 2))
def test_a_correct_model_passes_both_checks_and_records_the_same_values(runs, name, world):
    out, results = runs[world]
    for result in results:
        assert result[name]["error"] is None, result[name]["error"]
        assert result[name]["runs"] == {"batch": 1, "step": 1}  # both checks ran at the first step, on every rank
        assert result[name + "-unchecked"]["runs"] == {"batch": 0, "step": 0}
    checked, unchecked = _values(out / name, world), _values(out / (name + "-unchecked"), world)
    for a, b in zip(checked, unchecked):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------ entry point

if __name__ == "__main__" and "--worker" in sys.argv:
    START = time.perf_counter()
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)
    worker(Path(sys.argv[sys.argv.index("--worker") + 1]))
