"""Whole models against per-sample gradients from ``torch.func`` (tests/reference.py).

An MLP, a small CNN (Conv2d, GroupNorm, BatchNorm2d in eval mode, Linear), Hugging Face's GPT-2 (tied embedding and LM
head, padded sequences, a position embedding called with ids ``[1, T]``), a hand-written tiny GPT (Embedding, tied
Linear head, LayerNorm, RMSNorm, SDPA attention) and a model that calls one Linear twice in a forward. Each in float64
and float32, with several validation points; dots and squared norms on the default route and on both forced routes.
"""

from __future__ import annotations

import pytest
import reference as R
import torch
import torch.nn.functional as F
from torch import nn

import inrun
from inrun import GradientCapture, capture_batch

DTYPES = [torch.float64, torch.float32]
TOL = {torch.float64: 1e-5, torch.float32: 1e-4}




def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    error = R.relative_error(actual.to(expected.dtype), expected)
    assert error < TOL[dtype], f"{what}: relative error {error:.3g} >= {TOL[dtype]}"


def check_model(model: nn.Module, loss_fn, train, val, dtype: torch.dtype) -> dict[str, dict[str, str]]:
    """Dots and norms on every route against the reference; returns the routes reported per forced route."""
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    ref_train = R.per_sample_grads(model, loss_fn, train)
    expected_dots = R.flat(ref_train) @ R.flat(R.per_sample_grads(model, loss_fn, val)).T
    expected_norms = R.flat(ref_train).pow(2).sum(1)
    # the reference must be a real check: several validation points, gradients that differ between samples
    assert expected_dots.shape[1] >= 2 and expected_dots.std() > 0

    assert_close(inrun.grad_dots(model, loss_fn, train, val), expected_dots, dtype, "grad_dots")
    assert_close(inrun.grad_norms(model, loss_fn, train), expected_norms, dtype, "grad_norms")

    with GradientCapture(model) as capture:
        train_batch = capture_batch(capture, model, loss_fn, train)
        val_batch = capture_batch(capture, model, loss_fn, val)
    routes = {}
    for route in (None, "gram", "materialise"):
        train_batch.force_route = route
        train_batch.routes.clear()
        assert_close(train_batch.dots(val_batch), expected_dots, dtype, f"dots (route {route})")
        assert sorted(train_batch.routes) == trainable, "a route for every trainable parameter"
        routes[route] = dict(train_batch.routes)
        train_batch.routes.clear()
        assert_close(train_batch.squared_norms(), expected_norms, dtype, f"squared norms (route {route})")
        assert sorted(train_batch.routes) == trainable
        if route is not None:  # by default, norms (diagonal) and dots (all pairs) may choose differently
            assert train_batch.routes == routes[route]
    for name in trainable:
        assert routes[None][name] in ("gram", "materialise", "flat", "gram+materialise", "flat+gram", "flat+materialise")
        assert set(routes["gram"][name].split("+")) <= {"gram", "flat"}
        assert set(routes["materialise"][name].split("+")) <= {"materialise", "flat"}
    # forcing a route changes the routes of the weight matrices, not the results (checked above)
    assert routes["gram"] != routes["materialise"]

    sums = train_batch.gradient_sums()
    autograd_sums = R.summed_gradients(model, loss_fn, train)
    assert sorted(sums) == trainable
    assert_close(torch.cat([sums[k].flatten() for k in trainable]), torch.cat([autograd_sums[k].flatten() for k in trainable]), dtype, "gradient sums")
    return routes


# -- MLP -------------------------------------------------------------------------------------------------------------
def classification_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


@pytest.mark.parametrize("dtype", DTYPES)
def test_mlp(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    g = torch.Generator().manual_seed(1)
    train = (torch.randn(7, 6, generator=g, dtype=dtype), torch.randint(0, 3, (7,), generator=g))
    val = (torch.randn(4, 6, generator=g, dtype=dtype), torch.randint(0, 3, (4,), generator=g))
    check_model(model, classification_loss, train, val, dtype)


# -- CNN -------------------------------------------------------------------------------------------------------------
def small_cnn(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="reflect"),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding="same", groups=3),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(24, 5),
    ).to(dtype)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model[1].weight.copy_(torch.rand(4, generator=g, dtype=dtype) + 0.5)
        model[1].bias.copy_(torch.randn(4, generator=g, dtype=dtype) * 0.3)
        model[4].weight.copy_(torch.rand(6, generator=g, dtype=dtype) + 0.5)
        model[4].running_mean.copy_(torch.randn(6, generator=g, dtype=dtype) * 0.2)
        model[4].running_var.copy_(torch.rand(6, generator=g, dtype=dtype) + 0.5)
    return model.eval()


@pytest.mark.parametrize("dtype", DTYPES)
def test_small_cnn(dtype):
    model = small_cnn(dtype)
    g = torch.Generator().manual_seed(4)
    train = (torch.randn(5, 3, 8, 8, generator=g, dtype=dtype), torch.randint(0, 5, (5,), generator=g))
    val = (torch.randn(3, 3, 8, 8, generator=g, dtype=dtype), torch.randint(0, 5, (3,), generator=g))
    routes = check_model(model, classification_loss, train, val, dtype)
    assert routes["gram"]["0.weight"] == "gram" and routes["materialise"]["0.weight"] == "materialise"
    assert routes["gram"]["4.weight"] == "flat"  # BatchNorm's affine weight
    assert routes["gram"]["6.weight"] == "flat"  # a grouped convolution is materialised per group


