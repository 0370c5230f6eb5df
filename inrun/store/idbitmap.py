"""Bitmaps of sample ids: bit ``id - lo`` set for every id that occurs (the reader's id index, and the copy of it
that the close-time compression stores next to the records so that reading a finished run skips the id pass).

A bitmap is kept while the id range is at most ``max_range`` ids and at most ``ids_per_row`` ids per record (else
ids are too sparse for it: hashed document ids); ``lo`` is a multiple of 64, so that the bitmaps of several rank
files line up word by word.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

STORED_GROUP = "index"  # the stored bitmap: index/sample_id_bits (uint64 words), attrs lo, steps, rows
STORED_NAME = "sample_id_bits"
BITMAP_IDS_PER_ROW = 32  # at most this many ids of range per record (6 bytes per row): else sorted ids


class BitmapBuilder:
    """Sets the bits of streamed blocks of ids; ``words`` is None once the range outgrew the limit."""

    def __init__(self, max_range: int):
        self.max_range = max_range
        self.lo = 0
        self.words: np.ndarray | None = np.zeros(0, np.uint64)
        self.gave_up = False

    def add(self, ids: np.ndarray) -> bool:
        """Set the bits of ``ids``; False (and the bitmap dropped) when the range outgrows ``max_range``."""
        if self.gave_up:
            return False
        if not ids.size:
            return True
        low, high = int(ids.min()), int(ids.max())
        words = self.words
        if not words.size:
            self.lo = low - low % 64
        lo = self.lo
        if low < lo or high >= lo + 64 * words.size:  # widen the bitmap, in whole words
            below = -(-(lo - low) // 64) if low < lo else 0
            above = max(0, -(-(high - lo + 1) // 64) - words.size)
            if 64 * (words.size + below + above) > self.max_range:
                self.words, self.gave_up = None, True
                return False
            words = np.concatenate([np.zeros(below, np.uint64), words, np.zeros(above, np.uint64)])
            self.lo = lo = lo - 64 * below
            self.words = words
        offsets = ids.astype(np.int64, copy=False) - lo
        set_bits(words, offsets.astype(np.uint32) if 64 * words.size <= 2**32 else offsets.view(np.uint64))
        return True


def bitmap_limit(rows: int, max_ids: int) -> int:
    """The largest id range a bitmap may cover for ``rows`` records."""
    return min(max_ids, BITMAP_IDS_PER_ROW * rows + (1 << 16))


def bitmap_of(blocks: Iterable[np.ndarray], rows: int, max_ids: int) -> tuple[int, np.ndarray] | None:
    """``(lo, words)`` of the ids in ``blocks`` (``rows`` ids in all), or None when too sparse for a bitmap."""
    builder = BitmapBuilder(bitmap_limit(rows, max_ids))
    for ids in blocks:
        if not builder.add(ids):
            return None
    return builder.lo, builder.words


def set_bits(words: np.ndarray, offsets: np.ndarray) -> None:
    """Set bit ``offset`` (bit j of word w is offset 64 w + j) for every offset; repeats within a word are ORed
    together first (a sorted block, one OR-reduction per word; 32-bit offsets sort about twice as fast)."""
    offsets = np.sort(offsets)
    word = offsets >> offsets.dtype.type(6)
    starts = np.flatnonzero(np.r_[True, word[1:] != word[:-1]])
    bits = np.left_shift(np.uint64(1), (offsets & offsets.dtype.type(63)).astype(np.uint64))
    words[word[starts].astype(np.intp)] |= np.bitwise_or.reduceat(bits, starts)


def merge_bitmaps(parts: list[tuple[int, np.ndarray]]) -> tuple[int, np.ndarray]:
    """One bitmap of the union of several (each ``lo`` a multiple of 64)."""
    parts = [(lo, words) for lo, words in parts if words.size]
    if not parts:
        return 0, np.zeros(0, np.uint64)
    if len(parts) == 1:
        return parts[0]
    lo = min(p[0] for p in parts)
    end = max(p[0] + 64 * p[1].size for p in parts)
    words = np.zeros((end - lo) // 64, np.uint64)
    for part_lo, part in parts:
        first = (part_lo - lo) // 64
        words[first:first + part.size] |= part
    return lo, words
