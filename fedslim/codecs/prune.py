"""``prune``: L1 magnitude pruning, data-free, with ``torch.nn.utils.prune`` semantics.

* unstructured, ``scope: layer``: in every compressible tensor the ``round(amount * numel)`` elements of
  smallest ``|w|`` become zero (``L1Unstructured``);
* unstructured, ``scope: global``: the same over all compressible tensors together, as
  ``prune.global_unstructured`` does (``round(amount * total)`` elements);
* ``structured: true``: in every compressible tensor with at least 2 dims, the ``round(amount * size)``
  slices along ``dim`` (0: filters / output units, 1: input channels) of smallest L``norm`` norm become
  zero (``LnStructured``); 0-d and 1-d tensors are left alone.

Elements that are already zero are the smallest, so pruning gives at least ``amount`` sparsity and
exactly ``amount`` (rounded) on a tensor without zeros. The masks match ``torch.nn.utils.prune``
(tested), ties included: where equal magnitudes straddle the cut, ``torch.topk`` settles which are
taken, as torch does. :func:`magnitude_masks` exposes the same masks for training with a fixed mask
(HybridCompFL; AutoFLIP ranks by learning spread instead, :mod:`fedslim.algorithms.autoflip`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal

import numpy as np
import torch
from pydantic import field_validator, model_validator

from fedslim.codecs.base import CodecContext, State
from fedslim.codecs.stage import Report, Stage, StageParams, Work
from fedslim.registry import CODECS


class PruneParams(StageParams):
    amount: float
    scope: Literal["layer", "global"] = "layer"
    structured: bool = False
    dim: int = 0
    norm: Literal[1, 2] = 1

    @field_validator("amount")
    @classmethod
    def _amount(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            # 1 would zero every tensor the stage compresses: a run that trains nothing through them.
            raise ValueError("must be at least 0 and below 1 (1 would remove every weight the stage compresses)")
        return v

    @field_validator("dim")
    @classmethod
    def _dim(cls, v: int) -> int:
        if v not in (0, 1):
            raise ValueError("must be 0 (filters / output units) or 1 (input channels)")
        return v

    @model_validator(mode="after")
    def _global_unstructured_only(self) -> PruneParams:
        if self.structured and self.scope == "global":
            # Slice norms of layers with different slice sizes are not comparable.
            raise ValueError("scope 'global' works with unstructured pruning only (structured: false)")
        return self


def weight_names(state: State) -> frozenset[str]:
    """Data-free default for what to compress: floating ``*weight`` tensors with at least 2 dims."""
    return frozenset(n for n, t in state.items()
                     if t.is_floating_point() and t.dim() >= 2 and n.rsplit(".", 1)[-1] == "weight")


def prune_count(amount: float, size: int) -> int:
    """How many elements (or slices) ``amount`` removes: ``torch.nn.utils.prune``'s rounding."""
    return round(amount * size)


def _smallest(mag: np.ndarray, k: int) -> np.ndarray:
    """``bool`` mask of the ``k`` smallest entries, the ones ``torch.topk(mag, k, largest=False)`` picks.

    Without a tie at the cut the set is unique and ``argpartition`` finds it fast; when the k-th
    smallest value is shared by entries on both sides of the cut (a quantized tensor, equal weights),
    which of them are taken is up to the selection algorithm, so that case asks ``torch.topk`` itself,
    as ``torch.nn.utils.prune`` does (``argpartition`` breaks ties differently).
    """
    out = np.zeros(mag.size, dtype=bool)
    if k >= mag.size:
        out[:] = True
    elif k > 0:
        thr = mag[np.argpartition(mag, k - 1)[k - 1]]
        below = mag < thr
        n_below = int(np.count_nonzero(below))
        if n_below + int(np.count_nonzero(mag == thr)) == k:
            out = below | (mag == thr)
        else:
            out[torch.topk(torch.from_numpy(np.ascontiguousarray(mag)), k, largest=False).indices.numpy()] = True
    return out


