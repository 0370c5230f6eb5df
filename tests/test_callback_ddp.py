"""``InRunCallback`` under Lightning DDP on CPU (gloo, 2 processes): one store file per rank, and the union of the
ranks' records per step equals a single-process run whose batch is the union of both ranks' batches.

Each rank gets its own deterministic half of every global batch (``use_distributed_sampler=False``, a dataset per
rank): at step t rank 0 trains on ids 8t..8t+3 and rank 1 on 8t+4..8t+7. DDP averages the two ranks' mean-loss
gradients, which is the mean over the 8 samples, so a sample's contribution c_i carries 1/world_size and the
single-process run with batches of 8 (ids 8t..8t+7) takes the same steps with the same c_i.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from tests.test_inrun_values import adamw, loss_fn, make_data, make_mlp, read_store, replay, step_records

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN, RANK_BATCH, WORLD, N_VAL = 32, 4, 2, 5
GLOBAL_BATCH = RANK_BATCH * WORLD
N_STEPS = 6  # 1.5 epochs of the 4-step epoch
X, Y, VAL = make_data(n=N_TRAIN, n_val=N_VAL, seed=3)


class IndexedData(Dataset):
    def __len__(self):
        return N_TRAIN

    def __getitem__(self, i):
        return {"x": X[i], "y": Y[i], "index": i}


def rank_ids(rank: int) -> list[int]:
    """The samples of ``rank``, in order: the rank-th quarter-batch of every global batch."""
    return [i for i in range(N_TRAIN) if (i // RANK_BATCH) % WORLD == rank]


def global_ids(t: int) -> np.ndarray:
    start = (t % (N_TRAIN // GLOBAL_BATCH)) * GLOBAL_BATCH
    return np.arange(start, start + GLOBAL_BATCH)


def lightning_module():
    """The module class (defined lazily: importing lightning is slow and only the runs need it)."""
    import lightning as L

    class Net(L.LightningModule):
        def __init__(self, per_rank: bool):
            super().__init__()
            self.net = make_mlp(seed=1)
            self.per_rank = per_rank

        def per_sample_loss(self, batch):
            return loss_fn(self.net, batch)

        def training_step(self, batch, batch_idx):
            return self.per_sample_loss(batch).mean()

        def configure_optimizers(self):
            return adamw(self.net)

        def train_dataloader(self):
            if self.per_rank:
                data = Subset(IndexedData(), rank_ids(self.trainer.global_rank))
                return DataLoader(data, batch_size=RANK_BATCH, shuffle=False)
            return DataLoader(IndexedData(), batch_size=GLOBAL_BATCH, shuffle=False)

    return Net


def fit(path, per_rank: bool, max_steps: int = N_STEPS, ckpt_path=None, overwrite: bool = True, **trainer_kwargs):
    import lightning as L

    from inrun.callbacks import InRunCallback

    callback = InRunCallback(path, val_data=VAL, shapley="second", per_val_point=True, overwrite=overwrite,
                             record_norms=True)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, max_steps=max_steps, callbacks=[callback], **trainer_kwargs)
    trainer.fit(lightning_module()(per_rank=per_rank), ckpt_path=ckpt_path)
    return trainer


DDP_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)
from tests.test_callback_ddp import fit
trainer = fit(sys.argv[1], per_rank=True, strategy="ddp", devices=2, use_distributed_sampler=False)
print("rank", trainer.global_rank, "world", trainer.world_size, "steps", trainer.global_step, flush=True)
"""




RESUME_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)
from tests.test_callback_ddp import fit
path, ckpt, phase = sys.argv[1], sys.argv[2], sys.argv[3]
kwargs = dict(per_rank=True, strategy="ddp", devices=2, use_distributed_sampler=False)
if phase == "first":
    trainer = fit(path, max_steps=-1, max_epochs=1, **kwargs)  # stop at an epoch boundary (4 steps)
    trainer.save_checkpoint(ckpt)
else:
    trainer = fit(path, ckpt_path=ckpt, overwrite=False, **kwargs)
