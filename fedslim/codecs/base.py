"""Codec interface and the exact float wire format every pipeline falls back to.

A codec turns a dict of named tensors into ``bytes`` and back. The engine counts ``len(bytes)``:
what is reported is what was produced.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

State = dict[str, torch.Tensor]

_DTYPES: dict[torch.dtype, int] = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.int64: 3,
                                   torch.int32: 4, torch.uint8: 5, torch.int8: 6, torch.bool: 7,
                                   torch.float64: 8}
_DTYPE_OF = {v: k for k, v in _DTYPES.items()}


@dataclass
class CodecContext:
    """Who is encoding what. ``compressible`` names the tensors lossy stages may touch."""

    direction: str  # "up" | "down"
    client: int = -1
    round: int = 0
    compressible: frozenset[str] = frozenset()
    generator: torch.Generator | None = None  # stochastic stages draw from here only
    extras: dict[str, Any] = field(default_factory=dict)


class CodecError(ValueError):
    pass


def pack_exact(tensors: State) -> bytes:
    """Exact serialisation: per tensor name, dtype, shape, raw little-endian bytes."""
    out = [struct.pack("<I", len(tensors))]
    for name, t in tensors.items():
        nb = name.encode()
        t = t.detach().contiguous().cpu()
        if t.dtype not in _DTYPES:
            raise CodecError(f"tensor {name!r}: dtype {t.dtype} cannot be encoded")
        out.append(struct.pack("<H", len(nb)) + nb + struct.pack("<BB", _DTYPES[t.dtype], t.dim()))
        out.append(struct.pack(f"<{t.dim()}I", *t.shape))
        raw = t.view(torch.uint8) if t.dtype == torch.bfloat16 else t
        out.append(raw.numpy().tobytes() if t.dtype != torch.bfloat16 else raw.numpy().tobytes())
    return b"".join(out)


def unpack_exact(buf: bytes | memoryview, offset: int = 0) -> tuple[State, int]:
    mv = memoryview(buf)
    (n,) = struct.unpack_from("<I", mv, offset)
    offset += 4
    res: State = {}
    for _ in range(n):
        (ln,) = struct.unpack_from("<H", mv, offset)
        offset += 2
        name = bytes(mv[offset:offset + ln]).decode()
        offset += ln
        code, ndim = struct.unpack_from("<BB", mv, offset)
        offset += 2
        shape = struct.unpack_from(f"<{ndim}I", mv, offset)
        offset += 4 * ndim
        dtype = _DTYPE_OF[code]
        numel = int(np.prod(shape)) if ndim else 1
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        chunk = bytearray(mv[offset:offset + nbytes])
        offset += nbytes
        if dtype == torch.bfloat16:
            t = torch.frombuffer(chunk, dtype=torch.uint8).view(torch.bfloat16) if nbytes else torch.empty(0, dtype=dtype)
        else:
            t = torch.frombuffer(chunk, dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)
        res[name] = t.reshape(shape)
    return res, offset


class Codec:
    """Base class. Subclasses override ``encode``/``decode``; stateful ones also the state methods."""

    name = "codec"

    def encode(self, tensors: State, ctx: CodecContext) -> bytes:
        raise NotImplementedError

    def decode(self, payload: bytes, ctx: CodecContext) -> State:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class ExactCodec(Codec):
    """No compression: float32 as float32 on the wire."""

    name = "exact"

    def encode(self, tensors: State, ctx: CodecContext) -> bytes:
        check_finite(tensors, ctx)
        return pack_exact(tensors)

    def decode(self, payload: bytes, ctx: CodecContext) -> State:
        state, _ = unpack_exact(payload)
        return state


def check_finite(tensors: State, ctx: CodecContext) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            who = "server" if ctx.direction == "down" else f"client {ctx.client}"
            raise CodecError(f"round {ctx.round}: {who} tried to send tensor {name!r} containing NaN or Inf")
