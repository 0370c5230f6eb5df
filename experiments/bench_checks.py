"""One-off cost of inrun's self-checks (inrun/engine/checks.py), as ratios to one plain training step.

Two models: the TinyGPT of tests/test_tinygpt.py (2 layers, d=32, T=16) and a tiny Llama from transformers
(LlamaRMSNorm through the fallback). For each, side by side in one process and medians of ``--repeats`` runs:

* ``step``: one plain training step (forward, backward, SGD step) on a batch;
* ``recorder check``: what ``InRunRecorder`` adds at its first step (:class:`RecorderChecks`: the training batch
  through ``checked_capture`` -- a one-sample shape probe, a forward and backward with the parameters' gradient, two
  single-sample backwards, two forwards without gradients -- plus the free completeness check at the step);
* ``grad_norms`` with ``check=False`` and ``check=True`` (the check's extra cost in the public products).

Run: ``.venv/bin/python -m experiments.bench_checks`` (``--batch``, ``--repeats``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import inrun
from inrun.engine.capture import GradientCapture
from inrun.engine.checks import RecorderChecks, checked_capture
from inrun.engine.products import capture_batch


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


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, build, batch: int, repeats: int) -> dict:
    model, loss_fn, data = build(batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the model stays the same between repeats

    def step():
        loss_fn(model, data).mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    capture = GradientCapture(model).attach()

    def recorder_check():
        checks = RecorderChecks(True, None)
        captured = checked_capture(capture, model, loss_fn, data)
        grads = captured.gradient_sums()  # stands for the optimizer's gradients at the step (free there)
        checks.first_step = 0
        from inrun.engine.checks import check_completeness

        check_completeness(capture, [captured], grads)

    def captured_step():  # the recorder's own per-step capture, for reference
        capture_batch(capture, model, loss_fn, data)

    result = {
        "model": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "fallback": capture.coverage.fallback_numel,
        "step": median_seconds(step, repeats),
        "captured": median_seconds(captured_step, repeats),
        "recorder check": median_seconds(recorder_check, repeats),
    }
    capture.detach()
    result["grad_norms"] = median_seconds(lambda: inrun.grad_norms(model, loss_fn, data, check=False), repeats)
    result["grad_norms checked"] = median_seconds(lambda: inrun.grad_norms(model, loss_fn, data), repeats)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure("TinyGPT (tests/test_tinygpt.py)", tinygpt, args.batch, args.repeats),
            measure("Llama tiny (2 layers, d=64, T=32)", llama, args.batch, args.repeats)]
    print(f"batch {args.batch}, {args.threads} thread(s), median of {args.repeats}")
    print("| model | parameters (fallback) | training step | first-step check (x step) | grad_norms | "
          "grad_norms with check (x) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['parameters']:,} ({r['fallback']:,}) | {r['step'] * 1e3:.1f} ms | "
              f"{r['recorder check'] * 1e3:.1f} ms ({r['recorder check'] / r['step']:.1f}x) | "
              f"{r['grad_norms'] * 1e3:.1f} ms | {r['grad_norms checked'] * 1e3:.1f} ms "
              f"({r['grad_norms checked'] / r['grad_norms']:.1f}x) |")


if __name__ == "__main__":
    main()
