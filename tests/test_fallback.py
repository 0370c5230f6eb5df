"""The generic torch.func fallback and calls shared by the batch, against independent per-sample references.

References: ``torch.func.grad`` of ``functional_call`` one sample at a time (tests/reference.py), or, where dropout
is on, autograd's gradient of each sample's loss from the same forward (same masks). Nothing here uses inrun's code.
"""

from __future__ import annotations

import re

import pytest
import reference as R
import torch
import torch.nn.functional as F
from torch import nn

import inrun
from inrun import BatchMismatchError, GradientCapture, capture_batch

pytest.importorskip("transformers")


def sequence_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return (torch.sin(out) + out.pow(2)).reshape(out.shape[0], -1).sum(1)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# -- norm layers of every library -------------------------------------------------------------------------------------
class NanoLayerNorm(nn.Module):
    """nanoGPT's LayerNorm: an optional bias (PyTorch's LayerNorm had no bias=False when it was written)."""

    def __init__(self, ndim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


def hf_norm(kind: str, d: int) -> nn.Module:
    if kind == "llama":
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        return LlamaRMSNorm(d)
    if kind == "mistral":
        from transformers.models.mistral.modeling_mistral import MistralRMSNorm

        return MistralRMSNorm(d)
    if kind == "qwen2":
        from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

        return Qwen2RMSNorm(d)
    if kind == "gemma":  # scales by (1 + weight)
        from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

        return GemmaRMSNorm(d)
    if kind == "t5":  # RMS without mean subtraction, computed in float32
        from transformers.models.t5.modeling_t5 import T5LayerNorm

        return T5LayerNorm(d)
    return NanoLayerNorm(d, bias=kind == "nano_bias")


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "gemma", "t5", "nano_bias", "nano_no_bias"])
def test_norm_layers_of_every_library_are_exact_through_the_fallback(kind):
    torch.manual_seed(0)
    norm = hf_norm(kind, 6)
    with torch.no_grad():
        for p in norm.parameters():  # away from the initial ones/zeros so that every coordinate matters
            p.add_(0.3 * torch.randn(p.shape))
    model = nn.Sequential(nn.Linear(4, 6), norm, nn.Linear(6, 3)).double()
    train, val = randn(3, 5, 4, seed=1), randn(2, 5, 4, seed=2)
    with GradientCapture(model) as capture:
        own = sum(p.numel() for p in norm.parameters())
        assert capture.coverage.fraction == 1.0 and capture.coverage.fallback_numel == own
        assert f"({type(norm).__name__})" in capture.coverage.fallback[0]
    expected = R.reference_dots(model, sequence_loss, train, val)
    assert R.relative_error(inrun.grad_dots(model, sequence_loss, train, val), expected) < 1e-10
    assert R.relative_error(inrun.grad_norms(model, sequence_loss, train),
                            R.reference_norms(model, sequence_loss, train)) < 1e-10


# -- bare parameters, dropout replayed ----------------------------------------------------------------------------------
class PatchEmbeddings(nn.Module):
    """ViT's embeddings as ViT writes them: a class token and position embeddings as bare parameters, a patch
    convolution child, dropout after the sum."""

    def __init__(self, dropout: float):
        super().__init__()
        self.projection = nn.Conv2d(3, 8, kernel_size=4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 8))
        self.position_embeddings = nn.Parameter(torch.randn(1, 5, 8))
        self.dropout = nn.Dropout(dropout)

    def forward(self, pixels):
        patches = self.projection(pixels).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(pixels.shape[0], -1, -1), patches], dim=1)
        return self.dropout(tokens + self.position_embeddings)


class TinyViT(nn.Module):
    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.embeddings = PatchEmbeddings(dropout)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, pixels):
        return self.head(self.norm(self.embeddings(pixels))[:, 0])


def test_bare_parameters_in_a_forward_are_exact():
    torch.manual_seed(1)
    model = TinyViT().double()
    train, val = randn(4, 3, 8, 8, seed=3), randn(2, 3, 8, 8, seed=4)
    with GradientCapture(model) as capture:
        assert capture.coverage.fallback_numel == 8 + 40  # cls_token, position_embeddings; the conv is its own
    assert R.relative_error(inrun.grad_dots(model, sequence_loss, train, val),
                            R.reference_dots(model, sequence_loss, train, val)) < 1e-10


