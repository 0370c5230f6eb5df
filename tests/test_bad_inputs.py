"""Every bad input is refused before training, clearly, and nothing is written.

A table of bad inputs, each with the error class and a fragment of its message (the argument's name, or what was
wrong). Each case must fail before any optimizer step (the model's parameters are unchanged) and leave the store's
folder empty (no store, no checkpoint, no temporary file). The constructor cases run through ``InRunRecorder``, and
those that need no model through ``InRunCallback`` as well; the batch cases fail at ``begin_microbatch``, before the
forward pass; the optimizer cases at the first ``before_optimizer_step`` (a plain loop) or in ``on_fit_start``
(Lightning), before the store is created.

Also here, the inputs that look odd but are fine: ids up to ``2**63 - 1`` stored exactly, integer ids of any integer
type, an empty batch (skipped and recorded as skipped), and embeddings recorded without validation data.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

import inrun
from inrun import BatchMismatchError, InRunRecorder, InvalidArgumentError, LossShapeError, UnsupportedOptimizerError
from inrun.callbacks import InRunCallback
from inrun.cli import summary_lines

DTYPE = torch.float64
G = torch.Generator().manual_seed(0)
X = torch.randn(12, 3, generator=G, dtype=DTYPE)
Y = torch.randint(0, 2, (12,), generator=G)
VAL = {"x": torch.randn(5, 3, generator=G, dtype=DTYPE), "y": torch.randint(0, 2, (5,), generator=G)}


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DTYPE)


MODEL = make_model()  # built once; constructors only plan hooks on it


def loss_fn(model: nn.Module, batch: dict) -> torch.Tensor:
    return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def batch(ids) -> dict:
    ids = torch.as_tensor(ids, dtype=torch.long)
    return {"x": X[ids], "y": Y[ids], "index": ids}


def assert_nothing_written(folder: Path) -> None:
    leftover = sorted(p.name for p in folder.rglob("*"))
    assert leftover == [], f"files written before training: {leftover}"


# ---------------------------------------------------------------------------------------------- argument table
NAN_VAL = {"x": VAL["x"].clone(), "y": VAL["y"]}
NAN_VAL["x"][2, 1] = float("nan")
EMPTY_VAL = {"x": torch.zeros(0, 3, dtype=DTYPE), "y": torch.zeros(0, dtype=torch.long)}
META_VAL = {"x": torch.empty(5, 3, device="meta", dtype=DTYPE), "y": VAL["y"]}

# id: (overrides of the recorder's arguments, error class, message fragment, needs the model)
ARGUMENT_CASES = {
    "shapley-unknown": (dict(shapley="third"), InvalidArgumentError, "shapley must be", False),
    "shapley-bool": (dict(shapley=True), InvalidArgumentError, "shapley must be", False),
    "val-data-missing": (dict(val_data=None), InvalidArgumentError, "needs val_data", False),
    "val-data-int": (dict(val_data=5), InvalidArgumentError, "val_data must be", False),
    "val-data-str": (dict(val_data="val.pt"), InvalidArgumentError, "val_data must be", False),
    "val-data-empty-list": (dict(val_data=[]), InvalidArgumentError, "val_data is empty", False),
    "val-data-zero-rows": (dict(val_data=EMPTY_VAL), InvalidArgumentError, "0 rows", False),
    "val-data-nan": (dict(val_data=NAN_VAL), InvalidArgumentError, "validation data must be finite", False),
    "val-data-meta-device": (dict(val_data=META_VAL), InvalidArgumentError, "'meta' device", False),
    "embeddings-every-0": (dict(embeddings={"every": 0}), InvalidArgumentError, "embeddings['every']", False),
    "embeddings-k-rows-0": (dict(embeddings={"k_rows": 0}), InvalidArgumentError, "embeddings['k_rows']", False),
    "embeddings-k-cols-negative": (dict(embeddings={"k_cols": -3}), InvalidArgumentError, "embeddings['k_cols']",
                                   False),
    "embeddings-unknown-key": (dict(embeddings={"rows": 8}), InvalidArgumentError, "unknown key(s) ['rows']", False),
    "embeddings-kind": (dict(embeddings={"kind": "sparse"}), InvalidArgumentError, "embeddings['kind']", False),
    "embeddings-dtype": (dict(embeddings={"dtype": "int8"}), InvalidArgumentError, "embeddings['dtype']", False),
    "embeddings-parameters-str": (dict(embeddings={"parameters": "0.weight"}), InvalidArgumentError,
                                  "the string '0.weight'", False),
    "embeddings-parameters-unknown": (dict(embeddings={"parameters": ["body.weight"]}), InvalidArgumentError,
                                      "['body.weight']", True),
    "embeddings-type": (dict(embeddings="yes"), InvalidArgumentError, "embeddings must be", False),
    "checkpoint-every-negative": (dict(checkpoint_every=-1), InvalidArgumentError, "checkpoint_every", False),
    "checkpoint-every-0": (dict(checkpoint_every=0), InvalidArgumentError, "checkpoint_every", False),
    "checkpoint-every-float": (dict(checkpoint_every=2.5), InvalidArgumentError, "checkpoint_every", False),
    "flush-every-0": (dict(flush_every=0), InvalidArgumentError, "flush_every", False),
    "flush-every-negative": (dict(flush_every=-5), InvalidArgumentError, "flush_every", False),
    "flush-every-bool": (dict(flush_every=True), InvalidArgumentError, "flush_every", False),
    "source-names-str": (dict(source_names="web"), InvalidArgumentError, "source_names must be a list", False),
    "source-names-duplicates": (dict(source_names=["web", "web"]), InvalidArgumentError, "duplicates", False),
    "per-val-point-without-values": (dict(per_val_point=True, shapley=None), InvalidArgumentError, "per_val_point",
                                     False),
    "index-key-not-str": (dict(index_key=3), InvalidArgumentError, "index_key", False),
    "index-fn-not-callable": (dict(index_fn="index"), InvalidArgumentError, "index_fn", False),
    "loss-fn-not-callable": (dict(loss_fn="cross_entropy"), InvalidArgumentError, "loss_fn must be", False),
    "update-rule-unknown": (dict(update_rule="lion"), InvalidArgumentError, "update_rule='lion'", False),
    "overwrite-not-bool": (dict(overwrite="yes"), InvalidArgumentError, "overwrite must be True or False", False),
    "record-norms-not-bool": (dict(record_norms="no"), InvalidArgumentError, "record_norms", False),
    "model-not-a-module": (dict(model="gpt2"), InvalidArgumentError, "model must be a torch.nn.Module", True),
    "rank-out-of-range": (dict(rank=2, world_size=2), InvalidArgumentError, "rank must be", True),
    "gradient-divisor-0": (dict(gradient_divisor=0.0), InvalidArgumentError, "gradient_divisor", True),
}
MODEL_FREE = [name for name, case in ARGUMENT_CASES.items() if not case[3]]
RECORDER_DEFAULTS = dict(val_data=VAL, loss_fn=loss_fn, shapley="first")


@pytest.mark.parametrize("name", list(ARGUMENT_CASES))
def test_recorder_refuses_bad_arguments_at_construction(tmp_path, name):
    overrides, error, fragment, _ = ARGUMENT_CASES[name]
    kwargs = {**RECORDER_DEFAULTS, **overrides}
    model = kwargs.pop("model", MODEL)
    with pytest.raises(error, match=_escaped(fragment)):
        InRunRecorder(model, tmp_path / "store" / "run.h5", **kwargs)
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("name", MODEL_FREE)
def test_lightning_callback_refuses_bad_arguments_at_construction(tmp_path, name):
    overrides, error, fragment, _ = ARGUMENT_CASES[name]
    kwargs = {"val_data": VAL, **overrides}
    with pytest.raises(error, match=_escaped(fragment)):
        InRunCallback(tmp_path / "store" / "run.h5", **kwargs)
    assert_nothing_written(tmp_path)


def _escaped(fragment: str) -> str:
    import re

    return re.escape(fragment)


# ---------------------------------------------------------------------------------------------- store paths
def test_store_path_under_a_file_is_refused_at_construction(tmp_path):
    blocker = tmp_path / "runs"
    blocker.write_text("not a folder")
    with pytest.raises(InvalidArgumentError, match="is a file, not a folder"):
        InRunRecorder(MODEL, blocker / "deeper" / "run.h5", **RECORDER_DEFAULTS)
    with pytest.raises(InvalidArgumentError, match="is a file, not a folder"):
        InRunCallback(blocker / "run.h5", val_data=VAL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"] and blocker.read_text() == "not a folder"


def test_store_path_that_is_a_folder_is_refused(tmp_path):
    with pytest.raises(InvalidArgumentError, match="is a folder"):
        InRunRecorder(MODEL, tmp_path, **RECORDER_DEFAULTS)
    assert_nothing_written(tmp_path)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_unwritable_folder_is_refused_at_construction(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(InvalidArgumentError, match="not writable"):
            InRunRecorder(MODEL, locked / "sub" / "run.h5", **RECORDER_DEFAULTS)
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux procfs")
def test_a_folder_nobody_can_write_is_refused_at_construction():
    """procfs takes no new files, not even from root: the probe fails at construction, not at the first step."""
    with pytest.raises(InvalidArgumentError, match="the folder '/proc' is not writable"):
        InRunRecorder(MODEL, "/proc/inrun-test/run.h5", **RECORDER_DEFAULTS)
    with pytest.raises(InvalidArgumentError, match="is not writable"):
        InRunCallback("/proc/inrun-test/run.h5", val_data=VAL)


def test_a_missing_folder_is_not_created_by_the_check(tmp_path):
    recorder = InRunRecorder(MODEL, tmp_path / "a" / "b" / "run.h5", **RECORDER_DEFAULTS)
    assert_nothing_written(tmp_path)  # created at the first step, not before
    recorder.capture.detach()


# ---------------------------------------------------------------------------------------------- validation at start
def nan_loss(model, batch):
    losses = loss_fn(model, batch)
    return losses * float("nan") if batch["x"].shape[0] == 5 else losses  # NaN on the validation batch only


START_CASES = {
    "val-loss-nan": (dict(loss_fn=nan_loss), InvalidArgumentError, "validation loss at the initial parameters"),
    "val-loss-empty": (dict(loss_fn=lambda m, b: loss_fn(m, b)[:0]), InvalidArgumentError, "0 validation losses"),
    "val-structure": (dict(val_data={"x": VAL["x"]}), BatchMismatchError, "the validation data does not fit"),
    "val-loss-reduced": (dict(loss_fn=lambda m, b: loss_fn(m, b).mean()), LossShapeError, "use reduction='none'"),
    "val-labels-out-of-range": (dict(val_data={"x": VAL["x"], "y": VAL["y"] + 7}), BatchMismatchError,
                                "the validation data does not fit"),
}


@pytest.mark.parametrize("name", list(START_CASES))
@pytest.mark.parametrize("shapley", ["first", None])
def test_validation_data_that_does_not_work_with_the_model_fails_at_start(tmp_path, name, shapley):
    overrides, error, fragment = START_CASES[name]
    model = make_model()
    recorder = InRunRecorder(model, tmp_path / "run.h5", **{**RECORDER_DEFAULTS, "shapley": shapley,
                                                             "embeddings": shapley is None, **overrides})
    with pytest.raises(error, match=_escaped(fragment)):
        recorder.start()
    assert not recorder.capture._handles, "hooks left on the model"
    assert_nothing_written(tmp_path)


# ---------------------------------------------------------------------------------------------- batch fields
def _with(ids=None, **fields) -> dict:
    base = batch([0, 1, 2, 3])
    if ids is not None:
        base["index"] = ids
    base.update(fields)
    return base


BATCH_CASES = {
    "index-float": (_with(torch.tensor([0.5, 1.0, 2.0, 3.0])), InvalidArgumentError, "torch.float32 tensor"),
    "index-float-integral": (_with(torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=DTYPE)), InvalidArgumentError,
                             "must be integers"),
    "index-strings": (_with(["a", "b", "c", "d"]), InvalidArgumentError, "got str 'a'"),
    "index-bool": (_with(torch.tensor([True, False, True, True])), InvalidArgumentError, "torch.bool"),
    "index-negative": (_with(torch.tensor([0, -1, 2, 3])), InvalidArgumentError, "must be >= 0, got [-1]"),
    "index-beyond-int64": (_with([0, 1, 2, 2**63]), InvalidArgumentError, "outside the int64 range"),
    "index-numpy-float": (_with(np.array([0.0, 1.0, 2.0, 3.0])), InvalidArgumentError, "numpy float64"),
    "index-uint64-beyond-int64": (_with(torch.tensor([0, 1, 2, 2**63], dtype=torch.uint64)), InvalidArgumentError,
                                  "above the int64 range"),
    "index-too-few": (_with(torch.tensor([0, 1, 2])), BatchMismatchError, "3 sample indices"),
    "index-too-many": (_with(torch.arange(5)), BatchMismatchError, "5 sample indices"),
    "index-missing": ({"x": X[:4], "y": Y[:4]}, BatchMismatchError, "dataset index of each sample"),
    "source-outside-names": (_with(source=torch.tensor([0, 1, 2, 0])), InvalidArgumentError,
                             "must be in 0..1 (source_names has 2), got [2]"),
    "source-negative": (_with(source=torch.tensor([0, -1, 1, 0])), InvalidArgumentError, "got [-1]"),
    "source-float": (_with(source=torch.tensor([0.0, 1.0, 1.0, 0.0])), InvalidArgumentError, "source labels"),
    "source-wrong-count": (_with(source=torch.tensor([0, 1])), BatchMismatchError, "2 source labels"),
}


@pytest.mark.parametrize("name", list(BATCH_CASES))
def test_bad_batch_fields_fail_before_the_forward_pass(tmp_path, name):
    bad, error, fragment = BATCH_CASES[name]
    recorder = InRunRecorder(MODEL, tmp_path / "run.h5", **RECORDER_DEFAULTS, source_names=["web", "books"])
    recorder.start()
    try:
        with pytest.raises(error, match=_escaped(fragment)):
            recorder.begin_microbatch(bad)
    finally:
        recorder.close()
        recorder.capture.detach()
    assert_nothing_written(tmp_path)


def test_index_fn_returning_floats_names_index_fn(tmp_path):
    recorder = InRunRecorder(MODEL, tmp_path / "run.h5", **RECORDER_DEFAULTS,
                             index_fn=lambda b: b["index"].double())
    with pytest.raises(InvalidArgumentError, match="returned by index_fn"):
        recorder.begin_microbatch(batch([0, 1, 2, 3]))
    assert_nothing_written(tmp_path)


# ---------------------------------------------------------------------------------------------- optimizers
class SGDWithSchedule(torch.optim.SGD):
    """A subclass may change the step: it is not assumed to update like SGD."""


OPTIMIZER_CASES = {
    "nadam": (lambda p: torch.optim.NAdam(p, lr=0.01), "torch.optim.nadam.NAdam"),
    "sgd-subclass": (lambda p: SGDWithSchedule(p, lr=0.1), "subclasses SGD"),
    "maximize": (lambda p: torch.optim.SGD(p, lr=0.1, maximize=True), "maximize=True"),
}


def recorded_step(recorder: InRunRecorder, model: nn.Module, optimizer, b) -> None:
    """One optimizer step on batch ``b`` of a plain loop driving ``recorder``."""
    recorder.begin_microbatch(b)
    loss_fn(model, b).mean().backward()
    recorder.end_microbatch()
    recorder.before_optimizer_step(optimizer)
    optimizer.step()
    optimizer.zero_grad()


def one_step(recorder: InRunRecorder, model: nn.Module, optimizer, ids) -> None:
    recorder.start()
    recorded_step(recorder, model, optimizer, batch(ids))


@pytest.mark.parametrize("name", list(OPTIMIZER_CASES))
def test_unknown_optimizer_fails_before_the_first_step_writes_anything(tmp_path, name):
    make, fragment = OPTIMIZER_CASES[name]
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = make(model.parameters())
    recorder = InRunRecorder(model, tmp_path / "run.h5", **RECORDER_DEFAULTS)
    with pytest.raises(UnsupportedOptimizerError, match=_escaped(fragment)):
        recorder.check_optimizer(optimizer)  # what integrations call before training
    with pytest.raises(UnsupportedOptimizerError, match=_escaped(fragment)):
        one_step(recorder, model, optimizer, [0, 1, 2, 3])
    recorder.capture.detach()
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, model.parameters())), "the optimizer stepped"
    assert_nothing_written(tmp_path)


def test_a_named_update_rule_is_used_for_an_unknown_optimizer(tmp_path):
    model = make_model()
    optimizer = SGDWithSchedule(model.parameters(), lr=0.1)
    recorder = InRunRecorder(model, tmp_path / "run.h5", **RECORDER_DEFAULTS, update_rule="sgd")
    one_step(recorder, model, optimizer, [0, 1, 2, 3])
    recorder.close()
    with inrun.open_run(tmp_path / "run.h5") as run:
        assert run.config["update_rule"] == "sgd" and run.num_steps == 1


# ---------------------------------------------------------------------------------------------- accepted inputs
def test_large_ids_and_any_integer_type_are_stored_exactly(tmp_path):
    """Ids are int64 >= 0: 2**53 + 1 (not a float64) and 2**63 - 1 survive, from tensors, arrays and lists."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder = InRunRecorder(model, tmp_path / "run.h5", **RECORDER_DEFAULTS, index_fn=lambda b: b["ids"])
    big = [2**62, 2**53 + 1, 2**63 - 1, 7]
    forms = [torch.tensor(big), np.array(big, dtype=np.uint64), big, np.array([3, 1, 4, 1], dtype=np.int16)]
    recorder.start()
    for form in forms:
        recorded_step(recorder, model, optimizer, {**batch([0, 1, 2, 3]), "ids": form})
    recorder.close()
    with inrun.open_run(tmp_path / "run.h5") as run:
        for t, form in enumerate(forms):
            ids, _ = run.step_values(t)
            assert ids.dtype == np.int64 and [int(i) for i in ids] == [int(i) for i in form]


