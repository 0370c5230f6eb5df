"""``compression`` passed through the recorder and the callbacks: None keeps the store uncompressed at close, with
the same values as the default gzip store; a bad value is refused before training, naming the argument."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import inrun
from inrun.errors import InvalidArgumentError
from inrun.valuation.recorder import InRunRecorder
from tests.test_cli import record_small_run


def record(path, **options) -> str:
    """Six SGD steps of a small MLP on 24 samples, second-order values (the same run for the same options)."""
    return record_small_run(path, epochs=1, **options)


def dataset_compression(path: str) -> set:
    with h5py.File(path, "r") as f:
        return {ds.compression for table in ("steps", "records") for ds in f[table].values()}


def test_compression_none_keeps_the_store_uncompressed_with_the_same_values(tmp_path):
    plain = record(tmp_path / "plain.h5", compression=None)
    default = record(tmp_path / "default.h5")
    lzf = record(tmp_path / "lzf.h5", compression="lzf")
    assert dataset_compression(plain) == {None}
    assert dataset_compression(default) == {"gzip"}
    assert dataset_compression(lzf) == {"lzf"}
    with inrun.open_run(plain) as a, inrun.open_run(default) as b:
        assert a.num_records == b.num_records == 24
        for order in (1, 2):
            ids_a, values_a = a.sample_values(order)
            ids_b, values_b = b.sample_values(order)
            np.testing.assert_array_equal(ids_a, np.arange(24))
            np.testing.assert_array_equal(ids_a, ids_b)
            np.testing.assert_array_equal(values_a, values_b)
            assert np.isfinite(values_a).all() and np.abs(values_a).max() > 0
        for name in ("val_loss", "sum_value_1", "lr"):
            np.testing.assert_array_equal(a.steps[name], b.steps[name])


@pytest.mark.parametrize("bad", ["zip", "", 4, True, "GZIP"])
def test_bad_compression_is_refused_before_training(tmp_path, bad):
    model = nn.Linear(3, 2)
    with pytest.raises(InvalidArgumentError, match=r"compression must be 'auto'.*not "):
        InRunRecorder(model, tmp_path / "run.h5", val_data={"x": torch.zeros(1, 3)},
                      loss_fn=lambda m, b: m(b["x"]).sum(1), compression=bad)
    assert not (tmp_path / "run.h5").exists()


def test_callbacks_check_compression_at_construction(tmp_path):
    from inrun.callbacks.deepspeed import DeepSpeedInRun
    from inrun.callbacks.lightning import InRunCallback

    with pytest.raises(InvalidArgumentError, match="compression must be"):
        InRunCallback(tmp_path / "run.h5", val_data={"x": torch.zeros(1, 3)}, compression="bz2")
    with pytest.raises(InvalidArgumentError, match="compression must be"):
        DeepSpeedInRun(None, tmp_path / "run.h5", compression="bz2")  # refused before the engine is looked at
    callback = InRunCallback(tmp_path / "run.h5", val_data={"x": torch.zeros(1, 3)}, compression=None)
    assert callback.options["compression"] is None
