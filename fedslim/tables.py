"""Plain-text tables for ``fedslim report``: byte counts, and columns as wide as their cells."""

from __future__ import annotations


def fmt_bytes(n: float) -> str:
    """A byte count in decimal units (1 MB = 10^6 B), as every table and summary line prints them."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


def columns(heads: tuple[str, ...], table: list[tuple[str, ...]], align: str) -> list[str]:
    """Header, rule and rows, each column as wide as its longest cell, aligned as ``align`` says of each
    column ('l' left, 'r' right)."""
    widths = [max(len(h), *(len(r[j]) for r in table)) for j, h in enumerate(heads)]

    def fmt(cells: tuple[str, ...]) -> str:
        return " ".join(c.ljust(w) if a == "l" else c.rjust(w)
                        for c, w, a in zip(cells, widths, align, strict=True)).rstrip()

    header = fmt(heads)
    return [header, "-" * len(header), *(fmt(r) for r in table)]
