"""One-off cost of inrun's self-checks under DeepSpeed ZeRO-2/3, in one process or several (CPU, gloo).

The model of ``experiments/bench_checks.py`` (the TinyGPT of tests/test_tinygpt.py: 2 layers, d=32, T=16), batch 8
per rank, SGD, fp32. Per ZeRO stage and repeat, side by side in the same processes with fresh engines from the same
seed: a plain DeepSpeed loop (no inrun), then ``DeepSpeedInRun`` with ``check=False`` and with ``check=True``, each
``--steps`` optimizer steps. Reported (rank 0, medians over repeats):

* ``plain step``: a plain DeepSpeed optimizer step (steps after the first);
* ``check``: the time inside the checks at the first step (``RecorderChecks.seconds``): the batch check (under ZeRO-3
  inside the gathered-parameters context: the gather, a one-sample shape probe, a forward and backward with the
  parameters' gradient, two single-sample backwards, two forwards without gradients, re-partitioning) and, with
  several ranks, the agreement on its outcome; plus the step's completeness check (with several ranks: one
  all-reduce of the size of the checked parameters), also shown on its own;
* ``first step, checked - unchecked``: the difference of the first recorded step's wall time with and without the
  checks (the same cost seen from outside);

Run::

    .venv/bin/python -m experiments.bench_checks_distributed                  # one process
    .venv/bin/python -m torch.distributed.run --nproc_per_node 2 -m experiments.bench_checks_distributed
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from experiments.deepspeed_example import _single_process_env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8, help="samples per rank per step")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    _single_process_env()
    torch.set_num_threads(1)

    import deepspeed
    import torch.distributed as dist

    from experiments.tinygpt import TinyGPT, TinyGPTConfig, per_sample_lm_loss
    from inrun.callbacks.deepspeed import DeepSpeedInRun

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    config_model = TinyGPTConfig(seq_len=16, n_layer=2, n_head=4, d_model=32)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config_model.vocab_size, (args.steps * world * args.batch, 16), generator=g)
    val = {"input_ids": tokens[:4], "labels": tokens[:4]}

    def loss_fn(module, batch):
        return per_sample_lm_loss(module(batch["input_ids"]), batch["labels"])

    def batch_of(t: int) -> dict:
        start = (t * world + rank) * args.batch
        ids = torch.arange(start, start + args.batch)
        return {"input_ids": tokens[ids], "labels": tokens[ids], "index": ids}

    box = [tempfile.mkdtemp(prefix="bench_checks_distributed_") if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)  # one store path on every rank (each writes its own rank file)
    folder = Path(box[0])

    def run(stage: int, check: bool | None) -> tuple[list[float], float, float]:
        """Wall seconds of each optimizer step (``check`` None: no inrun), the seconds inside the checks and those
        inside the step's completeness check."""
        zero = {"stage": stage, **({"stage3_param_persistence_threshold": 0} if stage == 3 else {})}
        config = {"train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
                  "gradient_clipping": 0.0, "zero_optimization": zero, "zero_allow_untested_optimizer": True,
                  "steps_per_print": 10**9, "wall_clock_breakdown": False}
        model = TinyGPT(config_model, seed=0)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                               config=config)
        inrun_ds = None
        if check is not None:
            inrun_ds = DeepSpeedInRun(engine, folder / f"z{stage}-{check}.h5", val_data=val, loss_fn=loss_fn,
                                      shapley="first", overwrite=True, check=check)
        step_check = [0.0]
        if inrun_ds is not None:  # the step's completeness check timed on its own
            checks, on_step = inrun_ds.recorder.checks, inrun_ds.recorder.checks.on_step

            def timed_on_step(*a, **k):
                began = time.perf_counter()
                try:
                    return on_step(*a, **k)
                finally:
                    step_check[0] += time.perf_counter() - began

            checks.on_step = timed_on_step
        times = []
        for t in range(args.steps):
            batch = batch_of(t)
            dist.barrier()
            began = time.perf_counter()
            if inrun_ds is not None:
                inrun_ds.begin_microbatch(batch)
                inrun_ds.backward(loss_fn(engine, batch).mean())
                inrun_ds.step()
            else:
                engine.backward(loss_fn(engine, batch).mean())
                engine.step()
            dist.barrier()
            times.append(time.perf_counter() - began)
        seconds = 0.0
        if inrun_ds is not None:
            seconds = inrun_ds.recorder.checks.seconds
            inrun_ds.close()
        return times, seconds, step_check[0]

    rows = []
    for stage in args.stages:
        plain, unchecked, checked, inside, at_step = [], [], [], [], []
        for _ in range(args.repeats):
            plain += run(stage, None)[0][1:]
            unchecked.append(run(stage, False)[0][0])
            times, seconds, step_seconds = run(stage, True)
            checked.append(times[0])
            inside.append(seconds)
            at_step.append(step_seconds)
        step = statistics.median(plain)
        check = statistics.median(inside)
        outside = statistics.median(checked) - statistics.median(unchecked)
        rows.append(f"| ZeRO-{stage} | {world} | {step * 1e3:.1f} ms | {check * 1e3:.1f} ms ({check / step:.1f}x a "
                    f"step) | {statistics.median(at_step) * 1e3:.1f} ms | {outside * 1e3:.1f} ms |")
    if rank == 0:
        print(f"DeepSpeed {deepspeed.__version__}, {world} process(es), 1 thread each, TinyGPT 2 layers d=32 T=16, "
              f"batch {args.batch} per rank, medians of {args.repeats}")
        print("| stage | processes | plain DeepSpeed step | first-step checks | of which the step check | "
              "first step, checked - unchecked |")
        print("|---|---|---|---|---|---|")
        print("\n".join(rows))
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
