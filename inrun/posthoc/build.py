"""Building data value embeddings (DVEmb): the streaming, resumable backward recursion over a run's projected gradients.

ALGORITHMS.md, "Data value embeddings and trajectory-specific leave-one-out". A run recorded with
``embeddings=...`` holds, for every sample occurrence, its projected contribution ``g = P c_s(z)`` to the gradient of
step ``s`` (``records/proj_grad``) and, per layer block, the step's update scale ``eta_s`` (``steps/proj_scale``).
:func:`build_embeddings` runs the backward recursion per layer block (``M`` is ``k x k`` for a block of ``k``
projected coordinates)::

    M = 0
    for s = last step down to 0:
        emb(z) = eta_s (g_s(z) - M g_s(z))      for every z in B_s (all ranks)
        M     += gamma_s sum_{z in B_s} emb(z) g_s(z)^T

so that ``emb(z) = eta_s prod_{k>s} (I - eta_k H_k) g_s(z)`` with ``H_k = gamma_k sum_{j in B_k} g_j g_j^T``
(block-diagonal: one ``H`` per layer block). ``gamma_k = |B_k|`` by default (``hessian_scale="batch"``): then ``H_k``
is the empirical Fisher of the step's mean loss, ``(1/|B_k|) sum_j grad l_j grad l_j^T``, because ``c_j`` carries the
``1/|B_k|`` of the mean. ``hessian_scale=1`` is ALGORITHMS.md's formula as written (right for a sum-reduced loss);
docs/embeddings.md shows the measured difference. ``<P grad L_test(theta_T), emb(z)>`` then approximates ``L_test(theta'_T) - L_test(theta_T)``
when ``z``'s contribution to step ``s`` is dropped (positive = ``z`` helped). Removal from every epoch is the sum of
the sample's occurrence embeddings.

The result goes to ``<run>.dvemb.h5`` (format in docs/embeddings.md): one embedding per record row, in the row order
of ``Run.records()`` (rank 0's committed rows, then rank 1's, ...), the per-sample sums with their ``sample_ids``, and
the recursion state. The build streams the record backwards in chunks of steps, checkpoints ``M`` after every chunk
(data first, then state, then one attribute that commits both) and resumes after a crash.

Command line: ``python -m inrun.posthoc.build RUN [--until-step N] [--device cuda]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np
import torch
from torch import Tensor

from inrun.engine.projection import BlockLayout
from inrun.errors import InRunError
from inrun.posthoc.record import EmbeddingsError, RunRecord, read_projection
from inrun.store.reader import Run, open_run
from inrun.store.schema import LIBVER, StoreError
from inrun.version import __version__

FORMAT = "inrun-dvemb"


SCHEMA_VERSION = 1


SUFFIX = ".dvemb.h5"


ROW_BLOCK_BYTES = 64 << 20  # rows read at once when streaming the embeddings for a query


SUMS_BUDGET_BYTES = 1 << 30  # float64 accumulator of the per-sample sums, per pass over the rows


def default_embeddings_path(run: Run, until_step: int | None = None) -> Path:
    """``runs/run.h5`` -> ``runs/run.dvemb.h5`` (multi-rank ``runs/run.rank0.h5`` too); with ``until_step``
    ``runs/run.dvemb.step<N>.h5``."""
    first = run.paths[0]
    stem = first.name[: -len(".h5")] if first.name.endswith(".h5") else first.name
    if run.world_size > 1 and ".rank" in stem:
        stem = stem[: stem.rindex(".rank")]
    suffix = SUFFIX if until_step is None else f".dvemb.step{int(until_step)}.h5"
    return first.with_name(stem + suffix)


def _resolve_device(device: "str | torch.device | None") -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_until(record: RunRecord, until_step: int | None) -> int:
    last = int(record.step_numbers[-1]) if len(record.step_numbers) else -1
    if until_step is None:
        return last + 1
    until_step = int(until_step)
    if not 0 < until_step <= last + 1:
        raise EmbeddingsError(f"until_step must be between 1 and {last + 1} (the run's steps are 0..{last}), "
                              f"got {until_step}")
    return until_step


def _identity(record: RunRecord, until: int, layout: list[BlockLayout], dtype: torch.dtype,
              hessian_scale: "str | float") -> dict[str, Any]:
    return {
        "run_id": record.run.run_id,
        "until_step": until,
        "rank_rows": [int(r) for r in record.rank_rows],
        "dim": record.dim,
        "layout": json.dumps([vars(b) for b in layout]),
        "compute_dtype": str(dtype).replace("torch.", ""),
        "hessian_scale": str(hessian_scale),
    }


def _describe_mismatch(attrs: h5py.AttributeManager, wanted: dict[str, Any]) -> list[str]:
    problems = []
    for key, value in wanted.items():
        stored = attrs.get(key)
        stored = json.loads(stored) if key == "rank_rows" and stored is not None else stored
        if isinstance(stored, np.generic):
            stored = stored.item()
        if isinstance(stored, bytes):
            stored = stored.decode()
        if stored != value:
            problems.append(f"{key} is {stored!r} in the file, {value!r} now")
    return problems


def check_embeddings_header(attrs: h5py.AttributeManager, path: Path) -> None:
    fmt = attrs.get("format")
    if fmt != FORMAT:
        raise EmbeddingsError(f"{path} is not an inrun embeddings file (its 'format' attribute is {fmt!r})")
    version = int(attrs.get("schema_version", -1))
    if version > SCHEMA_VERSION:
        raise EmbeddingsError(f"{path} has embeddings schema {version}; this inrun reads up to schema "
                              f"{SCHEMA_VERSION}; upgrade inrun")


def build_progress(attrs: h5py.AttributeManager) -> dict[str, int]:
    return json.loads(attrs["progress"])


def _create(out: Path, identity: dict[str, Any], layout: list[BlockLayout], total_rows: int,
            dtype: torch.dtype) -> h5py.File:
    out.parent.mkdir(parents=True, exist_ok=True)
    f = h5py.File(out, "w", libver=LIBVER)
    attrs = f.attrs
    attrs["format"] = FORMAT
    attrs["schema_version"] = SCHEMA_VERSION
    attrs["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")

    attrs["inrun_version"] = __version__
    attrs["row_order"] = "Run.records() order: rank 0's committed rows, then rank 1's, ..."
    for key, value in identity.items():
        attrs[key] = json.dumps(value) if key == "rank_rows" else value
    attrs["complete"] = 0
    attrs["progress"] = json.dumps({"below": identity["until_step"], "slot": 0})
    dim = identity["dim"]
    chunk_rows = max(1, min(max(total_rows, 1), 16384 // max(dim, 1)))
    f.create_dataset("embeddings", shape=(total_rows, dim), dtype=np.float32, chunks=(chunk_rows, dim) if total_rows else None,
                     fillvalue=np.nan)
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    for slot in (0, 1):
        group = f.create_group(f"state/{slot}")
        for position, block in enumerate(layout):
            group.create_dataset(str(position), shape=(block.size, block.size), dtype=np_dtype, fillvalue=0.0)
    f.flush()
    return f


def _commit_chunk(f: h5py.File, blocks: list[Tensor], below: int) -> None:
    """Checkpoint after a chunk: ``M`` into the free slot, flush, then one attribute switches to it, flush.

    The embeddings of the chunk are already written; a crash before the attribute leaves the previous state, from
    which the chunk is simply recomputed (it overwrites the same rows with the same numbers).
    """
    slot = 1 - build_progress(f.attrs)["slot"]
    group = f[f"state/{slot}"]
    for position, m in enumerate(blocks):
        group[str(position)][...] = m.cpu().numpy()
    f.flush()
    f.attrs["progress"] = json.dumps({"below": int(below), "slot": slot})
    f.flush()


def _chunks(steps_desc: np.ndarray, chunk_steps: int, record: RunRecord, max_bytes: int) -> list[np.ndarray]:
    """Consecutive runs of steps (descending), each at most ``chunk_steps`` steps and about ``max_bytes`` of rows."""
    rows_per_step = np.zeros(len(steps_desc), np.int64)
    for r in record.ranks:
        pos = np.searchsorted(r.steps, steps_desc)
        inside = pos < len(r.steps)
        hit = np.zeros(len(steps_desc), bool)
        hit[inside] = r.steps[pos[inside]] == steps_desc[inside]
        rows_per_step[hit] += r.n_samples[pos[hit]]
    row_bytes = record.dim * 8
    out, start = [], 0
    while start < len(steps_desc):
        stop, size = start, 0
        while stop < len(steps_desc) and stop - start < chunk_steps and (stop == start or size + rows_per_step[stop] * row_bytes <= max_bytes):
            size += rows_per_step[stop] * row_bytes
            stop += 1
        out.append(steps_desc[start:stop])
        start = stop
    return out


def build_embeddings(
    run_or_path: "Run | str | Path",
    out: "str | Path | None" = None,
    *,
    until_step: int | None = None,
    chunk_steps: int = 64,
    device: "str | torch.device | None" = None,
    dtype: "str | torch.dtype" = "float32",
    resume: bool = True,
    progress: bool = True,
    max_chunk_bytes: int = 256 << 20,
    hessian_scale: "str | float" = "batch",
) -> Path:
    """Build the data value embeddings of a run recorded with embeddings; return the path of the file written.

    Args:
        run_or_path: an open :class:`~inrun.store.Run` or anything :func:`inrun.open_run` accepts.
        out: the output file; default ``<run>.dvemb.h5`` beside the run (``<run>.dvemb.step<N>.h5`` with
            ``until_step``).
        until_step: influence checkpointing: embeddings relative to the model at step ``until_step`` (the
            recursion starts at step ``until_step - 1``; rows of later steps stay NaN). Default: the final model.
        chunk_steps: steps read, processed and checkpointed together (also bounded by ``max_chunk_bytes``).
        device: where the recursion runs (``"cuda"``, ``"cpu"``; default CUDA when available).
        dtype: precision of ``M`` and of the arithmetic (``"float32"`` or ``"float64"``); stored embeddings are
            float32. Memory: ``sum over blocks of k_b^2`` numbers (e.g. 4096^2 * 4 B = 64 MiB per 64 x 64 block).
        resume: continue an interrupted build of the same run and settings (default); False starts over.
        progress: show a progress bar (tqdm) over steps.
        hessian_scale: ``gamma`` in ``H_k = gamma * sum_{j in B_k} g_j g_j^T``. ``"batch"`` (default): gamma = the
            number of samples of step k (all ranks), which makes ``H_k = (1/|B_k|) sum_j grad l_j grad l_j^T``, the
            empirical Fisher of the step's *mean* loss (what the DVEmb paper's Gauss-Newton approximation amounts
            to, and right for a mean-reduced training loss). ``1``: ``H_k = sum_j c_j c_j^T`` as ALGORITHMS.md writes
            it, which is the empirical Fisher of a *sum*-reduced loss. See docs/embeddings.md.
    """
    run = run_or_path if isinstance(run_or_path, Run) else open_run(run_or_path)
    try:
        return _build(run, out, until_step, chunk_steps, device, dtype, resume, progress, max_chunk_bytes,
                      _hessian_scale(hessian_scale))
    finally:
        if run is not run_or_path:
            run.close()


def _hessian_scale(value: "str | float") -> "str | float":
    if value == "batch":
        return value
    if isinstance(value, str) or not value >= 0:
        raise ValueError(f"hessian_scale must be 'batch' or a number >= 0, got {value!r}")
    return float(value)


def _build(run: Run, out, until_step, chunk_steps, device, dtype, resume, progress, max_chunk_bytes,
           hessian_scale) -> Path:
    if chunk_steps < 1:
        raise ValueError(f"chunk_steps must be >= 1, got {chunk_steps}")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    device = _resolve_device(device)
    layout, _, _ = read_projection(run)
    record = RunRecord(run)
    try:
        until = _resolve_until(record, until_step)
        out = Path(out) if out is not None else default_embeddings_path(run, until_step)
        identity = _identity(record, until, layout, dtype, hessian_scale)
        f = _open_output(out, identity, layout, int(record.offsets[-1]), dtype, resume)
        try:
            if int(f.attrs["complete"]):
                return out
            _recurse(f, record, layout, until, chunk_steps, device, dtype, progress, max_chunk_bytes, hessian_scale)
            _finalize(f, record)
        finally:
            f.close()
    finally:
        record.close()
    return out


def _open_output(out: Path, identity: dict[str, Any], layout: list[BlockLayout], total_rows: int,
                 dtype: torch.dtype, resume: bool) -> h5py.File:
    if out.exists() and resume:
        try:
            f = h5py.File(out, "r+", libver=LIBVER)
        except OSError as err:
            raise EmbeddingsError(f"cannot open {out} to resume the build: {err}. Pass resume=False to start over.") from err
        try:
            check_embeddings_header(f.attrs, out)
            problems = _describe_mismatch(f.attrs, identity)
        except BaseException:
            f.close()
            raise
        if problems:
            f.close()
            raise EmbeddingsError(
                f"{out} holds embeddings of another build ({'; '.join(problems)}); pass resume=False (--restart on "
                "the command line) to replace it, or another out= path"
            )
        return f
    if out.exists():
        out.unlink()
    return _create(out, identity, layout, total_rows, dtype)


def _load_state(f: h5py.File, layout: list[BlockLayout], device: torch.device, dtype: torch.dtype) -> tuple[int, list[Tensor]]:
    state = build_progress(f.attrs)
    group = f[f"state/{state['slot']}"]
    blocks = [torch.from_numpy(np.asarray(group[str(i)][()])).to(device=device, dtype=dtype) for i in range(len(layout))]
    return int(state["below"]), blocks


def _recurse(f: h5py.File, record: RunRecord, layout: list[BlockLayout], until: int, chunk_steps: int,
             device: torch.device, dtype: torch.dtype, progress: bool, max_chunk_bytes: int,
             hessian_scale: "str | float") -> None:
    from tqdm.auto import tqdm

    below, blocks = _load_state(f, layout, device, dtype)
    todo = record.steps_with_rows(below)[::-1]
    done = len(record.steps_with_rows(until)) - len(todo)
    bounds = [(b.offset, b.offset + b.size) for b in layout]
    embeddings = f["embeddings"]
    with tqdm(total=done + len(todo), initial=done, disable=not progress, desc="DVEmb build", unit="step") as bar:
        for chunk in _chunks(todo, chunk_steps, record, max_chunk_bytes):
            high, low = int(chunk[0]), int(chunk[-1])
            spans = [r.span(low, high) for r in record.ranks]
            data = [torch.from_numpy(record.read(k, a, b).astype(np.float64 if dtype == torch.float64 else np.float32))
                    .to(device) for k, (a, b, _) in enumerate(spans)]
            result = [torch.full_like(d, float("nan")) for d in data]
            for step in chunk:  # descending
                rows = []  # (rank, local slice) of the step's rows in this chunk
                for k, (r, (a, _, positions)) in enumerate(zip(record.ranks, spans)):
                    i = int(np.searchsorted(r.steps, step))
                    if i < len(r.steps) and r.steps[i] == step and r.n_samples[i] > 0:
                        start = int(r.row_start[i]) - a
                        rows.append((k, slice(start, start + int(r.n_samples[i]))))
                g = torch.cat([data[k][s] for k, s in rows]) if len(rows) > 1 else data[rows[0][0]][rows[0][1]]
                gamma = float(g.shape[0]) if hessian_scale == "batch" else float(hessian_scale)
                emb = _step(g, blocks, bounds, record.scale_of(int(step)), gamma)
                offset = 0
                for k, s in rows:
                    n = s.stop - s.start
                    result[k][s] = emb[offset: offset + n]
                    offset += n
                bar.update(1)
            for k, (a, b, _) in enumerate(spans):
                if b > a:
                    start = int(record.offsets[k]) + a
                    embeddings[start: start + (b - a)] = result[k].float().cpu().numpy()
            _commit_chunk(f, blocks, low)


def _step(g: Tensor, blocks: list[Tensor], bounds: list[tuple[int, int]], scales: np.ndarray, gamma: float) -> Tensor:
    """One step of the recursion, in place on ``blocks``; returns the step's embeddings (NaN rows stay NaN)."""
    finite = torch.isfinite(g).all(dim=1)
    emb = torch.full_like(g, float("nan"))
    if not bool(finite.any()):
        return emb  # a step whose projections were not recorded (settings.every > 1)
    whole = bool(finite.all())
    x = g if whole else g[finite]
    out = torch.empty_like(x)
    for (lo, hi), m, eta in zip(bounds, blocks, scales):
        gb = x[:, lo:hi]
        eb = float(eta) * (gb - gb @ m.T)
        out[:, lo:hi] = eb
        m.addmm_(eb.T, gb, alpha=gamma)  # M += gamma sum_z emb(z) g(z)^T
    if whole:
        return out
    emb[finite] = out
    return emb


