"""One-off cost of inrun's self-checks (inrun/engine/checks.py), as ratios to one plain training step.

Three models: the TinyGPT of tests/test_tinygpt.py (2 layers, d=32, T=16), a tiny Llama from transformers
(LlamaRMSNorm through the fallback) and the small GPT of issue 12 (``--small``: d 128, 3 blocks, ctx 64, the
model of ``bench_inrun --small``, at its batch 16 unless ``--batch`` says otherwise). For each, side by side in one
process and medians of ``--repeats`` runs (interleaved: one repeat of every measurement, then the next):

* ``step``: one plain training step (forward, backward, SGD step) on a batch;
* ``recorder check``: what ``InRunRecorder`` adds at its first step (:class:`RecorderChecks`: the training batch
  through ``checked_capture`` -- a one-sample shape probe, a forward and backward with the parameters' gradient, one
  forward of the batch with sample 0 changed, the spot-checked samples' gradients -- plus the completeness check at
  the step, which the recorder's batch check leaves to the step in a single process);
* ``grad_norms`` with ``check=False`` and ``check=True`` (the check's extra cost in the public products).

``--baseline REV`` (default: the commit before the cheaper checks) also times ``inrun/engine/checks.py`` as it was
at ``REV`` (read with ``git show``, imported as a module of its own) in the same process, so that the before/after
ratio is measured side by side; ``--baseline ''`` skips it.

Run: ``.venv/bin/python -m experiments.bench_checks`` (``--batch``, ``--repeats``, ``--small``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import inrun
from inrun.engine import checks as current_checks
from inrun.engine import products
from inrun.engine.capture import GradientCapture
from inrun.engine.products import capture_batch

#: the last commit with the earlier checks (a forward-free spot check and two probe forwards)
BASELINE = "331df28"


def tinygpt(batch: int):
    from experiments.tinygpt import TinyGPT, TinyGPTConfig, per_sample_lm_loss

    config = TinyGPTConfig(seq_len=16, n_layer=2, n_head=4, d_model=32)
    model = TinyGPT(config)
    g = torch.Generator().manual_seed(0)
    data = {"input_ids": torch.randint(0, config.vocab_size, (batch, config.seq_len), generator=g),
            "labels": torch.randint(0, config.vocab_size, (batch, config.seq_len), generator=g)}

    def loss_fn(m, b):
        return per_sample_lm_loss(m(b["input_ids"]), b["labels"])

    return model, loss_fn, data


def llama(batch: int):
    import transformers

    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    g = torch.Generator().manual_seed(1)
    data = {"input_ids": torch.randint(0, 256, (batch, 32), generator=g)}

    def loss_fn(m, b):
        ids = b["input_ids"]
        logits = m(input_ids=ids).logits[:, :-1]
        flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        return flat.reshape(ids.shape[0], -1).mean(1)

    return model, loss_fn, data


def small_gpt(batch: int):
    """The small GPT of issue 12 (``bench_inrun --small``): d 128, 3 blocks, ctx 64, vocab 256, no dropout."""
    from experiments.bench_engine import GPT, GPTShape, next_token_losses, random_tokens

    model = GPT(GPTShape(vocab=256, n_layer=3, d_model=128, d_mlp=512, n_head=2, max_len=1024))
    return model, next_token_losses, random_tokens(batch, 64, 256, 0, torch.device("cpu"))


def baseline_checks(rev: str):
    """``inrun/engine/checks.py`` as it was at ``rev``, imported as a module of its own (None without git)."""
    root = Path(__file__).resolve().parent.parent
    try:
        text = subprocess.run(["git", "show", f"{rev}:inrun/engine/checks.py"], cwd=root, check=True,
                              capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        print(f"no baseline: git show {rev} failed ({error})", file=sys.stderr)
        return None
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "inrun_checks_baseline.py")
    with open(path, "w") as handle:
        handle.write(text)
    spec = importlib.util.spec_from_file_location("inrun_checks_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def interleaved_medians(calls: dict, repeats: int) -> dict:
    """Median seconds of each call, one repeat of every call in turn (load drifts hit all of them alike)."""
    for fn in calls.values():
        fn()  # warm-up
    times: dict = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(found) for name, found in times.items()}


def recorder_check(module, capture, model, loss_fn, data) -> None:
    """The recorder's first-step checks with the checks of ``module``: the batch check, then the completeness check
    at the step (the optimizer's gradients there stand in as the captured sums: the step check's cost is the sums
    and the comparison)."""
    defer = "completeness" in module.checked_capture.__code__.co_varnames  # the batch leaves the sums to the step
    captured = (module.checked_capture(capture, model, loss_fn, data, completeness=False) if defer
                else module.checked_capture(capture, model, loss_fn, data))
    grads = {k: v.detach().clone() for k, v in captured.gradient_sums().items()}
    module.check_completeness(capture, [captured], grads)


def measure(name: str, build, batch: int, repeats: int, baseline) -> dict:
    model, loss_fn, data = build(batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the model stays the same between repeats

    def step():
        loss_fn(model, data).mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    capture = GradientCapture(model).attach()

    def grad_norms(module, check: bool):
        def run():
            saved = products._capture
            if check:  # grad_norms with the checks of ``module``
                products._capture = lambda c, m, f, b, _: module.checked_capture(c, m, f, b)
            try:
                inrun.grad_norms(model, loss_fn, data, check=check)
            finally:
                products._capture = saved
        return run

    calls = {
        "step": step,
        "captured": lambda: capture_batch(capture, model, loss_fn, data),  # the recorder's own per-step capture
        "recorder check": lambda: recorder_check(current_checks, capture, model, loss_fn, data),
    }
    if baseline is not None:
        calls["recorder check (baseline)"] = lambda: recorder_check(baseline, capture, model, loss_fn, data)
    result = {"model": name, "parameters": sum(p.numel() for p in model.parameters()),
              "fallback": capture.coverage.fallback_numel, **interleaved_medians(calls, repeats)}
    capture.detach()  # grad_norms attaches a capture of its own
    calls = {"step": step, "grad_norms": grad_norms(current_checks, False),
             "grad_norms checked": grad_norms(current_checks, True)}
    if baseline is not None:
        calls["grad_norms checked (baseline)"] = grad_norms(baseline, True)
    found = interleaved_medians(calls, repeats)
    scale = result["step"] / found.pop("step")  # the same step in both groups: its drift between them, taken out
    result.update({k: v * scale for k, v in found.items()})
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--small", action="store_true", help="also the small GPT of issue 12 (batch 16)")
    parser.add_argument("--only-small", action="store_true", help="only the small GPT of issue 12")
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the earlier checks ('' for none)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    baseline = baseline_checks(args.baseline) if args.baseline else None
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    rows = []
    if not args.only_small:
        rows += [measure("TinyGPT (tests/test_tinygpt.py)", tinygpt, args.batch, args.repeats, baseline),
                 measure("Llama tiny (2 layers, d=64, T=32)", llama, args.batch, args.repeats, baseline)]
    if args.small or args.only_small:
        batch = args.batch if args.batch != parser.get_default("batch") else 16
        rows.append(measure(f"small GPT of issue 12 (d 128, 3 blocks, T=64), batch {batch}", small_gpt, batch,
                            args.repeats, baseline))
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"batch {args.batch}, {args.threads} thread(s), median of {args.repeats}")
    print("| model | parameters (fallback) | training step | first-step check (x step) | grad_norms | "
          "grad_norms with check (x) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['parameters']:,} ({r['fallback']:,}) | {r['step'] * 1e3:.1f} ms | "
              f"{r['recorder check'] * 1e3:.1f} ms ({r['recorder check'] / r['step']:.1f}x) | "
              f"{r['grad_norms'] * 1e3:.1f} ms | {r['grad_norms checked'] * 1e3:.1f} ms "
              f"({r['grad_norms checked'] / r['grad_norms']:.1f}x) |")
    if baseline is not None:
        print(f"\nbefore ({args.baseline}) and after, same process, interleaved:")
        print("| model | first-step check before | after | after / before | grad_norms with check before | after | "
              "after / before |")
        print("|---|---|---|---|---|---|---|")
        for r in rows:
            old, new = r["recorder check (baseline)"], r["recorder check"]
            old_n, new_n = r["grad_norms checked (baseline)"], r["grad_norms checked"]
            print(f"| {r['model']} | {old * 1e3:.1f} ms ({old / r['step']:.1f}x) | {new * 1e3:.1f} ms "
                  f"({new / r['step']:.1f}x) | {new / old:.2f} | {old_n * 1e3:.1f} ms | {new_n * 1e3:.1f} ms | "
                  f"{new_n / old_n:.2f} |")


if __name__ == "__main__":
    main()
