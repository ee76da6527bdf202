"""``quantize``: n-bit uniform quantization (n = 1..16), the QuantFL uplink compressor done for real.

Round-to-nearest or stochastic (unbiased, DoReFa/QSGD style ``floor(x + u)``), symmetric or asymmetric
grid, one scale per tensor or per output channel (see :mod:`fedslim.codecs.grid`). Exact zeros stay
zero and are left out of the range, so quantizing after pruning keeps the pruned positions sparse.
Stochastic rounding draws only from ``ctx.generator``, one uniform per element in payload order, so the
same seed gives the same codes on every backend.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import field_validator

from fedslim.codecs.base import CodecContext, CodecError
from fedslim.codecs.grid import quantize_flat
from fedslim.codecs.stage import Report, Stage, StageParams, Work
from fedslim.registry import CODECS


class QuantizeParams(StageParams):
    bits: int = 8
    rounding: Literal["nearest", "stochastic"] = "nearest"
    scheme: Literal["symmetric", "asymmetric"] = "symmetric"
    granularity: Literal["tensor", "channel"] = "tensor"

    @field_validator("bits", mode="before")
    @classmethod
    def _bits(cls, v: object) -> object:
        # before pydantic's own int check, so 'x' or 4.5 get the allowed range too, not "a valid integer"
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 16:
            raise ValueError("must be an integer from 1 to 16")
        return v


def uniform_noise(generator: torch.Generator, n: int) -> np.ndarray:
    """``n`` draws from U[0, 1) taken from ``generator`` (on whatever device it lives)."""
    return torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device).cpu().numpy()


@CODECS.register("quantize", "n-bit uniform quantization (nearest or stochastic, sym/asym, tensor/channel)")
class Quantize(Stage):
    """n-bit uniform quantization of the nonzero elements of every compressible tensor."""

    name = "quantize"
    Params = QuantizeParams
    quantizes = True
    params: QuantizeParams

    @property
    def needs_generator(self) -> bool:
        return self.params.rounding == "stochastic"

    def apply(self, works: list[Work], ctx: CodecContext, report: Report) -> None:
        p = self.params
        if self.needs_generator and ctx.generator is None:
            raise CodecError(f"{self.name}: stochastic rounding draws from ctx.generator, which is None "
                             f"(round {ctx.round}, client {ctx.client})")
        for w in works:
            noise = uniform_noise(ctx.generator, w.numel) if self.needs_generator else None
            before = w.values != 0
            grid, codes, new = quantize_flat(w.values, w.shape, p.bits, p.scheme,
                                             p.granularity == "channel", noise)
            report.rounding_zeros += int(np.count_nonzero(before & (new == 0)))
            w.values, w.grid, w.codes = new, grid, codes
        report.bits = p.bits