def record_plan(path: Path, plan, *, optimizer="sgd", val_data=VAL, shapley="first", embeddings=False,
                loss=loss_fn) -> None:
    """A plain loop over ``plan`` (one list of micro-batch ids per step; an empty list is an empty batch)."""
    model = make_model(seed=3)
    opt = (torch.optim.SGD(model.parameters(), lr=0.3) if optimizer == "sgd"
           else torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.1))
    recorder = InRunRecorder(model, path, val_data=val_data, loss_fn=loss, shapley=shapley, embeddings=embeddings)
    recorder.start()
    for micro in plan:
        for ids in micro:
            b = batch(ids)
            recorder.begin_microbatch(b)
            (loss_fn(model, b).mean() / len(micro)).backward()
            recorder.end_microbatch()
        recorder.before_optimizer_step(opt)
        opt.step()
        opt.zero_grad()
    recorder.close()


def test_an_empty_batch_is_skipped_and_recorded_as_skipped(tmp_path):
    """Zero samples: the step is recorded as skipped (SGD does not move on a zero gradient); an empty micro-batch
    next to a real one adds nothing. The other steps' values are those of the same run without the empty batches."""
    with pytest.warns(UserWarning, match=r"step 0 not valued \(an empty batch \(0 samples\)\)"):
        record_plan(tmp_path / "empty.h5", [[[]], [[0, 1, 2, 3]], [[], [4, 5, 6, 7]], [[]]])
    record_plan(tmp_path / "clean.h5", [[[0, 1, 2, 3]], [[4, 5, 6, 7]]])
    with inrun.open_run(tmp_path / "empty.h5") as empty, inrun.open_run(tmp_path / "clean.h5") as clean:
        assert empty.num_steps == 4 and list(empty.steps["skipped"]) == [1, 0, 0, 1]
        for t_empty, t_clean in ((1, 0), (2, 1)):
            ids_e, values_e = empty.step_values(t_empty)
            ids_c, values_c = clean.step_values(t_clean)
            np.testing.assert_array_equal(ids_e, ids_c)
            # the second step was two micro-batches (loss / 2 each): its contributions are half those of the clean
            factor = 0.5 if t_empty == 2 else 1.0
            np.testing.assert_allclose(values_e, factor * values_c, rtol=1e-12, atol=1e-15)


