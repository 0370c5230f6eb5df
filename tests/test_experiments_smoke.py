"""Smoke tests: the main job and the benchmarks run end to end at a tiny size (their figures are not checked here;
benchmarks print ratios measured side by side, see experiments/)."""

from __future__ import annotations

import json
import warnings

import numpy as np

import inrun


def test_main_job_tiny(tmp_path):
    from experiments import main_job

    config = tmp_path / "tiny.toml"
    config.write_text(f"""
[data]
seq_len = 16
val_samples = 4
seed = 0
corruption = "random"
[data.samples_per_source]
docs = 16
code = 16
licence = 8
corrupted = 16
[model]
n_layer = 1
n_head = 2
d_model = 16
[train]
optimizer = "adamw"
lr = 3e-3
batch_size = 8
epochs = 1
seed = 0
[inrun]
output = "{tmp_path / 'run.h5'}"
shapley = "second"
phase_length = 2
wandb = false
embeddings = {{ k_rows = 4, k_cols = 4 }}
checkpoint_every = 2
""")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main_job.main(["--config", str(config), "--steps", "3"])
    assert (tmp_path / "run.png").stat().st_size > 10_000
    assert (tmp_path / "run.posthoc.h5").exists() and (tmp_path / "run.influence.npz").exists()
    with inrun.open_run(tmp_path / "run.h5") as run:
        assert run.num_steps == 3 and run.source_names == ["docs", "code", "licence", "corrupted"]
        assert np.isfinite(run.sample_values(order=2)[1]).all()


def test_bench_inrun_tiny(tmp_path):
    from experiments import bench_inrun

    out = tmp_path / "bench.json"
    bench_inrun.main(["--steps", "1", "--seq-len", "8", "--batch", "8", "--layers", "1", "--vocab", "64",
                      "--repeats", "1", "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    expected = {"plain", "embeddings (64x64)"} | {f"{name} [{variant}]" for name in bench_inrun.CONFIGS
                                                 if name not in ("plain", "embeddings (64x64)")
                                                 for variant in ("block", "fixed-state")}
    assert set(results) == expected and all(r["seconds"] > 0 for r in results.values())


def test_bench_inrun_phases_tiny(tmp_path):
    """--phases times inrun's pieces inside a fit: a first-order fit spends time in the products and the validation
    gradient, and the timers are removed afterwards."""
    from experiments import bench_inrun
    from inrun.engine.captured import CapturedBatch

    before = CapturedBatch.fixed_dots_and_norms
    out = tmp_path / "bench.json"
    bench_inrun.main(["--steps", "2", "--seq-len", "8", "--batch", "8", "--layers", "1", "--vocab", "64", "--d-model",
                      "32", "--repeats", "1", "--configs", "plain", "first", "--adam-values", "fixed-state",
                      "--phases", "--out", str(out)])
    found = json.loads(out.read_text())["phases"]["first [fixed-state]"]["phases_cpu_s"]
    assert found["products with D g_V and norms"] > 0 and found["validation gradient(s)"] > 0
    assert CapturedBatch.fixed_dots_and_norms is before


def test_lds_tiny(tmp_path):
    """The LDS benchmark end to end at a tiny size; a second call reads the retrained losses from the cache."""
    from experiments import lds

    argv = ["--subsets", "4", "--test-points", "3", "--n-train", "64", "--epochs", "1", "--variants", "block",
            "fixed-state", "--damping", "1", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "lds.json"),
            "--peers", "none"]  # the peers (optional packages) have their own test, tests/test_lds_peers.py
    results = lds.main(argv)
    assert len(list((tmp_path / "cache").iterdir())) == 2  # one ground truth per optimizer
    for name in ("sgd", "adamw"):
        scores = results[name]
        assert all(np.isfinite(v) and -1 <= v <= 1 for v in scores.values()), scores
        assert "TracInCP (every-step checkpoints)" in scores and "trajectory LOO (data value embeddings)" in scores
    assert "In-Run Shapley recorded, order 2 [fixed-state]" in results["adamw"]
    assert lds.main(argv)["adamw"] == results["adamw"]  # cached ground truth, same recording: same scores


def test_bench_engine_tiny(tmp_path):
    from experiments import bench_engine

    out = tmp_path / "engine.json"
    bench_engine.main(["--seq-lens", "16", "--layers", "1", "--vocab", "64", "--batch", "2", "--val-batch", "1",
                       "--repeats", "1", "--threads", "1", "--out", str(out)])
    assert out.exists()


def test_bench_fallback_tiny(tmp_path):
    from experiments import bench_fallback

    for model, fallback_tensors in (("llama", 3), ("encoder", 4)):  # 2 RMSNorms a layer + the final one; MHA's 4
        out = tmp_path / f"fallback_{model}.json"
        bench_fallback.main(["--model", model, "--hidden", "16", "--ffn", "32", "--layers", "1", "--heads", "2",
                             "--vocab", "64", "--seq-len", "8", "--batch", "2", "--val-batch", "1", "--repeats", "1",
                             "--steps", "1", "--threads", "1", "--out", str(out)])
        results = json.loads(out.read_text())["results"]
        assert set(results) == set(bench_fallback.VARIANTS)
        assert results["through the fallback"]["fallback_tensors"] == fallback_tensors
        assert results["frozen"]["fallback_tensors"] == 0
        for result in results.values():
            assert all(m["cpu_seconds"] > 0 for m in result["measurements"].values())
            assert result["loop"]["recorder_cpu_s"] > 0


def test_model_coverage_rewrites_only_its_block(tmp_path):
    from experiments import model_coverage

    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{model_coverage.START}\nold table\n{model_coverage.END}\nafter\n")
    rows = model_coverage.main(["--readme", str(readme), "--cases", "groupnorm_cnn", "batchnorm_train"])
    assert [(row["name"], row["verdict"]) for row in rows] == [("groupnorm_cnn", "exact"), ("batchnorm_train", "refused")]
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n") and text.endswith(f"{model_coverage.END}\nafter\n")
    assert "old table" not in text and "| groupnorm_cnn |" in text and "samples mixed" in text


def test_bench_reader_tiny(tmp_path, capsys):
    from experiments import bench_reader

    bench_reader.main(["--rows", "3000", "6000", "--batch", "64", "--step-store-steps", "300", "--workdir",
                       str(tmp_path), "--operations", "open only", "sample_values", "top_k", "export parquet",
                       "--json", str(tmp_path / "figures.json")])
    out = capsys.readouterr().out
    assert "extrapolated to 1,000,000,000 rows" in out and "ms per call" in out
    figures = json.loads((tmp_path / "figures.json").read_text())
    for rows in ("3000", "6000"):
        for operation in ("sample_values", "top_k", "export parquet"):
            assert figures["rows"][rows][operation]["streamed"]["seconds"] > 0, (rows, operation)
    assert figures["step_values"]["streamed"]["steps"] == 300


def test_embedding_sizing_quick(capsys):
    from experiments import embedding_sizing

    embedding_sizing.main(["--quick", "--points", "6"])
    out = capsys.readouterr().out
    assert "| 2 x 2 |" in out and "| 4 x 4 | flat_k = 4 |" in out


def test_bench_adam_step_tiny():
    from experiments import bench_adam_step

    found = bench_adam_step.main(["--rounds", "1", "--layers", "1", "--vocab", "64", "--seq-len", "8", "--batch", "8",
                                  "--configs", "plain", "first [block]", "first [fixed-state]"])
    assert set(found) == {"plain", "first [block]", "first [fixed-state]"} and all(v > 0 for v in found.values())
