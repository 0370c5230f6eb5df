"""W&B logging of in-run influence: what is logged (checked against the store with numpy) and what reaches an
offline run's record file."""

from __future__ import annotations

import glob
import os
import warnings

import h5py
import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from inrun.callbacks import InRunCallback, WandbInfluenceLogger

wandb = pytest.importorskip("wandb")

N, SOURCES = 24, ["clean", "noisy"]
X = torch.randn(N, 5, generator=torch.Generator().manual_seed(0))
Y = torch.randint(0, 3, (N,), generator=torch.Generator().manual_seed(1))
VAL = {"x": torch.randn(4, 5, generator=torch.Generator().manual_seed(2)), "y": torch.tensor([0, 1, 2, 0])}


class Items(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict:
        return {"x": X[i], "y": Y[i], "index": i, "source": i % 2}


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))

    def per_sample_loss(self, batch: dict) -> torch.Tensor:
        return F.cross_entropy(self.net(batch["x"]), batch["y"], reduction="none")

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.per_sample_loss(batch).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.2)


class SpyRun:
    """Stands in for a wandb run: keeps every dict passed to ``log``."""

    def __init__(self):
        self.logged: list[dict] = []

    def log(self, metrics: dict) -> None:
        self.logged.append(dict(metrics))


def fake_step(step: int, rng: np.random.Generator) -> tuple[dict, dict]:
    ids = rng.choice(100, size=6, replace=False)
    return (
        {"step": step, "val_loss": 1.0 / (step + 1), "sum_value_1": 0.5, "residual_1": 0.01, "lr": 0.1},
        {"sample_id": ids, "value_1": rng.normal(size=6), "source": ids % 2},
    )


def test_logger_step_source_phase_and_table_metrics():
    rng = np.random.default_rng(0)
    run = SpyRun()
    logger = WandbInfluenceLogger(run, phase_length=3, table_every=4, top_k=2, source_names=SOURCES)
    steps = [fake_step(t, rng) for t in range(8)]
    for row, records in steps:
        logger(row, records)
    assert [m["trainer/global_step"] for m in run.logged] == list(range(8))
    for (row, records), metrics in zip(steps, run.logged):
        for k, name in enumerate(SOURCES):
            expected = records["value_1"][records["source"] == k].sum()
            assert metrics[f"inrun/source/{name}/value_1"] == pytest.approx(expected)
        assert metrics["inrun/mean_value_1"] == pytest.approx(records["value_1"].mean())
        assert metrics["inrun/val_loss"] == pytest.approx(row["val_loss"])
    # phases of 3 steps close at steps 2 and 5, with the sums of their steps
    phase_steps = [m["trainer/global_step"] for m in run.logged if "inrun/phase/start_step" in m]
    assert phase_steps == [2, 5]
    second_phase = [m for m in run.logged if m.get("inrun/phase/start_step") == 3][0]
    expected = sum(r["value_1"][r["source"] == 1].sum() for _, r in steps[3:6])
    assert second_phase["inrun/phase/noisy/value_1"] == pytest.approx(expected)
    # tables at steps 3 and 7 hold the current top and bottom totals
    totals: dict[int, float] = {}
    for _, records in steps:
        for i, v in zip(records["sample_id"], records["value_1"]):
            totals[int(i)] = totals.get(int(i), 0.0) + float(v)
    last = run.logged[7]
    top = last["inrun/top_samples"]
    ranked = sorted(totals, key=totals.get, reverse=True)
    assert [row[0] for row in top.data] == ranked[:2]
    assert [row[0] for row in last["inrun/bottom_samples"].data] == ranked[::-1][:2]
    assert "inrun/value_histogram" in last and "inrun/top_samples" not in run.logged[5]


def test_lightning_run_logs_to_an_offline_wandb_run(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    wandb_logger = WandbLogger(project="inrun-test", save_dir=str(tmp_path), offline=True)
    influence = WandbInfluenceLogger(phase_length=2, table_every=3, top_k=3, source_names=SOURCES)
    callback = InRunCallback(tmp_path / "run.h5", val_data=VAL, shapley="second", source_names=SOURCES, wandb=influence)
    run = wandb_logger.experiment
    spy: list[dict] = []
    original = run.log
    monkeypatch.setattr(run, "log", lambda metrics, *a, **k: (spy.append(dict(metrics)), original(metrics, *a, **k)))
    trainer = L.Trainer(max_steps=6, accelerator="cpu", logger=wandb_logger, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Net(), DataLoader(Items(), batch_size=4))
    run.finish()
    logged = [m for m in spy if "inrun/sum_value_1" in m]
    with h5py.File(tmp_path / "run.h5", "r") as store:
        steps = {k: store["steps"][k][: store.attrs["committed_steps"]] for k in ("step", "sum_value_1", "sum_value_2")}
        records = {k: store["records"][k][: store.attrs["committed_rows"]] for k in ("step", "value_1", "source")}
    assert [m["trainer/global_step"] for m in logged] == steps["step"].tolist()
    np.testing.assert_allclose([m["inrun/sum_value_1"] for m in logged], steps["sum_value_1"], rtol=1e-12)
    np.testing.assert_allclose([m["inrun/sum_value_2"] for m in logged], steps["sum_value_2"], rtol=1e-12)
    for m in logged:
        t = m["trainer/global_step"]
        noisy = records["value_1"][(records["step"] == t) & (records["source"] == 1)].sum()
        assert m["inrun/source/noisy/value_1"] == pytest.approx(noisy)
    files = glob.glob(os.path.join(str(tmp_path), "wandb", "offline-run-*", "run-*.wandb"))
    assert len(files) == 1
    content = open(files[0], "rb").read()
    for key in (b"inrun/sum_value_1", b"inrun/source/noisy/value_1", b"inrun/phase/clean/value_1",
                b"inrun/top_samples", b"inrun/value_histogram", b"trainer/global_step"):
        assert key in content, key