def test_embeddings_without_validation_data(tmp_path):
    """``shapley=None`` needs no validation data: no validation pass (the loss function never sees a validation
    batch), the same projections and update scales as a run with validation data, the store says none were given,
    and ``inrun report`` copes."""
    calls: dict[str, list[bool]] = {"none": [], "val": []}

    def counting(run: str):
        def counting_loss(model, b):
            calls[run].append("index" in b)  # training batches carry an index, validation batches do not
            return loss_fn(model, b)
        return counting_loss

    plan = [[[0, 1, 2, 3]], [[4, 5, 6, 7]], [[]], [[8, 9, 10, 11]]]
    settings = {"k_rows": 2, "k_cols": 3, "parameters": ["2.weight", "0.bias"]}
    with pytest.warns(UserWarning, match="empty batch"):
        record_plan(tmp_path / "none.h5", plan, optimizer="adamw", val_data=None, shapley=None, embeddings=settings,
                    loss=counting("none"))
    with pytest.warns(UserWarning, match="empty batch"):
        record_plan(tmp_path / "val.h5", plan, optimizer="adamw", shapley=None, embeddings=settings,
                    loss=counting("val"))
    assert all(calls["none"]), "a validation pass ran without validation data"
    assert calls["val"].count(False) >= len(plan), "the run with validation data evaluates it every step"
    with inrun.open_run(tmp_path / "none.h5") as none, inrun.open_run(tmp_path / "val.h5") as val:
        assert none.config["has_validation_data"] is False and val.config["has_validation_data"] is True
        assert none.config["n_val"] == 0 and np.isnan(none.steps["val_loss"]).all()
        assert np.isfinite(val.steps["val_loss"]).all()
        np.testing.assert_array_equal(none.steps["skipped"], [0, 0, 1, 0])
        np.testing.assert_array_equal(none.steps["proj_scale"], val.steps["proj_scale"])
        assert np.isfinite(none.steps["proj_scale"][[0, 1, 3]]).all()
        a, b = none.records(columns=["proj_grad"])["proj_grad"], val.records(columns=["proj_grad"])["proj_grad"]
        assert a.shape == (12, 2 * 3 + 4) and np.array_equal(a, b)  # 2.weight [2, 4] -> 2 x 3; 0.bias 4 whole
        text = "\n".join(summary_lines(none))
    assert "no validation data given" in text and "none recorded (shapley=None)" in text


