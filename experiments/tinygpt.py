"""A tiny GPT-style causal language model (plain torch) and its LightningModule wrapper.

Every parameter is owned by an ``nn.Linear``, ``nn.Embedding`` or ``nn.LayerNorm``: those are the layer
types the attribution engine can compute per-sample gradients for. For the same reason the position
embedding is looked up with a ``[n, T]`` index tensor (one row per sample), not a shared ``[T]`` one, so
its output and output gradient are per sample like every other layer's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


@dataclass
class TinyGPTConfig:
    """Model size. ``seq_len`` is the longest input the position embedding covers."""

    vocab_size: int = 256
    seq_len: int = 64
    n_layer: int = 2
    n_head: int = 4
    d_model: int = 64
    dropout: float = 0.0
    tie_weights: bool = True


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention where position t attends only to positions <= t."""

    def __init__(self, config: TinyGPTConfig) -> None:
        super().__init__()
        if config.d_model % config.n_head:
            raise ValueError(f"d_model={config.d_model} is not divisible by n_head={config.n_head}")
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)
        q, k, v = (z.view(n, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        dropout = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attention(norm(x)), then x + MLP(norm(x))."""

    def __init__(self, config: TinyGPTConfig) -> None:
        super().__init__()
        d = config.d_model
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(config.dropout))
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Byte-level GPT: token + position embeddings, ``n_layer`` blocks, final norm, LM head.

    With ``tie_weights`` the LM head's weight is the token embedding's Parameter (the same object).
    Initialisation is deterministic for ``seed`` and leaves the global RNG state untouched.
    """

    def __init__(self, config: TinyGPTConfig | None = None, seed: int = 0) -> None:
        super().__init__()
        self.config = config = config or TinyGPTConfig()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
            self.pos_emb = nn.Embedding(config.seq_len, config.d_model)
            self.drop = nn.Dropout(config.dropout)
            self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
            self.ln_f = nn.LayerNorm(config.d_model)
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
            if config.tie_weights:
                self.lm_head.weight = self.tok_emb.weight
            self._init_weights()

    def _init_weights(self) -> None:
        """GPT-2 style: N(0, 0.02) weights, zero biases; residual output projections scaled by depth."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)) and module is not self.lm_head:
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        if not self.config.tie_weights:
            nn.init.normal_(self.lm_head.weight, std=0.02)
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, std=residual_std)
            nn.init.normal_(block.mlp[2].weight, std=residual_std)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids [n, T]`` (T <= seq_len) -> logits ``[n, T, vocab_size]``."""
        n, t = input_ids.shape
        if t > self.config.seq_len:
            raise ValueError(f"sequence length {t} exceeds the model's seq_len {self.config.seq_len}")
        positions = torch.arange(t, device=input_ids.device).expand(n, t)
        x = self.drop(self.tok_emb(input_ids) + self.pos_emb(positions))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def per_sample_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of each sample over its labelled positions -> ``[n]``.

    ``labels`` of -100 are ignored; a sample with no labelled position gets loss 0 (not NaN).
    """
    n, t, v = logits.shape
    token_loss = F.cross_entropy(
        logits.reshape(n * t, v).float(), labels.reshape(n * t), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(n, t)
    counts = (labels != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return token_loss.sum(dim=1) / counts


def _lr_factor(step: int, schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up, then constant or cosine decay to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class TinyGPTModule(L.LightningModule):
    """Trains ``TinyGPT`` on batches from ``experiments.textdata.collate_samples``.

    The training loss is the batch mean of ``per_sample_loss``, so each sample contributes 1/n of it.
    ``optimizer`` is ``"sgd"`` (plain SGD unless ``momentum`` is set) or ``"adamw"``. Weight decay applies to
    Linear and Embedding weights only (not biases or LayerNorm). ``schedule`` is ``"constant"`` (default) or
    ``"cosine"``; either may start with ``warmup_steps`` of linear warm-up. ``total_steps`` defaults to the
    trainer's estimate.
    """

    def __init__(
        self,
        config: TinyGPTConfig | None = None,
        optimizer: str = "sgd",
        lr: float = 0.1,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        schedule: str = "constant",
        warmup_steps: int = 0,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
        if schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
        config = config or TinyGPTConfig()
        self.save_hyperparameters(ignore=["config"])
        self.hparams["config"] = asdict(config)
        self.model = TinyGPT(config, seed=seed)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def per_sample_loss(self, batch: dict) -> torch.Tensor:
        """Loss of each sample in ``batch`` -> ``[n]``."""
        return per_sample_lm_loss(self(batch["input_ids"]), batch["labels"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.per_sample_loss(batch).mean()
        self.log("train_loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.per_sample_loss(batch).mean()
        self.log("val_loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def _param_groups(self) -> list[dict]:
        """Two groups: Linear/Embedding weights (decayed) and everything else (not decayed)."""
        decay, no_decay = {}, {}
        for module in self.model.modules():
            for name, param in module.named_parameters(recurse=False):
                decayed = name == "weight" and isinstance(module, (nn.Linear, nn.Embedding))
                (decay if decayed else no_decay)[id(param)] = param  # keyed by id: tied weights once
        return [
            {"params": list(decay.values()), "weight_decay": self.hparams.weight_decay},
            {"params": list(no_decay.values()), "weight_decay": 0.0},
        ]

    def _total_steps(self) -> int:
        if self.hparams.total_steps is not None:
            return int(self.hparams.total_steps)
        return int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(self._param_groups(), lr=hp.lr, momentum=hp.momentum)
        else:
            opt = torch.optim.AdamW(self._param_groups(), lr=hp.lr)
        if hp.schedule == "constant" and hp.warmup_steps == 0:
            return opt
        total = self._total_steps()
        factor = lambda step: _lr_factor(step, hp.schedule, hp.warmup_steps, total, hp.min_lr_ratio)  # noqa: E731
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
