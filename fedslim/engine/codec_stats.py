"""Codec statistics per metrics row and per run: payloads, real bytes, the float32 bytes they replace,
measured sparsity and rounding zeros, summed from each codec's ``last_stats``."""

from __future__ import annotations

from typing import Any


class CodecTally:
    """Codec statistics (``Codec.last_stats``) summed over the payloads sent between two metrics rows.

    Raw sums are kept next to the ratios so that rows can be summed again (the run summary does).
    """

    def __init__(self) -> None:
        self.payloads = self.bytes = self.float32_bytes = self.zeros = self.numel = self.rounding_zeros = 0
        self.bits: set[int] = set()
        self.nominal: float | None = None
        self.codecs: list[str] = []  # in order of first use: a window may mix pipelines (task.down_codec)

    def add(self, stats: dict[str, Any], copies: int = 1) -> None:
        if not stats:
            return
        name = str(stats.get("codec", "?"))
        if name not in self.codecs:
            self.codecs.append(name)
        self.payloads += copies
        self.bytes += copies * int(stats["bytes"])
        self.float32_bytes += copies * int(stats["float32_bytes"])
        numel = int(stats.get("compressed_numel") or 0)
        if stats.get("measured_sparsity") is not None and numel:
            self.zeros += copies * int(round(stats["measured_sparsity"] * numel))
            self.numel += copies * numel
        self.rounding_zeros += copies * int(stats.get("rounding_zeros") or 0)
        self.bits.add(int(stats.get("bits", 32)))
        if stats.get("nominal_sparsity") is not None:
            self.nominal = max(self.nominal or 0.0, float(stats["nominal_sparsity"]))

    def row(self) -> dict[str, Any]:
        return codec_row(" | ".join(self.codecs), self.payloads, self.bytes, self.float32_bytes, self.zeros, self.numel,
                         self.rounding_zeros, sorted(self.bits), self.nominal)


def codec_row(codec: str, payloads: int, nbytes: int, f32: int, zeros: int, numel: int, rounding_zeros: int,
              bits: list[int], nominal: float | None) -> dict[str, Any]:
    return {"codec": codec, "payloads": payloads, "bytes": nbytes, "float32_bytes": f32,
            "ratio_vs_float32": f32 / nbytes if nbytes else None, "bits": bits,
            "nominal_sparsity": nominal, "measured_sparsity": zeros / numel if numel else None,
            "zeros": zeros, "compressed_numel": numel, "rounding_zeros": rounding_zeros}


def sum_codec_rows(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    rows = [r for r in rows if r and r.get("payloads")]
    if not rows:
        return None
    nominal = [r["nominal_sparsity"] for r in rows if r.get("nominal_sparsity") is not None]
    names = list(dict.fromkeys(n for r in rows for n in r["codec"].split(" | ")))
    return codec_row(" | ".join(names), *(sum(int(r[k]) for r in rows) for k in (
        "payloads", "bytes", "float32_bytes", "zeros", "compressed_numel", "rounding_zeros")),
        sorted({b for r in rows for b in r["bits"]}), max(nominal) if nominal else None)