# ---------------------------------------------------------------------------------------------- Lightning
class EmptyFirst(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return i


def collate(ids):
    return batch(ids)


class Net(L.LightningModule):
    def __init__(self, optimizer=torch.optim.SGD):
        super().__init__()
        self.net = make_model(seed=5)
        self.optimizer_class = optimizer

    def per_sample_loss(self, b):
        return loss_fn(self.net, b)

    def training_step(self, b, batch_idx):
        return self.per_sample_loss(b).mean() if b["x"].shape[0] else self.net[0].weight.sum() * 0.0

    def configure_optimizers(self):
        return self.optimizer_class(self.parameters(), lr=0.1)


def fit(callback, module, batches) -> L.Trainer:
    loader = DataLoader(EmptyFirst(), batch_sampler=batches, collate_fn=collate)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, callbacks=[callback])
    trainer.fit(module, loader)
    return trainer


def test_lightning_unknown_optimizer_fails_before_training(tmp_path):
    module = Net(torch.optim.NAdam)
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(UnsupportedOptimizerError, match="NAdam"):
        fit(InRunCallback(tmp_path / "run.h5", val_data=VAL), module, [[0, 1, 2, 3]])
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, module.parameters()))
    assert_nothing_written(tmp_path)


def test_lightning_bad_indices_fail_before_the_first_step(tmp_path):
    module = Net()
    before = [p.detach().clone() for p in module.parameters()]
    callback = InRunCallback(tmp_path / "run.h5", val_data=VAL, index_fn=lambda b: b["index"].double())
    with pytest.raises(InvalidArgumentError, match="returned by index_fn"):
        fit(callback, module, [[0, 1, 2, 3]])
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, module.parameters()))
    assert_nothing_written(tmp_path)


