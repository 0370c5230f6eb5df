"""The model zoo: the models people train, built tiny from configs with random weights (no downloads).

Each :class:`ZooCase` builds a model, its per-sample loss and a training and a validation batch, and states what inrun
must do with it: be exact (``"exact"``), refuse it with a named error and message fragment (``"refused"``), or either
of the two (``"exact-or-refused"``, for a pattern the engine may learn to handle; what it must never do is give values
that are off). tests/test_zoo.py checks every case against torch.func per-sample gradients;
experiments/model_coverage.py turns the same cases into the README's coverage table.

Models: Hugging Face GPT-2, Llama, Mistral, Qwen2 (tied head), GPT-NeoX, BERT (token types, pooler), T5
(encoder-decoder, per-sample seq2seq loss), ViT; nanoGPT written as its author writes it (its own LayerNorm class with
an optional bias, ``self.wpe(torch.arange(t))`` without a batch dimension, weight-tied ``lm_head``,
``F.scaled_dot_product_attention``), also with batch size equal to sequence length; a head written as
``x @ self.wte.weight.T``; ``nn.TransformerEncoderLayer`` (``nn.MultiheadAttention``); a CNN with GroupNorm; and a CNN
with BatchNorm in train mode (samples mixed by batch statistics). Sizes: 2 layers, hidden 32, vocab 128, sequences
of 8-12 tokens, batches of 3-4, so that the whole zoo runs in seconds.

Batches pad where the model takes an attention mask (a right-padded sample, its pads masked and labelled -100), so
padding is part of every language model's check. Norm weights and biases are jittered away from their initial ones
and zeros, so that a per-sample gradient that ignored them would show.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

VOCAB = 128
HIDDEN = 32
HEADS = 4
LAYERS = 2
FFN = 64

LossFn = Callable[[nn.Module, Any], Tensor]


@dataclass
class ZooCase:
    """One zoo model and what inrun must do with it.

    ``expect``: ``"exact"`` (grad_dots/grad_norms within 1e-5 of torch.func in fp32), ``"refused"`` (every entry point
    raises ``inrun.errors.<error>`` with ``fragment`` in the message), or ``"exact-or-refused"`` (one or the other).
    ``or_unsupported``: with ``allow_unsupported=False``, an ``UnsupportedLayerError`` with the same fragment is a
    right refusal too (the layer is refused before the independence probe runs).
    ``lightning``: also fitted with ``InRunCallback`` in tests/test_zoo.py.
    """

    name: str
    build: Callable[[], tuple[nn.Module, LossFn, Any, Any]]
    expect: str
    description: str
    error: str | None = None
    fragment: str | None = None
    or_unsupported: bool = False
    lightning: bool = False


# --------------------------------------------------------------------------------------------------------------------
# batches and losses
# --------------------------------------------------------------------------------------------------------------------
def token_batch(n: int, length: int, seed: int, real: list[int] | None = None, vocab: int = VOCAB) -> dict:
    """Right-padded token sequences: sample i has ``real[i]`` real tokens (all of them if ``real`` is None or short);
    pads are token 0, masked out and labelled -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    for i, count in enumerate(real or []):
        mask[i, count:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def next_token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-sample next-token cross-entropy, the mean over the positions whose label is not -100."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="none")
    return losses.view(labels.shape).sum(1) / (labels != -100).sum(1).clamp_min(1)


def causal_lm_loss(model: nn.Module, batch: dict) -> Tensor:
    """A Hugging Face causal LM's per-sample loss (the model is not given labels: its own loss is a batch mean)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return next_token_loss(out.logits, batch["labels"])


def jitter_norms(model: nn.Module, seed: int, scale: float = 0.1) -> nn.Module:
    """Move every 1-D parameter (norm scales, biases, class tokens' rows stay) away from its initial ones/zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


# --------------------------------------------------------------------------------------------------------------------
# Hugging Face models
# --------------------------------------------------------------------------------------------------------------------
def _hf_causal(config_name: str, model_name: str, seed: int, **config: Any) -> Callable[[], tuple]:
    def build():
        import transformers

        cfg = getattr(transformers, config_name)(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                                  num_attention_heads=HEADS, intermediate_size=FFN,
                                                  max_position_embeddings=64, **config)
        torch.manual_seed(seed)
        model = jitter_norms(getattr(transformers, model_name)(cfg), seed).eval()
        train = token_batch(4, 10, seed + 1, real=[10, 6, 10, 3])
        val = token_batch(3, 8, seed + 2, real=[8, 5])
        return model, causal_lm_loss, train, val

    return build


def build_gpt2():
    import transformers

    cfg = transformers.GPT2Config(n_layer=LAYERS, n_embd=HIDDEN, n_head=HEADS, vocab_size=VOCAB, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                                  eos_token_id=0)
    torch.manual_seed(11)
    model = jitter_norms(transformers.GPT2LMHeadModel(cfg), 11).eval()
    return model, causal_lm_loss, token_batch(4, 10, 12, real=[10, 4, 10, 7]), token_batch(3, 8, 13, real=[8, 5])


def bert_loss(model: nn.Module, batch: dict) -> Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   token_type_ids=batch["token_type_ids"]).logits
    return F.cross_entropy(logits, batch["y"], reduction="none")


def bert_batch(n: int, length: int, seed: int, real: list[int]) -> dict:
    """Sentence pairs: token type 1 from the middle on, padding masked, a class label per sample."""
    batch = token_batch(n, length, seed, real=real)
    types = torch.zeros(n, length, dtype=torch.long)
    types[:, length // 2:] = 1
    g = torch.Generator().manual_seed(seed + 100)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
            "token_type_ids": types * batch["attention_mask"], "y": torch.randint(0, 3, (n,), generator=g)}


def build_bert():
    import transformers

    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                  num_attention_heads=HEADS, intermediate_size=FFN, max_position_embeddings=64,
                                  type_vocab_size=2, num_labels=3, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    torch.manual_seed(21)
    model = jitter_norms(transformers.BertForSequenceClassification(cfg), 21).eval()
    return model, bert_loss, bert_batch(4, 10, 22, real=[10, 5, 10, 8]), bert_batch(3, 8, 23, real=[8, 6, 8])


def t5_loss(model: nn.Module, batch: dict) -> Tensor:
    """Per-sample seq2seq loss: the mean cross-entropy over each sample's target tokens (labels -100 are pads)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   decoder_input_ids=batch["decoder_input_ids"],
                   decoder_attention_mask=batch["decoder_attention_mask"], use_cache=False).logits
    labels = batch["labels"]
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                             reduction="none")
    return losses.view(labels.shape).sum(1) / (labels != -100).sum(1).clamp_min(1)


def t5_batch(n: int, src: int, tgt: int, seed: int, src_real: list[int], tgt_real: list[int]) -> dict:
    """Padded sources and targets; decoder inputs are the targets shifted right behind the start token 0."""
    source = token_batch(n, src, seed, real=src_real)
    target = token_batch(n, tgt, seed + 1, real=tgt_real)
    decoder_inputs = torch.cat([torch.zeros(n, 1, dtype=torch.long), target["input_ids"][:, :-1]], 1)
    decoder_mask = torch.cat([torch.ones(n, 1, dtype=torch.long), target["attention_mask"][:, :-1]], 1)
    return {"input_ids": source["input_ids"], "attention_mask": source["attention_mask"],
            "decoder_input_ids": decoder_inputs, "decoder_attention_mask": decoder_mask, "labels": target["labels"]}


def build_t5():
    import transformers

    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=FFN, num_layers=LAYERS,
                                num_decoder_layers=LAYERS, num_heads=HEADS, relative_attention_num_buckets=8,
                                relative_attention_max_distance=16, dropout_rate=0.0, decoder_start_token_id=0,
                                pad_token_id=0, eos_token_id=1)
    torch.manual_seed(31)
    model = jitter_norms(transformers.T5ForConditionalGeneration(cfg), 31).eval()
    train = t5_batch(4, 10, 6, 32, src_real=[10, 4, 10, 7], tgt_real=[6, 6, 3, 5])
    val = t5_batch(3, 8, 5, 34, src_real=[8, 6], tgt_real=[5, 2])
    return model, t5_loss, train, val


def vit_loss(model: nn.Module, batch: dict) -> Tensor:
    return F.cross_entropy(model(pixel_values=batch["pixel_values"]).logits, batch["y"], reduction="none")


def image_batch(n: int, seed: int, size: int = 16, classes: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(n, 3, size, size, generator=g), "y": torch.randint(0, classes, (n,), generator=g)}


def build_vit():
    import transformers

    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=HIDDEN,
                                 num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
                                 num_labels=5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(41)
    model = transformers.ViTForImageClassification(cfg)
    g = torch.Generator().manual_seed(42)
    with torch.no_grad():  # ViT initialises its class token at zero: give it (and the positions) real values
        model.vit.embeddings.cls_token.add_(0.5 * torch.randn(model.vit.embeddings.cls_token.shape, generator=g))
        model.vit.embeddings.position_embeddings.add_(
            0.5 * torch.randn(model.vit.embeddings.position_embeddings.shape, generator=g))
    model = jitter_norms(model, 41).eval()
    return model, vit_loss, image_batch(4, 43), image_batch(3, 44)


# --------------------------------------------------------------------------------------------------------------------
# nanoGPT, written the way its author writes it (model.py of karpathy/nanoGPT, re-typed in its style)
# --------------------------------------------------------------------------------------------------------------------
class LayerNorm(nn.Module):
    """LayerNorm but with an optional bias (PyTorch's LayerNorm had no ``bias=False`` when nanoGPT was written)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input: Tensor) -> Tensor:
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


@dataclass
class GPTConfig:
    block_size: int = 32
    vocab_size: int = VOCAB
    n_layer: int = LAYERS
    n_head: int = HEADS
    n_embd: int = HIDDEN
    dropout: float = 0.0
    bias: bool = True


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0,
                                           is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class NanoBlock(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([NanoBlock(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        device = idx.device
        b, t = idx.size()
        assert t <= self.config.block_size, f"Cannot forward sequence of length {t}, block size is only {self.config.block_size}"
        pos = torch.arange(0, t, dtype=torch.long, device=device)  # shape (t)
        tok_emb = self.transformer.wte(idx)  # token embeddings of shape (b, t, n_embd)
        pos_emb = self.transformer.wpe(pos)  # position embeddings of shape (t, n_embd)
        x = self.transformer.drop(tok_emb + pos_emb)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss


def nanogpt_loss(model: nn.Module, batch: dict) -> Tensor:
    """Per-sample next-token loss on ``x -> y`` windows, as nanoGPT's data loader cuts them."""
    logits, _ = model(batch["x"])
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["y"].reshape(-1), reduction="none")
    return losses.view(batch["y"].shape).mean(1)


def window_batch(n: int, t: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, VOCAB, (n, t + 1), generator=g)
    return {"x": data[:, :-1].contiguous(), "y": data[:, 1:].contiguous()}


def _nanogpt(bias: bool, n: int, t: int, n_val: int, t_val: int, seed: int) -> Callable[[], tuple]:
    def build():
        torch.manual_seed(seed)
        model = jitter_norms(NanoGPT(GPTConfig(bias=bias)), seed)
        return model, nanogpt_loss, window_batch(n, t, seed + 1), window_batch(n_val, t_val, seed + 2)

    return build


# --------------------------------------------------------------------------------------------------------------------
# hand-written patterns
# --------------------------------------------------------------------------------------------------------------------
class FunctionalTiedHead(nn.Module):
    """A small LM whose output head reuses the token embedding functionally, ``x @ self.wte.weight.T`` or
    ``F.linear(x, self.wte.weight)``: the embedding's weight is used outside the embedding's forward."""

    def __init__(self, style: str = "matmul"):
        super().__init__()
        self.style = style
        self.wte = nn.Embedding(VOCAB, HIDDEN)
        self.wpe = nn.Embedding(32, HIDDEN)
        self.ln = nn.LayerNorm(HIDDEN)
        self.fc = nn.Linear(HIDDEN, FFN)
        self.proj = nn.Linear(FFN, HIDDEN)
        self.ln_f = nn.LayerNorm(HIDDEN)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1])[None])
        x = x + self.proj(F.gelu(self.fc(self.ln(x))))
        if self.style == "linear":
            return F.linear(self.ln_f(x), self.wte.weight)
        return self.ln_f(x) @ self.wte.weight.T


def window_loss(model: nn.Module, batch: dict) -> Tensor:
    """Per-sample next-token loss of a model that returns logits."""
    logits = model(batch["x"])
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["y"].reshape(-1), reduction="none")
    return losses.view(batch["y"].shape).mean(1)


def _functional_tied_head(style: str) -> Callable[[], tuple]:
    def build():
        torch.manual_seed(61)
        model = jitter_norms(FunctionalTiedHead(style), 61)
        return model, window_loss, window_batch(4, 9, 62), window_batch(3, 7, 63)

    return build


class EncoderClassifier(nn.Module):
    """Token and position embeddings, two ``nn.TransformerEncoderLayer`` (each an ``nn.MultiheadAttention`` and a
    feed-forward block), a masked mean over the real tokens and a linear classifier."""

    def __init__(self, norm_first: bool = False):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, HIDDEN)
        self.pos = nn.Embedding(32, HIDDEN)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(HIDDEN, HEADS, dim_feedforward=FFN, dropout=0.0, batch_first=True,
                                       norm_first=norm_first)
            for _ in range(LAYERS))
        self.head = nn.Linear(HIDDEN, 3)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1])[None])
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=mask == 0)
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return self.head(pooled)


