"""Bit packing, bitmaps and varint indices against plain-Python reference encoders."""

from __future__ import annotations

import numpy as np
import pytest

from fedslim.codecs.bitpack import pack_codes, packed_size, unpack_codes
from fedslim.codecs.sparse import (
    bitmap_size,
    decode_bitmap,
    decode_varint_indices,
    encode_bitmap,
    encode_varint_indices,
    varint_size,
)


def ref_pack(codes: list[int], bits: int) -> bytes:
    """LSB-first bit stream, one big integer: the definition in bitpack.py's docstring."""
    acc = 0
    for i, c in enumerate(codes):
        acc |= int(c) << (i * bits)
    return acc.to_bytes((len(codes) * bits + 7) // 8, "little")


def ref_varint(indices: list[int]) -> bytes:
    out, prev = bytearray(), -1
    for i in indices:
        g, prev = i - prev - 1, i
        while True:
            b, g = g & 0x7F, g >> 7
            out.append(b | (0x80 if g else 0))
            if not g:
                break
    return bytes(out)


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 33, 1000])
def test_pack_matches_reference_and_round_trips(bits: int, count: int) -> None:
    rng = np.random.default_rng(bits * 1000 + count)
    codes = rng.integers(0, 1 << bits, size=count)
    if count:
        codes[0], codes[-1] = (1 << bits) - 1, 0  # extreme codes at both ends of the stream
    buf = pack_codes(codes, bits)
    assert len(buf) == packed_size(count, bits) == (count * bits + 7) // 8
    assert buf == ref_pack(codes.tolist(), bits)
    # Trailing bytes after the packed codes must not be read.
    back = unpack_codes(buf + b"\xff\xff", count, bits)
    np.testing.assert_array_equal(back, codes)


def test_pack_rejects_bad_width() -> None:
    with pytest.raises(ValueError, match="between 1 and 16"):
        pack_codes(np.zeros(3, np.int64), 17)


@pytest.mark.parametrize("numel", [0, 1, 8, 13, 1001])
def test_bitmap_round_trip(numel: int) -> None:
    mask = np.random.default_rng(numel).random(numel) < 0.3
    buf = encode_bitmap(mask)
    assert len(buf) == bitmap_size(numel) == (numel + 7) // 8
    bits = [(buf[i // 8] >> (i % 8)) & 1 for i in range(numel)]
    assert bits == mask.astype(int).tolist()
    np.testing.assert_array_equal(decode_bitmap(buf, numel), mask)


@pytest.mark.parametrize("indices", [
    [],
    [0],
    [5],
    [0, 1, 2, 3],
    [127, 128 + 127 + 1, 20000, 20001, 3_000_000, 2**32 - 2],  # 1-, 2-, 3-, 4- and 5-byte gaps
])
def test_varint_matches_reference(indices: list[int]) -> None:
    idx = np.array(indices, dtype=np.int64)
    buf = encode_varint_indices(idx)
    assert buf == ref_varint(indices)
    assert varint_size(idx) == len(buf)
    back, used = decode_varint_indices(buf + b"\x05\x80", len(indices))
    assert used == len(buf)
    np.testing.assert_array_equal(back, idx)


def test_varint_random_sparse_round_trip() -> None:
    rng = np.random.default_rng(1)
    idx = np.flatnonzero(rng.random(200_000) < 0.002)
    buf = encode_varint_indices(idx)
    assert buf == ref_varint(idx.tolist())
    np.testing.assert_array_equal(decode_varint_indices(buf, idx.size)[0], idx)


def test_truncated_varint_is_an_error() -> None:
    buf = encode_varint_indices(np.array([3, 900, 70000]))
    with pytest.raises(ValueError, match="truncated"):
        decode_varint_indices(buf[:-1], 3)
