"""Sub-models of a width-scaled global model, shared by HeteroFL, FedRolex and Federated Dropout.

* **Index plans**: for every tensor of the global state, which entries along each axis a client's
  sub-model holds. An axis entry is an ``int`` k (the prefix ``[0, k)``) or a tensor of indices.
  Prefix plans (HeteroFL) come from the sub-model's shapes alone, so they work for any model whose
  narrower tensors are prefixes of the wider ones. Other plans (a rolling window, random channels)
  choose indices per *channel group* — every dimension coupled to the same channels, declared by
  the model's ``channel_groups()`` (see :mod:`fedslim.models.coupling`) — so a channel is kept or
  dropped consistently in the convolution, its bias and norm, the next layer's inputs and across
  residual adds.
* **Extraction**: the sub-model's state is the global tensors indexed by the plan, nothing else,
  so what the engine encodes for the downlink is exactly the sub-model.
* **Combine**: HeteroFL's sum-and-count. Each global element becomes the (optionally weighted) mean
  of the updates of the clients whose sub-model holds it; elements nobody held are left as they
  are; in the output layer a client may count only on the rows of its own labels.
* **Static BN query**: the ``bn_stats`` client procedure and the server-side merge of the clients'
  statistics (HeteroFL's privacy-preserving sBN: no pass over central training data).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from fedslim.data.types import TensorData
from fedslim.engine.task import ClientResult, ClientTask, ModelSpec, State
from fedslim.models.coupling import Member
from fedslim.models.layers import Scaler, batch_norms
from fedslim.registry import CLIENT_PROCEDURES

AxisIndex = int | torch.Tensor
IndexPlan = dict[str, tuple[AxisIndex, ...]]
# (group id, global channel count n, sub-model channel count k) -> k indices in [0, n)
Chooser = Callable[[int, int, int], torch.Tensor]

_BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def meta_model(spec: ModelSpec) -> nn.Module:
    """``spec`` built on the meta device: exact shapes, no memory, global RNG untouched."""
    with torch.device("meta"):
        return spec.build()


def state_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in meta_model(spec).state_dict().items()}


def output_layer_keys(model: nn.Module) -> tuple[str, ...]:
    """Weight and bias of the last linear layer: the classifier, whose rows are the classes."""
    name = None
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear):
            name = n
    if name is None:
        return ()
    keys = set(model.state_dict())
    return tuple(k for k in (f"{name}.weight", f"{name}.bias") if k in keys)


def expand(idx: torch.Tensor, block: int) -> torch.Tensor:
    """Channel indices -> indices of their ``block`` consecutive entries (flattened feature maps)."""
    if block == 1:
        return idx
    return (idx[:, None] * block + torch.arange(block)).reshape(-1)


class ChannelLayout:
    """Shapes, channel groups and output layer of one global model spec."""

    def __init__(self, spec: ModelSpec):
        model = meta_model(spec)
        self.spec = spec
        self.shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        self.output_keys = output_layer_keys(model)
        declare = getattr(model, "channel_groups", None)
        self.groups: list[list[Member]] | None = declare() if callable(declare) else None
        self.sizes: list[int] = []
        self.member_of: dict[tuple[str, int], tuple[int, int]] = {}
        for gid, members in enumerate(self.groups or []):
            n = None
            for key, axis, block in members:
                if key not in self.shapes:
                    raise ValueError(f"model '{spec.name}': channel group member {key} is not in the state dict")
                size, rest = divmod(self.shapes[key][axis], block)
                if rest or (n is not None and size != n):
                    raise ValueError(f"model '{spec.name}': {key} axis {axis} has {self.shapes[key][axis]} "
                                     f"entries, inconsistent with its channel group ({n} channels x {block})")
                n = size
                if (key, axis) in self.member_of:
                    raise ValueError(f"model '{spec.name}': {key} axis {axis} is in two channel groups")
                self.member_of[(key, axis)] = (gid, block)
            self.sizes.append(int(n or 0))

    def _check_keys(self, sub_shapes: dict[str, tuple[int, ...]]) -> None:
        if set(sub_shapes) != set(self.shapes):
            diff = sorted(set(sub_shapes) ^ set(self.shapes))
            raise ValueError(f"model '{self.spec.name}': sub-model and global model disagree on tensors {diff[:3]}")

    def prefix_plan(self, sub_shapes: dict[str, tuple[int, ...]]) -> IndexPlan:
        """HeteroFL's plan: the first k entries along every axis."""
        self._check_keys(sub_shapes)
        plan: IndexPlan = {}
        for k, shape in self.shapes.items():
            sub = sub_shapes[k]
            if len(sub) != len(shape) or any(s > g for s, g in zip(sub, shape, strict=True)):
                raise ValueError(f"model '{self.spec.name}': {k} has shape {sub} in the sub-model, not a "
                                 f"prefix of the global {shape}")
            plan[k] = tuple(sub)
        return plan

    def plan(self, sub_shapes: dict[str, tuple[int, ...]], choose: Chooser) -> IndexPlan:
        """A plan whose channels come from ``choose``, called once per channel group in a fixed order
        (so a seeded chooser gives reproducible plans). Groups the sub-model keeps whole are left
        unpermuted without asking ``choose``."""
        if self.groups is None:
            raise ValueError(f"model '{self.spec.name}' declares no channel groups (a channel_groups() "
                             f"method); only prefix sub-models (HeteroFL) can be cut from it")
        self._check_keys(sub_shapes)
        chosen: list[torch.Tensor | None] = []
        for gid, members in enumerate(self.groups):
            key, axis, block = members[0]
            n, k = self.sizes[gid], sub_shapes[key][axis] // block
            for mk, ma, mb in members:
                if sub_shapes[mk][ma] != k * mb:
                    raise ValueError(f"model '{self.spec.name}': {mk} axis {ma} has {sub_shapes[mk][ma]} "
                                     f"entries in the sub-model, inconsistent with its channel group ({k} x {mb})")
            if k > n:
                raise ValueError(f"model '{self.spec.name}': sub-model wider than the global model at {key}")
            if k == n:
                chosen.append(None)
                continue
            idx = torch.as_tensor(choose(gid, n, k), dtype=torch.long)
            if idx.shape != (k,) or len(torch.unique(idx)) != k or int(idx.min()) < 0 or int(idx.max()) >= n:
                raise ValueError(f"channel chooser returned {idx.tolist()[:8]}..., expected {k} distinct "
                                 f"indices in [0, {n})")
            chosen.append(idx)
        plan: IndexPlan = {}
        for key, shape in self.shapes.items():
            axes: list[AxisIndex] = []
            for a, size in enumerate(shape):
                hit = self.member_of.get((key, a))
                if hit is None:
                    if sub_shapes[key][a] != size:
                        raise ValueError(f"model '{self.spec.name}': {key} axis {a} shrinks with the width "
                                         f"but no channel group declares it")
                    axes.append(size)
                    continue
                gid, block = hit
                idx = chosen[gid]
                axes.append(size if idx is None else expand(idx, block))
            plan[key] = tuple(axes)
        return plan


