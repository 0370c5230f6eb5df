"""The main job: train a small GPT on a multi-source corpus of text shipped with Python, with In-Run Data Shapley.

One source is deliberately corrupted (random characters). The callback values every training sample at every
optimizer step against clean validation text, records projected gradients and model checkpoints, and logs to W&B
(offline). After training, test windows chosen then (held-out clean text) get post-hoc In-Run Shapley values and a
data-value-embedding phase curve, and the job ends with ``inrun report``: the corrupted source should come out with
the lowest values.

    .venv/bin/python -m experiments.main_job [--config configs/main.toml] [--steps N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import tomllib
import torch
from torch.utils.data import DataLoader

import inrun
from experiments.textdata import build_corpus, collate_samples
from experiments.tinygpt import TinyGPTConfig, TinyGPTModule
from inrun.callbacks import InRunCallback, WandbInfluenceLogger
from inrun.cli import write_report

ROOT = Path(__file__).resolve().parents[1]


def load_config(path: Path) -> dict:
    with open(path, "rb") as handle:
        return tomllib.load(handle)


def train(config: dict, max_steps: int | None) -> Path:
    data, model_cfg, train_cfg, inrun_cfg = config["data"], config["model"], config["train"], config["inrun"]
    corpus = build_corpus(
        seq_len=data["seq_len"], samples_per_source=data["samples_per_source"], val_samples=data["val_samples"],
        seed=data["seed"], corruption=data["corruption"],
    )
    print(f"[main] corpus: {len(corpus.train)} training windows {corpus.train.source_counts()}, "
          f"{len(corpus.val)} validation windows (clean docs + code)")
    val_batch = collate_samples([corpus.val[i] for i in range(len(corpus.val))])
    generator = torch.Generator().manual_seed(train_cfg["seed"])
    loader = DataLoader(corpus.train, batch_size=train_cfg["batch_size"], shuffle=True, generator=generator,
                        collate_fn=collate_samples)
    module = TinyGPTModule(
        TinyGPTConfig(seq_len=data["seq_len"], n_layer=model_cfg["n_layer"], n_head=model_cfg["n_head"],
                      d_model=model_cfg["d_model"]),
        optimizer=train_cfg["optimizer"], lr=train_cfg["lr"], seed=train_cfg["seed"],
    )
    output = ROOT / inrun_cfg["output"]
    output.parent.mkdir(parents=True, exist_ok=True)
    loggers, wandb_logger = [], None
    if inrun_cfg.get("wandb"):
        from lightning.pytorch.loggers import WandbLogger

        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_SILENT", "true")
        wandb_logger = WandbLogger(project="inrun-main", save_dir=str(output.parent), offline=True)
        loggers.append(wandb_logger)
    callback = InRunCallback(
        output, val_data=val_batch, shapley=inrun_cfg["shapley"], source_names=corpus.source_names, overwrite=True,
        embeddings=inrun_cfg.get("embeddings", False), checkpoint_every=inrun_cfg.get("checkpoint_every"),
        **({"adam_values": inrun_cfg["adam_values"]} if "adam_values" in inrun_cfg else {}),
        wandb=WandbInfluenceLogger(phase_length=inrun_cfg["phase_length"], source_names=corpus.source_names)
        if wandb_logger is not None else None,
    )
    trainer = L.Trainer(
        max_epochs=train_cfg["epochs"], max_steps=max_steps or -1, accelerator="cpu", callbacks=[callback],
        logger=loggers or False, enable_checkpointing=False, enable_model_summary=False, log_every_n_steps=10,
    )
    started = time.perf_counter()
    trainer.fit(module, loader)
    print(f"[main] trained {trainer.global_step} steps in {time.perf_counter() - started:.1f} s; store: {output}")
    if inrun_cfg.get("embeddings") and inrun_cfg.get("checkpoint_every"):
        after_training(output, module, corpus, wandb_logger)
    if wandb_logger is not None:
        print(f"[main] W&B offline run: {wandb_logger.experiment.dir}")
        wandb_logger.experiment.finish()
    return output


def after_training(path: Path, module: TinyGPTModule, corpus, wandb_logger) -> None:
    """Answers for test points chosen after training: post-hoc In-Run Shapley values and the DVEmb phase curve."""
    from inrun.callbacks import log_posthoc
    from inrun.cli import posthoc_path
    from inrun.posthoc.embeddings import step_influence

    test = collate_samples([corpus.val[i] for i in range(0, len(corpus.val), 4)])  # held-out clean windows

    def loss_fn(model, batch):
        return model.per_sample_loss(batch)

    with inrun.open_run(path) as run:
        result = run.posthoc_values(module, loss_fn, test)
        result.save(posthoc_path(run))
        step_influence(run, module, loss_fn, test, progress=False, save=True)
    print(f"[main] post-hoc values for {result.first.shape[1]} test windows, and the DVEmb phase curve, saved next "
          "to the store")
    if wandb_logger is not None:
        log_posthoc(wandb_logger.experiment, result)


def verdict(path: Path) -> bool:
    """Print whether the corrupted source has the lowest mean value per sample (orders 1 and 2)."""
    ok = True
    with inrun.open_run(path) as run:
        names = run.source_names
        records = run.records(columns=["sample_id", "source", "value_1", "value_2"])
        for order in (1, 2):
            values = records[f"value_{order}"]
            means = {names[s]: float(values[records["source"] == s].mean()) for s in np.unique(records["source"])}
            lowest = min(means, key=means.get)
            print(f"[main] mean value per occurrence, order {order}: "
                  + ", ".join(f"{k} {v:+.3e}" for k, v in means.items()) + f" -> lowest: {lowest}")
            ok &= lowest == "corrupted"
    print("[main] RESULT: the corrupted source has the lowest values" if ok else
          "[main] RESULT: the corrupted source is NOT the lowest-valued source")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "main.toml")
    parser.add_argument("--steps", type=int, default=None, help="stop after this many optimizer steps")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    config = load_config(args.config)
    path = train(config, args.steps)
    write_report(path, png=path.with_suffix(".png"), phase_length=config["inrun"]["phase_length"])
    return 0 if verdict(path) else 1


if __name__ == "__main__":
    sys.exit(main())