# -- Hugging Face GPT-2 ----------------------------------------------------------------------------------------------
def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy per sample, averaged over the positions whose label is not -100."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none", ignore_index=-100)
    counts = (labels != -100).sum(1).clamp_min(1)
    return losses.view(labels.shape).sum(1) / counts


def hf_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return lm_loss(logits, batch["labels"])


def lm_batch(n: int, length: int, vocab: int, seed: int, pad_to: list[int] | None = None) -> dict:
    """Right-padded token sequences: sample i has ``pad_to[i]`` real tokens; pads are masked and labelled -100."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    for i, real in enumerate(pad_to or []):
        mask[i, real:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture(scope="module")
def gpt2_factory():
    transformers = pytest.importorskip("transformers")

    def build(dtype: torch.dtype) -> nn.Module:
        config = transformers.GPT2Config(
            n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )
        torch.manual_seed(5)
        return transformers.GPT2LMHeadModel(config).to(dtype).eval()

    return build


@pytest.mark.parametrize("dtype", DTYPES)
def test_hf_gpt2(dtype, gpt2_factory):
    model = gpt2_factory(dtype)
    assert model.lm_head.weight is model.transformer.wte.weight, "GPT-2's LM head must be tied to its token embedding"
    train = lm_batch(4, 7, 50, seed=6, pad_to=[7, 4, 7, 2])
    val = lm_batch(3, 5, 50, seed=7, pad_to=[5, 3])
    seen = []
    handle = model.transformer.wpe.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    try:
        routes = check_model(model, hf_loss, train, val, dtype)
    finally:
        handle.remove()
    assert (1, 7) in seen and (1, 5) in seen, f"the position embedding was expected to see ids [1, T], saw {seen}"
    # the tied matrix has one entry, under its first name; its cross terms (embedding x head) are counted
    assert "lm_head.weight" not in routes[None] and "transformer.wte.weight" in routes[None]
    assert routes["gram"]["transformer.wte.weight"] == "gram"
    assert routes["gram"]["transformer.wpe.weight"] == "gram"  # position embedding, ids [1, T] expanded


def test_hf_gpt2_padding_is_invisible(gpt2_factory):
    """A padded sample's products equal those of the same sample without the padding."""
    model = gpt2_factory(torch.float64)
    padded = lm_batch(2, 8, 50, seed=8, pad_to=[5, 8])
    unpadded = {key: value[:1, :5] for key, value in padded.items()}
    val = lm_batch(2, 6, 50, seed=9)
    full = inrun.grad_dots(model, hf_loss, padded, val)
    alone = inrun.grad_dots(model, hf_loss, unpadded, val)
    assert R.relative_error(full[:1], alone) < 1e-10
    assert R.relative_error(full, R.reference_dots(model, hf_loss, padded, val)) < 1e-10


# -- a hand-written tiny GPT -----------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d, bias=False)
        self.norm2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 2 * d)
        self.out = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        mask = causal[None, None] & key_mask[:, None, None, :].bool()
        mask = mask | torch.eye(t, dtype=torch.bool)  # every query sees itself (no empty rows)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(attended.transpose(1, 2).reshape(n, t, d))
        return x + self.out(F.gelu(self.fc(self.norm2(x))))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 23, d: int = 12, heads: int = 2, layers: int = 2, max_len: int = 16):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1])[None]  # [1, T], broadcast over the batch
        x = self.tok(ids) + self.pos(positions)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x))


def tiny_gpt_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return lm_loss(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_tiny_gpt(dtype):
    torch.manual_seed(10)
    model = TinyGPT().to(dtype)
    assert model.head.weight is model.tok.weight
    train = lm_batch(5, 9, 23, seed=11, pad_to=[9, 3, 9, 6, 9])
    val = lm_batch(3, 6, 23, seed=12, pad_to=[6, 6, 4])
    routes = check_model(model, tiny_gpt_loss, train, val, dtype)
    assert "head.weight" not in routes[None]
    assert {routes["gram"][k] for k in ("tok.weight", "pos.weight", "blocks.0.qkv.weight")} == {"gram"}
    assert routes["gram"]["blocks.0.norm1.weight"] == "flat" and routes["gram"]["blocks.1.norm2.bias"] == "flat"


# -- one module called twice in a forward ----------------------------------------------------------------------------
class TwoBranches(nn.Module):
    """``shared`` is applied to two branches and, in sequence, to its own output: three uses per forward."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 4)
        self.shared = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        left = self.shared(h)
        right = self.shared(torch.tanh(self.shared(h.flip(-1))))
        return self.out(torch.cat([self.norm(left), self.norm(right) * right], -1))


def sequence_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return (torch.sin(out) + out.pow(2)).reshape(out.shape[0], -1).sum(1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_module_called_twice(dtype):
    torch.manual_seed(13)
    model = TwoBranches().to(dtype)
    g = torch.Generator().manual_seed(14)
    train = torch.randn(6, 3, 5, generator=g, dtype=dtype)
    val = torch.randn(4, 2, 5, generator=g, dtype=dtype)
    check_model(model, sequence_loss, train, val, dtype)
    with GradientCapture(model) as capture:
        batch = capture_batch(capture, model, sequence_loss, train)
    assert len(batch.factors["shared.weight"]) == 3 and len(batch.factors["norm.weight"]) == 2  # one per call
