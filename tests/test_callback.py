"""``InRunCallback`` inside real Lightning runs on CPU: values against an independent replay, resuming, several epochs,
crash survival, bad input, non-finite steps, gradient clipping and checkpoints that load with ``weights_only=True``.

The replay (tests/test_inrun_values.py) uses torch.func per-sample gradients and torch's own optimizer; the store is
read with h5py (committed part only). Models are float64 so that runs compare to ~1e-12.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset

from inrun.callbacks import InRunCallback
from inrun.errors import BatchMismatchError
from tests.test_inrun_values import (
    adamw,
    assert_values_match,
    batch_of,
    loss_fn,
    make_data,
    make_mlp,
    model_at,
    read_store,
    replay,
    sgd,
    step_records,
)

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN, BATCH, N_VAL = 16, 4, 5
STEPS_PER_EPOCH = N_TRAIN // BATCH
X, Y, VAL = make_data(n=N_TRAIN, n_val=N_VAL, seed=0)




# ------------------------------------------------------------------------------------------------ model and data


class IndexedData(Dataset):
    def __init__(self, with_index: bool = True):
        self.with_index = with_index

    def __len__(self):
        return N_TRAIN

    def __getitem__(self, i):
        item = {"x": X[i], "y": Y[i]}
        if self.with_index:
            item["index"] = i
        return item


def loader(with_index: bool = True) -> DataLoader:
    return DataLoader(IndexedData(with_index), batch_size=BATCH, shuffle=False)


OPTIMIZERS = {"sgd": sgd, "adamw": adamw}


class Net(L.LightningModule):
    """A small MLP (float64) with the ``per_sample_loss`` the callback needs; ``nan_at_step`` makes that step's loss
    NaN, and the module then skips the update (its own ``on_before_optimizer_step`` drops non-finite gradients)."""

    def __init__(self, optimizer: str = "adamw", nan_at_step: int | None = None):
        super().__init__()
        self.net = make_mlp(seed=1)
        self.optimizer_name = optimizer
        self.nan_at_step = nan_at_step
        self.skipped_updates = 0

    def per_sample_loss(self, batch):
        return loss_fn(self.net, batch)

    def training_step(self, batch, batch_idx):
        loss = self.per_sample_loss(batch).mean()
        if self.global_step == self.nan_at_step:
            loss = loss * float("nan")
        return loss

    def on_before_optimizer_step(self, optimizer):
        if any(p.grad is not None and not torch.isfinite(p.grad).all() for p in self.parameters()):
            for p in self.parameters():
                p.grad = None  # torch optimizers skip parameters without a gradient
            self.skipped_updates += 1

    def configure_optimizers(self):
        return OPTIMIZERS[self.optimizer_name](self.net)


class NoPerSampleLoss(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = make_mlp(seed=1)

    def training_step(self, batch, batch_idx):
        return loss_fn(self.net, batch).mean()

    def configure_optimizers(self):
        return sgd(self.net)


def make_trainer(callbacks, **kwargs) -> L.Trainer:
    options = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                   enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks))
    options.update(kwargs)
    return L.Trainer(callbacks=callbacks, **options)


def plan_from_store(records, n_steps, accumulate=1) -> list[list[torch.Tensor]]:
    """The micro-batches of each recorded step, as recorded (micro-batch order)."""
    plan = []
    for t in range(n_steps):
        ids = torch.as_tensor(step_records(records, t)["sample_id"])
        plan.append(list(ids.split(len(ids) // accumulate)))
    return plan


def expected_ids(t: int, accumulate: int = 1) -> np.ndarray:
    """Sample ids of optimizer step t with shuffle=False: consecutive batches, epoch after epoch."""
    per_epoch = STEPS_PER_EPOCH // accumulate
    start = (t % per_epoch) * BATCH * accumulate
    return np.arange(start, start + BATCH * accumulate)


def assert_same_store(a: Path, b: Path, rtol: float = 1e-12):
    """Two stores hold the same steps and records (every column; NaN where both are NaN)."""
    sa, ra = read_store(a)
    sb, rb = read_store(b)
    assert set(sa) == set(sb) and set(ra) == set(rb)
    np.testing.assert_array_equal(sa["step"], sb["step"])
    np.testing.assert_array_equal(ra["step"], rb["step"])
    np.testing.assert_array_equal(ra["sample_id"], rb["sample_id"])
    for table_a, table_b, label in ((sa, sb, "steps"), (ra, rb, "records")):
        for name in table_a:
            np.testing.assert_allclose(table_b[name], table_a[name], rtol=rtol, atol=1e-15, equal_nan=True,
                                       err_msg=f"{label}/{name}")


TOTAL_EPOCHS = 3


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The reference run: AdamW, 3 epochs of 4 steps, second-order values, never interrupted."""
    path = tmp_path_factory.mktemp("uninterrupted") / "run.h5"
    torch.set_num_threads(1)
    callback = InRunCallback(path, val_data=VAL, shapley="second", overwrite=True)
    make_trainer([callback], max_epochs=TOTAL_EPOCHS).fit(Net("adamw"), loader())
    return path


