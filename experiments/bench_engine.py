"""Benchmark of the per-sample gradient engine on a GPT-2-small-shaped model, against plain backward and torch.func.

For each sequence length T, in one process with the same model and data, it measures (every call runs once at the
smallest T first; then per T one run for peak memory, which also warms up, and the median of ``--repeats`` timed runs,
wall-clock and process CPU time; see :mod:`experiments.benchutil`):

1. ``plain``: forward and backward of the train batch (``loss.mean().backward()``), the baseline;
2. ``grad_dots``: :func:`inrun.grad_dots` (forward and backward of the val and the train batch, then the products);
3. ``grad_norms``: :func:`inrun.grad_norms` of the train batch;
4. ``naive``: per-sample gradients with ``torch.func`` (``vmap(grad(...))``, or a loop of ``grad`` if vmap fails)
   for train and val, then flattened dot products (``naive_dots``) or squared norms of train (``naive_norms``).
   Skipped where the per-sample gradients would not fit in the available memory, or above ``--naive-max-len``.

It also reports the route (gram / materialise / flat) the engine took for every parameter, and a breakdown of the
engine's time into capture (forward + backward with hooks) and per-parameter products, optionally with both routes
forced (``--compare-routes``) to check the route choice. Run from the repo root::

    .venv/bin/python -m experiments.bench_engine --seq-lens 128 256 512 1024 --layers 2 --batch 4 --val-batch 2
    .venv/bin/python -m experiments.bench_engine --quick

On a CPU shared with other jobs, ``--threads 1`` gives far steadier numbers: with two OpenMP threads every parallel
region waits until both threads hold a core, which turns microsecond operations into ~20 ms ones under load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

import inrun
from experiments.benchutil import (
    Measurement,
    available_memory_bytes,
    format_bytes,
    measure,
    release_memory,
    render_table,
    synchronize,
)
from inrun.engine.algebra import parameter_dots, parameter_squared_norms
from inrun.engine.factors import OuterFactor

GIB = 1 << 30


# --------------------------------------------------------------------------------------------------------------------
# Model: GPT-2 small's shapes in plain torch modules
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class GPTShape:
    """GPT-2 small by default; ``n_layer`` and ``vocab`` are the knobs that make it fit a small machine."""

    vocab: int = 50257
    max_len: int = 1024
    d_model: int = 768
    n_head: int = 12
    d_mlp: int = 3072
    n_layer: int = 2


class Attention(nn.Module):
    """Causal multi-head self-attention with a fused qkv projection."""

    def __init__(self, shape: GPTShape) -> None:
        super().__init__()
        self.n_head = shape.n_head
        self.qkv = nn.Linear(shape.d_model, 3 * shape.d_model)
        self.proj = nn.Linear(shape.d_model, shape.d_model)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = (z.view(n, t, self.n_head, -1).transpose(1, 2) for z in self.qkv(x).split(d, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(self, shape: GPTShape) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(shape.d_model)
        self.attn = Attention(shape)
        self.ln2 = nn.LayerNorm(shape.d_model)
        self.fc = nn.Linear(shape.d_model, shape.d_mlp)
        self.out = nn.Linear(shape.d_mlp, shape.d_model)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    """Token + position embeddings, ``n_layer`` blocks, final LayerNorm, LM head tied to the token embedding.

    Positions are looked up with ids ``[1, T]`` shared by the batch, as GPT-2 does (the engine expands them).
    """

    def __init__(self, shape: GPTShape, seed: int = 0) -> None:
        super().__init__()
        self.wte = nn.Embedding(shape.vocab, shape.d_model)
        self.wpe = nn.Embedding(shape.max_len, shape.d_model)
        self.blocks = nn.ModuleList(Block(shape) for _ in range(shape.n_layer))
        self.ln_f = nn.LayerNorm(shape.d_model)
        self.head = nn.Linear(shape.d_model, shape.vocab, bias=False)
        self.head.weight = self.wte.weight
        generator = torch.Generator().manual_seed(seed)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                with torch.no_grad():
                    module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)[None]
        x = self.wte(ids) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def next_token_losses(model: Callable[[Tensor], Tensor], batch: Tensor) -> Tensor:
    """Per-sample mean next-token cross-entropy of token ids ``batch [n, T + 1]``: ``[n]``.

    ``model`` is the module, or any function of token ids returning logits (for ``functional_call``)."""
    logits = model(batch[:, :-1])
    targets = batch[:, 1:]
    losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return losses.view(targets.shape).mean(1)


def random_tokens(n: int, length: int, vocab: int, seed: int, device: torch.device) -> Tensor:
    """``n`` sequences of ``length + 1`` uniformly random token ids (inputs and shifted targets)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length + 1), generator=generator).to(device)