print("rank", trainer.global_rank, "world", trainer.world_size, "steps", trainer.global_step, flush=True)
"""


def run_script(out: Path, source: str, *args: str) -> str:
    script = out / "script.py"
    script.write_text(source.format(root=str(ROOT)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK"):
        env.pop(name, None)  # Lightning picks a free port itself
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=400,
                          env=env, cwd=out)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    return proc.stdout


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    stdout = run_script(out, DDP_SCRIPT, str(out / "run.h5"))
    assert f"world 2 steps {N_STEPS}" in stdout, stdout
    return out


@pytest.mark.slow
def test_ddp_resume_restores_each_ranks_own_state(ddp_run, tmp_path):
    """Checkpoint at an epoch boundary (step 4), resume in new processes. Each rank must resume its own pending
    step (Lightning saves rank 0's callback state only, so the callback gathers every rank's): step 3, written
    after the resume from the restored state, equals the uninterrupted run on both ranks, no step is duplicated or
    lost, and no rank's file holds the other rank's samples. (After the resume Lightning itself replays the first
    batch of the epoch under DDP with a per-rank loader, so later steps' batches differ from the uninterrupted run.)
    """
    path, ckpt = tmp_path / "run.h5", tmp_path / "mid.ckpt"
    run_script(tmp_path, RESUME_SCRIPT, str(path), str(ckpt), "first")
    stdout = run_script(tmp_path, RESUME_SCRIPT, str(path), str(ckpt), "resume")
    assert f"world 2 steps {N_STEPS}" in stdout, stdout
    for rank in range(WORLD):
        steps, resumed = read_store(tmp_path / f"run.rank{rank}.h5")
        _, expected = read_store(ddp_run / f"run.rank{rank}.h5")
        assert steps["step"].tolist() == list(range(N_STEPS))
        assert set(resumed["sample_id"].tolist()) <= set(rank_ids(rank))
        before = resumed["step"] < 4
        np.testing.assert_array_equal(resumed["sample_id"][before], expected["sample_id"][expected["step"] < 4])
        np.testing.assert_allclose(resumed["value_1"][before], expected["value_1"][expected["step"] < 4], rtol=1e-9)
        np.testing.assert_allclose(resumed["value_2"][before], expected["value_2"][expected["step"] < 4], rtol=1e-9)


@pytest.mark.slow
def test_one_store_per_rank(ddp_run):
    files = sorted(p.name for p in ddp_run.glob("*.h5"))
    assert files == ["run.rank0.h5", "run.rank1.h5"]
    for rank in range(WORLD):
        steps, records = read_store(ddp_run / f"run.rank{rank}.h5")
        assert list(steps["step"]) == list(range(N_STEPS))
        for t in range(N_STEPS):  # each rank recorded exactly its own quarter-batch
            ids = step_records(records, t)["sample_id"]
            np.testing.assert_array_equal(ids, global_ids(t)[rank * RANK_BATCH:(rank + 1) * RANK_BATCH])


@pytest.mark.slow
def test_union_of_ranks_equals_a_single_process_run(ddp_run, tmp_path):
    single = tmp_path / "single.h5"
    fit(single, per_rank=False)
    s_steps, s_records = read_store(single)
    ranks = [read_store(ddp_run / f"run.rank{r}.h5") for r in range(WORLD)]
    assert list(s_steps["step"]) == list(range(N_STEPS))
    for t in range(N_STEPS):
        expected = step_records(s_records, t)
        np.testing.assert_array_equal(expected["sample_id"], global_ids(t))
        union = {k: np.concatenate([step_records(rec, t)[k] for _, rec in ranks]) for k in expected}
        order = np.argsort(union["sample_id"])
        np.testing.assert_array_equal(union["sample_id"][order], expected["sample_id"])
        for column in ("value_1", "value_2", "grad_norm_sq", "value_1_per_val", "value_2_per_val"):
            want = expected[column]
            np.testing.assert_allclose(union[column][order], want, rtol=1e-6 if "per_val" in column else 1e-9,
                                       atol=1e-6 * np.abs(want).max(), err_msg=f"{column} at step {t}")
        for rank_steps, _ in ranks:  # the losses of a step are the same on every rank and in the single run
            for column in ("val_loss", "val_loss_base", "val_loss_after", "lr"):
                assert rank_steps[column][t] == pytest.approx(s_steps[column][t], rel=1e-9), (column, t)


@pytest.mark.slow
def test_ddp_values_match_an_independent_replay(ddp_run):
    """The replay knows nothing of ranks: one step per global batch of 8, c_i = grad l_i / 8."""
    ranks = [read_store(ddp_run / f"run.rank{r}.h5") for r in range(WORLD)]
    plan = [[torch.as_tensor(global_ids(t))] for t in range(N_STEPS)]
    reference = replay(make_mlp(seed=1), adamw, plan, X, Y, VAL)
    for t, ref in enumerate(reference):
        union = {k: np.concatenate([step_records(rec, t)[k] for _, rec in ranks])
                 for k in ("sample_id", "value_1", "value_2", "grad_norm_sq")}
        order = np.argsort(union["sample_id"])
        np.testing.assert_array_equal(union["sample_id"][order], ref.ids)
        for column in ("value_1", "value_2", "grad_norm_sq"):
            want = getattr(ref, column)
            np.testing.assert_allclose(union[column][order], want, rtol=1e-9, atol=1e-9 * np.abs(want).max(),
                                       err_msg=f"{column} at step {t}")


@pytest.mark.slow
def test_run_level_efficiency_residual_sums_over_ranks(ddp_run):
    """The efficiency residual of a step is (values of ALL ranks) - utility; a rank holds only half the values.

    Read through ``inrun.store.open_run`` (the run-level view): its steps table must give that residual.
    """
    reader = pytest.importorskip("inrun.store.reader")
    ranks = [read_store(ddp_run / f"run.rank{r}.h5") for r in range(WORLD)]
    steps0 = ranks[0][0]
    utility = steps0["val_loss_base"] - steps0["val_loss_after"]
    with reader.open_run(ddp_run / "run.h5") as run:
        assert run.world_size == WORLD and run.num_steps == N_STEPS
        assert run.num_records == N_STEPS * GLOBAL_BATCH
        steps = run.steps
        for order in (1, 2):
            total = sum(np.bincount(rec["step"], weights=rec[f"value_{order}"], minlength=N_STEPS)
                        for _, rec in ranks)
            np.testing.assert_allclose(steps[f"sum_value_{order}"], total, rtol=1e-9,
                                       err_msg=f"run-level sum_value_{order}")
            np.testing.assert_allclose(steps[f"residual_{order}"], total - utility, rtol=1e-6, atol=1e-12,
                                       err_msg=f"run-level residual_{order}")
