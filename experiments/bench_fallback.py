"""What the generic fallback costs: a Llama-shaped model with its RMSNorm scales attributed through the fallback,
against the same model with those scales frozen, both as ratios to plain training, measured side by side in one
process.

Hugging Face's ``LlamaForCausalLM`` (random weights from a config) has no dedicated handler for ``LlamaRMSNorm``: its
``weight`` goes through the generic fallback (per-sample vector-Jacobian products of the module with ``torch.func``).
Freezing those weights (``requires_grad_(False)``) leaves only Linear and Embedding layers, all on dedicated handlers.
``--model encoder`` measures the heavier use of the fallback instead: a causal LM of ``nn.TransformerEncoderLayer``
blocks, whose ``nn.MultiheadAttention`` is attributed as one unit (``in_proj_weight`` and ``out_proj`` materialised
per sample), against the same model with the attention frozen.
For each of the two variants, on the same weights and data (see :mod:`experiments.benchutil` for how times and peak
memory are taken; CPU time of the process is the steadier figure on a shared machine):

1. ``plain``: forward and backward of the mean loss of the training batch, the baseline of that variant;
2. ``grad_dots``: :func:`inrun.grad_dots` of the training batch against the validation batch, without the one-off
   self-checks (``check=False``, the steady state of a loop over batches);
3. ``grad_norms``: :func:`inrun.grad_norms` of the training batch, likewise;
4. ``grad_dots + checks``: :func:`inrun.grad_dots` with its default first-call checks (independence probe,
   completeness, per-sample spot check), the one-off price of a first call;
5. with ``--steps`` > 0, a training loop of that many SGD steps with :class:`inrun.InRunRecorder` (first-order values
   against the validation batch) against the same loop without it, after one untimed step each (the recorder's checks
   run at its first step).

Run from the repo root::

    .venv/bin/python -m experiments.bench_fallback --threads 1
    .venv/bin/python -m experiments.bench_fallback --threads 1 --hidden 512 --ffn 1376 --layers 4 --heads 8 --seq-len 256
    .venv/bin/python -m experiments.bench_fallback --threads 1 --model encoder
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import platform
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import inrun
from experiments.benchutil import Measurement, format_bytes, measure, render_table, train_step

#: variant -> whether the parameters the fallback would attribute are frozen
VARIANTS = {"through the fallback": False, "frozen": True}


def uses_fallback(module: nn.Module) -> bool:
    """Modules of the benchmarked models that have no dedicated handler: every library's RMSNorm class, and
    ``nn.MultiheadAttention`` (attributed as one unit, its ``in_proj_weight`` and ``out_proj`` together)."""
    return type(module).__name__.endswith("RMSNorm") or isinstance(module, nn.MultiheadAttention)


class EncoderLM(nn.Module):
    """Token and position embeddings, causal ``nn.TransformerEncoderLayer`` blocks (``nn.MultiheadAttention``
    inside), a final LayerNorm and a linear head: the attention goes through the fallback."""

    def __init__(self, args: argparse.Namespace):
        super().__init__()
        self.tok = nn.Embedding(args.vocab, args.hidden)
        self.pos = nn.Embedding(max(args.seq_len, 64), args.hidden)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(args.hidden, args.heads, dim_feedforward=args.ffn, dropout=0.0,
                                       batch_first=True, norm_first=True)
            for _ in range(args.layers))
        self.norm = nn.LayerNorm(args.hidden)
        self.head = nn.Linear(args.hidden, args.vocab, bias=False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, use_cache: bool = False) -> Tensor:
        t = input_ids.shape[1]
        causal = torch.full((t, t), float("-inf")).triu(1)
        x = self.tok(input_ids) + self.pos(torch.arange(t)[None])
        for layer in self.layers:
            x = layer(x, src_mask=causal, is_causal=True)
        return self.head(self.norm(x))


def build_model(args: argparse.Namespace, freeze: bool) -> nn.Module:
    """The benchmarked model, seeded; with ``freeze`` the fallback's parameters do not require gradients.

    ``llama``: Hugging Face's LlamaForCausalLM (RMSNorm, rotary attention with grouped KV heads, SwiGLU MLP), whose
    norm scales go through the fallback. ``encoder``: :class:`EncoderLM`, whose attention does.
    """
    torch.manual_seed(args.seed)
    if args.model == "encoder":
        model = EncoderLM(args).train()  # dropout is 0; eval mode could take the fused inference path
    else:
        import transformers

        config = transformers.LlamaConfig(
            vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.ffn,
            num_hidden_layers=args.layers, num_attention_heads=args.heads,
            num_key_value_heads=max(1, args.heads // 2), max_position_embeddings=max(args.seq_len, 64),
            attention_dropout=0.0,
        )
        model = transformers.LlamaForCausalLM(config).eval()
    if freeze:
        for module in model.modules():
            if uses_fallback(module):
                module.requires_grad_(False)
    return model


def fallback_parameters(model: nn.Module) -> tuple[int, int]:
    """(tensors, values) of the trainable parameters the fallback attributes."""
    tensors = [p for m in model.modules() if uses_fallback(m) for p in m.parameters() if p.requires_grad]
    return len(tensors), sum(p.numel() for p in tensors)


def make_batch(n: int, length: int, vocab: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "index": torch.arange(n)}


def loss_fn(model: nn.Module, batch: dict) -> Tensor:
    """Per-sample mean next-token cross-entropy."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logits = out.logits if hasattr(out, "logits") else out
    logits, labels = logits[:, :-1], batch["input_ids"][:, 1:]
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    return losses.view(labels.shape).mean(1)


