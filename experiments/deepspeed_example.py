"""DeepSpeed + inrun on CPU: TinyGPT on text shipped with Python (one source corrupted), ZeRO from a JSON config.

The JSON file is a DeepSpeed config (``configs/deepspeed_zero2.json``, ``configs/deepspeed_zero3.json``): ZeRO stage,
micro-batch size, gradient accumulation, clipping, optimizer, bf16. Its ``"inrun"`` section (removed before DeepSpeed
sees the config) holds this example's own settings: store path, Shapley order, steps, corpus and model sizes.

Every rank trains on its own shard of the data (``DistributedSampler``) and writes its own store file; rank 0 then
reads all ranks as one run and prints the ``inrun report`` summary::

    .venv/bin/python -m torch.distributed.run --nproc_per_node 2 -m experiments.deepspeed_example \\
        --config configs/deepspeed_zero2.json
    .venv/bin/python -m experiments.deepspeed_example --config configs/deepspeed_zero3.json   # one process

The loop is a plain DeepSpeed loop with three inrun lines (``begin_microbatch``, ``backward``, ``step``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler

ROOT = Path(__file__).resolve().parents[1]


def _single_process_env() -> None:
    """Started without a launcher: act as rank 0 of 1 (DeepSpeed still wants a process group)."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def load_config(path: Path) -> tuple[dict, dict]:
    """The DeepSpeed config and the example's ``"inrun"`` section."""
    config = json.loads(path.read_text())
    settings = config.pop("inrun", {})
    return config, settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "deepspeed_zero2.json")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the config's)")
    parser.add_argument("--output", type=Path, default=None, help="store path (default: the config's)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    _single_process_env()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))

    import deepspeed

    import inrun
    from experiments.textdata import build_corpus, collate_samples
    from experiments.tinygpt import TinyGPT, TinyGPTConfig, per_sample_lm_loss
    from inrun.callbacks.deepspeed import DeepSpeedInRun
    from inrun.cli import summary_lines

    ds_config, settings = load_config(args.config)
    data_cfg, model_cfg = settings.get("data", {}), settings.get("model", {})
    steps = args.steps or int(settings.get("steps", 40))
    seed = int(settings.get("seed", 0))
    output = args.output or ROOT / settings.get("output", "runs/deepspeed/run.h5")

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # CPU: skip a one-minute JIT compile
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()

    corpus = build_corpus(seq_len=data_cfg.get("seq_len", 64), samples_per_source=data_cfg.get("samples_per_source"),
                          val_samples=data_cfg.get("val_samples", 32), seed=seed,
                          corruption=data_cfg.get("corruption", "random"))
    val_batch = collate_samples([corpus.val[i] for i in range(len(corpus.val))])
    sampler = DistributedSampler(corpus.train, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    loader = DataLoader(corpus.train, batch_size=ds_config["train_micro_batch_size_per_gpu"], sampler=sampler,
                        collate_fn=collate_samples, drop_last=True)
    model = TinyGPT(TinyGPTConfig(seq_len=data_cfg.get("seq_len", 64), **model_cfg), seed=seed)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)

    def per_sample_loss(module, batch):
        return per_sample_lm_loss(module(batch["input_ids"]), batch["labels"])

    if rank == 0:
        print(f"[deepspeed] {args.config.name}: ZeRO {engine.zero_optimization_stage()}, {world} process(es), "
              f"micro-batch {engine.train_micro_batch_size_per_gpu()} x accumulation "
              f"{engine.gradient_accumulation_steps()} x {world} ranks = {engine.train_batch_size()} samples a step; "
              f"optimizer {type(engine.basic_optimizer).__name__}; {len(corpus.train)} training windows "
              f"{corpus.train.source_counts()}", flush=True)
    started, taken, epoch = time.perf_counter(), 0, 0
    with DeepSpeedInRun(engine, output, val_data=val_batch, loss_fn=per_sample_loss,
                        shapley=settings.get("shapley", "second"), source_names=corpus.source_names,
                        overwrite=True) as inrun_ds:
        while taken < steps:
            sampler.set_epoch(epoch)
            for batch in loader:
                inrun_ds.begin_microbatch(batch)
                loss = per_sample_loss(engine, batch).mean()
                inrun_ds.backward(loss)
                if inrun_ds.step():
                    taken += 1
                    if rank == 0 and (taken % 10 == 0 or taken == steps):
                        print(f"[deepspeed] step {taken}/{steps}  loss {loss.item():.3f}  "
                              f"{time.perf_counter() - started:.1f} s", flush=True)
                    if taken == steps:
                        break
            epoch += 1
    torch.distributed.barrier()  # every rank's store is closed before rank 0 reads them all
    if rank == 0:
        print(f"[deepspeed] trained {taken} steps in {time.perf_counter() - started:.1f} s; stores: "
              f"{', '.join(p.name for p in sorted(output.parent.glob(output.stem + '*.h5')))}")
        # the prefix finds this run's rank files (run.rank0.h5, ...); one process writes run.h5 itself
        with inrun.open_run(output if world == 1 else output.with_suffix("")) as run:
            print("\n".join(summary_lines(run)))
    torch.distributed.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
