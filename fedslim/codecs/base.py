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
        out.append(raw_bytes(t))
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
        res[name] = from_raw(mv[offset:offset + nbytes], dtype, tuple(shape))
        offset += nbytes
    return res, offset


def raw_bytes(t: torch.Tensor) -> bytes:
    """The tensor's elements as little-endian bytes (numpy has no bfloat16, so that goes as raw bits)."""
    t = t.detach().contiguous().cpu().reshape(-1)
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def from_raw(buf: bytes | memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if len(buf) == 0:
        return torch.empty(shape, dtype=dtype)
    chunk = bytearray(buf)  # frombuffer shares memory; a private copy keeps the payload immutable
    if dtype == torch.bfloat16:
        return torch.frombuffer(chunk, dtype=torch.int16).view(torch.bfloat16).reshape(shape)
    return torch.frombuffer(chunk, dtype=dtype).reshape(shape)


def float32_size(tensors: State) -> int:
    """Bytes :class:`ExactCodec` would produce if every floating tensor were float32 (the baseline)."""
    total = 4
    for name, t in tensors.items():
        item = 4 if t.is_floating_point() else t.element_size()
        total += 2 + len(name.encode()) + 2 + 4 * t.dim() + t.numel() * item
    return total


def ratio_vs_float32(tensors: State, payload: bytes | int) -> float:
    """How many times smaller than the float32 exact payload ``payload`` is (inf for an empty payload)."""
    n = payload if isinstance(payload, int) else len(payload)
    return float32_size(tensors) / n if n else float("inf")


class Codec:
    """Base class. Subclasses override ``encode``/``decode``; stateful ones also the state methods.

    ``last_stats`` describes the last ``encode`` (at least ``bytes``, ``float32_bytes``,
    ``ratio_vs_float32``, ``bits``, ``nominal_sparsity``, ``measured_sparsity``, ``rounding_zeros``)
    so the engine can log it next to the byte count.
    """

    name = "codec"
    last_stats: dict[str, Any] = {}  # fallback for subclasses that skip __init__; encode rebinds it

    def __init__(self) -> None:
        self.last_stats = {}

    def encode(self, tensors: State, ctx: CodecContext) -> bytes:
        raise NotImplementedError

    def decode(self, payload: bytes, ctx: CodecContext) -> State:
        raise NotImplementedError

    def restrict_memory(self, masks: dict[str, torch.Tensor], forget: bool = False) -> None:
        """Weights fixed at zero from now on (``masks``: 0/1 per tensor name), or, with ``forget``, updates
        never to be sent: what a stage remembers between payloads (error feedback) drops them."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class ExactCodec(Codec):
    """No compression: float32 as float32 on the wire."""

    name = "exact"

    def encode(self, tensors: State, ctx: CodecContext) -> bytes:
        check_finite(tensors, ctx)
        payload = pack_exact(tensors)
        f32 = float32_size(tensors)
        self.last_stats = {"codec": self.name, "bytes": len(payload), "float32_bytes": f32,
                           "ratio_vs_float32": f32 / len(payload), "bits": 32, "nominal_sparsity": None,
                           "measured_sparsity": None, "rounding_zeros": 0}
        return payload

    def decode(self, payload: bytes, ctx: CodecContext) -> State:
        state, _ = unpack_exact(payload)
        return state


_NUMPY_FLOATS = (torch.float32, torch.float64, torch.float16)


def _all_finite(t: torch.Tensor) -> bool:
    if t.device.type == "cpu" and t.dtype in _NUMPY_FLOATS:
        # numpy's single-threaded scan beats torch's thread pool by far on the small tensors sent here
        return bool(np.isfinite(t.detach().numpy()).all())
    return bool(torch.isfinite(t).all())


def check_finite(tensors: State, ctx: CodecContext) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not _all_finite(t):
            who = (f"server (to client {ctx.client})" if ctx.client >= 0 else "server") \
                if ctx.direction == "down" else f"client {ctx.client}"
            bad = int((~torch.isfinite(t)).sum())
            raise CodecError(f"round {ctx.round}: {who} tried to send tensor {name!r} containing NaN or Inf "
                             f"({bad} of {t.numel()} elements): training diverged; try a lower "
                             f"train.optimizer.lr")