def test_lightning_fit_with_an_empty_batch_and_embeddings_only(tmp_path):
    """The contract's embeddings-only callback (no validation data) through a fit whose first batch is empty."""
    callback = InRunCallback(tmp_path / "run.h5", shapley=None, embeddings={"k_rows": 2, "k_cols": 2})
    with pytest.warns(UserWarning, match="empty batch"):
        fit(callback, Net(), [[], [0, 1, 2, 3], [4, 5, 6, 7]])
    with inrun.open_run(tmp_path / "run.h5") as run:
        assert run.num_steps == 3 and list(run.steps["skipped"]) == [1, 0, 0]
        assert run.config["has_validation_data"] is False
        assert run.records(columns=["proj_grad"])["proj_grad"].shape[0] == 8
        assert math.isnan(float(run.steps["val_loss"][1]))


class StubEngine:
    """What ``DeepSpeedAdapter`` reads of a ZeRO-0 engine in one process (no DeepSpeed needed)."""

    mp_world_size, pipeline_parallelism, dp_world_size = 1, False, 1

    def __init__(self, optimizer):
        self.basic_optimizer = optimizer

    def zero_optimization(self):
        return False

    def gradient_clipping(self):
        return 0.0


def test_deepspeed_adapter_refuses_an_unknown_optimizer_unless_a_rule_is_named(tmp_path):
    """DeepSpeedInRun and Lightning's DeepSpeed strategy call ``prepare`` while setting up, before any step."""
    from inrun.callbacks.deepspeed_engine import DeepSpeedAdapter

    model = make_model()
    adapter = DeepSpeedAdapter(StubEngine(torch.optim.NAdam(model.parameters())))
    recorder = InRunRecorder(model, tmp_path / "run.h5", **RECORDER_DEFAULTS)
    with pytest.raises(UnsupportedOptimizerError, match="NAdam"):
        adapter.prepare(recorder)
    named = InRunRecorder(model, tmp_path / "run.h5", **RECORDER_DEFAULTS, update_rule="adam")
    adapter.prepare(named)
    assert adapter.rule == "adam"
    adapter = DeepSpeedAdapter(StubEngine(torch.optim.RMSprop(model.parameters())))
    adapter.prepare(recorder)
    assert adapter.rule == "rmsprop"
    assert_nothing_written(tmp_path)


