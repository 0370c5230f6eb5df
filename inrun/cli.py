"""The ``inrun`` command line: ``inrun report RUN`` and ``inrun export RUN``.

``report`` prints a summary of a recorded run (steps, samples, coverage, top and bottom samples, a per-phase table)
and writes a PNG plot of influence over training, per phase and per source. ``export`` writes the per-sample values
as CSV and ``.npz``, the records and steps as Parquet, and the per-validation-point matrix, all streamed.
"""

from __future__ import annotations

import argparse
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
        f"samples        {run.num_samples} distinct, {run.num_records} occurrences",
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
    if result.run_id != run.run_id:  # e.g. the store was recorded again at this path: those values are not this run's
        return [f"post-hoc       {path.name} not shown: it holds values of run {result.run_id or '(not recorded)'}, "
                f"not of this run ({run.run_id}); compute them again (run.posthoc_values) and save them"]
    kinds, counts = np.unique([note.split(" (")[0] for note in result.approximation], return_counts=True)
    lines = [f"post-hoc       {result.first.shape[1]} test points from {path.name}; test gradients at: "
             + ", ".join(f"{kind} ({count} steps)" for kind, count in zip(kinds, counts))]
    fallback = result.fallback_note()
    if fallback is not None:
        lines.append(f"post-hoc       {fallback}")
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
        counts = phases.counts if phases.counts.ndim == 2 else phases.counts[:, None]
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


def write_report(path: str | Path, png: str | Path | None = None, top: int = 5, phase_length: int | None = None) -> None:
    """Print the report of the run at ``path`` and write its plot (default: next to the store, ``.png``)."""
    with open_run(path) as run:
        # every aggregate the report and its plot use, in one pass over the records (each column read once)
        run.precompute(_orders(run), window=_phase_length(run, phase_length), by_source=run.source_names is not None)
        for line in summary_lines(run, top=top, phase_length=phase_length):
            print(line)
        target = Path(png) if png else Path(run.paths[0]).with_suffix(".png")
        print(f"plot           {plot(run, target, phase_length)}")


EXPORT_ROWS = 1 << 20  # rows per written chunk / Parquet row group: memory stays one chunk, whatever the run


def sample_table(run: Run) -> dict[str, np.ndarray]:
    """Per-sample columns (ids ascending): ``sample_id``, ``value_<order>`` of each recorded order, ``occurrences``.
    Memory grows with the distinct ids only."""
    ids, occurrences = run.sample_counts()
    columns = {"sample_id": ids}
    for order in _orders(run):
        columns[f"value_{order}"] = run.sample_values(order=order)[1]
    columns["occurrences"] = occurrences
    return columns


def export(path: str | Path, csv_path: str | Path | None = None, npz_path: str | Path | None = None,
           parquet_dir: str | Path | None = None, val_points: str | Path | None = None) -> None:
    """Write per-sample run values (orders recorded, occurrences) as CSV and/or ``.npz``; with ``parquet_dir`` the
    per-sample, records, steps and sources tables as Parquet files; with ``val_points`` the per-validation-point
    matrix (``.npz`` or ``.parquet``). Everything is streamed in chunks of ``EXPORT_ROWS`` rows."""
    with open_run(path) as run:
        if csv_path or npz_path:
            columns = sample_table(run)
            if npz_path:
                np.savez(npz_path, **columns)
                print(f"wrote {npz_path}")
            if csv_path:
                write_csv(csv_path, columns)
                print(f"wrote {csv_path}")
        if parquet_dir:
            for written in write_parquet(run, Path(parquet_dir)):
                print(f"wrote {written}")
        if val_points:
            print(f"wrote {write_val_points(run, Path(val_points))}")


def write_csv(path: str | Path, columns: dict[str, np.ndarray]) -> None:
    """``columns`` (one value per row) as CSV, written chunk by chunk (pyarrow's writer when installed: floats in
    shortest round-trip form either way)."""
    names, n = list(columns), len(next(iter(columns.values()))) if columns else 0
    try:
        import pyarrow as pa
        import pyarrow.csv as pacsv
    except ImportError:
        pa = None
    with open(path, "wb") as handle:
        if pa is not None:
            schema = pa.schema([(name, pa.from_numpy_dtype(np.asarray(c).dtype)) for name, c in columns.items()])
            with pacsv.CSVWriter(handle, schema,
                                 write_options=pacsv.WriteOptions(quoting_style="none")) as writer:
                for start in range(0, n, EXPORT_ROWS):
                    writer.write_batch(pa.record_batch([np.asarray(columns[name][start:start + EXPORT_ROWS])
                                                        for name in names], schema=schema))
                if n == 0:
                    writer.write_table(schema.empty_table())
            return
        handle.write((",".join(names) + "\n").encode())
        for start in range(0, n, EXPORT_ROWS):
            parts = [[repr(x) for x in np.asarray(columns[name][start:start + EXPORT_ROWS]).tolist()] for name in names]
            handle.write(("\n".join(map(",".join, zip(*parts))) + "\n").encode())


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError("Parquet export needs pyarrow: pip install 'inrun[parquet]' (or pip install pyarrow)") \
            from err
    return pa, pq


