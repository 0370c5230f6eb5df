"""Checks of the CPython-text corpus: determinism, indexing, sources, held-out validation, padding, collate."""

import pytest
import torch

from experiments.textdata import (
    IGNORE_INDEX,
    PAD_ID,
    SOURCE_NAMES,
    VOCAB_SIZE,
    TextSamples,
    build_corpus,
    collate_samples,
    cut_windows,
    decode,
    docs_documents,
    encode,
)

SEQ_LEN = 64
COUNTS = {"docs": 120, "code": 100, "licence": 40, "corrupted": 80}


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(seq_len=SEQ_LEN, samples_per_source=COUNTS, val_samples=20, seed=0)


def _rows(samples: TextSamples, source: str | None = None) -> set[bytes]:
    """Each sample's full window (inputs + last target) as bytes, for content comparisons; optionally one source."""
    rows = set()
    for i in range(len(samples)):
        if source is not None and SOURCE_NAMES[int(samples.source[i])] != source:
            continue
        length = int(samples.lengths[i])
        window = torch.cat([samples.input_ids[i], samples.labels[i, -1:].clamp(min=0)])[:length]
        rows.add(bytes(window.tolist()))
    return rows


def test_encode_decode_round_trip():
    text = "héllo, wörld → ok"
    ids = encode(text)
    assert ids.dtype == torch.long and int(ids.max()) < VOCAB_SIZE
    assert decode(ids) == text


def test_same_seed_same_corpus_other_seed_differs(corpus):
    again = build_corpus(seq_len=SEQ_LEN, samples_per_source=COUNTS, val_samples=20, seed=0)
    other = build_corpus(seq_len=SEQ_LEN, samples_per_source=COUNTS, val_samples=20, seed=1)
    for name in ("input_ids", "labels", "source"):
        assert torch.equal(getattr(corpus.train, name), getattr(again.train, name))
        assert torch.equal(getattr(corpus.val, name), getattr(again.val, name))
    assert not torch.equal(corpus.train.input_ids, other.train.input_ids)


def test_indices_unique_and_dense(corpus):
    indices = [corpus.train[i]["index"] for i in range(len(corpus.train))]
    assert indices == list(range(len(corpus.train)))
    assert all(isinstance(i, int) for i in indices)


def test_sources_labelled_and_counted(corpus):
    assert corpus.source_names == list(SOURCE_NAMES)
    assert corpus.train.source_counts() == COUNTS
    assert len(corpus.train) == sum(COUNTS.values())
    # Items say which source they come from; spot-check content: licence samples read like the licence.
    licence_id = SOURCE_NAMES.index("licence")
    licence_text = "".join(
        decode(corpus.train[i]["input_ids"]) for i in range(len(corpus.train)) if corpus.train[i]["source"] == licence_id
    )
    assert "licen" in licence_text.lower()


def test_validation_is_clean_and_held_out(corpus):
    val_sources = {SOURCE_NAMES[s] for s in corpus.val.source.tolist()}
    assert val_sources == {"docs", "code"} and len(corpus.val) == 20
    assert not _rows(corpus.val) & _rows(corpus.train)


def test_corrupted_text_is_no_docs_window(corpus):
    docs_windows = cut_windows(docs_documents(), SEQ_LEN)
    docs_rows = {bytes(t[:n].tolist()) for t, n in zip(docs_windows.tokens, docs_windows.lengths.tolist())}
    corrupted_rows = _rows(corpus.train, "corrupted")
    assert len(corrupted_rows) == COUNTS["corrupted"]
    assert not corrupted_rows & docs_rows


def test_tokens_in_vocab_range(corpus):
    for samples in (corpus.train, corpus.val):
        assert samples.input_ids.dtype == torch.long
        assert 0 <= int(samples.input_ids.min()) and int(samples.input_ids.max()) < VOCAB_SIZE
        real = samples.labels[samples.labels != IGNORE_INDEX]
        assert 0 < int(real.min()) and int(real.max()) < VOCAB_SIZE


def test_padding_positions(corpus):
    train = corpus.train
    lengths = train.lengths
    padded = (lengths < SEQ_LEN + 1).nonzero().flatten()
    assert len(padded) > 0
    positions = torch.arange(SEQ_LEN)
    for i in padded.tolist():
        n_real = int(lengths[i])  # real tokens in the (seq_len + 1)-window
        assert torch.equal(train.input_ids[i] == PAD_ID, positions >= n_real)
        assert torch.equal(train.labels[i] == IGNORE_INDEX, positions >= n_real - 1)
    full = lengths == SEQ_LEN + 1
    assert not (train.labels[full] == IGNORE_INDEX).any()
    assert not (train.input_ids[full] == PAD_ID).any()


def test_collate_shapes_and_dtypes(corpus):
    items = [corpus.train[i] for i in (0, 5, len(corpus.train) - 1)]
    batch = collate_samples(items)
    assert batch["input_ids"].shape == batch["labels"].shape == (3, SEQ_LEN)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    assert batch["index"].dtype == batch["source"].dtype == torch.long
    assert batch["index"].tolist() == [0, 5, len(corpus.train) - 1]
    assert batch["source"].tolist() == [item["source"] for item in items]


def test_too_many_samples_is_a_clear_error():
    with pytest.raises(ValueError, match="licence"):
        build_corpus(samples_per_source={"licence": 100_000}, val_samples=0)