def is_prefix(plan: IndexPlan) -> bool:
    return all(isinstance(a, int) for axes in plan.values() for a in axes)


def extract(state: State, plan: IndexPlan) -> State:
    """The sub-model's tensors: ``state`` indexed by ``plan`` (prefixes are views, no copy)."""
    out: State = {}
    for k, t in state.items():
        v = t
        for a, ix in enumerate(plan[k]):
            if isinstance(ix, int):
                if ix != v.shape[a]:
                    v = v.narrow(a, 0, ix)
            else:
                v = v.index_select(a, ix.to(v.device))
        out[k] = v.contiguous()
    return out


@dataclass
class Contribution:
    """One client's update for :func:`combine`."""

    delta: State  # sub-model shaped
    plan: IndexPlan
    weight: float = 1.0
    rows: torch.Tensor | None = None  # output-layer rows (classes) it may update; None: all


def _placement(axes: tuple[AxisIndex, ...], d: torch.Tensor,
               rows: torch.Tensor | None) -> tuple[tuple[slice | torch.Tensor, ...], torch.Tensor]:
    """Where a sub-model tensor lands in the global one, and the values that land there."""
    if rows is None and all(isinstance(a, int) for a in axes):
        return tuple(slice(0, a) for a in axes), d  # type: ignore[arg-type]
    idx = [torch.arange(a) if isinstance(a, int) else a for a in axes]
    if rows is not None:
        idx[0] = idx[0][rows]
        d = d.index_select(0, rows.to(d.device))
    nd = len(idx)
    mesh = tuple(t.view([-1 if i == j else 1 for j in range(nd)]) for i, t in enumerate(idx))
    return mesh, d


def combine(state: State, contributions: Iterable[Contribution], output_keys: Iterable[str] = ()) -> State:
    """Sum-and-count: per global element, the weighted mean of the deltas of the clients that hold it.

    Returns a delta shaped like ``state`` (zero where no client held the element), so the new model
    is ``state + delta`` and a server optimizer can act on it. Accumulated in float64; each term is
    ``delta * (w / total_w)`` in client order, which with every client holding everything is exactly
    :func:`fedslim.algorithms.aggregate.mean_delta`'s arithmetic, weighted or not (so rate-1 HeteroFL equals
    FedAvg bit for bit).
    """
    contributions = [c for c in contributions if c.weight > 0]
    outs = set(output_keys)
    delta: State = {}
    if not contributions:
        return delta
    for k, ref in state.items():
        placed = []
        for c in contributions:
            index, vals = _placement(c.plan[k], c.delta[k], c.rows if k in outs else None)
            placed.append((index, vals, c.weight))
        cnt = torch.zeros(ref.shape, dtype=torch.float64)
        for index, _, w in placed:
            cnt[index] += w
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for index, vals, w in placed:
            total = cnt[index]
            # A true division: ``w / tensor`` is computed as ``tensor.reciprocal() * w``, one rounding
            # more, which put weighted runs a last bit away from FedAvg's ``w / w.sum()``.
            acc[index] += vals.to("cpu", torch.float64) * torch.full_like(total, w).div_(total)
        delta[k] = acc.to(ref.dtype) if ref.is_floating_point() else acc.round().to(ref.dtype)
    return delta


