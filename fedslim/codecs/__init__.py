"""Compression on the wire. ``build_pipeline(specs)`` turns config stages into one :class:`Codec`."""

from __future__ import annotations

from typing import Any

from fedslim.codecs.base import Codec, CodecContext, CodecError, ExactCodec, pack_exact, unpack_exact

__all__ = ["Codec", "CodecContext", "CodecError", "ExactCodec", "build_pipeline", "pack_exact", "unpack_exact"]


def build_pipeline(specs: list[dict[str, Any]], field: str = "codec") -> Codec:
    if not specs:
        return ExactCodec()
    raise ValueError(f"{field}: codec stages are not available yet")
