"""Sizing data value embeddings up front: the first step states the bytes per occurrence and the planned total,
checked against the store actually written; a total over the free disk stops the run before anything is written;
flat parameters can be projected (``flat_k``)."""

from __future__ import annotations

import warnings
from collections import namedtuple

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import inrun.valuation.recorder as recorder_module
from inrun.engine.projection import ProjectionSettings, Projector
from inrun.errors import InvalidArgumentError
from inrun.store.schema import StoreIOError
from inrun.valuation.recorder import InRunRecorder


def loss_fn(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["y"], reduction="none")


def train(path, embeddings, steps=3, batch=4):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(steps * batch, 6, generator=g), torch.randint(0, 3, (steps * batch,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 40), nn.Tanh(), nn.Linear(40, 3))
    recorder = InRunRecorder(model, path, loss_fn=loss_fn, shapley=None, embeddings=embeddings)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder.start()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in range(steps):
            ids = torch.arange(t * batch, (t + 1) * batch)
            b = {"x": x[ids], "y": y[ids], "index": ids}
            recorder.begin_microbatch(b)
            loss_fn(model, b).mean().backward()
            recorder.end_microbatch()
            recorder.before_optimizer_step(optimizer)
            optimizer.step()
            optimizer.zero_grad()
    recorder.close()
    return recorder


def test_first_step_states_the_size_that_is_then_written(tmp_path, capsys):
    recorder = train(tmp_path / "run.h5", {"k_rows": 4, "k_cols": 4, "planned_steps": 3})
    size = recorder.embedding_size
    with h5py.File(tmp_path / "run.h5", "r") as store:
        records = store["records"]
        row_bytes = sum(ds.dtype.itemsize * int(np.prod(ds.shape[1:])) for ds in records.values())
        assert records["proj_grad"].shape[1] == size.dim == recorder.projector.dim
        rows = store.attrs["committed_rows"]
    assert size.bytes_per_occurrence == row_bytes
    assert size.total_bytes == row_bytes * rows == row_bytes * 4 * 3
    err = capsys.readouterr().err
    assert f"{size.dim:,} projected numbers" in err and "for the 3 projected steps planned" in err


def test_a_total_over_the_free_disk_refuses_to_start(tmp_path, monkeypatch):
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(recorder_module.shutil, "disk_usage", lambda path: Usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(StoreIOError, match="only 0.0 GB are free .*'check_disk': False"):
        train(tmp_path / "run.h5", {"planned_steps": 10**6})
    assert not (tmp_path / "run.h5").exists()
    recorder = train(tmp_path / "run2.h5", {"planned_steps": 10**6, "check_disk": False})
    assert recorder.embedding_size.total_bytes > 1000
    recorder = train(tmp_path / "run3.h5", True)  # no plan: stated, not checked
    assert recorder.embedding_size.total_bytes is None


def test_flat_parameters_can_be_projected():
    shapes = {"weight": (40, 6), "bias": 40}
    whole = Projector.build(shapes, ProjectionSettings(k_rows=4, k_cols=4))
    assert [b.size for b in whole.layout] == [16, 16]  # by default the bias gets min(40, k_rows * k_cols) = 16
    projected = Projector.build(shapes, ProjectionSettings(k_rows=4, k_cols=4, flat_k=5))
    assert [b.size for b in projected.layout] == [16, 5]
    kept = Projector.build(shapes, ProjectionSettings(k_rows=8, k_cols=8))
    assert kept.layout[1].size == 40 and kept.matrices["bias"][0] is None  # default: biases kept whole
    grad = torch.randn(3, 40, dtype=torch.float64)
    p = projected.matrices["bias"][0]
    assert p.shape == (5, 40)
    out = projected.project_gradients({"weight": torch.zeros(3, 40, 6), "bias": grad})
    np.testing.assert_allclose(out[:, 16:].numpy(), (grad @ p.T).numpy(), rtol=1e-6)


def test_bad_sizing_options_are_named():
    model = nn.Linear(3, 2)
    for bad, match in (({"flat_k": 0}, "flat_k"), ({"planned_steps": -1}, "planned_steps"),
                       ({"check_disk": "no"}, "check_disk")):
        with pytest.raises(InvalidArgumentError, match=match):
            InRunRecorder(model, "unused.h5", loss_fn=loss_fn, shapley=None, embeddings=bad)
