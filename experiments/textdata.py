"""A small multi-source text corpus built only from text that ships with CPython, plus its datasets.

Sources (their ids are their positions in ``SOURCE_NAMES``):

* ``docs``      - the reference documentation topics in ``pydoc_data.topics`` (one document per topic);
* ``code``      - the standard library's own public ``.py`` files (one document per file);
* ``licence``   - Python's ``LICENSE.txt`` (one document);
* ``corrupted`` - docs windows whose characters are shuffled (or replaced by random characters), so they
  look like text but teach nothing about the validation data. This is the source attribution should rank last.

Tokenizer: byte level. A token is one byte of the UTF-8 encoding, so the vocabulary is exactly 256 and any
text round-trips. Byte 0 (NUL) is used as the padding id; it is removed from the source texts, so it never
appears as a real token.

Each document is cut into non-overlapping windows of ``seq_len + 1`` tokens (inputs and next-token targets);
windows never cross a document boundary, so each document's last window is shorter and gets padded.
"""

from __future__ import annotations

import builtins
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch.utils.data import Dataset

VOCAB_SIZE = 256
PAD_ID = 0
IGNORE_INDEX = -100
SOURCE_NAMES: tuple[str, ...] = ("docs", "code", "licence", "corrupted")
VAL_SOURCES: tuple[str, ...] = ("docs", "code")
DEFAULT_SAMPLES_PER_SOURCE: dict[str, int] = {"docs": 300, "code": 300, "licence": 100, "corrupted": 300}
MIN_LICENCE_CHARS = 1000

# ----------------------------------------------------------------------------------------------------------
# Tokenizer


def encode(text: str) -> torch.Tensor:
    """Text -> LongTensor of UTF-8 bytes (one token per byte, values 0..255)."""
    data = text.encode("utf-8")
    if not data:
        return torch.zeros(0, dtype=torch.long)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def decode(ids: torch.Tensor | Sequence[int]) -> str:
    """Token ids -> text; padding is dropped and invalid UTF-8 (e.g. a cut multi-byte char) becomes U+FFFD."""
    values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    return bytes(v for v in values if 0 < v < VOCAB_SIZE).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------------------------------------
# Raw sources: lists of documents


def _clean(text: str) -> str:
    """Remove NUL characters, whose byte is reserved for padding."""
    return text.replace("\x00", "")


def docs_documents() -> list[str]:
    """The documentation topics shipped in ``pydoc_data`` (sorted by topic name)."""
    try:
        from pydoc_data.topics import topics
    except ImportError as err:  # some distributions strip it
        raise RuntimeError("this Python has no pydoc_data.topics; the 'docs' source needs it") from err
    return [_clean(topics[name]) for name in sorted(topics)]


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def code_documents(max_chars: int = 400_000, per_file_chars: int = 8_000) -> list[str]:
    """The first ``per_file_chars`` characters of each public stdlib module, in name order, up to ``max_chars``.

    Only top-level files whose names do not start with ``_`` are used: that skips machine-generated files such
    as ``_sysconfigdata_*.py``. The per-file cap spreads the budget over many modules instead of a few big ones.
    """
    documents: list[str] = []
    remaining = max_chars
    for path in sorted(_stdlib_dir().glob("*.py")):
        if remaining <= 0:
            break
        if path.name.startswith("_"):
            continue
        text = _clean(path.read_text(encoding="utf-8", errors="replace"))[: min(per_file_chars, remaining)]
        if text:
            documents.append(text)
            remaining -= len(text)
    if not documents:
        raise RuntimeError(f"no standard-library .py files found in {_stdlib_dir()}")
    return documents


def _licence_files() -> list[Path]:
    """Where CPython's own ``site`` module looks for the licence file (see ``builtins.license``)."""
    dirs = [_stdlib_dir(), Path(os.__file__).resolve().parent, Path(sys.base_prefix), Path(sys.prefix)]
    dirs += [d.parent for d in dirs[:2]]
    return [d / name for d in dict.fromkeys(dirs) for name in ("LICENSE.txt", "LICENSE")]


def _printer_text(printer: object) -> str:
    """The full text behind ``builtins.license`` (a ``_sitebuiltins._Printer``), or '' if unavailable."""
    try:
        printer._Printer__setup()  # type: ignore[attr-defined]  # private, hence the broad fallback
        return "\n".join(printer._Printer__lines)  # type: ignore[attr-defined]
    except Exception:
        return ""


def licence_documents() -> list[str]:
    """Python's licence text: ``LICENSE.txt`` next to the stdlib, else the text behind ``builtins.license``."""
    for path in _licence_files():
        if path.is_file():
            text = _clean(path.read_text(encoding="utf-8", errors="replace"))
            if len(text) >= MIN_LICENCE_CHARS:
                return [text]
    text = _clean(_printer_text(getattr(builtins, "license", None)))
    if len(text) >= MIN_LICENCE_CHARS:
        return [text]
    searched = ", ".join(str(p) for p in _licence_files())
    raise FileNotFoundError(
        f"no Python licence text of at least {MIN_LICENCE_CHARS} characters found (searched {searched} "
        "and builtins.license); this Python build does not ship it, so the 'licence' source is unavailable"
    )