def test_dropout_inside_a_fallback_module_is_replayed():
    """Training mode, dropout 0.5 inside the module the fallback re-runs: vmap refuses randomness, so the batched
    route re-runs the module with the random state of the original call. Reference: autograd's gradient of each
    sample's loss from the very same forward."""
    torch.manual_seed(2)
    model = TinyViT(dropout=0.5).double().train()
    x = randn(4, 3, 8, 8, seed=5)
    params = dict(model.named_parameters())
    torch.manual_seed(7)
    losses = sequence_loss(model, x)
    rows = [torch.autograd.grad(losses[i], list(params.values()), retain_graph=True) for i in range(4)]
    expected = {name: torch.stack([row[k] for row in rows]) for k, name in enumerate(params)}
    with GradientCapture(model) as capture:
        torch.manual_seed(7)
        got = capture_batch(capture, model, sequence_loss, x).per_sample_gradients()
    for name in ("embeddings.cls_token", "embeddings.position_embeddings", "embeddings.projection.weight"):
        assert R.relative_error(got[name], expected[name]) < 1e-10, name
    assert (expected["embeddings.position_embeddings"] == 0).any(), "dropout must have acted for this check"


class ValueBranching(nn.Module):
    """A forward that branches on a value (``.item()``): vmap cannot trace it; the batched route can."""

    def __init__(self, d: int):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, d))
        self.inner = nn.Linear(d, d)  # a hooked child: its hooks must not record while the fallback re-runs it

    def forward(self, x):
        h = self.inner(x) * self.scale
        return h if float(h.detach().abs().max().item()) < 1e6 else h * 0


def test_value_dependent_forward_takes_the_batched_route_and_children_record_once():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), ValueBranching(5), nn.Tanh(), nn.Linear(5, 2)).double()
    train, val = randn(3, 4, seed=6), randn(2, 4, seed=7)
    with GradientCapture(model) as capture:
        captured = capture_batch(capture, model, sequence_loss, train)
    assert len(captured.factors["1.inner.weight"]) == 1  # one use: the re-run did not record a second call
    assert R.relative_error(inrun.grad_dots(model, sequence_loss, train, val),
                            R.reference_dots(model, sequence_loss, train, val)) < 1e-10


# -- nn.MultiheadAttention as one unit ----------------------------------------------------------------------------------
class Attend(nn.Module):
    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(4, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=batch_first)
        self.head = nn.Linear(8, 2)

    def forward(self, batch):
        x, pad = batch
        h = self.embed(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        out, _ = self.attention(h, h, h, key_padding_mask=pad)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return self.head(out)


def masked_loss(model: nn.Module, batch) -> torch.Tensor:
    out = model(batch)
    keep = (~batch[1]).unsqueeze(-1).to(out.dtype)
    return ((torch.sin(out) + out.pow(2)) * keep).reshape(out.shape[0], -1).sum(1)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_is_one_exact_unit(batch_first):
    """``out_proj.forward`` never runs inside ``nn.MultiheadAttention``: its weight is attributed with
    ``in_proj_weight`` by one fallback over the whole module (with a key padding mask, sequence-first or not)."""
    torch.manual_seed(4)
    model = Attend(batch_first).double()
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[1, 3:] = True
    train = (randn(3, 5, 4, seed=8), pad)
    val = (randn(2, 5, 4, seed=9), torch.zeros(2, 5, dtype=torch.bool))
    with GradientCapture(model) as capture:
        units = [entry for entry in capture.hooked if entry.name == "attention"]
        assert len(units) == 1 and units[0].route == "fallback"
        assert sorted(units[0].parameters.values()) == [
            "attention.in_proj_bias", "attention.in_proj_weight", "attention.out_proj.bias", "attention.out_proj.weight"]
        assert not any(entry.name == "attention.out_proj" for entry in capture.hooked)
    assert R.relative_error(inrun.grad_dots(model, masked_loss, train, val),
                            R.reference_dots(model, masked_loss, train, val)) < 1e-10


# -- calls shared by the whole batch ------------------------------------------------------------------------------------
class Positions(nn.Module):
    """nanoGPT's way: ``wpe(torch.arange(t))``, no batch dimension, broadcast-added to the token embeddings."""

    def __init__(self):
        super().__init__()
        self.wte = nn.Embedding(11, 6)
        self.wpe = nn.Embedding(8, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))))


@pytest.mark.parametrize("n, t", [(3, 6), (6, 6)])
def test_ids_without_a_batch_dimension_are_per_sample(n, t):
    """With t == n the call cannot be told from a per-sample lookup by shape: the one-sample probe of the checks
    (on by default) tells it."""
    torch.manual_seed(5)
    model = Positions().double()
    g = torch.Generator().manual_seed(10)
    train, val = torch.randint(0, 11, (n, t), generator=g), torch.randint(0, 11, (2, t), generator=g)
    expected = R.reference_dots(model, sequence_loss, train, val)
    assert R.relative_error(inrun.grad_dots(model, sequence_loss, train, val), expected) < 1e-10