def test_an_existing_store_is_refused_at_start_unless_overwriting_or_resuming(tmp_path):
    """A plain loop learns it at ``start()``, before the first forward pass; the old file stays as it was."""
    old = tmp_path / "run.h5"
    old.write_bytes(b"an earlier run")
    recorder = InRunRecorder(make_model(), old, **RECORDER_DEFAULTS)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        recorder.start()
    assert old.read_bytes() == b"an earlier run" and not recorder.capture._handles
    InRunRecorder(make_model(), old, **RECORDER_DEFAULTS, overwrite=True).start()  # accepted (opens at step 1)
    assert old.read_bytes() == b"an earlier run"


@pytest.mark.parametrize("kwargs, fragment", [
    ({"check_every": 0}, "check_every"),
    ({"check_every": 2.5}, "check_every"),
    ({"adam_values": "nope"}, "adam_values"),
])
def test_callback_check_and_adam_options_refused_at_construction(tmp_path, kwargs, fragment):
    from inrun.callbacks import InRunCallback

    val = {"x": torch.randn(2, 4), "y": torch.tensor([0, 1]), "index": torch.tensor([0, 1])}
    with pytest.raises(ValueError, match=fragment):
        InRunCallback(tmp_path / "run.h5", val_data=val, **kwargs)
    assert not any(tmp_path.iterdir())


def test_callback_forwards_check_options_to_the_recorder(tmp_path):
    from inrun.callbacks import InRunCallback

    val = {"x": torch.randn(2, 4), "y": torch.tensor([0, 1]), "index": torch.tensor([0, 1])}
    cb = InRunCallback(tmp_path / "run.h5", val_data=val, check=False, check_every=7, adam_values="fixed-state")
    assert cb.options["check"] is False and cb.options["check_every"] == 7
    assert cb.options["adam_values"] == "fixed-state"