# ------------------------------------------------------------------------------------------------ values


def test_lightning_values_match_replay_over_several_epochs(uninterrupted):
    steps, records = read_store(uninterrupted)
    n_steps = TOTAL_EPOCHS * STEPS_PER_EPOCH
    assert list(steps["step"]) == list(range(n_steps))
    for t in range(n_steps):
        np.testing.assert_array_equal(step_records(records, t)["sample_id"], expected_ids(t))
    reference = replay(make_mlp(seed=1), adamw, plan_from_store(records, n_steps), X, Y, VAL)
    assert_values_match(steps, records, reference, norms=False)  # recorded with the defaults: no per-sample norms
    for t, ref in enumerate(reference):
        with torch.no_grad():
            train_loss = float(loss_fn(model_at(make_mlp(seed=1), ref.params), batch_of(X, Y, ref.ids)).mean())
        assert steps["train_loss"][t] == pytest.approx(train_loss, rel=1e-10)
        assert steps["val_loss"][t] == pytest.approx(ref.val_loss, rel=1e-10)
        assert steps["val_loss_after"][t] == pytest.approx(ref.val_loss_after, rel=1e-10)
        assert steps["residual_2"][t] == pytest.approx(
            step_records(records, t)["value_2"].sum() - (ref.val_loss_base - ref.val_loss_after), abs=1e-12)


