"""Evaluation metrics on a tensor dataset: loss, top-1/top-k accuracy, F1, precision, recall."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score, precision_score, recall_score
from torch import nn

from fedslim.data.types import TensorData


@torch.no_grad()
def predict(model: nn.Module, data: TensorData, batch_size: int = 1000,
            label_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Logits for every sample (eval mode). ``label_mask`` restricts predictions to held classes."""
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    outs = []
    for i in range(0, len(data), batch_size):
        out = model(data.x[i:i + batch_size].to(dev)).float()
        if label_mask is not None:
            out = out.masked_fill(~label_mask.to(out.device), float("-inf"))
        outs.append(out.cpu())
    model.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0)


def metrics_from_logits(logits: torch.Tensor, y: torch.Tensor, num_classes: int, topk: int = 5) -> dict[str, float]:
    y = y.cpu()
    if len(y) == 0:
        return {"n": 0}
    finite = torch.where(torch.isfinite(logits), logits, torch.full_like(logits, -1e9))
    loss = float(F.cross_entropy(finite, y))
    pred = logits.argmax(1)
    k = min(topk, num_classes)
    topk_hit = (logits.topk(k, dim=1).indices == y[:, None]).any(1)
    yt, yp = y.numpy(), pred.numpy()
    labels = np.arange(num_classes)
    kw = {"labels": labels, "zero_division": 0}
    return {
        "n": int(len(y)),
        "loss": loss,
        "acc": float((pred == y).float().mean()),
        f"top{k}": float(topk_hit.float().mean()),
        "f1_macro": float(f1_score(yt, yp, average="macro", **kw)),
        "f1_weighted": float(f1_score(yt, yp, average="weighted", **kw)),
        "precision": float(precision_score(yt, yp, average="macro", **kw)),
        "recall": float(recall_score(yt, yp, average="macro", **kw)),
    }


def evaluate(model: nn.Module, data: TensorData, num_classes: int, *, batch_size: int = 1000,
             topk: int = 5, label_mask: torch.Tensor | None = None) -> dict[str, float]:
    logits = predict(model, data, batch_size, label_mask)
    return metrics_from_logits(logits, data.y, num_classes, topk)


def mean_metrics(items: list[dict[str, float]]) -> dict[str, float]:
    """Sample-weighted mean of per-client metric dicts (keys present in all)."""
    items = [m for m in items if m.get("n", 0) > 0]
    if not items:
        return {"n": 0}
    total = sum(m["n"] for m in items)
    keys = [k for k in items[0] if k != "n" and all(k in m for m in items)]
    out: dict[str, float] = {"n": int(total), "clients": len(items)}
    for k in keys:
        out[k] = float(sum(m[k] * m["n"] for m in items) / total)
    return out