def _arrow_column(pa, array: np.ndarray):
    """A numpy column as an Arrow array; a column of fixed-size rows becomes a fixed-size list."""
    if array.ndim == 1:
        return pa.array(array)
    return pa.FixedSizeListArray.from_arrays(pa.array(array.reshape(-1)), int(np.prod(array.shape[1:])))


def _write_chunks(path: Path, chunks, schema=None) -> Path:
    """Write an iterator of ``{name: array}`` chunks as one Parquet file, one row group per chunk."""
    pa, pq = _pyarrow()
    writer = None
    try:
        for chunk in chunks:
            batch = pa.record_batch({name: _arrow_column(pa, a) for name, a in chunk.items()})
            if writer is None:
                writer = pq.ParquetWriter(path, batch.schema)
            writer.write_batch(batch)
    finally:
        if writer is not None:
            writer.close()
    return path


def _slices(columns: dict[str, np.ndarray]):
    n = len(next(iter(columns.values())))
    for start in range(0, max(n, 1), EXPORT_ROWS):
        yield {name: a[start:start + EXPORT_ROWS] for name, a in columns.items()}


def write_parquet(run: Run, folder: Path) -> list[Path]:
    """``samples.parquet`` (per-sample values), ``records.parquet`` (every record: one-value columns, the
    per-validation-point columns as fixed-size lists, and the rank), ``steps.parquet`` (the run-level steps table)
    and ``sources.parquet`` (source id -> name), each streamed one row group per ``EXPORT_ROWS`` rows."""
    _pyarrow()
    folder.mkdir(parents=True, exist_ok=True)
    written = [_write_chunks(folder / "samples.parquet", _slices(sample_table(run)))]
    names = [c for c in run.record_columns if run.record_shape(c) == () or c.endswith("_per_val")] + ["rank"]
    written.append(_write_chunks(folder / "records.parquet", run.iter_records(names, EXPORT_ROWS)))
    written.append(_write_chunks(folder / "steps.parquet", _slices(run.steps)))
    labels = run.source_names or []
    sources = {"source": np.arange(-1, len(labels), dtype=np.int32),
               "name": np.array(["unlabelled", *labels], dtype=object)}
    written.append(_write_chunks(folder / "sources.parquet", _slices(sources)))
    return written


def write_val_points(run: Run, path: Path) -> Path:
    """The per-validation-point matrices (``Run.val_point_values``) of every order recorded: ``.npz`` with
    ``sample_id`` and ``value_<order>`` [n_ids, n_val], or ``.parquet`` with one fixed-size-list column per order."""
    orders = [o for o in _orders(run) if f"value_{o}_per_val" in run.record_columns] or [1]
    columns = {"sample_id": run.sample_ids}
    for order in orders:
        columns[f"value_{order}"] = run.val_point_values(order=order)[1]  # raises clearly when not recorded
    if path.suffix == ".parquet":
        return _write_chunks(path, _slices(columns))
    if path.suffix != ".npz":
        raise ValueError(f"--val-points must end in .npz or .parquet, got {path}")
    np.savez(path, **columns)
    return path


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
    exporter.add_argument("--parquet", default=None, metavar="DIR",
                          help="write samples/records/steps/sources .parquet files into DIR (needs pyarrow)")
    exporter.add_argument("--val-points", default=None, metavar="PATH",
                          help="the [n_ids, n_val] matrix of values per validation point (.npz or .parquet)")
    args = parser.parse_args(argv)
    if args.command == "export" and not (args.csv or args.npz or args.parquet or args.val_points):
        exporter.error("export needs --csv PATH, --npz PATH, --parquet DIR and/or --val-points PATH")
    try:
        _live_note(args.run)
        if args.command == "report":
            write_report(args.run, args.png, args.top, args.phase_length)
        else:
            export(args.run, args.csv, args.npz, args.parquet, args.val_points)
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