def _keep_masks(arrays: dict[str, np.ndarray], amount: float, scope: str, structured: bool,
                dim: int, norm: int, dtypes: dict[str, torch.dtype] | None = None) -> dict[str, np.ndarray]:
    """``True`` = kept, same shapes as ``arrays``; tensors the method does not apply to keep all.

    The counts and the choice (smallest ``|w|``, smallest slice norm) are those of
    ``prune.L1Unstructured`` / ``prune.global_unstructured`` / ``prune.LnStructured``, ties included;
    unstructured masks are numpy (a codec call need not wait on torch's thread pool for tiny tensors)
    unless a tie at the cut needs ``torch.topk``. ``dtypes``: each tensor's own dtype, in which
    structured slice norms are computed (float64 if not given).
    """
    masks: dict[str, np.ndarray] = {}
    if structured:
        for name, a in arrays.items():
            if a.ndim < 2 or a.size == 0:
                masks[name] = np.ones(a.shape, dtype=bool)
                continue
            # LnStructured's own computation: the slice norms in the tensor's dtype (float32 sums round
            # differently from float64 ones, which can reorder nearly equal slices), then torch.topk
            # keeping the largest (size - k), which also settles ties among equal norms as it does.
            t = torch.from_numpy(a).to(dtypes.get(name, torch.float64) if dtypes else torch.float64)
            dims = [d for d in range(a.ndim) if d != dim]
            norms = torch.linalg.vector_norm(t, ord=norm, dim=dims)
            size = a.shape[dim]
            keep = np.zeros(size, dtype=bool)
            n_keep = size - prune_count(amount, size)
            if n_keep == size:
                keep[:] = True
            elif n_keep > 0:
                keep[torch.topk(norms, n_keep, largest=True).indices.numpy()] = True
            shape = [1] * a.ndim
            shape[dim] = size
            masks[name] = np.broadcast_to(keep.reshape(shape), a.shape).copy()
        return masks
    if scope == "layer":
        for name, a in arrays.items():
            masks[name] = ~_smallest(np.abs(a).reshape(-1), prune_count(amount, a.size)).reshape(a.shape)
        return masks
    if not arrays:
        return masks
    mag = np.concatenate([np.abs(a).reshape(-1) for a in arrays.values()])
    keep = ~_smallest(mag, prune_count(amount, mag.size))
    bounds = np.cumsum([a.size for a in arrays.values()])[:-1]
    for (name, a), part in zip(arrays.items(), np.split(keep, bounds), strict=True):
        masks[name] = part.reshape(a.shape)
    return masks


def magnitude_masks(state: State, amount: float, scope: str = "layer",
                    compressible: Iterable[str] | None = None, structured: bool = False, dim: int = 0,
                    norm: int = 1) -> dict[str, torch.Tensor]:
    """L1 pruning masks (``bool``, ``True`` = kept) for the compressible tensors of ``state``.

    Keep them to re-apply after every training step (``ClientTask.param_masks``). ``compressible``
    defaults to :func:`weight_names`; the arguments mean what the ``prune`` stage's fields mean.
    """
    PruneParams(amount=amount, scope=scope, structured=structured, dim=dim, norm=norm)  # same checks
    names = weight_names(state) if compressible is None else set(compressible)
    tensors = {n: t.detach() for n, t in state.items() if n in names and t.is_floating_point()}
    arrays = {n: t.to("cpu", torch.float64).numpy() for n, t in tensors.items()}
    masks = _keep_masks(arrays, amount, scope, structured, dim, norm, {n: t.dtype for n, t in tensors.items()})
    return {n: torch.from_numpy(m).to(tensors[n].device) for n, m in masks.items()}


@CODECS.register("prune", "L1 magnitude pruning: unstructured per layer or global, or structured filters")
class Prune(Stage):
    """L1 magnitude pruning of the compressible tensors."""

    name = "prune"
    Params = PruneParams
    params: PruneParams

    def apply(self, works: list[Work], ctx: CodecContext, report: Report) -> None:
        p = self.params
        keep = _keep_masks({w.name: w.values.reshape(w.shape) for w in works}, p.amount, p.scope,
                           p.structured, p.dim, p.norm, {w.name: w.dtype for w in works})
        for w in works:
            w.zero_out(~keep[w.name].reshape(-1))
        report.ask_sparsity(p.amount)