# ------------------------------------------------------------------------------------------------
# static BatchNorm: client statistics and their merge


def _load_without_bn_stats(model: nn.Module, state: State) -> None:
    bn_keys = {f"{n}.{b}" for n, _ in batch_norms(model) for b in _BN_BUFFERS}
    dev = next(model.parameters()).device
    missing, unexpected = model.load_state_dict({k: v.to(dev) for k, v in state.items()}, strict=False)
    missing = [k for k in missing if k not in bn_keys]
    if missing or unexpected:
        raise ValueError(f"client model and payload disagree: missing {missing[:3]}, unexpected {unexpected[:3]}")


@CLIENT_PROCEDURES.register("bn_stats", "per-channel mean/var of every BatchNorm input on local data (static BN)")
@torch.no_grad()
def bn_stats_procedure(task: ClientTask, data: TensorData, model: nn.Module) -> ClientResult:
    """HeteroFL's sBN query, answered by one client: a forward pass over its local data in training
    mode (each BatchNorm normalises with batch statistics, as during training) while recording the
    exact per-channel mean and variance of every BatchNorm's input over all of it.

    Dropout and Scaler run as at inference: the statistics must describe the network that will be
    evaluated. ``task.extras``: ``batch_size`` (default 500), ``max_samples`` (a seeded subset).
    Returns ``extras['bn']`` ({layer.running_mean / .running_var: float32}, population variance) and
    ``extras['bn_n']`` ({layer: number of values per channel behind them}).
    """
    _load_without_bn_stats(model, task.state)
    was_training = model.training
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd | Scaler):
            m.eval()
    n = len(data)
    idx = torch.arange(n)
    max_samples = task.extras.get("max_samples")
    if max_samples is not None and n > int(max_samples):
        gen = torch.Generator()
        gen.manual_seed(task.seed)
        idx = torch.randperm(n, generator=gen)[: int(max_samples)].sort().values
        n = len(idx)
    sums: dict[str, list[torch.Tensor | int]] = {}

    def hook(name: str) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def record(_: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0]
            dims = [0, *range(2, x.dim())]
            s1 = x.sum(dims, dtype=torch.float64)
            s2 = (x * x).sum(dims, dtype=torch.float64)
            cnt = x.numel() // x.shape[1]
            if name in sums:
                acc = sums[name]
                acc[0] = acc[0] + s1  # type: ignore[operator]
                acc[1] = acc[1] + s2  # type: ignore[operator]
                acc[2] = int(acc[2]) + cnt
            else:
                sums[name] = [s1, s2, cnt]
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in batch_norms(model)]
    try:
        bs = max(2, int(task.extras.get("batch_size", 500)))
        starts = list(range(0, n, bs))
        # A last batch of one sample cannot be batch-normalised: fold it into the previous batch.
        if len(starts) > 1 and n - starts[-1] == 1:
            starts.pop()
        dev = data.x.device
        if n >= 2:
            for i, s in enumerate(starts):
                e = starts[i + 1] if i + 1 < len(starts) else n
                model(data.x[idx[s:e].to(dev)])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    stats: State = {}
    counts: dict[str, int] = {}
    for name, (s1, s2, cnt) in sums.items():
        mean = s1 / cnt  # type: ignore[operator]
        var = (s2 / cnt - mean * mean).clamp_min(0)  # type: ignore[operator]
        stats[f"{name}.running_mean"] = mean.float().cpu()
        stats[f"{name}.running_var"] = var.float().cpu()
        counts[name] = int(cnt)
    return ClientResult(task.client, task.round, {}, n, 0, 0.0,
                        {"bn": stats, "bn_n": counts, "level": task.extras.get("level")})


def merge_bn_stats(results: Iterable[ClientResult], layers: Iterable[str]) -> State:
    """Pool clients' BatchNorm statistics as if over the union of their data: count-weighted means,
    variance ``E[var + mean^2] - mean^2`` (then the unbiased correction BatchNorm uses). Layers no
    client had data for keep mean 0 and variance 1."""
    out: State = {}
    results = list(results)
    for layer in layers:
        tot, s1, s2 = 0, None, None
        for r in results:
            n = r.extras.get("bn_n", {}).get(layer, 0)
            if not n:
                continue
            m = r.extras["bn"][f"{layer}.running_mean"].double()
            v = r.extras["bn"][f"{layer}.running_var"].double()
            s1 = n * m if s1 is None else s1 + n * m
            s2 = n * (v + m * m) if s2 is None else s2 + n * (v + m * m)
            tot += n
        if s1 is None or s2 is None:
            continue
        mean = s1 / tot
        var = (s2 / tot - mean * mean).clamp_min(0) * (tot / max(tot - 1, 1))
        out[f"{layer}.running_mean"] = mean.float()
        out[f"{layer}.running_var"] = var.float()
        out[f"{layer}.num_batches_tracked"] = torch.tensor(len(results), dtype=torch.long)
    return out