def test_every_epoch_occurrence_is_recorded_and_run_values_sum_them(uninterrupted):
    steps, records = read_store(uninterrupted)
    ids, counts = np.unique(records["sample_id"], return_counts=True)
    np.testing.assert_array_equal(ids, np.arange(N_TRAIN))
    assert (counts == TOTAL_EPOCHS).all()
    for i in range(N_TRAIN):  # sample i is in step e*4 + i//4 of every epoch e, with a different value each time
        rows = records["sample_id"] == i
        np.testing.assert_array_equal(records["step"][rows],
                                      [e * STEPS_PER_EPOCH + i // BATCH for e in range(TOTAL_EPOCHS)])
        assert len(np.unique(records["value_1"][rows])) == TOTAL_EPOCHS
    for order in (1, 2):
        sums = np.bincount(records["sample_id"], weights=records[f"value_{order}"])
        try:
            from inrun.store.reader import open_run
        except ImportError:  # the reader is optional for this test; the sums above are the run values
            continue
        with open_run(uninterrupted) as run:
            assert run.num_steps == TOTAL_EPOCHS * STEPS_PER_EPOCH
            run_ids, values = run.sample_values(order=order)
            np.testing.assert_array_equal(run_ids, np.arange(N_TRAIN))
            np.testing.assert_allclose(values, sums, rtol=1e-12, atol=1e-15)


def test_gradient_accumulation(tmp_path):
    path = tmp_path / "run.h5"
    callback = InRunCallback(path, val_data=VAL, shapley="second", overwrite=True, record_norms=True)
    make_trainer([callback], max_steps=4, accumulate_grad_batches=2).fit(Net("adamw"), loader())
    steps, records = read_store(path)
    assert list(steps["step"]) == [0, 1, 2, 3]
    for t in range(4):
        np.testing.assert_array_equal(step_records(records, t)["sample_id"], expected_ids(t, accumulate=2))
    reference = replay(make_mlp(seed=1), adamw, plan_from_store(records, 4, accumulate=2), X, Y, VAL)
    assert_values_match(steps, records, reference)
    # the step's training loss is the mean of its micro-batches' mean losses (not divided by the accumulation)
    for t, ref in enumerate(reference):
        with torch.no_grad():
            model = model_at(make_mlp(seed=1), ref.params)
            expected = np.mean([float(loss_fn(model, batch_of(X, Y, ids)).mean())
                                for ids in plan_from_store(records, 4, accumulate=2)[t]])
        assert steps["train_loss"][t] == pytest.approx(expected, rel=1e-10), f"train_loss of step {t}"


@pytest.mark.parametrize("max_norm", [0.05, 100.0])
def test_gradient_clipping_by_norm(tmp_path, max_norm):
    path = tmp_path / "run.h5"
    callback = InRunCallback(path, val_data=VAL, shapley="second", overwrite=True, record_norms=True)
    make_trainer([callback], max_steps=4, gradient_clip_val=max_norm).fit(Net("sgd"), loader())
    steps, records = read_store(path)
    plan = plan_from_store(records, 4)
    reference = replay(make_mlp(seed=1), sgd, plan, X, Y, VAL, clip_norm=max_norm)
    assert_values_match(steps, records, reference)
    unclipped = replay(make_mlp(seed=1), sgd, plan[:1], X, Y, VAL)
    total = float(np.sqrt(sum(v.sum(0).pow(2).sum() for v in unclipped[0].contributions.values())))
    if max_norm < total:  # clipping was active: the unclipped values are larger by total / max_norm
        np.testing.assert_allclose(step_records(records, 0)["value_1"] * (total + 1e-6) / max_norm,
                                   unclipped[0].value_1, rtol=1e-9)
    else:
        np.testing.assert_allclose(step_records(records, 0)["value_1"], unclipped[0].value_1, rtol=1e-9)


def test_shapley_none_records_no_values_and_does_not_warn(tmp_path):
    """``shapley=None`` means "record nothing": no records, and no per-step "not valued" warning."""
    path = tmp_path / "run.h5"
    callback = InRunCallback(path, val_data=VAL, shapley=None, overwrite=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer([callback], max_steps=3).fit(Net("sgd"), loader())
    inrun_warnings = [str(w.message) for w in caught if "inrun" in str(w.message)]
    assert inrun_warnings == []
    _, records = read_store(path)
    assert len(records["sample_id"]) == 0


def test_gradient_clipping_by_value_warns(tmp_path):
    callback = InRunCallback(tmp_path / "run.h5", val_data=VAL, shapley="first", overwrite=True)
    trainer = make_trainer([callback], max_steps=1, gradient_clip_val=0.01, gradient_clip_algorithm="value")
    with pytest.warns(UserWarning, match="by value"):
        trainer.fit(Net("sgd"), loader())


# ------------------------------------------------------------------------------------------------ resuming


def test_resume_from_a_checkpoint_gives_the_uninterrupted_store(tmp_path, uninterrupted):
    """Train 2 epochs, save a checkpoint, then a new Trainer + new callback on the same path resumes to 3 epochs."""
    path, ckpt = tmp_path / "run.h5", tmp_path / "mid.ckpt"
    first = InRunCallback(path, val_data=VAL, shapley="second", overwrite=True)
    trainer = make_trainer([first], max_epochs=2)
    trainer.fit(Net("adamw"), loader())
    trainer.save_checkpoint(ckpt)
    assert list(read_store(path)[0]["step"]) == list(range(2 * STEPS_PER_EPOCH))

    second = InRunCallback(path, val_data=VAL, shapley="second")  # no overwrite: resuming appends
    make_trainer([second], max_epochs=TOTAL_EPOCHS).fit(Net("adamw"), loader(), ckpt_path=ckpt, weights_only=True)
    steps, records = read_store(path)
    assert list(steps["step"]) == list(range(TOTAL_EPOCHS * STEPS_PER_EPOCH))  # nothing duplicated, nothing lost
    assert len(records["sample_id"]) == TOTAL_EPOCHS * N_TRAIN
    assert_same_store(uninterrupted, path)


class FailAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated failure at step {self.step}")


def test_resume_from_an_older_checkpoint_after_a_failure(tmp_path, uninterrupted):
    """A run fails at step 6 with steps 0-4 already in the store; resuming from the checkpoint of step 4 (whose
    callback state holds step 3 still waiting for its validation loss after) cuts the store back and re-records."""
    path, ckpt_dir = tmp_path / "run.h5", tmp_path / "checkpoints"
    callback = InRunCallback(path, val_data=VAL, shapley="second", overwrite=True, flush_every=1)
    checkpoints = ModelCheckpoint(dirpath=ckpt_dir, every_n_epochs=1, save_on_train_epoch_end=True, save_top_k=-1)
    with pytest.raises(RuntimeError, match="simulated failure"):
        make_trainer([callback, FailAt(6), checkpoints], max_epochs=TOTAL_EPOCHS).fit(Net("adamw"), loader())
    assert list(read_store(path)[0]["step"]) == [0, 1, 2, 3, 4]  # committed by on_exception
    (ckpt,) = sorted(ckpt_dir.glob("*.ckpt"))

    # the callback state is plain tensors and numbers: the checkpoint loads with weights_only=True
    state = torch.load(ckpt, weights_only=True)["callbacks"]
    (inrun_state,) = [v for k, v in state.items() if "InRunCallback" in k]
    assert inrun_state["next_step"] == STEPS_PER_EPOCH and inrun_state["pending"]["step"] == STEPS_PER_EPOCH - 1

    resumed = InRunCallback(path, val_data=VAL, shapley="second", flush_every=1)
    make_trainer([resumed], max_epochs=TOTAL_EPOCHS).fit(Net("adamw"), loader(), ckpt_path=ckpt, weights_only=True)
    assert_same_store(uninterrupted, path)


def test_checkpoint_with_per_val_point_state_loads_weights_only(tmp_path):
    path, ckpt_dir = tmp_path / "run.h5", tmp_path / "checkpoints"
    callback = InRunCallback(path, val_data=VAL, shapley="second", overwrite=True, per_val_point=True)
    checkpoints = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_top_k=-1)
    make_trainer([callback, checkpoints], max_steps=3).fit(Net("adamw"), loader())
    (ckpt,) = sorted(ckpt_dir.glob("*.ckpt"))
    state = torch.load(ckpt, weights_only=True)["callbacks"]
    (inrun_state,) = [v for k, v in state.items() if "InRunCallback" in k]
    pending = inrun_state["pending"]["values"]
    assert pending["per_val_1"].shape == (BATCH, N_VAL) and pending["per_val_2"].shape == (BATCH, N_VAL)

    def plain(value):
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (torch.Tensor, int, float, str, bool))

    assert plain(inrun_state)


# ------------------------------------------------------------------------------------------------ crash survival

CRASH_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)
import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from inrun.callbacks import InRunCallback
from tests.test_callback import Net, VAL, loader, make_trainer