def encoder_loss(model: nn.Module, batch: dict) -> Tensor:
    return F.cross_entropy(model(batch["input_ids"], batch["attention_mask"]), batch["y"], reduction="none")


def build_transformer_encoder():
    torch.manual_seed(71)
    # train mode (dropout is 0): in eval mode nn.TransformerEncoderLayer may take its fused inference fast path
    model = jitter_norms(EncoderClassifier(), 71).train()
    train, val = bert_batch(4, 9, 72, real=[9, 5, 9, 7]), bert_batch(3, 7, 73, real=[7, 4])
    return model, encoder_loss, train, val


def image_classification_loss(model: nn.Module, batch: tuple) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def build_groupnorm_cnn():
    torch.manual_seed(81)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.GroupNorm(4, 8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 5),
    )
    model = jitter_norms(model, 81)
    train, val = image_batch(4, 82, size=8), image_batch(3, 83, size=8)
    return model, image_classification_loss, (train["pixel_values"], train["y"]), (val["pixel_values"], val["y"])


def build_batchnorm_train():
    torch.manual_seed(91)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 5),
    ).train()
    train, val = image_batch(4, 92, size=8), image_batch(3, 93, size=8)
    return model, image_classification_loss, (train["pixel_values"], train["y"]), (val["pixel_values"], val["y"])