# --------------------------------------------------------------------------------------------------------------------
# The measured calls
# --------------------------------------------------------------------------------------------------------------------
def plain_backward(model: nn.Module, batch: Tensor) -> None:
    """The baseline: one training step's forward and backward (gradients dropped afterwards)."""
    next_token_losses(model, batch).mean().backward()
    model.zero_grad(set_to_none=True)


def per_sample_gradients(model: nn.Module, batch: Tensor, method: str) -> dict[str, Tensor]:
    """Materialised per-sample gradients ``{name: [n, *param.shape]}`` with torch.func (the naive reference)."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def one_loss(weights: dict[str, Tensor], sample: Tensor) -> Tensor:
        forward = lambda ids: functional_call(model, weights, (ids,))  # noqa: E731
        return next_token_losses(forward, sample[None])[0]

    if method == "vmap":
        return vmap(grad(one_loss), in_dims=(None, 0))(params, batch)
    per_sample = [grad(one_loss)(params, sample) for sample in batch]
    return {name: torch.stack([g[name] for g in per_sample]) for name in params}


def naive_dots(model: nn.Module, train: Tensor, val: Tensor, method: str) -> Tensor:
    """``[n_train, n_val]`` dot products of flattened per-sample gradients, summed parameter by parameter."""
    left = per_sample_gradients(model, train, method)
    right = per_sample_gradients(model, val, method)
    return sum(left[k].flatten(1) @ right[k].flatten(1).T for k in left)  # type: ignore[return-value]


def naive_norms(model: nn.Module, batch: Tensor, method: str) -> Tensor:
    """``[n]`` squared norms of flattened per-sample gradients."""
    grads = per_sample_gradients(model, batch, method)
    return sum(g.flatten(1).pow(2).sum(1) for g in grads.values())  # type: ignore[return-value]


def choose_naive_method(model: nn.Module, batch: Tensor) -> tuple[str, str]:
    """``("vmap", note)`` if ``vmap(grad(...))`` runs on this model (SDPA included), else ``("loop", why)``.

    The note names operators that vmap runs through its slow per-sample fallback (it warns about them); those
    warnings are silenced afterwards.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            per_sample_gradients(model, batch[:2], "vmap")
        except Exception as error:  # noqa: BLE001 -- any failure of vmap means: use the loop
            return "loop", f"vmap(grad) failed ({type(error).__name__}: {error})"
    fallbacks = sorted(set(re.findall(r"batching rule for (\S+?)\.", " ".join(str(w.message) for w in caught))))
    warnings.filterwarnings("ignore", message=".*have not yet implemented the batching rule.*")
    return "vmap", (f"vmap runs {', '.join(fallbacks)} through its per-sample fallback loop" if fallbacks else "")


def naive_memory_needed(model: nn.Module, samples: int, activations_bytes: int) -> int:
    """Rough bytes the naive route needs: per-sample gradients (twice, for vmap's temporaries) plus activations."""
    numel = sum(p.numel() for p in model.parameters())
    itemsize = next(model.parameters()).element_size()
    return 2 * samples * numel * itemsize + activations_bytes


