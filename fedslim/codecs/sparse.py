"""Positions of the nonzero elements of a flat tensor: a bitmap or delta-coded varint indices.

* **bitmap**: one bit per element, element ``i`` at bit ``i % 8`` of byte ``i // 8`` (LSB-first),
  ``ceil(numel / 8)`` bytes.
* **varint deltas**: for sorted nonzero indices ``i_0 < i_1 < ...`` the gaps ``g_j = i_j - i_{j-1} - 1``
  (with ``i_{-1} = -1``, so a gap counts the zeros skipped) as unsigned LEB128 varints: 7 value bits a
  byte, least significant group first, high bit set on every byte but the last of a number. A gap takes
  ``max(1, ceil(bit_length(g) / 7))`` bytes. The decoder knows the count, so no length field is needed.

Both are vectorised: no Python loop runs over elements.
"""

from __future__ import annotations

import numpy as np


def bitmap_size(numel: int) -> int:
    return (numel + 7) // 8


def encode_bitmap(mask: np.ndarray) -> bytes:
    return np.packbits(mask.reshape(-1).astype(bool), bitorder="little").tobytes()


def decode_bitmap(buf: bytes | memoryview, numel: int) -> np.ndarray:
    """The ``bool`` mask of ``numel`` elements stored in the first ``bitmap_size(numel)`` bytes."""
    raw = np.frombuffer(buf, dtype=np.uint8, count=bitmap_size(numel))
    return np.unpackbits(raw, count=numel, bitorder="little").astype(bool)


def gaps_of(indices: np.ndarray) -> np.ndarray:
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size == 0:
        return np.zeros(0, np.uint64)
    return (np.diff(idx, prepend=-1) - 1).astype(np.uint64)


def _varint_lengths(values: np.ndarray) -> np.ndarray:
    n = np.ones(values.shape, dtype=np.int64)
    top = int(values.max()) if values.size else 0
    k = 1
    while k < 10 and top >= 1 << (7 * k):  # 64-bit values need at most 10 groups of 7 bits
        n += values >= np.uint64(1 << (7 * k))
        k += 1
    return n


def varint_size(indices: np.ndarray) -> int:
    """Bytes :func:`encode_varint_indices` produces for these sorted indices."""
    return int(_varint_lengths(gaps_of(indices)).sum())


def encode_varint_indices(indices: np.ndarray) -> bytes:
    gaps = gaps_of(indices)
    if gaps.size == 0:
        return b""
    lens = _varint_lengths(gaps)
    starts = np.cumsum(lens) - lens
    owner = np.repeat(np.arange(gaps.size), lens)
    j = np.arange(int(lens.sum())) - starts[owner]  # which 7-bit group of its number each byte holds
    groups = (gaps[owner] >> (np.uint64(7) * j.astype(np.uint64))) & np.uint64(0x7F)
    more = (j < lens[owner] - 1).astype(np.uint64) << np.uint64(7)
    return (groups | more).astype(np.uint8).tobytes()


def decode_varint_indices(buf: bytes | memoryview, count: int) -> tuple[np.ndarray, int]:
    """The first ``count`` indices stored in ``buf`` and how many bytes they took."""
    if count == 0:
        return np.zeros(0, np.int64), 0
    raw = np.frombuffer(buf, dtype=np.uint8)
    ends = np.flatnonzero(raw < 0x80)
    if ends.size < count:
        raise ValueError(f"truncated varint index list: {ends.size} of {count} numbers present")
    used = int(ends[count - 1]) + 1
    raw = raw[:used]
    is_end = raw < 0x80
    owner = np.cumsum(is_end) - is_end  # number of completed varints before each byte
    starts = np.concatenate([[0], ends[:count - 1] + 1])
    j = np.arange(used) - starts[owner]
    # Gaps are < 2**32 (u32 shapes), so float64 weights add them up exactly.
    part = (raw & 0x7F).astype(np.float64) * np.exp2(7.0 * j)
    gaps = np.bincount(owner, weights=part, minlength=count).astype(np.int64)
    return np.cumsum(gaps + 1) - 1, used
