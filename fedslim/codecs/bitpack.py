"""Bit packing of unsigned n-bit integer codes (n = 1..16) into bytes, vectorised with numpy.

Layout: code ``i`` occupies stream bits ``i*n .. i*n + n - 1``, least significant bit first, and stream
bit ``b`` is bit ``b % 8`` of byte ``b // 8`` (LSB-first, i.e. ``np.packbits(..., bitorder="little")``).
The last byte is zero-padded, so ``count`` codes take exactly ``ceil(count * n / 8)`` bytes. With this
order 8-bit codes are plain ``uint8`` and 16-bit codes plain little-endian ``uint16``, which are the
fast paths; widths dividing 8 are OR-ed into bytes with shifts; other widths go through bit planes.
"""

from __future__ import annotations

import numpy as np


def packed_size(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """``codes`` (any integer dtype, values in ``[0, 2**bits)``) -> ``packed_size(len, bits)`` bytes."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be between 1 and 16 (got {bits})")
    c = np.ascontiguousarray(codes).reshape(-1)
    if c.size == 0:
        return b""
    if bits == 8:
        return c.astype(np.uint8).tobytes()
    if bits == 16:
        return c.astype("<u2").tobytes()
    if 8 % bits == 0:
        per = 8 // bits
        pad = (-c.size) % per
        c8 = c.astype(np.uint8)
        if pad:
            c8 = np.concatenate([c8, np.zeros(pad, np.uint8)])
        c8 = c8.reshape(-1, per) << (np.arange(per, dtype=np.uint8) * bits)
        return np.bitwise_or.reduce(c8, axis=1).astype(np.uint8).tobytes()
    planes = (c.astype(np.uint32)[:, None] >> np.arange(bits, dtype=np.uint32)) & 1
    return np.packbits(planes.astype(np.uint8).reshape(-1), bitorder="little").tobytes()


def unpack_codes(buf: bytes | memoryview, count: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: the first ``count`` codes of ``buf`` as ``int64``."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be between 1 and 16 (got {bits})")
    nbytes = packed_size(count, bits)
    raw = np.frombuffer(buf, dtype=np.uint8, count=nbytes)
    if count == 0:
        return np.zeros(0, np.int64)
    if bits == 8:
        return raw.astype(np.int64)
    if bits == 16:
        return raw.view("<u2").astype(np.int64)
    if 8 % bits == 0:
        per = 8 // bits
        shifts = np.arange(per, dtype=np.uint8) * bits
        c = (raw[:, None] >> shifts) & np.uint8((1 << bits) - 1)
        return c.reshape(-1)[:count].astype(np.int64)
    planes = np.unpackbits(raw, count=count * bits, bitorder="little").reshape(count, bits)
    return planes.astype(np.int64) @ (np.int64(1) << np.arange(bits, dtype=np.int64))
