"""How labels are spread over clients: a counts matrix, a text table and a stacked bar chart."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedslim.data.formats import atomic_output

# Above these, one column per class (or one row per class mix) stops being readable.
_MAX_CLASS_COLUMNS = 12
_MAX_FULL_ROWS = 32
_TOP = 3


def label_counts(labels: np.ndarray | Sequence[int], parts: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """(clients x classes) int64 matrix of how many samples of each class each client holds."""
    labels = np.asarray(labels)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), found {labels.min()}..{labels.max()}")
    out = np.zeros((len(parts), num_classes), dtype=np.int64)
    for i, p in enumerate(parts):
        out[i] = np.bincount(labels[np.asarray(p, dtype=np.int64)], minlength=num_classes)
    return out


def format_label_report(counts: np.ndarray, class_names: Sequence[str] | None = None) -> str:
    """A compact text table, one row per client.

    With few classes and clients each class gets a column; otherwise each row lists the client's
    number of labels and its top classes with their share, which stays readable at 100+ clients.
    A footer summarises sizes and label diversity.
    """
    counts = np.asarray(counts, dtype=np.int64)
    n_clients, n_classes = counts.shape
    names = list(class_names) if class_names is not None else [str(i) for i in range(n_classes)]
    if len(names) != n_classes:
        raise ValueError(f"{len(names)} class names for {n_classes} classes")
    sizes = counts.sum(1)
    present = (counts > 0).sum(1)
    cw = max(len("client"), len(str(max(n_clients - 1, 0))))
    nw = max(1, len(str(int(sizes.max()) if n_clients else 0)), len("n"))
    lines: list[str] = []
    if n_classes <= _MAX_CLASS_COLUMNS and n_clients <= _MAX_FULL_ROWS:
        short = [n[:8] for n in names]
        widths = [max(len(s), len(str(int(counts[:, j].max()) if n_clients else 0))) for j, s in enumerate(short)]
        lines.append(f"{'client':>{cw}} {'n':>{nw}}  " + " ".join(f"{s:>{w}}" for s, w in zip(short, widths,
                                                                                             strict=True)))
        for i in range(n_clients):
            cells = " ".join(f"{int(c):>{w}}" for c, w in zip(counts[i], widths, strict=True))
            lines.append(f"{i:>{cw}} {int(sizes[i]):>{nw}}  {cells}")
    else:
        lines.append(f"{'client':>{cw}} {'n':>{nw}} {'labels':>6}  top classes (share)")
        for i in range(n_clients):
            order = np.argsort(-counts[i], kind="stable")[:_TOP]
            top = "  ".join(f"{names[j]}:{counts[i, j] / max(sizes[i], 1):.0%}" for j in order if counts[i, j] > 0)
            lines.append(f"{i:>{cw}} {int(sizes[i]):>{nw}} {int(present[i]):>6}  {top}")
    if n_clients:
        lines.append(f"{n_clients} clients, {int(sizes.sum())} samples; size min/median/max "
                     f"{int(sizes.min())}/{int(np.median(sizes))}/{int(sizes.max())}; labels per client "
                     f"mean {present.mean():.1f} (min {int(present.min())}, max {int(present.max())})")
    return "\n".join(lines)


def plot_label_counts(counts: np.ndarray, path: str | Path, class_names: Sequence[str] | None = None,
                      title: str | None = None) -> Path:
    """Stacked horizontal bars (one per client, one colour per class), written atomically.

    Uses a bare ``Figure`` on the Agg canvas rather than pyplot, so it needs no display and leaves
    pyplot's global state alone in the caller's process.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(counts)
    n_clients, n_classes = counts.shape
    names = list(class_names) if class_names is not None else [str(i) for i in range(n_classes)]
    path = Path(path)
    fig = Figure(figsize=(8, min(2 + 0.22 * n_clients, 40)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colours = _palette(n_classes)
    left = np.zeros(n_clients)
    ys = np.arange(n_clients)
    for j in range(n_classes):
        ax.barh(ys, counts[:, j], left=left, color=colours[j], label=names[j], height=0.8, linewidth=0)
        left += counts[:, j]
    ax.set_yticks(ys if n_clients <= 50 else ys[:: max(1, n_clients // 25)])
    ax.invert_yaxis()
    ax.set_xlabel("samples")
    ax.set_ylabel("client")
    ax.set_title(title or f"labels per client ({n_clients} clients, {n_classes} classes)")
    if n_classes <= 20:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small", frameon=False)
    fig.tight_layout()
    suffix = path.suffix.lstrip(".") or "png"
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format=suffix, dpi=120)
    return path


def _palette(n: int) -> list[tuple[float, float, float, float]]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "viridis"]
    if n <= 20:
        return [cmap(j % cmap.N) for j in range(n)]
    return [cmap(j / max(n - 1, 1)) for j in range(n)]
