"""Checks of TinyGPT: weight tying, per-sample loss, causality, learning, and Lightning training."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from experiments.tinygpt import TinyGPT, TinyGPTConfig, TinyGPTModule, per_sample_lm_loss

CONFIG = TinyGPTConfig(seq_len=16, n_layer=2, n_head=4, d_model=32)


def _batch(n: int = 6, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, CONFIG.vocab_size, (n, CONFIG.seq_len), generator=g)
    labels = torch.randint(0, CONFIG.vocab_size, (n, CONFIG.seq_len), generator=g)
    labels[1, 10:] = -100  # a padded sample
    labels[2, :] = -100  # a sample with nothing to predict
    return {"input_ids": input_ids, "labels": labels, "index": torch.arange(n), "source": torch.zeros(n, dtype=torch.long)}


def test_tied_weights_are_one_parameter():
    tied = TinyGPT(CONFIG)
    assert tied.lm_head.weight is tied.tok_emb.weight
    untied = TinyGPT(TinyGPTConfig(seq_len=16, d_model=32, tie_weights=False))
    assert untied.lm_head.weight is not untied.tok_emb.weight


def test_only_supported_layers_own_parameters():
    for module in TinyGPT(CONFIG).modules():
        if any(True for _ in module.parameters(recurse=False)):
            assert isinstance(module, (nn.Linear, nn.Embedding, nn.LayerNorm)), type(module)


def test_init_is_deterministic_for_a_seed():
    a, b, c = TinyGPT(CONFIG, seed=3), TinyGPT(CONFIG, seed=3), TinyGPT(CONFIG, seed=4)
    for (_, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(pa, pb)
    assert not torch.equal(a.tok_emb.weight, c.tok_emb.weight)


def test_forward_shape():
    batch = _batch()
    logits = TinyGPT(CONFIG)(batch["input_ids"])
    assert logits.shape == (6, CONFIG.seq_len, CONFIG.vocab_size)


def test_per_sample_loss_matches_explicit_loop():
    batch = _batch()
    logits = torch.randn(6, CONFIG.seq_len, CONFIG.vocab_size, dtype=torch.float64)
    expected = []
    for i in range(6):
        keep = batch["labels"][i] != -100
        if keep.any():
            expected.append(F.cross_entropy(logits[i][keep], batch["labels"][i][keep]))
        else:
            expected.append(torch.tensor(0.0, dtype=torch.float64))
    got = per_sample_lm_loss(logits, batch["labels"])
    assert got.shape == (6,)
    torch.testing.assert_close(got.double(), torch.stack(expected), rtol=1e-5, atol=1e-6)
    assert got[2] == 0


def test_causal_future_tokens_do_not_change_earlier_logits():
    model = TinyGPT(CONFIG).eval()
    ids = _batch()["input_ids"]
    changed = ids.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % CONFIG.vocab_size
    before, after = model(ids), model(changed)
    torch.testing.assert_close(before[:, :9], after[:, :9])
    assert not torch.allclose(before[:, 9:], after[:, 9:])


def test_sgd_steps_reduce_batch_loss():
    model = TinyGPT(CONFIG)
    batch = _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(5):
        loss = per_sample_lm_loss(model(batch["input_ids"]), batch["labels"]).mean()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0]


class _DictDataset(TensorDataset):
    def __getitem__(self, i):
        ids, labels = super().__getitem__(i)
        return {"input_ids": ids, "labels": labels, "index": i, "source": 0}


@pytest.mark.parametrize("optimizer,schedule", [("sgd", "constant"), ("adamw", "cosine")])
def test_lightning_module_trains(optimizer, schedule):
    batch = _batch(n=8)
    data = DataLoader(_DictDataset(batch["input_ids"], batch["labels"]), batch_size=4)
    module = TinyGPTModule(CONFIG, optimizer=optimizer, lr=0.05, schedule=schedule, warmup_steps=1)
    before = module.per_sample_loss(batch).detach()
    assert before.shape == (8,)
    trainer = L.Trainer(
        max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data, data)  # also runs validation_step once
    assert trainer.global_step == 3
    assert {"train_loss", "val_loss"} <= set(trainer.callback_metrics)
    after = module.per_sample_loss(batch).detach()
    assert after.mean() < before.mean()
