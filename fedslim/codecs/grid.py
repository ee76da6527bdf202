"""Uniform quantization grids: the math shared by the encoder (snap to the grid) and the decoder.

Three grids, per tensor or per output channel (dim 0, tensors with at least 2 dims only):

* ``sym`` (symmetric, n >= 2): ``L = 2**(n-1) - 1``, value ``= (code - L) * s`` for codes ``0..2L``,
  ``s = max|w| / L`` (rounded up to float32 so the grid covers every value). Zero is code ``L``, exact.
* ``sign`` (symmetric, n = 1): value ``= (2*code - 1) * m`` with ``m = max|w|`` (DoReFa's 1-bit grid);
  zero is not on it.
* ``asym`` (asymmetric): value ``= lo + code * step`` for codes ``0..2**n - 1``, ``lo <= min w``,
  ``lo + (2**n - 1) * step >= max w`` (both float32); zero is on it only by coincidence.

The range is taken over the *nonzero* elements: an exact zero is a pruned or dropped element, it stays
exactly zero whatever the grid, and it does not widen the range. Because the float32 scales are rounded
outwards, no value is clipped, so round-to-nearest errs by at most half a step and stochastic rounding
(``floor(x + u)``, ``u ~ U[0, 1)``, DoReFa/QSGD style) is unbiased for every element.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedslim.codecs.base import CodecError

F32, F64 = np.float32, np.float64
KINDS = ("sym", "sign", "asym")


@dataclass
class Grid:
    kind: str  # "sym" | "sign" | "asym"
    bits: int
    per_channel: bool
    scale: np.ndarray  # float32 (G,): s for sym, m for sign, step for asym
    lo: np.ndarray | None = None  # float32 (G,), asym only

    @property
    def groups(self) -> int:
        return int(self.scale.size)

    @property
    def zero_code(self) -> int | None:
        """The code that decodes to exactly 0, if the grid has one."""
        return (1 << (self.bits - 1)) - 1 if self.kind == "sym" else None

    @property
    def step(self) -> np.ndarray:
        """Distance between neighbouring grid values, per group (float64)."""
        s = self.scale.astype(F64)
        return 2 * s if self.kind == "sign" else s

    def group_of(self, positions: np.ndarray, numel: int) -> np.ndarray | None:
        if not self.per_channel or self.groups <= 1:
            return None
        return positions // (numel // self.groups)

    def dequant(self, codes: np.ndarray, group: np.ndarray | None) -> np.ndarray:
        """Grid values (float64) of ``codes``; ``group`` is each code's channel, or None per tensor."""
        return self._values(codes.astype(F64), self._param(self.scale, group),
                            None if self.lo is None else self._param(self.lo, group))

    def dequant_all(self, codes: np.ndarray) -> np.ndarray:
        """:meth:`dequant` of the codes of every element in order, by broadcasting instead of gathers
        (the same float operations per element, so the same values)."""
        g = self.groups if self.per_channel else 1
        c = codes.astype(F64).reshape(g, -1)
        col = (lambda a: a.astype(F64)[:, None]) if self.per_channel else (lambda a: a.astype(F64)[0])
        return self._values(c, col(self.scale), None if self.lo is None else col(self.lo)).reshape(-1)

    @staticmethod
    def _param(p: np.ndarray, group: np.ndarray | None) -> np.ndarray:
        p = p.astype(F64)
        return p[group] if group is not None else p[0]

    def _values(self, c: np.ndarray, s: np.ndarray, lo: np.ndarray | None) -> np.ndarray:
        if self.kind == "sym":
            return (c - self.zero_code) * s
        if self.kind == "sign":
            return (2 * c - 1) * s
        return lo + c * s


def _round_up_f32(x: np.ndarray) -> np.ndarray:
    """Smallest float32 >= x (elementwise, x float64 >= 0)."""
    y = x.astype(F32)
    low = y.astype(F64) < x
    y[low] = np.nextafter(y[low], F32(np.inf))
    return y


def quantize_flat(values: np.ndarray, shape: tuple[int, ...], bits: int, scheme: str, per_channel: bool,
                  noise: np.ndarray | None = None) -> tuple[Grid, np.ndarray, np.ndarray]:
    """Snap the nonzero elements of ``values`` (flat float64) to an n-bit grid.

    ``noise`` (uniform in [0, 1), one per element) selects stochastic rounding, None round-to-nearest
    (ties to even). Returns the grid, the codes (int64, zero code or 0 where ``values`` is 0) and the
    new values (float64, exactly what the decoder will compute).
    """
    numel = values.size
    per_channel = per_channel and len(shape) >= 2 and numel > 0
    g = shape[0] if per_channel else 1
    v = values.reshape(g, -1)
    nz = v != 0
    kind = "asym" if scheme == "asymmetric" else ("sign" if bits == 1 else "sym")
    lo = None
    if kind == "asym":
        lo64 = np.where(nz, v, np.inf).min(axis=1, initial=np.inf)
        hi64 = np.where(nz, v, -np.inf).max(axis=1, initial=-np.inf)
        empty = ~nz.any(axis=1)
        lo64[empty], hi64[empty] = 0.0, 0.0
        lo = lo64.astype(F32)
        high = lo.astype(F64) > lo64
        lo[high] = np.nextafter(lo[high], F32(-np.inf))
        top = (1 << bits) - 1
        scale = _round_up_f32((hi64 - lo.astype(F64)) / top)
        while True:  # rounding lo down can leave the top a hair short; one more ulp fixes it
            short = lo.astype(F64) + top * scale.astype(F64) < hi64
            if not short.any():
                break
            scale[short] = np.nextafter(scale[short], F32(np.inf))
        x = np.divide(v - lo.astype(F64)[:, None], scale.astype(F64)[:, None],
                      out=np.zeros_like(v), where=scale[:, None] > 0)
        kmin, kmax = 0, top
    else:
        m = np.abs(v).max(axis=1, initial=0.0)
        if kind == "sym":
            half = (1 << (bits - 1)) - 1
            scale = _round_up_f32(m / half)
            while True:
                short = half * scale.astype(F64) < m
                if not short.any():
                    break
                scale[short] = np.nextafter(scale[short], F32(np.inf))
            x = np.divide(v, scale.astype(F64)[:, None], out=np.zeros_like(v), where=scale[:, None] > 0)
            kmin, kmax = -half, half
        else:
            scale = _round_up_f32(m)
            x = np.divide(v + scale.astype(F64)[:, None], 2 * scale.astype(F64)[:, None],
                          out=np.zeros_like(v), where=scale[:, None] > 0)
            kmin, kmax = 0, 1
    if not np.isfinite(scale).all():
        raise CodecError(f"value range of a tensor of shape {tuple(shape)} overflows a float32 {bits}-bit grid")
    q = np.rint(x) if noise is None else np.floor(x + noise.reshape(g, -1))
    q = np.clip(q, kmin, kmax).astype(np.int64)
    grid = Grid(kind, bits, per_channel, scale, lo)
    codes = q - kmin if kind == "sym" else q
    codes[~nz] = grid.zero_code or 0
    codes = codes.reshape(-1)
    new = grid.dequant_all(codes)
    new[~nz.reshape(-1)] = 0.0
    return grid, codes, new
