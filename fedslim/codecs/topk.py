"""``topk``: keep the ``k`` largest-magnitude elements, with error feedback (Stich et al. 2018,
Karimireddy et al. 2019).

With ``error_feedback`` the codec keeps, per ``ctx.client`` and tensor name, the residual ``e`` of the
last encode: it sends ``C(x + e)`` and keeps ``e' = x + e - C(x + e)`` where ``C(.)`` is what the
receiver decodes after *all* stages, so the quantization error of later stages is fed back too. The
residuals are part of ``state_dict()`` so a resumed run continues with them. A residual whose shape no
longer matches its tensor (the client got a different sub-model) is dropped.
Error feedback is for updates: ``codec.down`` sends the global model itself, so there it is refused
(:meth:`TopK.conflict_on_downlink`); the dropped weights would be added to the next model again.

``k = round(ratio * numel)`` per tensor (at least 1 for a nonempty tensor), or over all compressible
tensors together with ``scope: global``.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import numpy as np
import torch
from pydantic import field_validator

from fedslim.codecs.base import CodecContext
from fedslim.codecs.stage import Report, Stage, StageParams, Work
from fedslim.registry import CODECS


class TopKParams(StageParams):
    ratio: float
    error_feedback: bool = True
    scope: Literal["layer", "global"] = "layer"

    @field_validator("ratio")
    @classmethod
    def _ratio(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError("must be in (0, 1]")
        return v


def keep_count(ratio: float, numel: int) -> int:
    return 0 if numel == 0 else min(numel, max(1, round(ratio * numel)))


def _top_mask(mag: np.ndarray, k: int) -> np.ndarray:
    keep = np.zeros(mag.size, dtype=bool)
    if k >= mag.size:
        keep[:] = True
    elif k > 0:
        keep[np.argpartition(-mag, k - 1)[:k]] = True
    return keep


@CODECS.register("topk", "top-k sparsification with per-client error feedback")
class TopK(Stage):
    """Keep the k largest-magnitude elements of each compressible tensor."""

    name = "topk"
    Params = TopKParams
    params: TopKParams

    def __init__(self, params: StageParams | None = None, **fields: Any):
        super().__init__(params, **fields)
        self.residuals: dict[int, dict[str, torch.Tensor]] = {}
        self._pending: tuple[int, dict[str, np.ndarray]] | None = None

    def apply(self, works: list[Work], ctx: CodecContext, report: Report) -> None:
        p = self.params
        self._pending = None
        if p.error_feedback:
            mine = self.residuals.get(ctx.client, {})
            for w in works:
                r = mine.get(w.name)
                if r is not None and tuple(r.shape) == w.shape:
                    w.replace(w.values + r.reshape(-1).numpy().astype(np.float64))
            self._pending = (ctx.client, {w.name: w.values.copy() for w in works})
        if p.scope == "layer":
            for w in works:
                w.zero_out(~_top_mask(np.abs(w.values), keep_count(p.ratio, w.numel)))
        elif works:
            mag = np.concatenate([np.abs(w.values) for w in works])
            keep = _top_mask(mag, keep_count(p.ratio, mag.size))
            for w, part in zip(works, np.split(keep, np.cumsum([w.numel for w in works])[:-1]), strict=True):
                w.zero_out(~part)
        report.ask_sparsity(1.0 - p.ratio)

    def conflict_after_quantizer(self) -> str | None:
        if self.params.error_feedback:
            return ("its error feedback adds a float residual to the quantized values, which then travel "
                    "as float32 (move topk before the quantizer)")
        return None

    def conflict_on_downlink(self) -> str | None:
        if self.params.error_feedback:
            return ("error_feedback adds what a payload left out to the next one, which is right for updates "
                    "but the downlink sends the global model itself, so the dropped weights pile up round after "
                    "round; set error_feedback: false (it is true by default)")
        return None

    def finish(self, works: list[Work], decoded: dict[str, np.ndarray], ctx: CodecContext) -> None:
        if self._pending is None:
            return
        client, acc = self._pending
        self._pending = None
        shapes = {w.name: w.shape for w in works}
        self.residuals[client] = {
            name: torch.from_numpy((a - decoded[name]).astype(np.float32)).reshape(shapes[name])
            for name, a in acc.items()}

    def restrict_memory(self, masks: dict[str, torch.Tensor], forget: bool = False) -> None:
        if forget:
            self.residuals.clear()
            return
        for res in self.residuals.values():
            for name, r in res.items():
                if name in masks and tuple(r.shape) == tuple(masks[name].shape):
                    res[name] = r * masks[name].to(r.dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"residuals": copy.deepcopy(self.residuals)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.residuals = {int(c): {n: t.detach().to("cpu", torch.float32).clone() for n, t in res.items()}
                          for c, res in state.get("residuals", {}).items()}
