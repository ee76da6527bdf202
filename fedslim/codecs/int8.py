"""``int8``: zero-aware symmetric per-tensor int8, HybridCompFL's post-pruning step done right.

``scale = max|w| / 127``, ``code = round(w / scale)`` in ``[-127, 127]``, value ``= code * scale``.
A zero stays exactly zero; a nonzero becomes zero only when it rounds to 0 (``|w| < scale / 2``), and
those "rounding zeros" are counted in ``last_stats["rounding_zeros"]``. The HybridCompFL reference
instead zeroed every ``|w| < min_nonzero = 0.01``, which turned 10 % pruning into ~60 % sparsity.
"""

from __future__ import annotations

from fedslim.codecs.base import CodecContext
from fedslim.codecs.quantize import Quantize, QuantizeParams
from fedslim.codecs.stage import Report, Stage, StageParams, Work
from fedslim.registry import CODECS

_INT8 = QuantizeParams(bits=8, rounding="nearest", scheme="symmetric", granularity="tensor")


class Int8Params(StageParams):
    """No fields: the format is fixed."""


@CODECS.register("int8", "zero-aware symmetric per-tensor int8 (zeros stay zero, rounding zeros counted)")
class Int8(Stage):
    """Zero-aware symmetric per-tensor int8."""

    name = "int8"
    Params = Int8Params
    quantizes = True

    def __init__(self, params: StageParams | None = None, **fields: object):
        super().__init__(params, **fields)
        self._q = Quantize(_INT8)

    def apply(self, works: list[Work], ctx: CodecContext, report: Report) -> None:
        self._q.apply(works, ctx, report)
