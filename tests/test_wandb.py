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


# ------------------------------------------------------------------------------------------- any id, any failure

def test_running_totals_with_any_int64_id():
    """Hashed ids up to 2**63-1 and negative ids: totals match a dict, memory is one entry per distinct id."""
    from inrun.callbacks.wandb_logging import RunningTotals

    rng = np.random.default_rng(4)
    pool = np.r_[rng.integers(-(2**62), 2**62, 3000), 2**62, 2**63 - 1, -(2**63), -5]
    totals, reference, last_source = RunningTotals(), {}, {}
    for _ in range(60):  # 60 x 2000 rows: the buffer is merged into the kept totals several times
        ids = rng.choice(pool, 2000)
        values, sources = rng.normal(size=2000), rng.integers(-1, 3, 2000)
        totals.add(ids, values, sources)
        for i, v, s in zip(ids.tolist(), values.tolist(), sources.tolist()):
            reference[i] = reference.get(i, 0.0) + v
            last_source[i] = s
    assert len(totals) == len(reference) and not totals.approximate
    assert totals.ids.tolist() == sorted(reference)
    np.testing.assert_allclose(totals.totals, [reference[i] for i in sorted(reference)], rtol=1e-9, atol=1e-12)
    assert totals.sources.tolist() == [last_source[i] for i in sorted(reference)]
    top, bottom = totals.extremes(5)
    ranked = sorted(reference, key=lambda i: (-reference[i], i))
    assert totals.ids[top].tolist() == ranked[:5]
    assert totals.ids[bottom].tolist() == sorted(reference, key=lambda i: (reference[i], i))[:5]


def test_running_totals_cap_keeps_the_extremes_and_says_so():
    from inrun.callbacks.wandb_logging import RunningTotals

    rng = np.random.default_rng(5)
    totals = RunningTotals(max_ids=40)
    strong = {2**61 + 1: 50.0, 2**61 + 2: -60.0, 7: 40.0}
    with pytest.warns(RuntimeWarning, match="more than max_ids=40 distinct sample ids"):
        for step in range(30):
            ids = rng.integers(0, 2**62, 3000)  # new ids every step, small values
            totals.add(ids, rng.normal(scale=0.01, size=ids.size), np.zeros(ids.size))
            totals.add(np.array(list(strong)), np.array(list(strong.values())) / 30, np.zeros(3))
            totals.merge()
    assert totals.approximate and len(totals) <= 40 and totals.evicted > 0
    top, bottom = totals.extremes(2)
    assert totals.ids[top].tolist() == [2**61 + 1, 7] and totals.ids[bottom][0] == 2**61 + 2
    np.testing.assert_allclose(totals.totals[top], [50.0, 40.0], rtol=1e-9)


def test_logger_with_huge_ids_logs_tables():
    run = SpyRun()
    logger = WandbInfluenceLogger(run, table_every=2, top_k=2)
    for t in range(4):
        logger({"step": t}, {"sample_id": np.array([2**62, 2**40 + t, 3]), "value_1": np.array([1.0, -2.0, 0.5])})
    assert logger.failures == 0
    assert [row[0] for row in run.logged[3]["inrun/top_samples"].data] == [2**62, 3]
    assert run.logged[3]["inrun/top_samples"].data[0][1] == pytest.approx(4.0)


class BrokenRun:
    def log(self, metrics: dict) -> None:
        raise ConnectionError("wandb is unreachable")


def test_a_logging_failure_is_a_warning():
    logger = WandbInfluenceLogger(BrokenRun())
    with pytest.warns(RuntimeWarning, match="W&B logging failed at step 0 .*ConnectionError"):
        logger({"step": 0}, {"sample_id": np.arange(3), "value_1": np.ones(3)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # later failures are counted, not warned again
        logger({"step": 1}, {"sample_id": np.arange(3), "value_1": np.ones(3)})
    assert logger.failures == 2


def test_a_failing_listener_never_stops_the_recorder(tmp_path):
    from inrun.valuation.recorder import InRunRecorder

    model = Net().net
    recorder = InRunRecorder(model, tmp_path / "run.h5", val_data=VAL,
                             loss_fn=lambda m, b: F.cross_entropy(m(b["x"]), b["y"], reduction="none"))

    def broken(row, records):
        raise RuntimeError("listener bug")

    recorder.listeners.append(broken)
    recorder.start()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(RuntimeWarning, match="listener .*failed at step 0.*training goes on"):
        for start in (0, 4):
            batch = {"x": X[start:start + 4], "y": Y[start:start + 4], "index": torch.arange(start, start + 4)}
            recorder.begin_microbatch(batch)
            F.cross_entropy(model(batch["x"]), batch["y"]).backward()
            recorder.end_microbatch()
            recorder.before_optimizer_step(optimizer)
            optimizer.step()
            optimizer.zero_grad()
    recorder.close()
    with h5py.File(tmp_path / "run.h5", "r") as store:
        assert store.attrs["committed_steps"] == 2