def relative_error(value: Tensor, reference: Tensor) -> float:
    return float((value - reference).norm() / reference.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------------------------------------------------
# Routes and the breakdown of the engine's time
# --------------------------------------------------------------------------------------------------------------------
def group_name(name: str) -> str:
    """``blocks.3.attn.qkv.weight`` -> ``blocks.*.attn.qkv.weight``: one row for all blocks."""
    return re.sub(r"^blocks\.\d+\.", "blocks.*.", name)


def capture_both(model: nn.Module, train: Tensor, val: Tensor) -> tuple[inrun.CapturedBatch, inrun.CapturedBatch]:
    """Factors of the train and val batches, as :func:`inrun.grad_dots` computes them."""
    with inrun.GradientCapture(model) as capture:
        val_factors = inrun.capture_batch(capture, model, next_token_losses, val)
        train_factors = inrun.capture_batch(capture, model, next_token_losses, train)
    return train_factors, val_factors


def routes_taken(train: inrun.CapturedBatch, val: inrun.CapturedBatch) -> dict[str, dict[str, str]]:
    """``{"dots": {param: route}, "norms": {param: route}}`` as the engine chooses them."""
    train.routes.clear()
    train.dots(val)
    dots = dict(train.routes)
    train.routes.clear()
    train.squared_norms()
    return {"dots": dots, "norms": dict(train.routes)}


def route_counts(routes: dict[str, str]) -> str:
    """``{"a": "gram", "b": "flat", ...}`` -> ``"gram 5, flat 12"``."""
    counts: dict[str, int] = {}
    for route in routes.values():
        counts[route] = counts.get(route, 0) + 1
    return ", ".join(f"{route} {count}" for route, count in sorted(counts.items()))


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call: wall-clock on CUDA, process CPU time on CPU (steadier on a shared machine)."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    synchronize(device)
    start = clock()
    fn()
    synchronize(device)
    return clock() - start


def product_breakdown(
    model: nn.Module, train: Tensor, val: Tensor, device: torch.device, compare_routes: bool
) -> dict[str, Any]:
    """Seconds of the engine's phases: capture, then products per parameter group (one run each, not a median;
    CPU time on CPU, see :func:`_timed`).

    With ``compare_routes`` every parameter with outer-product factors is also timed with each route forced.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    no_hooks = lambda: [torch.autograd.grad(next_token_losses(model, b).sum(), params) for b in (val, train)]  # noqa: E731
    no_hooks_s = _timed(no_hooks, device)
    captured: list[tuple[inrun.CapturedBatch, inrun.CapturedBatch]] = []
    capture_s = _timed(lambda: captured.append(capture_both(model, train, val)), device)
    train_f, val_f = captured[0]
    routes = routes_taken(train_f, val_f)
    groups: dict[str, dict[str, Any]] = {}
    for name, uses in train_f.factors.items():
        outer = any(isinstance(f, OuterFactor) for f in uses)
        key = group_name(name) if outer else "(flat parameters)"
        row = groups.setdefault(key, {"params": 0, "dots_route": set(), "norms_route": set()})
        row["params"] += 1
        row["dots_route"].add(routes["dots"][name])
        row["norms_route"].add(routes["norms"][name])
        forces = [None, "gram", "materialise"] if compare_routes and outer else [None]
        for force in forces:
            suffix = f"_{force}_s" if force else "_s"
            dots_s = _timed(lambda: parameter_dots(uses, val_f.factors[name], force=force), device)
            norms_s = _timed(lambda: parameter_squared_norms(uses, force=force), device)
            row["dots" + suffix] = row.get("dots" + suffix, 0.0) + dots_s
            row["norms" + suffix] = row.get("norms" + suffix, 0.0) + norms_s
            release_memory(device)
    for row in groups.values():
        row["dots_route"] = "/".join(sorted(row["dots_route"]))
        row["norms_route"] = "/".join(sorted(row["norms_route"]))
    return {"no_hooks_s": no_hooks_s, "capture_s": capture_s, "routes": routes, "groups": groups}


# --------------------------------------------------------------------------------------------------------------------
# One sequence length
# --------------------------------------------------------------------------------------------------------------------
def bench_length(model: nn.Module, length: int, args: argparse.Namespace, device: torch.device, method: str) -> dict:
    """All measurements at sequence length ``length``."""
    vocab = model.wte.num_embeddings
    train = random_tokens(args.batch, length, vocab, seed=length, device=device)
    val = random_tokens(args.val_batch, length, vocab, seed=length + 1, device=device)
    run = lambda fn: measure(fn, device, repeats=args.repeats)  # noqa: E731
    record: dict[str, Any] = {"seq_len": length, "device": str(device)}
    results: dict[str, Measurement | None] = {
        "plain": run(lambda: plain_backward(model, train)),
        "grad_dots": run(lambda: inrun.grad_dots(model, next_token_losses, train, val)),
        "grad_norms": run(lambda: inrun.grad_norms(model, next_token_losses, train)),
    }
    activations = results["plain"].peak_bytes or 0  # type: ignore[union-attr]
    needed = naive_memory_needed(model, args.batch + args.val_batch, activations)
    too_long = args.naive_max_len is not None and length > args.naive_max_len
    if args.skip_naive or too_long or needed > 0.8 * available_memory_bytes(device):
        reason = "--skip-naive" if args.skip_naive else "--naive-max-len" if too_long else f"needs {needed / GIB:.1f} GiB"
        record["naive_skipped"] = f"skipped ({reason})"
        results["naive_dots"] = results["naive_norms"] = None
    else:
        results["naive_dots"] = run(lambda: naive_dots(model, train, val, method))
        results["naive_norms"] = run(lambda: naive_norms(model, train, method))
    record["measurements"] = {k: (m.as_dict() if m else None) for k, m in results.items()}
    record["ratios"] = ratios(results)
    record["breakdown"] = product_breakdown(model, train, val, device, args.compare_routes)
    release_memory(device)
    return record


def ratios(results: dict[str, Measurement | None]) -> dict[str, float | None]:
    """Time ratios: engine over plain backward, naive over engine."""

    def ratio(top: str, bottom: str, cpu: bool) -> float | None:
        a, b = results.get(top), results.get(bottom)
        if not (a and b):
            return None
        return a.cpu_seconds / b.cpu_seconds if cpu else a.seconds / b.seconds

    pairs = [("grad_dots", "plain"), ("grad_norms", "plain"), ("naive_dots", "grad_dots"), ("naive_norms", "grad_norms")]
    found: dict[str, float | None] = {}
    for top, bottom in pairs:
        found[f"{top}/{bottom}"] = ratio(top, bottom, cpu=False)
        found[f"{top}/{bottom} (cpu)"] = ratio(top, bottom, cpu=True)
    return found


def check_correctness(model: nn.Module, length: int, args: argparse.Namespace, device: torch.device, method: str) -> dict:
    """Relative errors of grad_dots and grad_norms against the naive reference at one (small) length."""
    vocab = model.wte.num_embeddings
    train = random_tokens(args.batch, length, vocab, seed=length, device=device)
    val = random_tokens(args.val_batch, length, vocab, seed=length + 1, device=device)
    dots = inrun.grad_dots(model, next_token_losses, train, val)
    norms = inrun.grad_norms(model, next_token_losses, train)
    reference_dots = naive_dots(model, train, val, method)
    reference_norms = naive_norms(model, train, method)
    return {
        "seq_len": length,
        "grad_dots_rel_error": relative_error(dots, reference_dots),
        "grad_norms_rel_error": relative_error(norms, reference_norms),
    }


# --------------------------------------------------------------------------------------------------------------------
# Printing
# --------------------------------------------------------------------------------------------------------------------
def _seconds(m: dict | None, skipped: str) -> str:
    return f"{m['seconds']:.2f}/{m['cpu_seconds']:.2f}" if m else skipped


def _ratio(ratios: dict[str, float | None], key: str) -> str:
    wall, cpu = ratios[key], ratios[f"{key} (cpu)"]
    if wall is None or cpu is None or math.isnan(wall):
        return "-"
    return f"{wall:.2f}/{cpu:.2f}"


def timing_table(records: list[dict]) -> str:
    names = ["plain", "grad_dots", "grad_norms", "naive_dots", "naive_norms"]
    keys = ["grad_dots/plain", "grad_norms/plain", "naive_dots/grad_dots", "naive_norms/grad_norms"]
    headers = ["T"] + names + ["dots/plain", "norms/plain", "naive/dots", "naive/norms"]
    rows = [
        [r["seq_len"]]
        + [_seconds(r["measurements"][n], r.get("naive_skipped", "skipped")) for n in names]
        + [_ratio(r["ratios"], k) for k in keys]
        for r in records
    ]
    return render_table(headers, rows)


def memory_table(records: list[dict]) -> str:
    names = ["plain", "grad_dots", "grad_norms", "naive_dots", "naive_norms"]
    rows = []
    for r in records:
        m = r["measurements"]
        cells = [format_bytes(m[n]["peak_bytes"]) if m[n] else r.get("naive_skipped", "skipped") for n in names]
        rows.append([r["seq_len"]] + cells)
    return render_table(["T"] + [f"{n} peak" for n in names], rows)


def route_table(records: list[dict]) -> str:
    rows = []
    for r in records:
        routes = r["breakdown"]["routes"]
        rows.append([r["seq_len"], route_counts(routes["dots"]), route_counts(routes["norms"])])
    return render_table(["T", "grad_dots routes (params)", "grad_norms routes (params)"], rows)


def breakdown_table(records: list[dict], compare_routes: bool) -> str:
    headers = ["T", "group", "n", "dots route", "dots s", "norms route", "norms s"]
    if compare_routes:
        headers += ["dots gram s", "dots mat s", "norms gram s", "norms mat s"]
    rows = []
    for r in records:
        b = r["breakdown"]
        dots_total = sum(g["dots_s"] for g in b["groups"].values())
        norms_total = sum(g["norms_s"] for g in b["groups"].values())
        rows.append([r["seq_len"], "(fwd+bwd val+train, no hooks)", "", "", f"{b['no_hooks_s']:.3f}", "", ""])
        rows.append([r["seq_len"], "(capture val+train)", "", "", f"{b['capture_s']:.3f}", "", ""])
        for name, g in sorted(b["groups"].items(), key=lambda item: -item[1]["dots_s"]):
            row = [r["seq_len"], name, g["params"], g["dots_route"], f"{g['dots_s']:.3f}", g["norms_route"], f"{g['norms_s']:.3f}"]
            if compare_routes:
                row += [f"{g[k]:.3f}" if k in g else "" for k in ("dots_gram_s", "dots_materialise_s", "norms_gram_s", "norms_materialise_s")]
            rows.append(row)
        rows.append([r["seq_len"], "(all products)", "", "", f"{dots_total:.3f}", "", f"{norms_total:.3f}"])
    return render_table(headers, rows)


# --------------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--layers", type=int, default=None, help="transformer blocks (default: 12 on CUDA, 2 on CPU)")
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--batch", type=int, default=4, help="train samples")
    parser.add_argument("--val-batch", type=int, default=2, help="validation samples")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                        help="parameters (and so activations and gradients) in bf16; exactness is then reported "
                             "against the naive reference in the same dtype")
    parser.add_argument("--compare-routes", action="store_true", help="also time each route forced, per parameter")
    parser.add_argument("--skip-naive", action="store_true", help="do not run the torch.func reference")
    parser.add_argument("--naive-max-len", type=int, default=None, help="skip the torch.func reference above this T")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="smoke test: T 64 and 128, vocab 1000, 1 block")
    parser.add_argument("--out", default="runs/bench_engine.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.seq_lens, args.vocab, args.layers, args.repeats = [64, 128], 1000, 1, 1
    if args.layers is None:
        args.layers = 12 if args.device.startswith("cuda") else 2
    return args


def warm_up(model: nn.Module, length: int, args: argparse.Namespace, device: torch.device) -> None:
    """Run every measured call once so that lazy initialisation is not counted as the first length's memory."""
    train = random_tokens(args.batch, length, args.vocab, seed=0, device=device)
    val = random_tokens(args.val_batch, length, args.vocab, seed=1, device=device)
    plain_backward(model, train)
    inrun.grad_dots(model, next_token_losses, train, val)
    inrun.grad_norms(model, next_token_losses, train)


def print_report(records: list[dict], compare_routes: bool) -> None:
    print("\nTime in s, median, as wall/cpu (cpu: process CPU time, all threads); ratios of times, as wall/cpu")
    print(timing_table(records))
    print("\nPeak memory above the pre-call level (CPU: RSS sampled every ~1 ms; CUDA: max_memory_allocated)")
    print(memory_table(records))
    print("\nRoutes chosen by the engine (parameters per route)\n" + route_table(records))
    clock = "wall" if records and records[0].get("device", "cpu").startswith("cuda") else "process CPU"
    print(f"\nEngine breakdown (single runs, {clock} s): fwd+bwd without hooks, capture, then products per parameter group")
    print(breakdown_table(records, compare_routes))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = GPTShape(vocab=args.vocab, max_len=max(1024, max(args.seq_lens)), n_layer=args.layers)
    model = GPT(shape).to(device, torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    lengths = sorted(args.seq_lens)
    print(
        f"device {device} ({torch.get_num_threads()} threads, {args.dtype}), torch {torch.__version__}; "
        f"{args.layers} blocks, "
        f"vocab {args.vocab}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; "
        f"train batch {args.batch}, val batch {args.val_batch}; median of {args.repeats}; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    result: dict[str, Any] = {
        "args": vars(args),
        "shape": asdict(shape),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_average_start": os.getloadavg(),
        "records": [],
    }
    warm_up(model, lengths[0], args, device)
    if not args.skip_naive:
        method, note = choose_naive_method(model, random_tokens(2, lengths[0], args.vocab, 0, device))
        correctness = check_correctness(model, lengths[0], args, device, method)
        result.update(naive_method=method, naive_note=note, correctness=correctness)
        print(f"naive reference: torch.func {method}{f' ({note})' if note else ''}")
        print(f"correctness at T={lengths[0]}: grad_dots rel. error {correctness['grad_dots_rel_error']:.2e}, "
              f"grad_norms rel. error {correctness['grad_norms_rel_error']:.2e}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for length in lengths:
        start = time.perf_counter()
        result["records"].append(bench_length(model, length, args, device, result.get("naive_method", "")))
        result["load_average_end"] = os.getloadavg()
        out.write_text(json.dumps(result, indent=1, default=str))  # after every length: partial runs keep results
        print(f"  T={length} done in {time.perf_counter() - start:.0f} s (load average {os.getloadavg()[0]:.1f})", flush=True)
    print_report(result["records"], args.compare_routes)
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