def unchecked() -> dict[str, Any]:
    """``check=False`` where the products take it (the steady-state cost, without the first call's self-checks)."""
    return {"check": False} if "check" in inspect.signature(inrun.grad_dots).parameters else {}


def plain_step(model: nn.Module, batch: dict) -> None:
    loss_fn(model, batch).mean().backward()
    model.zero_grad(set_to_none=True)


def training_loop(model: nn.Module, batches: list[dict], val: dict, recorder_path: Path | None) -> float:
    """SGD steps over ``batches``; with ``recorder_path`` an InRunRecorder values each step. Returns the CPU seconds
    of every step after the first (the first is untimed: warm-up, and the recorder's one-off checks)."""
    mode = model.training
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    recorder = None
    if recorder_path is not None:
        recorder = inrun.InRunRecorder(model, recorder_path, val_data=val, loss_fn=loss_fn, shapley="first",
                                       overwrite=True)
        recorder.start()
    start = None
    for step, batch in enumerate(batches):
        if step == 1:
            start = time.process_time()
        train_step(model, optimizer, loss_fn, batch, recorder)
    elapsed = time.process_time() - start if start is not None else 0.0
    if recorder is not None:
        recorder.close()
    model.train(mode)
    return elapsed


def bench_variant(name: str, args: argparse.Namespace, train: dict, val: dict, device: torch.device) -> dict:
    model = build_model(args, VARIANTS[name])
    tensors, values = fallback_parameters(model)
    options = unchecked()
    results: dict[str, Measurement] = {}
    results["plain"] = measure(lambda: plain_step(model, train), device, repeats=args.repeats, warmup=1)
    results["grad_dots"] = measure(lambda: inrun.grad_dots(model, loss_fn, train, val, **options), device,
                                   repeats=args.repeats, warmup=1)
    results["grad_norms"] = measure(lambda: inrun.grad_norms(model, loss_fn, train, **options), device,
                                    repeats=args.repeats, warmup=1)
    if options:
        results["grad_dots + checks"] = measure(lambda: inrun.grad_dots(model, loss_fn, train, val), device,
                                                repeats=args.repeats)
    out: dict[str, Any] = {"fallback_tensors": tensors, "fallback_values": values,
                           "measurements": {key: m.as_dict() for key, m in results.items()}}
    if args.steps > 0:
        batches = [make_batch(args.batch, args.seq_len, args.vocab, 100 + s) for s in range(args.steps + 1)]
        with tempfile.TemporaryDirectory() as folder:
            plain_loop = training_loop(build_model(args, VARIANTS[name]), batches, val, None)
            recorder_loop = training_loop(build_model(args, VARIANTS[name]), batches, val, Path(folder) / "run.h5")
        out["loop"] = {"plain_cpu_s": plain_loop, "recorder_cpu_s": recorder_loop}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("llama", "encoder"), default="llama",
                        help="llama: RMSNorm scales through the fallback; encoder: nn.MultiheadAttention through it")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--ffn", type=int, default=688)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="training samples")
    parser.add_argument("--val-batch", type=int, default=2, help="validation samples")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps of the recorder loop (0: skip it)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 gives steadier CPU times)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_fallback.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    import transformers  # noqa: F401  (imported before the freeze below)

    # the timings collect garbage before every call: leave the import's long-lived objects out of those collections
    gc.freeze()
    train = make_batch(args.batch, args.seq_len, args.vocab, 1)
    val = make_batch(args.val_batch, args.seq_len, args.vocab, 2)

    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in VARIANTS:
            results[name] = bench_variant(name, args, train, val, device)

    headers = ["variant", "fallback params", "plain CPU s", "grad_dots / plain", "grad_norms / plain",
               "dots + checks / plain", "recorder step / plain step", "peak memory plain / dots"]
    rows = []
    for name, result in results.items():
        m = result["measurements"]
        plain = m["plain"]["cpu_seconds"]
        ratio = (lambda key: f"{m[key]['cpu_seconds'] / plain:.2f}x" if key in m else "-")
        loop = result.get("loop")
        loop_ratio = f"{loop['recorder_cpu_s'] / loop['plain_cpu_s']:.2f}x" if loop and loop["plain_cpu_s"] > 0 else "-"
        rows.append([name, f"{result['fallback_tensors']} ({result['fallback_values']:,} values)", f"{plain:.3f}",
                     ratio("grad_dots"), ratio("grad_norms"), ratio("grad_dots + checks"), loop_ratio,
                     f"{format_bytes(m['plain']['peak_bytes'])} / {format_bytes(m['grad_dots']['peak_bytes'])}"])
    what = "Llama-shaped (RMSNorm scales)" if args.model == "llama" else "nn.TransformerEncoderLayer LM (attention)"
    print(f"{what}: {args.layers} layers, hidden {args.hidden}, ffn {args.ffn}, vocab {args.vocab}, "
          f"batch {args.batch} x {args.seq_len} tokens, validation {args.val_batch}; "
          f"threads {torch.get_num_threads()}; CPU seconds, medians of {args.repeats}")
    print(render_table(headers, rows))
    payload = {"args": {k: str(v) for k, v in vars(args).items()}, "platform": platform.platform(),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1, default=str))
    return payload


if __name__ == "__main__":
    main()
