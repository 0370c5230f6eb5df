"""Fit-time overhead of inrun under DeepSpeed ZeRO 2 and 3 on CPU: the same training with and without inrun.

Every process runs, for each ZeRO stage, alternating repeats of: a plain DeepSpeed loop, and the same loop with
``DeepSpeedInRun`` (first- and second-order values); each repeat builds a fresh engine from the same seed, so every
variant does the same work on the same data in the same processes. A repeat times ``--steps`` optimizer steps after
``--warmup`` untimed ones (ZeRO-3 records its parameter trace on the first step), between barriers; the table shows
the median over repeats, per optimizer step, and the ratio to the plain loop. The store's close (final validation
pass, compressing rewrite) is timed separately. The DeepSpeed settings come from ``configs/deepspeed_zero{2,3}.json``
(batch, accumulation, optimizer), the model and data from their ``"inrun"`` section.

The validation set is ``--val-points`` windows (default: 1/8 of the global batch, as issue 12 sets it). Each rank
evaluates its share of them (``split_validation``, the default); ``--unsplit`` adds the same variants with every
rank evaluating every point, side by side, so the split's gain is measured in the same processes::

    .venv/bin/python -m torch.distributed.run --nproc_per_node 2 -m experiments.bench_deepspeed
    .venv/bin/python -m torch.distributed.run --nproc_per_node 2 -m experiments.bench_deepspeed --steps 10 --repeats 2 --unsplit
    # on GPUs (NCCL, bf16): --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from experiments.deepspeed_example import _single_process_env

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per repeat")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before the timed ones")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shapley", nargs="+", default=["first", "second"])
    parser.add_argument("--val-points", type=int, default=None,
                        help="validation windows (default: 1/8 of the global batch, at least one per rank)")
    parser.add_argument("--unsplit", action="store_true",
                        help="also run each inrun variant with split_validation=False (every rank every point)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cuda: one GPU per process (NCCL), else CPU processes (gloo)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="DeepSpeed's bf16 mode or fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per process (default: cores / "
                        "processes)")
    parser.add_argument("--d-model", type=int, default=None, help="override the config's model width")
    parser.add_argument("--layers", type=int, default=None, help="override the config's number of blocks")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here (rank 0)")
    parser.add_argument("--adam-values", default=None,
                        help="how AdamW steps are valued (inrun's adam_values; default: the library's default)")
    parser.add_argument("--profile", type=int, default=0,
                        help="cProfile rank 0's timed steps of the inrun variants and print this many functions")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    _single_process_env()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 2) // local_world))
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))

    import deepspeed
    import torch.distributed as dist
    from torch.utils.data import DataLoader, DistributedSampler

    from experiments.benchutil import render_table
    from experiments.textdata import build_corpus, collate_samples
    from experiments.tinygpt import TinyGPT, TinyGPTConfig, per_sample_lm_loss
    from inrun.callbacks.deepspeed import DeepSpeedInRun
    from inrun.valuation.update_rules import DEFAULT_ADAM_VALUES

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if args.device == "cuda" else "gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()

    def per_sample_loss(module, batch):
        return per_sample_lm_loss(module(batch["input_ids"]), batch["labels"])

    configs = {}
    for stage in args.stages:
        config = json.loads((ROOT / "configs" / f"deepspeed_zero{stage}.json").read_text())
        config["bf16"] = {"enabled": args.dtype == "bf16"}
        configs[stage] = (config, config.pop("inrun"))
    settings = configs[args.stages[0]][1]
    data_cfg, model_cfg = settings["data"], dict(settings["model"])
    model_cfg.update({k: v for k, v in (("d_model", args.d_model), ("n_layer", args.layers)) if v is not None})
    global_batch = min(c["train_micro_batch_size_per_gpu"] * c["gradient_accumulation_steps"] * world
                       for c, _ in configs.values())
    n_val = args.val_points or max(world, global_batch // 8)
    corpus = build_corpus(seq_len=data_cfg["seq_len"], samples_per_source=data_cfg["samples_per_source"],
                          val_samples=max(n_val, data_cfg["val_samples"]), seed=0, corruption=data_cfg["corruption"])
    val_batch = collate_samples([corpus.val[i] for i in range(n_val)])
    folder = Path(tempfile.mkdtemp(prefix="bench_deepspeed_")) if rank == 0 else None
    folder = Path(_broadcast(str(folder) if folder else None))

    def run(stage: int, variant: str | None) -> tuple[float, float, float]:
        """Wall seconds per timed optimizer step, seconds to close the store (0 without inrun), and this process's
        CPU seconds per timed step (steadier than wall time on a shared machine)."""
        shapley = variant.split()[0] if variant else None
        config = configs[stage][0]
        model = TinyGPT(TinyGPTConfig(seq_len=data_cfg["seq_len"], **model_cfg), seed=0)
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        sampler = DistributedSampler(corpus.train, num_replicas=world, rank=rank, shuffle=True, seed=0)
        loader = DataLoader(corpus.train, batch_size=config["train_micro_batch_size_per_gpu"], sampler=sampler,
                            collate_fn=collate_samples, drop_last=True)
        inrun_ds, profiler = None, None
        if shapley is not None:
            inrun_ds = DeepSpeedInRun(engine, folder / f"zero{stage}-{variant.replace(' ', '-')}.h5",
                                      val_data=val_batch, loss_fn=per_sample_loss, shapley=shapley, overwrite=True,
                                      split_validation="unsplit" not in variant,
                                      **({"adam_values": args.adam_values} if args.adam_values else {}))
        taken, started, epoch = 0, None, 0
        total = args.warmup + args.steps
        while taken < total:
            sampler.set_epoch(epoch)
            for batch in loader:
                batch = {k: v.to(engine.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                if inrun_ds is not None:
                    inrun_ds.begin_microbatch(batch)
                loss = per_sample_loss(engine, batch).mean()
                if inrun_ds is not None:
                    inrun_ds.backward(loss)
                    boundary = inrun_ds.step()
                else:
                    boundary = engine.is_gradient_accumulation_boundary()
                    engine.backward(loss)
                    engine.step()
                if boundary:
                    taken += 1
                    if taken == args.warmup:
                        dist.barrier()
                        started, cpu_started = time.perf_counter(), time.process_time()
                        if args.profile and rank == 0 and inrun_ds is not None:
                            import cProfile

                            profiler = cProfile.Profile()
                            profiler.enable()
                    if taken == total:
                        break
            epoch += 1
        if args.device == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        if profiler is not None:
            import pstats

            profiler.disable()
            print(f"[bench] profile of ZeRO {stage} {variant}, rank 0, {args.steps} steps:")
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.profile)
        per_step = (time.perf_counter() - started) / args.steps
        cpu_per_step = (time.process_time() - cpu_started) / args.steps
        closing = 0.0
        if inrun_ds is not None:
            began = time.perf_counter()
            inrun_ds.close()
            dist.barrier()
            closing = time.perf_counter() - began
        del engine
        return per_step, closing, cpu_per_step

    variants = [None, *args.shapley, *([f"{order} unsplit" for order in args.shapley] if args.unsplit else [])]
    results: dict[tuple[int, str | None], list[tuple[float, float, float]]] = {}
    for stage in args.stages:
        for repeat in range(args.repeats):
            for variant in variants:  # side by side: plain, first, second, plain, first, second, ...
                results.setdefault((stage, variant), []).append(run(stage, variant))
                if rank == 0:
                    print(f"[bench] ZeRO {stage} repeat {repeat + 1}/{args.repeats} {variant or 'plain'}: "
                          f"{results[(stage, variant)][-1][0] * 1e3:.1f} ms/step", flush=True)
    if rank == 0:
        rows, records = [], []
        for stage in args.stages:
            config = configs[stage][0]
            plain = statistics.median(r[0] for r in results[(stage, None)])
            plain_cpu = statistics.median(r[2] for r in results[(stage, None)])
            for variant in variants:
                per_step = statistics.median(r[0] for r in results[(stage, variant)])
                cpu = statistics.median(r[2] for r in results[(stage, variant)])
                closing = statistics.median(r[1] for r in results[(stage, variant)])
                rows.append([f"ZeRO {stage}", config["train_micro_batch_size_per_gpu"],
                             config["gradient_accumulation_steps"], variant or "plain (no inrun)",
                             f"{per_step * 1e3:.1f}", f"{per_step / plain:.2f}x", f"{cpu * 1e3:.1f}",
                             f"{cpu / plain_cpu:.2f}x", f"{closing:.2f}" if variant else "-"])
                records.append({"stage": stage, "variant": variant or "plain", "ms_per_step": per_step * 1e3,
                                "ratio": per_step / plain, "cpu_ms_per_step": cpu * 1e3, "cpu_ratio": cpu / plain_cpu,
                                "close_s": closing})
        print()
        where = (f"{torch.cuda.get_device_name()}" if args.device == "cuda" else
                 f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
                 f"{torch.get_num_threads()} threads each")
        print(f"DeepSpeed {deepspeed.__version__}, torch {torch.__version__}, {world} processes on {where}, "
              f"{args.dtype}, TinyGPT {model_cfg}, seq {data_cfg['seq_len']}, {n_val} validation windows "
              f"(global batch {global_batch}), {args.steps} timed steps x {args.repeats} repeats (median), "
              f"adam_values={args.adam_values or DEFAULT_ADAM_VALUES}")
        print(render_table(["stage", "micro-batch", "accumulation", "variant", "wall ms / step", "vs plain",
                            "CPU ms / step (rank 0)", "vs plain", "close (s)"], rows))
        if args.json:
            args.json.write_text(json.dumps(records, indent=2))
    dist.barrier()
    return 0


def _broadcast(value):
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


if __name__ == "__main__":
    sys.exit(main())