out, kill_at, epochs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

class Kill(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == kill_at:
            print("killing at step", kill_at, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

callback = InRunCallback(os.path.join(out, "run.h5"), val_data=VAL, shapley="second", flush_every=2)
checkpoints = ModelCheckpoint(dirpath=os.path.join(out, "checkpoints"), every_n_epochs=1,
                              save_on_train_epoch_end=True, save_top_k=-1)
make_trainer([callback, Kill(), checkpoints], max_epochs=epochs).fit(Net("adamw"), loader())
print("finished without being killed", flush=True)
"""


@pytest.mark.slow
def test_store_survives_sigkill_and_resumes(tmp_path, uninterrupted):
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT.format(root=str(ROOT)))
    kill_at = 2 * STEPS_PER_EPOCH + 2  # step 10: inside the third epoch, after the checkpoint of step 8
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), str(kill_at), str(TOTAL_EPOCHS)],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    assert "killing at step" in proc.stdout

    path = tmp_path / "run.h5"
    steps, records = read_store(path)  # opens; only the committed part is read
    n = len(steps["step"])
    print(f"{n} steps committed when killed at step {kill_at}")
    # steps 0..8 were appended (step 9 waits for its loss after); with flush_every=2 and a commit at each
    # checkpoint, at least the steps up to the last checkpoint are committed
    assert 2 * STEPS_PER_EPOCH - 1 <= n <= kill_at - 1
    assert list(steps["step"]) == list(range(n))
    assert len(records["sample_id"]) == steps["n_samples"].sum() == n * BATCH
    for t in range(n):  # every committed step has all its rows, with finite values
        rows = step_records(records, t)
        np.testing.assert_array_equal(rows["sample_id"], expected_ids(t))
        assert np.isfinite(rows["value_1"]).all() and np.isfinite(rows["value_2"]).all()
    # and they are the values the uninterrupted run recorded
    ref_steps, ref_records = read_store(uninterrupted)
    np.testing.assert_allclose(records["value_2"], ref_records["value_2"][: n * BATCH], rtol=1e-10)
    np.testing.assert_allclose(steps["residual_2"], ref_steps["residual_2"][:n], rtol=1e-8, atol=1e-14)
    try:
        from inrun.store.reader import open_run
    except ImportError:
        open_run = None
    if open_run is not None:
        with open_run(path) as run:
            assert run.num_steps == n and run.num_records == n * BATCH

    # resume from the last checkpoint (step 8): the store ends up as the uninterrupted run's
    ckpt = sorted((tmp_path / "checkpoints").glob("*.ckpt"))[-1]
    assert "step=8" in ckpt.name
    resumed = InRunCallback(path, val_data=VAL, shapley="second", flush_every=2)
    make_trainer([resumed], max_epochs=TOTAL_EPOCHS).fit(Net("adamw"), loader(), ckpt_path=ckpt, weights_only=True)
    assert_same_store(uninterrupted, path, rtol=1e-10)


# ------------------------------------------------------------------------------------------------ bad input


def test_batches_without_index_fail_before_any_step(tmp_path):
    callback = InRunCallback(tmp_path / "run.h5", val_data=VAL, overwrite=True)
    trainer = make_trainer([callback], max_steps=2)
    with pytest.raises(BatchMismatchError) as info:
        trainer.fit(Net("sgd"), loader(with_index=False))
    assert "index_key" in str(info.value) and "index_fn" in str(info.value)
    assert trainer.global_step == 0


def test_index_fn_and_index_key_are_used(tmp_path):
    for kwargs, data in (({"index_fn": lambda batch: batch["idx"]}, "idx"), ({"index_key": "idx"}, "idx")):
        path = tmp_path / f"{next(iter(kwargs))}.h5"
        renamed = [{"x": b["x"], "y": b["y"], data: b["index"] + 100} for b in loader()]
        callback = InRunCallback(path, val_data=VAL, overwrite=True, **kwargs)
        make_trainer([callback], max_steps=2).fit(Net("sgd"), DataLoader(renamed, batch_size=None))
        _, records = read_store(path)
        np.testing.assert_array_equal(records["sample_id"], np.arange(100, 100 + 2 * BATCH))


def test_module_without_per_sample_loss(tmp_path):
    callback = InRunCallback(tmp_path / "run.h5", val_data=VAL, overwrite=True)
    trainer = make_trainer([callback], max_steps=2)
    with pytest.raises(AttributeError, match="per_sample_loss") as info:
        trainer.fit(NoPerSampleLoss(), loader())
    assert "loss_fn" in str(info.value)
    assert trainer.global_step == 0
    # with a loss_fn it works and gives the same values as per_sample_loss would
    path = tmp_path / "with_loss_fn.h5"
    callback = InRunCallback(path, val_data=VAL, overwrite=True, loss_fn=lambda module, batch: loss_fn(module.net, batch),
                             record_norms=True)
    make_trainer([callback], max_steps=2).fit(NoPerSampleLoss(), loader())
    steps, records = read_store(path)
    reference = replay(make_mlp(seed=1), sgd, plan_from_store(records, 2), X, Y, VAL)
    assert_values_match(steps, records, reference, orders=(1,))


@pytest.mark.parametrize("bad", [{"x": VAL["x"]}, {"x": VAL["x"][:, :3], "y": VAL["y"]}, [VAL["x"], VAL["y"]]],
                         ids=["missing-key", "wrong-width", "tuple-not-dict"])
def test_validation_data_of_the_wrong_structure_fails_at_start(tmp_path, bad):
    callback = InRunCallback(tmp_path / "run.h5", val_data=bad, overwrite=True)
    trainer = make_trainer([callback], max_steps=2)
    with pytest.raises(BatchMismatchError, match="validation"):
        trainer.fit(Net("sgd"), loader())
    assert trainer.global_step == 0


def test_existing_store_without_overwrite(tmp_path):
    path = tmp_path / "run.h5"
    make_trainer([InRunCallback(path, val_data=VAL, overwrite=True)], max_steps=1).fit(Net("sgd"), loader())
    before = path.read_bytes()
    trainer = make_trainer([InRunCallback(path, val_data=VAL)], max_steps=2)
    with pytest.raises(FileExistsError, match="overwrite"):
        trainer.fit(Net("sgd"), loader())
    assert trainer.global_step == 0
    assert path.read_bytes() == before  # the earlier run's store is untouched


def test_non_finite_step_is_skipped_and_training_goes_on(tmp_path):
    path = tmp_path / "run.h5"
    callback = InRunCallback(path, val_data=VAL, shapley="second", overwrite=True)
    module = Net("sgd", nan_at_step=2)
    with pytest.warns(UserWarning, match="step 2 not valued"):
        make_trainer([callback], max_steps=6).fit(module, loader())
    assert module.skipped_updates == 1
    steps, records = read_store(path)
    assert list(steps["step"]) == list(range(6))
    assert list(steps["skipped"]) == [0, 0, 1, 0, 0, 0]
    assert steps["n_samples"][2] == 0 and not (records["step"] == 2).any()
    # the other steps are valued as in a run where step 2 changed nothing (plain SGD keeps no state)
    plan = [[torch.as_tensor(expected_ids(t))] for t in range(6)]
    reference = replay(make_mlp(seed=1), sgd, plan[:2] + plan[3:], X, Y, VAL)
    for k, t in enumerate([0, 1, 3, 4, 5]):
        got, ref = step_records(records, t), reference[k]
        np.testing.assert_array_equal(got["sample_id"], ref.ids)
        for order in (1, 2):
            np.testing.assert_allclose(got[f"value_{order}"], getattr(ref, f"value_{order}"), rtol=1e-9, atol=1e-15)
        assert steps["val_loss"][t] == pytest.approx(ref.val_loss, rel=1e-10)
        assert steps["val_loss_after"][t] == pytest.approx(ref.val_loss_after, rel=1e-10)
    assert steps["val_loss"][2] == pytest.approx(steps["val_loss_after"][1], rel=1e-12)


class SkipOnce(Net):
    """``training_step`` returns None once (Lightning skips the backward): nothing to value at that step."""

    def training_step(self, batch, batch_idx):
        if self.global_step == 2 and not getattr(self, "_skipped", False):
            self._skipped = True
            return None
        return super().training_step(batch, batch_idx)


def test_step_without_backward_is_recorded_as_skipped(tmp_path):
    path = tmp_path / "run.h5"
    callback = InRunCallback(path, val_data=VAL, shapley="second", overwrite=True)
    trainer = make_trainer([callback], max_steps=5)
    with pytest.warns(UserWarning, match="step 2 not valued"):
        trainer.fit(SkipOnce("sgd"), loader())
    steps, records = read_store(path)
    assert list(steps["step"]) == list(range(trainer.global_step))  # store steps stay aligned with Lightning's
    assert list(steps["skipped"]) == [0, 0, 1, 0, 0]
    assert list(steps["n_samples"]) == [BATCH, BATCH, 0, BATCH, BATCH]
    np.testing.assert_array_equal(step_records(records, 3)["sample_id"], expected_ids(3))
