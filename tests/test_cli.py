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


def record_small_run(path, *, epochs: int, sources: list[str] | None = None, **options) -> str:
    """``epochs`` of SGD on 24 samples (batches of 4 in a fixed order), second-order values, a fixed seed; with
    ``sources``, sample i comes from source i % 2. ``options`` go to the recorder."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 5, generator=g), torch.randint(0, 3, (24,), generator=g)
    val = {"x": torch.randn(4, 5, generator=g), "y": torch.randint(0, 3, (4,), generator=g)}
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))

    def loss_fn(m, b):
        return F.cross_entropy(m(b["x"]), b["y"], reduction="none")

    optimizer = torch.optim.SGD(model.parameters(), lr=0.3)
    if sources is not None:
        options["source_names"] = sources
    recorder = InRunRecorder(model, path, val_data=val, loss_fn=loss_fn, shapley="second", **options)
    recorder.start()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(epochs):
            for start in range(0, 24, 4):
                ids = torch.arange(start, start + 4)
                batch = {"x": x[ids], "y": y[ids], "index": ids}
                if sources is not None:
                    batch["source"] = ids % 2
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


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> str:
    """Two epochs of SGD on 24 samples (each sample seen twice), second-order values, two sources."""
    return record_small_run(tmp_path_factory.mktemp("cli") / "run.h5", epochs=2, sources=SOURCES, per_val_point=True)


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


def raw_columns(path: str, table: str = "records") -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as store:
        n = store.attrs["committed_rows"] if table == "records" else store.attrs["committed_steps"]
        return {name: ds[:n] for name, ds in store[table].items()}


def test_export_parquet_matches_the_raw_store(recorded, tmp_path, monkeypatch):
    pq = pytest.importorskip("pyarrow.parquet")
    from inrun import cli

    monkeypatch.setattr(cli, "EXPORT_ROWS", 7)  # several row groups
    cli.export(recorded, parquet_dir=tmp_path / "pq")
    raw = raw_columns(recorded)
    records = pq.ParquetFile(tmp_path / "pq" / "records.parquet")
    assert records.metadata.num_row_groups == 7  # 48 rows in groups of 7
    table = records.read()
    for name in ("step", "sample_id", "value_1", "value_2", "source"):
        np.testing.assert_array_equal(table[name].to_numpy(), raw[name])
    per_val = np.stack(table["value_1_per_val"].to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(per_val, raw["value_1_per_val"])
    assert "proj_grad" not in table.column_names and set(table["rank"].to_numpy()) == {0}
    steps = pq.read_table(tmp_path / "pq" / "steps.parquet")
    np.testing.assert_array_equal(steps["lr"].to_numpy(), raw_columns(recorded, "steps")["lr"])
    samples = pq.read_table(tmp_path / "pq" / "samples.parquet")
    ids, expected = raw_sums(recorded, "value_2")
    np.testing.assert_array_equal(samples["sample_id"].to_numpy(), ids)
    np.testing.assert_allclose(samples["value_2"].to_numpy(), expected, rtol=1e-12)
    sources = pq.read_table(tmp_path / "pq" / "sources.parquet").to_pydict()
    assert sources == {"source": [-1, 0, 1], "name": ["unlabelled", *SOURCES]}


@pytest.mark.parametrize("suffix", [".npz", ".parquet"])
def test_export_val_points_matrix(recorded, tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    target = tmp_path / f"points{suffix}"
    run_cli("export", recorded, "--val-points", str(target))
    if suffix == ".npz":
        got = dict(np.load(target))
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(target)
        got = {name: np.stack(table[name].to_numpy(zero_copy_only=False)) if name != "sample_id"
               else table[name].to_numpy() for name in table.column_names}
    raw = raw_columns(recorded)
    ids = np.unique(raw["sample_id"])
    np.testing.assert_array_equal(got["sample_id"], ids)
    for order in (1, 2):
        column = raw[f"value_{order}_per_val"].astype(np.float64)
        expected = np.array([column[raw["sample_id"] == i].sum(axis=0) for i in ids])
        assert got[f"value_{order}"].shape == (24, 4)
        np.testing.assert_allclose(got[f"value_{order}"], expected, rtol=1e-12)
        # the recorder's per-sample value is the mean over validation points (float32 storage of the matrix)
        np.testing.assert_allclose(got[f"value_{order}"].mean(axis=1), raw_sums(recorded, f"value_{order}")[1],
                                   rtol=1e-5, atol=1e-9)


def test_val_points_not_recorded_is_a_clear_error(tmp_path):
    from inrun.store.writer import RunWriter

    with RunWriter(tmp_path / "run.h5") as w:
        w.append_step({}, {"sample_id": np.arange(3), "value_1": np.ones(3)})
    done = subprocess.run([sys.executable, "-m", "inrun.cli", "export", str(tmp_path / "run.h5"), "--val-points",
                           str(tmp_path / "m.npz")], capture_output=True, text=True)
    assert done.returncode == 1 and "per_val_point=True" in done.stderr


def test_console_script_is_installed():
    import shutil

    assert shutil.which("inrun") or (sys.prefix and __import__("os").path.exists(f"{sys.prefix}/bin/inrun"))


def test_export_needs_a_target(recorded):
    done = subprocess.run([sys.executable, "-m", "inrun.cli", "export", recorded], capture_output=True, text=True)
    assert done.returncode != 0 and "--csv" in done.stderr and "--parquet" in done.stderr


def test_reader_agrees_with_raw_store(recorded):
    with inrun.open_run(recorded) as run:
        ids, values = run.sample_values(order=2)
    expected_ids, expected = raw_sums(recorded, "value_2")
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(values, expected, rtol=1e-12)
