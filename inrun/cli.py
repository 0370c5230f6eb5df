"""The ``inrun`` command line: ``inrun report RUN`` and ``inrun export RUN``.

``report`` prints a summary of a recorded run (steps, samples, coverage, top and bottom samples, a per-phase table)
and writes a PNG plot of influence over training, per phase and per source. ``export`` writes the per-sample values
as CSV and ``.npz`` for use anywhere.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from inrun.store.lock import is_locked
from inrun.store.paths import find_rank_files
from inrun.store.reader import Run, open_run
from inrun.store.schema import StoreError


def _orders(run: Run) -> list[int]:
    order = int(run.config.get("shapley_order", 1))
    return [] if order == 0 else [1, 2] if order >= 2 else [1]  # 0: shapley=None, no values recorded


def _phase_length(run: Run, requested: int | None) -> int:
    return requested or max(1, run.num_steps // 10)


def summary_lines(run: Run, top: int = 5, phase_length: int | None = None) -> list[str]:
    """The text of ``inrun report``."""
    steps = run.steps
    coverage = run.coverage
    lines = [
        f"run            {', '.join(str(p) for p in run.paths)}",
        f"steps          {run.num_steps} ({int(steps['skipped'].sum())} skipped)",
        f"samples        {run.sample_ids.size} distinct, {run.num_records} occurrences",
        f"update rule    {run.config.get('update_rule', '?')}, Shapley order {run.config.get('shapley_order', '?')}",
        f"coverage       {coverage.get('fraction', 1.0):.1%} of trainable parameters",
    ]
    for key in ("residual_1", "residual_2"):
        residual = steps.get(key)
        if residual is not None and np.isfinite(residual).any():
            lines.append(f"efficiency     mean |{key}| = {np.nanmean(np.abs(residual)):.3e} "
                         f"(values of a step vs. its validation-loss reduction)")
    val = steps.get("val_loss")
    if not run.config.get("has_validation_data", True):
        lines.append("val loss       none (no validation data given: embeddings only)")
    elif val is not None and val.size:
        lines.append(f"val loss       {val[0]:.4f} -> {steps.get('val_loss_after', val)[-1]:.4f}")
    names = run.source_names
    for order in _orders(run):
        ids_top, values_top = run.top_k(top, order=order)
        ids_bottom, values_bottom = run.bottom_k(top, order=order)
        lines.append(f"top {top} (order {order})     " + ", ".join(f"{i}:{v:+.2e}" for i, v in zip(ids_top, values_top)))
        lines.append(f"bottom {top} (order {order})  " + ", ".join(f"{i}:{v:+.2e}" for i, v in zip(ids_bottom, values_bottom)))
    lines += posthoc_lines(run, top)
    influence = Path(run.paths[0]).with_suffix(".influence.npz")
    if influence.exists():
        curve = np.load(influence)
        thirds = np.array_split(curve["values"], 3) if curve["values"].size >= 3 else [curve["values"]]
        lines.append("DVEmb influence per step (lr divided out), mean over early / middle / late thirds: "
                     + ", ".join(f"{part.mean():+.3e}" for part in thirds))
    window = _phase_length(run, phase_length)
    if not _orders(run):
        lines.append("values         none recorded (shapley=None)")
        return lines
    phases = run.phase_values(window=window, order=1, by_source=names is not None)
    header = ["phase start"] + (list(phases.source_names) if phases.source_names else ["value_1"])
    lines.append(f"per-phase value_1 sums (window {window} steps)")
    lines.append("  " + "".join(f"{h:>14}" for h in header))
    table = phases.values if phases.values.ndim == 2 else phases.values[:, None]
    for start, row in zip(phases.phase_starts, table):
        lines.append("  " + f"{int(start):>14}" + "".join(f"{v:>14.3e}" for v in row))
    return lines


def posthoc_path(run: Run) -> Path:
    """Where ``PosthocValues.save`` results for a run are looked for: ``<run>.posthoc.h5``."""
    return Path(run.paths[0]).with_suffix(".posthoc.h5")


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    ranks = lambda v: np.argsort(np.argsort(v)).astype(float)  # noqa: E731
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1]) if a.size > 1 else float("nan")


def posthoc_lines(run: Run, top: int) -> list[str]:
    """Post-hoc values saved next to the run, shown beside the in-run ones."""
    path = posthoc_path(run)
    if not path.exists():
        return []
    from inrun.posthoc.values import PosthocValues

    result = PosthocValues.load(path)
    kinds, counts = np.unique([note.split(" (")[0] for note in result.approximation], return_counts=True)
    lines = [f"post-hoc       {result.first.shape[1]} test points from {path.name}; test gradients at: "
             + ", ".join(f"{kind} ({count} steps)" for kind, count in zip(kinds, counts))]
    for order in (1, 2):
        summed = result.summed(order)
        best, worst = np.argsort(summed)[::-1][:top], np.argsort(summed)[:top]
        lines.append(f"post-hoc top {top} (order {order})     "
                     + ", ".join(f"{result.sample_ids[i]}:{summed[i]:+.2e}" for i in best))
        lines.append(f"post-hoc bottom {top} (order {order})  "
                     + ", ".join(f"{result.sample_ids[i]}:{summed[i]:+.2e}" for i in worst))
        if order in _orders(run):
            ids, in_run = run.sample_values(order=order)
            if np.array_equal(ids, result.sample_ids):
                lines.append(f"post-hoc vs in-run (order {order}): Spearman {_spearman(summed, in_run):.3f} "
                             "(different utilities unless the test points are the validation set)")
    return lines


def plot(run: Run, png: Path, phase_length: int | None = None) -> Path:
    """A PNG of influence over training: per-phase sums per source, and cumulative values per source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = _phase_length(run, phase_length)
    by_source = run.source_names is not None
    orders = _orders(run)
    influence = Path(run.paths[0]).with_suffix(".influence.npz")
    panels = len(orders) + 1 + int(influence.exists())
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    for ax, order in zip(axes[0], orders):
        phases = run.phase_values(window=window, order=order, by_source=by_source)
        table = phases.values if phases.values.ndim == 2 else phases.values[:, None]
        labels = phases.source_names or ["all samples"]
        counts = _phase_counts(run, window, by_source)
        for k, label in enumerate(labels):
            if counts[:, k].sum() == 0:
                continue
            mean = np.divide(table[:, k], counts[:, k], out=np.full(len(table), np.nan), where=counts[:, k] > 0)
            ax.plot(phases.phase_starts, mean, marker="o", label=label)
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_title(f"In-Run Shapley (order {order}): mean value per sample, per phase")
        ax.set_xlabel(f"optimizer step (phases of {window})")
        ax.set_ylabel("value (validation loss reduction)")
        ax.legend(fontsize=8)
    if influence.exists():
        curve = np.load(influence)
        ax = axes[0][len(orders)]
        ax.plot(curve["steps"], curve["values"], color="tab:purple")
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_title("data value embeddings: mean influence per step")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("influence on test loss / learning rate")
    ax = axes[0][-1]
    steps = run.steps
    ax.plot(steps["step"], steps["val_loss"], label="validation loss")
    ax.set_title("validation loss")
    ax.set_xlabel("optimizer step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def _phase_counts(run: Run, window: int, by_source: bool) -> np.ndarray:
    """Occurrences per phase (and source): the denominators of per-sample means."""
    records = run.records(columns=["step", "source"])
    phase = records["step"] // window
    n_phases = int(phase.max()) + 1 if phase.size else 0
    n_phases = max(n_phases, len(run.phase_values(window=window).phase_starts))
    if not by_source:
        return np.bincount(phase, minlength=n_phases)[:, None].astype(float)
    n_sources = len(run.source_names or [])
    flat = phase * n_sources + np.clip(records["source"], 0, None)
    return np.bincount(flat, minlength=n_phases * n_sources).reshape(n_phases, n_sources).astype(float)


def write_report(path: str | Path, png: str | Path | None = None, top: int = 5, phase_length: int | None = None) -> None:
    """Print the report of the run at ``path`` and write its plot (default: next to the store, ``.png``)."""
    with open_run(path) as run:
        for line in summary_lines(run, top=top, phase_length=phase_length):
            print(line)
        target = Path(png) if png else Path(run.paths[0]).with_suffix(".png")
        print(f"plot           {plot(run, target, phase_length)}")


def export(path: str | Path, csv_path: str | Path | None, npz_path: str | Path | None) -> None:
    """Write per-sample run values (orders recorded, occurrences) as CSV and/or ``.npz``."""
    with open_run(path) as run:
        ids = run.sample_ids
        columns = {"sample_id": ids}
        for order in _orders(run):
            columns[f"value_{order}"] = run.sample_values(order=order)[1]
        _, columns["occurrences"] = np.unique(run.records(columns=["sample_id"])["sample_id"], return_counts=True)
        if npz_path:
            np.savez(npz_path, **columns)
            print(f"wrote {npz_path}")
        if csv_path:
            with open(csv_path, "w", newline="") as handle:
                writer = csv.writer(handle)
                writer.writerow(list(columns))
                writer.writerows(zip(*(np.asarray(c).tolist() for c in columns.values())))
            print(f"wrote {csv_path}")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status: 0, 1 on an error (one line on stderr, the traceback with
    ``--debug``), 2 on a usage error (argparse)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    parser = argparse.ArgumentParser(prog="inrun", description="Read runs recorded by inrun.", parents=[common])
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("report", help="summary and plot of a run", parents=[common])
    report.add_argument("run", help="a store (.h5), or the folder/prefix of a multi-rank run")
    report.add_argument("--png", default=None, help="where to write the plot (default: next to the store)")
    report.add_argument("--top", type=int, default=5)
    report.add_argument("--phase-length", type=int, default=None, help="steps per phase (default: a tenth)")
    exporter = commands.add_parser("export", help="per-sample values as CSV and/or .npz", parents=[common])
    exporter.add_argument("run")
    exporter.add_argument("--csv", default=None)
    exporter.add_argument("--npz", default=None)
    args = parser.parse_args(argv)
    if args.command == "export" and not (args.csv or args.npz):
        exporter.error("export needs --csv PATH and/or --npz PATH")
    try:
        _live_note(args.run)
        if args.command == "report":
            write_report(args.run, args.png, args.top, args.phase_length)
        else:
            export(args.run, args.csv, args.npz)
    except Exception as err:  # noqa: BLE001 -- one clear line per error; --debug shows where it came from
        if args.debug:
            raise
        print(f"inrun {args.command}: error: {_one_line(err)}", file=sys.stderr)
        if not isinstance(err, (OSError, ValueError, KeyError, StoreError)):
            print("(an unexpected error: run again with --debug for the traceback, and please report it)",
                  file=sys.stderr)
        return 1
    return 0


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err.args[0] if isinstance(err, KeyError) and err.args else err).split())
    return text or type(err).__name__


def _live_note(path: str) -> None:
    """Say on stderr when the run is still being written (the report then shows the steps committed so far)."""
    try:
        live = [p for p in find_rank_files(path) if is_locked(p)]
    except OSError:
        return  # open_run reports the missing run
    if live:
        print(f"note: {', '.join(map(str, live))} is still being written; showing the steps committed so far",
              file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
