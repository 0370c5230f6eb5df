"""``inrun report`` and ``inrun export`` on a small recorded run; exported values checked against the raw store."""

from __future__ import annotations

import csv
import subprocess
import sys
import warnings

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import inrun
from inrun.valuation.recorder import InRunRecorder

SOURCES = ["clean", "noisy"]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> str:
    """Two epochs of SGD on 24 samples (each sample seen twice), second-order values, two sources."""
    path = tmp_path_factory.mktemp("cli") / "run.h5"
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 5, generator=g), torch.randint(0, 3, (24,), generator=g)
    val = {"x": torch.randn(4, 5, generator=g), "y": torch.randint(0, 3, (4,), generator=g)}
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))

    def loss_fn(m, b):
        return F.cross_entropy(m(b["x"]), b["y"], reduction="none")

    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    recorder = InRunRecorder(model, path, val_data=val, loss_fn=loss_fn, shapley="second", source_names=SOURCES)
    recorder.start()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):
            for start in range(0, 24, 4):
                ids = torch.arange(start, start + 4)
                batch = {"x": x[ids], "y": y[ids], "index": ids, "source": ids % 2}
                recorder.begin_microbatch(batch)
                loss = loss_fn(model, batch).mean()
                loss.backward()
                recorder.end_microbatch()
                recorder.before_optimizer_step(optimizer)
                optimizer.step()
                optimizer.zero_grad()
                recorder.note_train_loss(float(loss))
    recorder.close()
    return str(path)


def run_cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "inrun.cli", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def raw_sums(path: str, column: str) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(path, "r") as store:
        rows = store.attrs["committed_rows"]
        ids, values = store["records"]["sample_id"][:rows], store["records"][column][:rows]
    unique = np.unique(ids)
    return unique, np.array([values[ids == i].sum() for i in unique])


def test_report_prints_summary_and_writes_png(recorded, tmp_path):
    png = tmp_path / "plot.png"
    out = run_cli("report", recorded, "--png", str(png), "--phase-length", "4", "--top", "3")
    assert "steps          12 (0 skipped)" in out
    assert "samples        24 distinct, 48 occurrences" in out
    assert "update rule    sgd, Shapley order 2" in out
    ids, values = raw_sums(recorded, "value_1")
    best = ids[np.argmax(values)]
    assert f"top 3 (order 1)     {best}:" in out
    assert "clean" in out and "noisy" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_export_csv_and_npz_match_the_raw_store(recorded, tmp_path):
    csv_path, npz_path = tmp_path / "values.csv", tmp_path / "values.npz"
    run_cli("export", recorded, "--csv", str(csv_path), "--npz", str(npz_path))
    with open(csv_path) as handle:
        rows = list(csv.DictReader(handle))
    exported = np.load(npz_path)
    for order in (1, 2):
        ids, expected = raw_sums(recorded, f"value_{order}")
        np.testing.assert_array_equal(exported["sample_id"], ids)
        np.testing.assert_allclose(exported[f"value_{order}"], expected, rtol=1e-12)
        np.testing.assert_allclose([float(r[f"value_{order}"]) for r in rows], expected, rtol=1e-12)
    assert set(exported["occurrences"].tolist()) == {2}


def test_console_script_is_installed():
    import shutil

    assert shutil.which("inrun") or (sys.prefix and __import__("os").path.exists(f"{sys.prefix}/bin/inrun"))


def test_export_needs_a_target(recorded):
    done = subprocess.run([sys.executable, "-m", "inrun.cli", "export", recorded], capture_output=True, text=True)
    assert done.returncode != 0 and "--csv" in done.stderr


def test_reader_agrees_with_raw_store(recorded):
    with inrun.open_run(recorded) as run:
        ids, values = run.sample_values(order=2)
    expected_ids, expected = raw_sums(recorded, "value_2")
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(values, expected, rtol=1e-12)