class RelativeBias(nn.Module):
    """T5's relative attention bias: an embedding over [query, key] buckets (no batch dimension), permuted to
    ``[1, heads, q, k]`` and added to every sample's attention scores."""

    def __init__(self, heads: int = 2, d: int = 6):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.bias = nn.Embedding(7, heads)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        buckets = (torch.arange(t)[None, :] - torch.arange(t)[:, None]).clamp(-3, 3) + 3
        position_bias = self.bias(buckets).permute(2, 0, 1).unsqueeze(0)
        scores = q @ k.transpose(-1, -2) + position_bias
        mixed = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, t, d)
        return self.out(mixed)


class BiasModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 6)
        self.attention = RelativeBias()
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.attention(self.embed(x)))


def test_relative_position_bias_without_a_batch_dimension():
    torch.manual_seed(6)
    model = BiasModel().double()
    train, val = randn(3, 5, 4, seed=11), randn(2, 5, 4, seed=12)
    # without the checks' probe: a clear error that shows the shapes and both possible causes
    with pytest.raises(BatchMismatchError, match=re.escape("'attention.bias' saw 5 samples but there are 3 losses")) \
            as info:
        inrun.grad_norms(model, sequence_loss, train, check=False)
    assert "input [5, 5], output [5, 5, 2]" in str(info.value) and "broadcast" in str(info.value)
    # with them (the default): attributed by the fallback at the attention module, exact
    expected = R.reference_dots(model, sequence_loss, train, val)
    assert R.relative_error(inrun.grad_dots(model, sequence_loss, train, val), expected) < 1e-10
    with GradientCapture(model) as capture:
        inrun.engine.checks.probe_shapes(capture, model, sequence_loss, train, 3)
        assert any("attention.bias.weight" in line for line in capture.coverage.fallback)
        assert capture.coverage.fraction == 1.0


# -- a registered handler takes precedence over the fallback (the README's worked example) ---------------------------
class ScaledLinear(nn.Linear):
    """``y = scale * (x W^T + b)``: a subclass, so the dedicated Linear handler does not apply to it."""

    def __init__(self, d_in: int, d_out: int, scale: float):
        super().__init__(d_in, d_out)
        self.scale = scale

    def forward(self, x):
        return self.scale * super().forward(x)


class ScaledLinearHandler:
    parameter_names = ("weight", "bias")

    def check(self, module):
        return None

    def factors(self, module, inputs, grad_output):
        from inrun.engine.factors import DenseSide, FlatFactor, OuterFactor
        from inrun.engine.layers.registry import sample_major

        a = sample_major(inputs)
        b = sample_major(grad_output) * module.scale
        found = {"weight": OuterFactor(DenseSide(b), DenseSide(a))}
        if module.bias is not None:
            found["bias"] = FlatFactor(b.sum(1))
        return found


def test_a_registered_handler_replaces_the_fallback():
    from inrun.engine.layers.registry import _BY_TYPE

    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), ScaledLinear(5, 3, 0.5)).double()
    train, val = randn(3, 6, 4, seed=13), randn(2, 6, 4, seed=14)
    before = inrun.check_model(model, sequence_loss, train, print_table=False)
    assert {r.parameter: r.route for r in before.rows}["2.weight"] == "fallback" and before.fallback_numel == 18
    inrun.register_layer(ScaledLinear, ScaledLinearHandler())
    try:
        check = inrun.check_model(model, sequence_loss, train, print_table=False)
        assert check.ok and {r.parameter: r.route for r in check.rows}["2.weight"] in ("ghost", "materialised")
        assert check.fallback_numel == 0 and "0 of 43 parameter elements through the fallback" in str(check)
        assert R.relative_error(inrun.grad_dots(model, sequence_loss, train, val),
                                R.reference_dots(model, sequence_loss, train, val)) < 1e-10
    finally:
        del _BY_TYPE[ScaledLinear]


def test_fallback_with_gradient_accumulation():
    """Two micro-batches collected at once: the fallback's per-sample gradients are joined along the samples."""
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(4, 6), NanoLayerNorm(6, bias=True), nn.Linear(6, 2)).double()
    with torch.no_grad():
        model[1].weight.add_(0.3 * torch.randn(6))
    x = randn(8, 3, 4, seed=15)
    with GradientCapture(model) as capture:
        for part in (x[:4], x[4:]):
            capture.batch_size = 4
            sequence_loss(model, part).sum().backward()
        got = capture.collect(num_samples=8).per_sample_gradients()
    expected = R.per_sample_grads(model, sequence_loss, x)
    for name in expected:
        assert R.relative_error(got[name], expected[name]) < 1e-12, name
