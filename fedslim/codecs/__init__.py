"""Compression on the wire: stages composed into pipelines, chosen in the config for either direction.

Config form (``codec.up`` / ``codec.down``, stages applied in order)::

    [{name: quantize, bits: 4, rounding: stochastic, scheme: symmetric, granularity: tensor}]
    [{name: prune, amount: 0.5, scope: layer, structured: false}, {name: int8}]
    [{name: topk, ratio: 0.01, error_feedback: true}]

``build_pipeline(specs, field)`` turns such a list into one :class:`Codec` (``ExactCodec`` when it is
empty). A pipeline takes at most one quantizing stage (``quantize`` or ``int8``); after it only ``prune``
or ``topk`` with ``error_feedback: false`` may follow. The wire format is documented in :mod:`fedslim.codecs.wire`.
"""

from __future__ import annotations

from fedslim.codecs.base import (
    Codec,
    CodecContext,
    CodecError,
    ExactCodec,
    check_finite,
    float32_size,
    pack_exact,
    ratio_vs_float32,
    unpack_exact,
)
from fedslim.codecs.grid import Grid, quantize_flat
from fedslim.codecs.int8 import Int8
from fedslim.codecs.pipeline import Pipeline, build_pipeline, build_stage, compress_state
from fedslim.codecs.prune import Prune, magnitude_masks, weight_names
from fedslim.codecs.quantize import Quantize
from fedslim.codecs.stage import Stage, Work
from fedslim.codecs.topk import TopK
from fedslim.codecs.wire import coded_record_size, header_size, payload_size, raw_record_size

__all__ = [
    "Codec", "CodecContext", "CodecError", "ExactCodec", "Grid", "Int8", "Pipeline", "Prune", "Quantize",
    "Stage", "TopK", "Work", "build_pipeline", "build_stage", "check_finite", "coded_record_size",
    "compress_state", "float32_size", "header_size", "magnitude_masks", "pack_exact", "payload_size",
    "quantize_flat", "ratio_vs_float32", "raw_record_size", "unpack_exact", "weight_names",
]