# ----------------------------------------------------------------------------------------------------------
# Windows


@dataclass
class Windows:
    """Token windows of one source: ``tokens [m, seq_len + 1]`` padded with ``PAD_ID``, ``lengths [m]`` real tokens."""

    tokens: torch.Tensor
    lengths: torch.Tensor

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def padded(self) -> torch.Tensor:
        """Bool mask of the windows that end in padding."""
        return self.lengths < self.tokens.shape[1]

    def select(self, rows: torch.Tensor) -> "Windows":
        return Windows(self.tokens[rows], self.lengths[rows])


def _document_windows(ids: torch.Tensor, width: int) -> Windows:
    """Cut one document into non-overlapping windows of ``width`` tokens, padding the last one.

    A trailing piece of fewer than 2 tokens is dropped: it would have no next-token target.
    """
    n_windows = -(-len(ids) // width)
    tokens = torch.full((n_windows * width,), PAD_ID, dtype=torch.long)
    tokens[: len(ids)] = ids
    lengths = (len(ids) - torch.arange(n_windows) * width).clamp(max=width)
    keep = lengths >= 2
    return Windows(tokens.view(n_windows, width)[keep], lengths[keep])


def _drop_duplicates(windows: Windows, seen: set[bytes]) -> Windows:
    """Keep only windows whose content is not in ``seen`` (which is updated), so no text occurs twice."""
    keep = []
    for row, (tokens, length) in enumerate(zip(windows.tokens, windows.lengths.tolist())):
        key = bytes(tokens[:length].tolist())
        if key not in seen:
            seen.add(key)
            keep.append(row)
    return windows.select(torch.tensor(keep, dtype=torch.long))


def cut_windows(documents: Sequence[str], seq_len: int, seen: set[bytes] | None = None) -> Windows:
    """All windows of ``seq_len + 1`` tokens of ``documents``, without duplicates (also of ``seen``)."""
    width = seq_len + 1
    parts = [_document_windows(encode(doc), width) for doc in documents if doc]
    windows = Windows(torch.cat([p.tokens for p in parts]), torch.cat([p.lengths for p in parts]))
    return _drop_duplicates(windows, set() if seen is None else seen)


def corrupt_windows(windows: Windows, generator: torch.Generator, mode: str = "shuffle") -> Windows:
    """Deterministic garbage made from ``windows``; padding stays where it was.

    ``mode="shuffle"`` permutes the real tokens inside each window (same characters, no structure);
    ``mode="random"`` replaces them by random printable ASCII characters. In shuffle mode a window that
    comes out unchanged (e.g. one repeated character) is replaced by random characters instead.
    """
    real = torch.arange(windows.tokens.shape[1]) < windows.lengths[:, None]
    noise = torch.randint(32, 127, windows.tokens.shape, generator=generator)
    if mode == "random":
        tokens = torch.where(real, noise, windows.tokens)
    elif mode == "shuffle":
        keys = torch.rand(windows.tokens.shape, generator=generator).masked_fill(~real, 2.0)
        tokens = windows.tokens.gather(1, keys.argsort(dim=1))
        unchanged = (tokens == windows.tokens).all(dim=1, keepdim=True)
        tokens = torch.where(unchanged & real, noise, tokens)
    else:
        raise ValueError(f"unknown corruption mode {mode!r}; use 'shuffle' or 'random'")
    return Windows(tokens, windows.lengths.clone())


# ----------------------------------------------------------------------------------------------------------
# Dataset


class TextSamples(Dataset):
    """Next-token samples. Item ``i`` is ``{"input_ids": LongTensor[T], "labels": LongTensor[T], "index": i,
    "source": source id}``; ``labels`` is -100 where the target would be padding."""

    def __init__(self, parts: Sequence[tuple[int, Windows]], source_names: Sequence[str]) -> None:
        tokens = torch.cat([w.tokens for _, w in parts])
        self.lengths = torch.cat([w.lengths for _, w in parts])
        self.source = torch.cat([torch.full((len(w),), sid, dtype=torch.long) for sid, w in parts])
        self.source_names = list(source_names)
        seq_len = tokens.shape[1] - 1
        self.input_ids = tokens[:, :-1].clone()
        has_target = torch.arange(1, seq_len + 1) < self.lengths[:, None]
        self.labels = tokens[:, 1:].masked_fill(~has_target, IGNORE_INDEX)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict:
        return {
            "input_ids": self.input_ids[index],
            "labels": self.labels[index],
            "index": int(index),
            "source": int(self.source[index]),
        }

    def source_counts(self) -> dict[str, int]:
        """How many samples each source has."""
        counts = torch.bincount(self.source, minlength=len(self.source_names)).tolist()
        return dict(zip(self.source_names, counts))


def collate_samples(items: Sequence[Mapping]) -> dict[str, torch.Tensor]:
    """Stack ``TextSamples`` items into a batch dict; ``index`` and ``source`` become LongTensors."""
    return {
        "input_ids": torch.stack([item["input_ids"] for item in items]),
        "labels": torch.stack([item["labels"] for item in items]),
        "index": torch.tensor([int(item["index"]) for item in items], dtype=torch.long),
        "source": torch.tensor([int(item["source"]) for item in items], dtype=torch.long),
    }


# ----------------------------------------------------------------------------------------------------------
# Building the splits


@dataclass
class CorpusSplits:
    """Train set (all sources), validation set (clean docs + code, disjoint from train), and bookkeeping."""

    train: TextSamples
    val: TextSamples
    source_names: list[str]
    available_windows: dict[str, int]


def _take(order: torch.Tensor, count: int, padded: torch.Tensor, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``order`` into its first ``count`` rows and the rest, making sure a padded row is among the first.

    Guaranteeing one padded row (when there is one to take) keeps the padding path exercised in every build.
    """
    if count > len(order):
        raise ValueError(f"source {source!r} has only {len(order)} windows left, {count} requested")
    chosen, rest = order[:count].clone(), order[count:].clone()
    if count > 0 and not padded[chosen].any() and padded[rest].any():
        swap = int(torch.nonzero(padded[rest])[0])
        chosen[-1], rest[swap] = rest[swap].clone(), chosen[-1].clone()
    return chosen, rest


def _split_counts(total: int, names: Sequence[str]) -> dict[str, int]:
    """Spread ``total`` as evenly as possible over ``names`` (earlier names get the remainder)."""
    return {name: total // len(names) + (i < total % len(names)) for i, name in enumerate(names)}


def _load_windows(seq_len: int, code_chars: int, wanted: Mapping[str, int]) -> dict[str, Windows]:
    """Windows of each clean source that is needed (licence only if asked for), deduplicated across sources."""
    loaders = {"docs": docs_documents, "code": lambda: code_documents(code_chars), "licence": licence_documents}
    seen: set[bytes] = set()
    return {
        name: cut_windows(loader(), seq_len, seen)
        for name, loader in loaders.items()
        if name != "licence" or wanted.get("licence", 0) > 0
    }


def build_corpus(
    seq_len: int = 64,
    samples_per_source: Mapping[str, int] | None = None,
    val_samples: int = 32,
    seed: int = 0,
    code_chars: int = 400_000,
    corruption: str = "shuffle",
) -> CorpusSplits:
    """Build the train and validation sets, deterministically for ``seed``.

    Each clean source's windows are put in a seeded random order; validation takes the first windows of docs
    and code, train the next ones, and the corrupted source is made from docs windows used by neither.
    Train samples are grouped by source in ``SOURCE_NAMES`` order; their ``index`` is 0..N-1.
    Source ids are fixed (``SOURCE_NAMES``) even if a source gets 0 samples, so runs stay comparable.
    """
    wanted = dict(DEFAULT_SAMPLES_PER_SOURCE if samples_per_source is None else samples_per_source)
    unknown = set(wanted) - set(SOURCE_NAMES)
    if unknown:
        raise ValueError(f"unknown sources {sorted(unknown)}; known: {list(SOURCE_NAMES)}")
    windows = _load_windows(seq_len, code_chars, wanted)
    generator = torch.Generator().manual_seed(seed)
    orders = {name: torch.randperm(len(w), generator=generator) for name, w in windows.items()}

    val_counts = _split_counts(val_samples, VAL_SOURCES)
    val_parts, train_selected, leftovers = [], {}, {}
    for name, w in windows.items():
        val_rows, rest = _take(orders[name], val_counts.get(name, 0), w.padded, name)
        train_selected[name], leftovers[name] = _take(rest, wanted.get(name, 0), w.padded, name)
        if name in VAL_SOURCES:
            val_parts.append((SOURCE_NAMES.index(name), w.select(val_rows)))

    corrupted_rows, _ = _take(leftovers["docs"], wanted.get("corrupted", 0), windows["docs"].padded, "docs")
    train_windows = {name: windows[name].select(rows) for name, rows in train_selected.items()}
    train_windows["corrupted"] = corrupt_windows(windows["docs"].select(corrupted_rows), generator, corruption)

    train_parts = [(sid, train_windows[name]) for sid, name in enumerate(SOURCE_NAMES) if name in train_windows]
    return CorpusSplits(
        train=TextSamples(train_parts, SOURCE_NAMES),
        val=TextSamples(val_parts, SOURCE_NAMES),
        source_names=list(SOURCE_NAMES),
        available_windows={name: len(w) for name, w in windows.items()},
    )