# --------------------------------------------------------------------------------------------------------------------
# the zoo
# --------------------------------------------------------------------------------------------------------------------
CASES: list[ZooCase] = [
    ZooCase("gpt2", build_gpt2, "exact", "HF GPT-2: Conv1D, tied head, positions `[1, t]`, padded", lightning=True),
    ZooCase("llama", _hf_causal("LlamaConfig", "LlamaForCausalLM", 101, num_key_value_heads=2),
            "exact", "HF Llama: LlamaRMSNorm, GQA, rotary, padded", lightning=True),
    ZooCase("mistral", _hf_causal("MistralConfig", "MistralForCausalLM", 111, num_key_value_heads=2),
            "exact", "HF Mistral: MistralRMSNorm, GQA, padded"),
    ZooCase("qwen2", _hf_causal("Qwen2Config", "Qwen2ForCausalLM", 121, num_key_value_heads=2,
                                tie_word_embeddings=True),
            "exact", "HF Qwen2: Qwen2RMSNorm, qkv biases, tied head, padded"),
    ZooCase("gpt_neox", _hf_causal("GPTNeoXConfig", "GPTNeoXForCausalLM", 131, hidden_dropout=0.0,
                                   attention_dropout=0.0),
            "exact", "HF GPT-NeoX (Pythia): parallel residual, rotary, padded"),
    ZooCase("bert", build_bert, "exact", "HF BERT classifier: token types, pooler, padded", lightning=True),
    ZooCase("t5", build_t5, "exact",
            "HF T5 encoder-decoder: T5LayerNorm, relative attention bias `[1, h, q, k]`, per-sample seq2seq loss"),
    ZooCase("vit", build_vit, "exact", "HF ViT classifier: `cls_token` and `position_embeddings` as bare parameters"),
    ZooCase("nanogpt", _nanogpt(True, 3, 8, 2, 6, 141), "exact",
            "nanoGPT as written: own LayerNorm class, `wpe(arange(t))`, tied `lm_head`, SDPA"),
    ZooCase("nanogpt_n_eq_t", _nanogpt(False, 6, 6, 6, 6, 151), "exact",
            "nanoGPT, `bias=False`, batch size == sequence length (train and validation)"),
    ZooCase("functional_tied_head", _functional_tied_head("matmul"), "exact-or-refused",
            "`logits = x @ self.wte.weight.T` (a weight used outside its module)",
            error="ExactnessError", fragment="wte.weight", lightning=True),
    ZooCase("functional_tied_linear", _functional_tied_head("linear"), "exact-or-refused",
            "`logits = F.linear(x, self.wte.weight)`", error="ExactnessError", fragment="wte.weight"),
    ZooCase("transformer_encoder", build_transformer_encoder, "exact",
            "`nn.TransformerEncoderLayer` x2 (`nn.MultiheadAttention`), key padding mask"),
    ZooCase("groupnorm_cnn", build_groupnorm_cnn, "exact", "CNN: Conv2d, GroupNorm, Linear"),
    ZooCase("batchnorm_train", build_batchnorm_train, "refused", "CNN with `BatchNorm2d` in train mode",
            error="SampleMixingError", fragment="no sample has a gradient of its own", or_unsupported=True,
            lightning=True),
]

BY_NAME = {case.name: case for case in CASES}


def to_double(batch: Any) -> Any:
    """The batch with floating-point tensors in float64 (index tensors unchanged)."""
    if isinstance(batch, Tensor):
        return batch.double() if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {key: to_double(value) for key, value in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_double(value) for value in batch)
    return batch