def _finalize(f: h5py.File, record: RunRecord) -> None:
    """Per-sample sums of the occurrence embeddings (NaN rows left out), then the complete flag."""
    ids_all = record.sample_ids()
    ids, inverse = np.unique(ids_all, return_inverse=True)
    inverse = inverse.reshape(-1)
    emb = f["embeddings"]
    rows, dim = emb.shape
    counts = np.zeros(len(ids), np.int64)
    for name in ("sample_ids", "sums", "occurrences"):
        if name in f:
            del f[name]
    sums_ds = f.create_dataset("sums", shape=(len(ids), dim), dtype=np.float32,
                               chunks=(max(1, min(max(len(ids), 1), 16384 // max(dim, 1))), dim) if len(ids) else None)
    width = max(1, min(dim, SUMS_BUDGET_BYTES // max(8 * len(ids), 1)))
    row_block = max(1, ROW_BLOCK_BYTES // (4 * dim)) if dim else rows
    for c0 in range(0, max(dim, 1), width):
        c1 = min(dim, c0 + width)
        sums = torch.zeros(len(ids), c1 - c0, dtype=torch.float64)
        for r0 in range(0, rows, row_block):
            block = np.asarray(emb[r0: r0 + row_block, c0:c1], dtype=np.float64) if c1 > c0 else np.zeros((0, 0))
            finite = np.isfinite(block).all(axis=1) if block.size else np.zeros(len(block), bool)
            index = torch.from_numpy(inverse[r0: r0 + len(block)][finite])
            sums.index_add_(0, index, torch.from_numpy(block[finite]))
            if c0 == 0:
                counts += np.bincount(inverse[r0: r0 + len(block)][finite], minlength=len(ids))
        if c1 > c0:
            sums_ds[:, c0:c1] = sums.float().numpy()
    f.create_dataset("sample_ids", data=ids.astype(np.int64))
    f.create_dataset("occurrences", data=counts)
    f.flush()
    f.attrs["complete"] = 1
    f.flush()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inrun.posthoc.build",
                                     description="Build the data value embeddings of a run recorded with embeddings.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build (or finish building) <run>.dvemb.h5")
    build.add_argument("run", help="the run store (file, folder or prefix of a multi-rank run)")
    build.add_argument("--out", default=None)
    build.add_argument("--until-step", type=int, default=None)
    build.add_argument("--chunk-steps", type=int, default=64)
    build.add_argument("--device", default=None)
    build.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    build.add_argument("--hessian-scale", default="batch", help="'batch' (default) or a number")
    build.add_argument("--restart", action="store_true", help="start over instead of resuming")
    args = parser.parse_args(argv)
    try:
        path = build_embeddings(args.run, args.out, until_step=args.until_step, chunk_steps=args.chunk_steps,
                                device=args.device, dtype=args.dtype, resume=not args.restart,
                                hessian_scale=args.hessian_scale if args.hessian_scale == "batch" else float(args.hessian_scale))
    except (InRunError, StoreError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
