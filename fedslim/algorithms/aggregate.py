"""Aggregation primitives shared by the algorithms."""

from __future__ import annotations

import torch

from fedslim.engine.task import ClientResult, State


def mean_delta(results: list[ClientResult], weighted: bool = True) -> State:
    """Sample-weighted (or plain) mean of client deltas, accumulated in float64 for order-robustness."""
    if not results:
        return {}
    w = torch.tensor([float(r.num_samples) if weighted else 1.0 for r in results], dtype=torch.float64)
    if float(w.sum()) == 0:
        w = torch.ones_like(w)
    w = w / w.sum()
    out: State = {}
    for k, ref in results[0].delta.items():
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for wi, r in zip(w.tolist(), results, strict=True):
            acc += wi * r.delta[k].to(torch.float64)
        out[k] = acc.round().to(ref.dtype) if not ref.is_floating_point() else acc.to(ref.dtype)
    return out
