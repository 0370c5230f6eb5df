"""How closely the default Adam value variant follows the exact fixed-state values, on the same training run.

Two stores recorded from the same fit (same seed, data and optimizer), one with ``adam_values="block"`` (the
default) and one with ``adam_values="fixed-state"``, are compared: per step, the Pearson and Spearman correlation of
the batch's values (reported as median and minimum over steps), and the relative error of the run totals per sample
(``|totals_a - totals_b| / |totals_b|``, Euclidean norms over samples), for each recorded order.

With ``--main`` it runs the README's main job (configs/main.toml) twice, once per variant, and compares those.

    .venv/bin/python -m experiments.adam_fidelity --main [--steps 100]
    .venv/bin/python -m experiments.adam_fidelity A.h5 B.h5
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from pathlib import Path

import numpy as np
import tomllib

import inrun


def _rank(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x)).astype(np.float64)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denominator) if denominator > 0 else float("nan")


def compare_runs(path: str | Path, reference: str | Path) -> dict:
    """Per-step and run-total agreement of ``path``'s values with ``reference``'s (same fit, another variant)."""
    found: dict = {}
    with inrun.open_run(path) as run, inrun.open_run(reference) as ref:
        orders = [order for order in (1, 2) if f"value_{order}" in run.record_columns
                  and f"value_{order}" in ref.record_columns]
        for order in orders:
            pearson, spearman = [], []
            for t in range(min(run.num_steps, ref.num_steps)):
                ids, a = run.step_values(t, order=order)
                ids_ref, b = ref.step_values(t, order=order)
                if len(a) < 3 or not np.array_equal(ids, ids_ref):
                    continue
                pearson.append(_pearson(a, b))
                spearman.append(_pearson(_rank(a), _rank(b)))
            ids, totals = run.sample_values(order=order)
            ids_ref, totals_ref = ref.sample_values(order=order)
            assert np.array_equal(ids, ids_ref), "the two runs saw different samples"
            found[f"order {order}"] = {
                "steps": len(pearson),
                "pearson per step (median, min)": [float(np.nanmedian(pearson)), float(np.nanmin(pearson))],
                "spearman per step (median, min)": [float(np.nanmedian(spearman)), float(np.nanmin(spearman))],
                "relative error of run totals": float(np.linalg.norm(totals - totals_ref)
                                                      / max(np.linalg.norm(totals_ref), 1e-300)),
                "pearson of run totals": _pearson(totals, totals_ref),
                "spearman of run totals": _pearson(_rank(totals), _rank(totals_ref)),
            }
    return found


def main_job_fidelity(steps: int | None, variant: str = "block") -> dict:
    """Run the main job (configs/main.toml, W&B off) once per variant into a temporary folder and compare."""
    from experiments import main_job

    config = tomllib.loads(Path("configs/main.toml").read_text())
    paths = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in (variant, "fixed-state"):
            lines = Path("configs/main.toml").read_text().splitlines()
            out = Path(folder) / name / "run.h5"
            text = []
            for line in lines:
                if line.startswith("output ="):
                    line = f'output = "{out}"'
                elif line.startswith("wandb ="):
                    line = "wandb = false"
                text.append(line)
                if line.strip() == "[inrun]":
                    text.append(f'adam_values = "{name}"')
            cfg = Path(folder) / f"{name}.toml"
            cfg.write_text("\n".join(text) + "\n")
            argv = ["--config", str(cfg)] + (["--steps", str(steps)] if steps else [])
            main_job.main(argv)
            paths[name] = out
        found = compare_runs(paths[variant], paths["fixed-state"])
    found["config"] = {"train": config["train"], "model": config["model"], "steps": steps}
    return found


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stores", nargs="*", type=Path, help="a store and its fixed-state reference")
    parser.add_argument("--main", action="store_true", help="run the main job with both variants and compare")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.main:
        found = main_job_fidelity(args.steps)
    elif len(args.stores) == 2:
        found = compare_runs(*args.stores)
    else:
        parser.error("give two stores or --main")
    print(json.dumps(found, indent=2))
    return found


if __name__ == "__main__":
    main()
