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
    starts = list(range(0, len(data), batch_size))
    # A final batch of one sample breaks a BatchNorm that normalises with batch statistics (static BN,
    # track_running_stats=False) even in eval mode; fold it into the previous batch, as training does.
    if len(starts) > 1 and len(data) - starts[-1] == 1:
        starts.pop()
    ends = [*starts[1:], len(data)] if starts else []
    for i, j in zip(starts, ends, strict=True):
        try:
            out = model(data.x[i:j].to(dev)).float()
        except ValueError as e:
            if "Expected more than 1 value per channel" not in str(e):
                raise
            raise ValueError(f"cannot evaluate {type(model).__name__} on a batch of one sample (of a set of "
                             f"{len(data)}): it normalises with the batch's own statistics (BatchNorm without "
                             "running statistics, e.g. model.options.track_running_stats=false), which needs two "
                             "or more; give every evaluated set two or more samples (data.local_test_fraction, "
                             "data.test_subset) and eval.batch_size 2 or more") from None
        if label_mask is not None:
            out = out.masked_fill(~label_mask.to(out.device), float("-inf"))
        outs.append(out.cpu())
    model.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0)


def metrics_from_logits(logits: torch.Tensor, y: torch.Tensor, num_classes: int, topk: int = 5) -> dict[str, float]:
    """Loss, top-1 (``acc``), top-k, macro/weighted F1, macro precision and recall of ``logits`` against ``y``.

    - Classes are ranked by logit with ties broken towards the lower class index (as ``argmax`` does), so the
      top-1 prediction is always the first of the top k: top-k >= top-1 even for constant logits.
    - A row with a NaN logit has no prediction: it counts as wrong for every metric, and the loss is NaN.
      ``-inf`` logits are classes masked out of the prediction (``label_mask``); they are ranked last.
    - Macro averages run over the classes present in ``y`` or predicted, not over all ``num_classes``: a
      class with no test sample and no prediction has no F1 to average (scoring it 0 would cap the macro
      F1 of a client whose local split holds 2 of 10 classes at 0.2 even when all its predictions are right).
    """
    y = y.cpu()
    if len(y) == 0:
        return {"n": 0}
    logits = logits.cpu().float()
    nan_row = torch.isnan(logits).any(1)
    # Masked classes (-inf) as a very low finite logit, so a fully masked row gives a finite loss; NaN and
    # +inf are left as they are and make the loss NaN, as they should for a broken model.
    loss_in = logits.masked_fill(torch.isneginf(logits), -1e9)
    loss = float(F.cross_entropy(loss_in, y))
    k = min(topk, num_classes)
    scores = logits.masked_fill(nan_row[:, None], float("-inf"))
    ranked = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]
    pred = ranked[:, 0]
    correct = (pred == y) & ~nan_row
    topk_hit = (ranked == y[:, None]).any(1) & ~nan_row
    yt = y.numpy()
    yp = torch.where(nan_row, torch.full_like(pred, -1), pred).numpy()  # -1: no prediction (a miss)
    labels = np.union1d(yt, yp[yp >= 0])
    kw = {"labels": labels, "zero_division": 0}
    n = len(yt)
    return {
        "n": int(n),
        "loss": loss,
        "acc": int(correct.sum()) / n,
        f"top{k}": int(topk_hit.sum()) / n,
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
