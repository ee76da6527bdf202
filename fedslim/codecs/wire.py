"""Wire format of a pipeline payload. ``len(payload)`` is exactly :func:`payload_size` of its records.

All integers and floats are little-endian. ::

    payload := u8 version (= 1) | u32 count | record * count                        5 bytes + records
    record  := u16 name_len | name (utf-8) | u8 dtype | u8 ndim | u32 shape[ndim]     2 + len + 2 + 4*ndim
               | u8 mode | body                                                       + 1 + body

    mode    bits 0-1  positions: 0 dense, 1 bitmap, 2 varint deltas, 3 raw exact
            bits 2-3  values:    0 float32, 1 sym codes, 2 sign codes, 3 asym codes   (see grid.py)
            bit  4    one scale (and lo) per output channel, G = shape[0]; else G = 1

    body, raw exact (tensors lossy stages may not touch: BN statistics, counters, biases by default):
            numel * itemsize(dtype) bytes, the tensor's own dtype, bit-exact

    body, coded (compressible tensors):
            u8  bits                   1..16 for codes, 32 for float32 values                        1
            u32 nnz                    bitmap and varint only                                        4
            params                     sym, sign: G x f32 scale; asym: G x f32 lo, then G x f32 step  4G or 8G
            positions                  bitmap: ceil(numel / 8) bytes; varint: V bytes (sparse.py)
            values                     count = numel (dense) or nnz; codes: ceil(count * bits / 8)
                                       bytes packed LSB-first (bitpack.py); float32: 4 * count

A coded tensor goes dense, bitmap or varint, whichever is smallest (ties in that order); dense is
possible only when every element is representable, i.e. there are no zeros or the grid has a zero
code (sym) or the values are float32. Decoded values are cast back to the tensor's dtype.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch

from fedslim.codecs.base import _DTYPE_OF, _DTYPES, CodecError, from_raw, raw_bytes
from fedslim.codecs.bitpack import pack_codes, packed_size, unpack_codes
from fedslim.codecs.grid import KINDS, Grid
from fedslim.codecs.sparse import (
    bitmap_size,
    decode_bitmap,
    decode_varint_indices,
    encode_bitmap,
    encode_varint_indices,
    varint_size,
)
from fedslim.codecs.stage import Work

VERSION = 1
POSITIONS = ("dense", "bitmap", "varint", "raw")
VALUES = ("float32", *KINDS)  # index = value field of the mode byte
_PER_CHANNEL = 1 << 4


def header_size(name: str, ndim: int) -> int:
    """Bytes of a record before its body (mode byte included)."""
    return 2 + len(name.encode()) + 2 + 4 * ndim + 1


def raw_record_size(name: str, shape: tuple[int, ...], itemsize: int) -> int:
    return header_size(name, len(shape)) + int(np.prod(shape, dtype=np.int64)) * itemsize


def coded_record_size(name: str, shape: tuple[int, ...], *, positions: str, values: str, bits: int,
                      nnz: int, groups: int = 1, varint_bytes: int = 0) -> int:
    """The documented size of one coded record (``values`` in :data:`VALUES`)."""
    numel = int(np.prod(shape, dtype=np.int64))
    count = numel if positions == "dense" else nnz
    params = 0 if values == "float32" else (8 if values == "asym" else 4) * groups
    pos = {"dense": 0, "bitmap": bitmap_size(numel), "varint": varint_bytes}[positions]
    vals = 4 * count if values == "float32" else packed_size(count, bits)
    return header_size(name, len(shape)) + 1 + (0 if positions == "dense" else 4) + params + pos + vals


def payload_size(record_sizes: list[int]) -> int:
    return 5 + sum(record_sizes)


def payload_header(count: int) -> bytes:
    return struct.pack("<BI", VERSION, count)


def _head(name: str, dtype: torch.dtype, shape: tuple[int, ...], mode: int) -> bytes:
    if dtype not in _DTYPES:
        raise CodecError(f"tensor {name!r}: dtype {dtype} cannot be encoded")
    nb = name.encode()
    return (struct.pack("<H", len(nb)) + nb + struct.pack("<BB", _DTYPES[dtype], len(shape))
            + struct.pack(f"<{len(shape)}I", *shape) + bytes([mode]))


def encode_raw(name: str, t: torch.Tensor) -> bytes:
    return _head(name, t.dtype, tuple(t.shape), 3) + raw_bytes(t)


@dataclass
class Coded:
    """One encoded compressible tensor, with what the receiver will decode."""

    record: bytes
    decoded: np.ndarray  # flat float64, before the cast to the tensor's dtype
    positions: str
    values: str
    bits: int
    nnz: int
    groups: int


def encode_work(w: Work) -> Coded:
    numel, grid = w.numel, w.grid
    nz = w.values != 0
    idx = np.flatnonzero(nz)
    nnz = int(idx.size)
    bits = grid.bits if grid is not None else 32

    def vbytes(count: int) -> int:
        return packed_size(count, bits) if grid is not None else 4 * count

    options: list[tuple[int, str]] = []
    if nnz == numel or grid is None or grid.zero_code is not None:
        options.append((vbytes(numel), "dense"))
    options.append((4 + bitmap_size(numel) + vbytes(nnz), "bitmap"))
    vsize = varint_size(idx)
    options.append((4 + vsize + vbytes(nnz), "varint"))
    positions = min(options, key=lambda o: o[0])[1]  # min keeps the first of equal sizes

    vkind = "float32" if grid is None else grid.kind
    mode = POSITIONS.index(positions) | (VALUES.index(vkind) << 2)
    if grid is not None and grid.per_channel:
        mode |= _PER_CHANNEL
    parts = [_head(w.name, w.dtype, w.shape, mode), bytes([bits])]
    if positions != "dense":
        parts.append(struct.pack("<I", nnz))
    if grid is not None:
        if grid.kind == "asym":
            parts.append(grid.lo.astype("<f4").tobytes())
        parts.append(grid.scale.astype("<f4").tobytes())
    if positions == "bitmap":
        parts.append(encode_bitmap(nz))
    elif positions == "varint":
        parts.append(encode_varint_indices(idx))

    if grid is None:
        vals = (w.values if positions == "dense" else w.values[idx]).astype("<f4")
        parts.append(vals.tobytes())
        decoded = np.zeros(numel, dtype=np.float64)
        decoded[slice(None) if positions == "dense" else idx] = vals
    else:
        if positions == "dense":
            codes = np.where(nz, w.codes, grid.zero_code if grid.zero_code is not None else 0)
        else:
            codes = w.codes[idx]
        parts.append(pack_codes(codes, bits))
        # The quantizing stage computed the values with grid.dequant, as the decoder will.
        decoded = w.values.copy()
    return Coded(b"".join(parts), decoded, positions, vkind, bits, nnz, grid.groups if grid else 0)


_NP = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


def to_tensor(flat: np.ndarray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """float64 values -> a tensor of ``dtype`` (round to nearest, the same on both ends of the wire)."""
    if dtype in _NP:
        return torch.from_numpy(flat.astype(_NP[dtype])).reshape(shape)
    return torch.from_numpy(flat).to(dtype).reshape(shape)


def read_record(mv: memoryview, off: int) -> tuple[str, torch.Tensor, int]:
    (ln,) = struct.unpack_from("<H", mv, off)
    off += 2
    name = bytes(mv[off:off + ln]).decode()
    off += ln
    code, ndim = struct.unpack_from("<BB", mv, off)
    off += 2
    shape = tuple(struct.unpack_from(f"<{ndim}I", mv, off))
    off += 4 * ndim
    mode = mv[off]
    off += 1
    dtype = _DTYPE_OF[code]
    numel = int(np.prod(shape, dtype=np.int64))
    positions = POSITIONS[mode & 3]
    if positions == "raw":
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        return name, from_raw(mv[off:off + nbytes], dtype, shape), off + nbytes
    vkind = VALUES[(mode >> 2) & 3]
    per_channel = bool(mode & _PER_CHANNEL)
    bits = mv[off]
    off += 1
    nnz = numel
    if positions != "dense":
        (nnz,) = struct.unpack_from("<I", mv, off)
        off += 4
    grid = None
    if vkind != "float32":
        groups = shape[0] if per_channel else 1
        lo = None
        if vkind == "asym":
            lo = np.frombuffer(mv, dtype="<f4", count=groups, offset=off).astype(np.float32)
            off += 4 * groups
        scale = np.frombuffer(mv, dtype="<f4", count=groups, offset=off).astype(np.float32)
        off += 4 * groups
        grid = Grid(vkind, bits, per_channel, scale, lo)
    if positions == "bitmap":
        idx = np.flatnonzero(decode_bitmap(mv[off:], numel))
        off += bitmap_size(numel)
    elif positions == "varint":
        idx, used = decode_varint_indices(mv[off:], nnz)
        off += used
    else:
        idx = np.arange(numel)
    out = np.zeros(numel, dtype=np.float64)
    if grid is None:
        out[idx] = np.frombuffer(mv, dtype="<f4", count=idx.size, offset=off)
        off += 4 * idx.size
    else:
        codes = unpack_codes(mv[off:], idx.size, bits)
        off += packed_size(idx.size, bits)
        if positions == "dense":
            out = grid.dequant_all(codes) if numel else out
        else:
            out[idx] = grid.dequant(codes, grid.group_of(idx, numel))
    return name, to_tensor(out, dtype, shape), off
