"""``InRunCallback`` under Lightning's DeepSpeed strategies (``deepspeed_stage_2``, ``deepspeed_stage_3``) on a GPU.

Lightning refuses DeepSpeed without CUDA ("only supported on CUDA GPUs"), so these tests need one and are skipped
cleanly otherwise; tests/test_deepspeed.py drives the same callback hooks, in the same order, around a real CPU
engine. What these check on the real Trainer:

* ``on_before_optimizer_step`` fires on every micro-batch under DeepSpeed; the callback values a step only at
  ``engine.is_gradient_accumulation_boundary()``, so the store has one row per optimizer step;
* gradients and optimizer state come from DeepSpeed (``param.grad`` is None under ZeRO), and ZeRO-3's partitioned
  parameters are gathered for the validation passes;
* the values equal those of a plain PyTorch loop with ``InRunRecorder`` (same seed, data order, batch). Lightning
  divides the loss by ``accumulate_grad_batches`` and ``engine.backward`` divides it again (NOTES.md), so the
  reference trains on mean loss / gas^2 (``Case(lightning=True)``).

Every Trainer runs in its own subprocess (each initialises torch.distributed and DeepSpeed's global state).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning's DeepSpeed strategy needs a CUDA GPU"),
]

GPU_TOL = 1e-4  # of the step's largest |value|: GPU vs CPU float32 kernels (the reference runs on the CPU)

CONFIGS = [
    # (strategy, precision, optimizer, accumulate_grad_batches)
    ("deepspeed_stage_2", "32-true", "adamw", 2),
    ("deepspeed_stage_3", "32-true", "adamw", 2),
    ("deepspeed_stage_3", "32-true", "sgd-momentum", 1),
    ("deepspeed_stage_2", "bf16-mixed", "sgd", 2),
]


def fit(out: Path, strategy: str, precision: str, optimizer: str, gas: int) -> None:
    """The worker: a real ``Trainer`` with ``InRunCallback`` on one GPU."""
    import lightning as L
    from torch.utils.data import DataLoader, Dataset

    from inrun.callbacks import InRunCallback
    from tests.test_deepspeed import MICRO, N_TRAIN, STEPS, VAL, X, Y, loss_fn, make_model, make_optimizer

    class Indexed(Dataset):
        def __len__(self):
            return N_TRAIN

        def __getitem__(self, i):
            return {"x": X[i], "y": Y[i], "index": i}

    class Net(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_model()

        def forward(self, x):
            return self.net(x)

        def per_sample_loss(self, batch):
            return loss_fn(self.net, batch)

        def training_step(self, batch, batch_idx):
            return self.per_sample_loss(batch).mean()

        def configure_optimizers(self):
            return make_optimizer(optimizer, self.parameters())

        def train_dataloader(self):
            return DataLoader(Indexed(), batch_size=MICRO, shuffle=False)

    callback = InRunCallback(out / "run.h5", val_data=VAL, shapley="second", overwrite=True)
    trainer = L.Trainer(accelerator="gpu", devices=1, strategy=strategy, precision=precision,
                        accumulate_grad_batches=gas, max_steps=STEPS, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    trainer.fit(Net())
    assert trainer.global_step == STEPS
    batches = trainer.fit_loop.epoch_loop.batch_progress.total.ready
    print("optimizer steps", trainer.global_step, "micro-batches", batches)


@pytest.mark.parametrize("strategy,precision,optimizer,gas", CONFIGS,
                         ids=["-".join(map(str, config)) for config in CONFIGS])
def test_lightning_deepspeed_values_match_plain_pytorch(tmp_path, strategy, precision, optimizer, gas):
    import inrun
    from tests.test_deepspeed import BF16_TOL, STEPS, Case, read_ranks, reference_store, union_of_step
    from tests.test_inrun_values import read_store, step_records

    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(tmp_path), strategy,
                           precision, optimizer, str(gas)], capture_output=True, text=True, timeout=600, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]

    with inrun.open_run(tmp_path / "run.h5") as run:
        assert run.num_steps == STEPS  # one row per optimizer step, not per micro-batch
        config = run.config
    assert config["strategy"] == "deepspeed" and config["zero_stage"] == int(strategy[-1])
    assert config["gradient_accumulation_steps"] == gas

    stage = int(strategy[-1])
    reference = reference_store(Case("ref", stage, optimizer, gas, lightning=True), 1, tmp_path / "ref.h5")
    steps, _ = read_store(tmp_path / "run.h5")
    assert list(steps["step"]) == list(range(STEPS)) and not steps["skipped"].any()
    ranks = read_ranks(tmp_path, 1)
    _, ref_records = read_store(reference)
    bf16 = precision.startswith("bf16")
    for t in range(STEPS):
        got = union_of_step(ranks, t)
        want = step_records(ref_records, t)
        order = np.argsort(want["sample_id"], kind="stable")
        np.testing.assert_array_equal(got["sample_id"], want["sample_id"][order])
        for column in ("value_1", "value_2"):
            expected = want[column][order]
            tol = BF16_TOL if bf16 else GPU_TOL
            np.testing.assert_allclose(got[column], expected, rtol=0, atol=tol * np.abs(expected).max(),
                                       err_msg=f"{strategy} {precision} {optimizer} {column} step {t}")


if __name__ == "__main__" and "--worker" in sys.argv:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    args = sys.argv[sys.argv.index("--worker") + 1:]
    fit(Path(args[0]), args[1], args[2], args[3], int(args[4]))
