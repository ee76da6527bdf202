"""Vectorized backend: clients that share a model spec train as one batched computation.

The train tasks of a cohort are grouped by (model spec, local-training settings, data split). For a
group of G clients the parameters, BatchNorm statistics and optimizer state are stacked along a new
leading axis, and every local step is one forward and backward pass of all G clients, followed by SGD
(momentum, Nesterov, weight decay) or Adam applied to the stacked tensors. The pass is taken one of
two ways:

* ``stacked`` (wherever the model's layers allow it, which is every model in the zoo): one ordinary
  module computes all G clients, their activations side by side along the channel axis, with grouped
  convolutions and batched matrix products (:mod:`fedslim.engine.stacked`); a step of all G clients
  costs the host about what two serial client steps do;
* ``vmap`` (any other model): ``torch.func.vmap`` over ``torch.func.grad`` of ``functional_call``,
  the same kernels with the transforms' cost in Python on every step.

It is a GPU play: one large step keeps the device busy where G small ones would not. ``auto`` picks
this backend only on CUDA; on a multi-core CPU it picks ``process`` (see docs/backends.md for how the
two compare there).

Each client draws its batches from its own generator exactly as :func:`fedslim.engine.client.train_model`
does (the same ``_batches`` permutations, the fold of a final 1-sample batch, the augmentation
draws), so the results match the serial backend within floating-point tolerance. Clients are
sorted by their number of steps; at step s only the prefix of clients that still have a batch is
computed and updated, so a client with fewer batches stops exactly where it would alone and its
weights and optimizer state are left untouched afterwards. Batches shorter than the longest in a
step are padded with weight-0 samples: they add nothing to the loss or the gradient, and
BatchNorm layers are swapped for a masked version that leaves them out of the batch statistics.

Dropout: serial training draws a client's masks from the global generator seeded with the task's
seed. The stacked path replays that per client (each client's generator state is kept and swapped in
for its draws), so models with dropout match serial too; vmap cannot, so a model with dropout that
cannot take the stacked path trains serially.

What runs serially instead (each reason said once, as a warning): tasks that are not ``train``
tasks, single-task groups, models with buffers outside BatchNorm, models with dropout off the stacked
path, clients with no data.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.optim.adam import adam

from fedslim.engine import process_backend
from fedslim.engine.backends import ModelBuffers, SerialBackend
from fedslim.engine.client import Schedule, _fusable, augment_with, epoch_schedule
from fedslim.engine.memory import available_bytes, client_bytes
from fedslim.engine.process_backend import ProcessBackend, fork_available
from fedslim.engine.stacked import (
    ClientRng,
    StackCtx,
    check_stacked,
    dropout_input_dims,
    dropout_layers,
    forward_stacked,
    masked_batch_norm,
    stack_model,
)
from fedslim.engine.store import ClientStore
from fedslim.engine.task import ClientResult, ClientTask, LocalTrain, ModelSpec
from fedslim.registry import BACKENDS

Tensor = torch.Tensor

# The share of the device's free memory a group is sized to take (the per-client figure is already an
# upper estimate; the rest is left for the data, the allocator's slack and everything else running).
MEMORY_SHARE = 0.8


class _Ctx:
    """Per-call side channel into the masked BatchNorm layers (sample weights in, statistics out)."""

    def __init__(self) -> None:
        self.weight: Tensor | None = None
        self.stats: dict[str, tuple[Tensor, Tensor]] = {}


class MaskedBatchNorm(nn.Module):
    """Training-mode BatchNorm over the weight-1 samples of a padded batch, without in-place buffer
    updates: the batch mean and unbiased variance go out through the context, and the caller folds
    them into the stacked running statistics. Parameter and buffer names match ``nn.BatchNorm*``."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, name: str, ctx: _Ctx):
        super().__init__()
        self.name, self.ctx, self.eps = name, ctx, bn.eps
        self.affine, self.track = bn.affine, bn.track_running_stats
        if bn.affine:
            self.weight = nn.Parameter(bn.weight.detach().clone())
            self.bias = nn.Parameter(bn.bias.detach().clone())
        for b in ("running_mean", "running_var", "num_batches_tracked"):
            t = getattr(bn, b, None)
            if t is not None:
                self.register_buffer(b, t.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        w = self.ctx.weight
        assert w is not None
        # One client under vmap: the stacked layout with k = 1.
        g, b = (self.weight.unsqueeze(0), self.bias.unsqueeze(0)) if self.affine else (None, None)
        y, mean, var = masked_batch_norm(x.unsqueeze(1), w.unsqueeze(0), g, b, self.eps)
        if self.track:
            self.ctx.stats[self.name] = (mean[0].detach(), var[0].detach())
        return y.squeeze(1)


@dataclass
class _Plan:
    """A functional copy of one spec's model and what the batched step needs to know about it."""

    model: nn.Module
    ctx: _Ctx
    trainable: list[str]
    frozen: list[str]  # parameters without grad
    buffers: list[str]
    bns: dict[str, tuple[float | None, list[str]]]  # bn name -> (momentum, its buffer keys)
    keys: frozenset[str]
    stacked: tuple[nn.Module, StackCtx] | None = None  # see fedslim.engine.stacked; None: vmap
    why_vmap: str | None = None  # why there is no stacked module
    has_dropout: bool = False


def why_not_vectorizable(model: nn.Module) -> str | None:
    for name, m in model.named_modules():
        if isinstance(m, nn.SyncBatchNorm):
            return "SyncBatchNorm"
        if not isinstance(m, nn.modules.batchnorm._BatchNorm) and any(True for _ in m.buffers(recurse=False)):
            return f"module {name or type(m).__name__} keeps buffers outside BatchNorm"
    return None


def _make_plan(model: nn.Module, spec: ModelSpec, use_stacked: bool = True) -> _Plan:
    fm = copy.deepcopy(model)
    ctx = _Ctx()
    bns: dict[str, tuple[float | None, list[str]]] = {}
    for name, m in list(fm.named_modules()):
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            parent_name, _, attr = name.rpartition(".")
            parent = fm.get_submodule(parent_name) if parent_name else fm
            setattr(parent, attr, MaskedBatchNorm(m, name, ctx))
            prefix = f"{name}."
            bns[name] = (m.momentum, [prefix + b for b, _ in m.named_buffers(recurse=False)])
    fm.train()
    params = dict(fm.named_parameters())
    trainable = [k for k, p in params.items() if p.requires_grad]
    frozen = [k for k, p in params.items() if not p.requires_grad]
    buffers = [k for k, _ in fm.named_buffers()]
    plan = _Plan(fm, ctx, trainable, frozen, buffers, bns, frozenset(fm.state_dict()),
                 has_dropout=bool(dropout_layers(model)))
    if not use_stacked:
        plan.why_vmap = "the stacked path was turned off"
        return plan
    made = stack_model(model)
    if isinstance(made, str):
        plan.why_vmap = made
        return plan
    why = check_stacked(model, made[0], made[1], spec.input_shape, spec.num_classes)
    if why is None:
        plan.stacked = made
    else:
        plan.why_vmap = why
    return plan


@dataclass
class _Schedule:
    idx: Tensor  # (S, G, B) long: rows into the group's concatenated data; padding points at row 0
    weight: Tensor  # (S, G, B) float: 1 for a real sample, 0 for padding
    count: Tensor  # (S, G) float: real samples per step
    steps: list[int]  # per client
    rows: list[list[int]]  # (S, G) real samples per step, on the host (for dropout draws)
    flip: Tensor | None = None  # (S, G, B) bool
    dy: Tensor | None = None  # (S, G, B) long
    dx: Tensor | None = None


def client_schedule(task: ClientTask, n: int, image: bool) -> Schedule:
    """The batches (and augmentation draws) ``train_model`` would take for ``task`` on n samples,
    drawn from a generator seeded the same way, in the same order (on the CPU)."""
    tr = task.train
    assert tr is not None
    gen = torch.Generator()
    gen.manual_seed(task.seed)
    out: Schedule = []
    for _ in range(tr.epochs):
        out += epoch_schedule(n, tr, gen, image)
        if tr.max_steps is not None and len(out) >= tr.max_steps:
            return out[:tr.max_steps]
    return out


# Failed allocations that reach Python as a plain RuntimeError: cuDNN's and cuBLAS's own workspace
# allocations on a GPU, CUDA's own (outside torch's caching allocator), and the CPU allocator.
_OOM_MESSAGES = ("CUDNN_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_ALLOC_FAILED", "CUDA error: out of memory",
                 "DefaultCPUAllocator: can't allocate memory")


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` says that memory ran out (torch's ``OutOfMemoryError`` or one of the above)."""
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError)
                                                       and any(m in str(e) for m in _OOM_MESSAGES))


def _to(t: Tensor | None, device: str) -> Tensor | None:
    return None if t is None else t.to(device)


def _build_schedule(per: list[list[tuple[Tensor, tuple[Tensor, ...]]]], offsets: list[int], mode: str,
                    device: str) -> _Schedule:
    # Filled with one scatter per array rather than a few small ops per (client, step): on a GPU
    # the host's time per operation is what a small model's step costs, and 25 clients x 95 steps of
    # slicing was as many operations as the steps themselves.
    steps = [len(p) for p in per]
    S, G = max(steps), len(per)
    batches = [b for p in per for b, _ in p]  # client-major, then step
    B = max(len(b) for b in batches)
    lens = torch.tensor([len(b) for b in batches])
    step_of = torch.tensor([s for p in per for s in range(len(p))])
    client_of = torch.tensor([g for g, p in enumerate(per) for _ in p])
    starts = torch.cumsum(lens, 0) - lens
    col = torch.arange(int(lens.sum())) - torch.repeat_interleave(starts, lens)
    dest = torch.repeat_interleave(step_of * G + client_of, lens) * B + col  # flat (s, g, j) of each sample
    base = torch.tensor(offsets)
    idx = base.view(1, G, 1).expand(S, G, B).clone()  # padding points at the client's first row
    idx.view(-1)[dest] = torch.cat(batches) + torch.repeat_interleave(base[client_of], lens)
    weight = torch.zeros(S, G, B)
    weight.view(-1)[dest] = 1.0
    flip = dy = dx = None
    if mode != "none":
        flip = torch.zeros(S, G, B, dtype=torch.bool)
        flip.view(-1)[dest] = torch.cat([d[0] for p in per for _, d in p])
    if mode == "crop_flip":
        dy, dx = torch.zeros(S, G, B, dtype=torch.long), torch.zeros(S, G, B, dtype=torch.long)
        dy.view(-1)[dest] = torch.cat([d[1] for p in per for _, d in p])
        dx.view(-1)[dest] = torch.cat([d[2] for p in per for _, d in p])
    counts = torch.zeros(S, G, dtype=torch.long)
    counts[step_of, client_of] = lens
    return _Schedule(idx.to(device), weight.to(device), counts.to(weight.dtype).to(device), steps, counts.tolist(),
                     _to(flip, device), _to(dy, device), _to(dx, device))


class _Optimizer:
    """torch.optim.SGD / Adam over stacked parameters; ``k`` leading clients take part in a step, the
    rest are left untouched.

    Adam is torch's own functional ``adam`` on the k-client slices, fused (one pass over each tensor)
    where the serial procedure's optimizer is fused too, so both run the same kernel on each element;
    the foreach form took seven passes, a large share of a small model's step on a CPU."""

    def __init__(self, tr: LocalTrain, params: dict[str, Tensor]):
        self.tr, self.o = tr, tr.optimizer
        self.t = 0
        if self.o.name == "sgd":
            self.buf: dict[str, Tensor] | None = None
        elif self.o.name == "adam":
            self.m = {k: torch.zeros_like(v) for k, v in params.items()}
            self.v = {k: torch.zeros_like(v) for k, v in params.items()}
            self.fused = _fusable(list(params.values()))
            # The step count as torch's Adam keeps it (a tensor per parameter; the fused kernel wants
            # them on the parameters' device), advanced by the update itself.
            self.steps = {k: torch.zeros((), dtype=torch.float32, device=v.device if self.fused else "cpu")
                          for k, v in params.items()}
        else:
            raise ValueError(f"train.optimizer.name: unknown optimizer {self.o.name!r}")

    def step(self, params: dict[str, Tensor], grads: dict[str, Tensor], k: int) -> None:
        o, lr = self.o, self.tr.lr
        self.t += 1
        names = list(grads)
        ps = [params[n][:k] for n in names]
        gs = [grads[n] for n in names]
        if o.name == "adam":
            # The fused kernel walks a parameter and its gradient in memory order, so they must share
            # strides; autograd.grad may hand back a transposed layout (the stacked Linear's weights).
            gs = [g if g.stride() == q.stride() else torch.empty_like(q).copy_(g) for g, q in zip(gs, ps, strict=True)]
            adam([*ps], gs, [self.m[n][:k] for n in names], [self.v[n][:k] for n in names], [],
                 [self.steps[n] for n in names], foreach=not self.fused, fused=self.fused or None,
                 amsgrad=False, beta1=o.betas[0], beta2=o.betas[1], lr=lr, weight_decay=o.weight_decay,
                 eps=1e-8,  # torch.optim.Adam's default, which the serial procedure uses
                 maximize=False)
            return
        # SGD as torch's per-tensor loop computes it, in torch._foreach_* ops (a handful of kernels,
        # so that a GPU step is not launch-bound).
        if o.weight_decay != 0:
            gs = torch._foreach_add(gs, ps, alpha=o.weight_decay)
        if o.name == "sgd":
            if o.momentum > 0:
                if self.buf is None:
                    self.buf = {n: torch.zeros_like(p) for n, p in params.items()}
                bufs = [self.buf[n][:k] for n in names]
                if self.t == 1:
                    torch._foreach_copy_(bufs, gs)
                else:
                    torch._foreach_mul_(bufs, o.momentum)
                    torch._foreach_add_(bufs, gs)
                gs = torch._foreach_add(gs, bufs, alpha=o.momentum) if o.nesterov else bufs
            torch._foreach_add_(ps, gs, alpha=-lr)
            return


def _clip(grads: dict[str, Tensor], max_norm: float) -> dict[str, Tensor]:
    """``nn.utils.clip_grad_norm_`` per client over its own gradients."""
    norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), 2, dim=1) for g in grads.values()], 1)
    total = torch.linalg.vector_norm(norms, 2, dim=1)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return {n: g * coef.reshape([-1] + [1] * (g.dim() - 1)) for n, g in grads.items()}


@BACKENDS.register("vectorized", "same-spec clients trained as one batched step (stacked model or vmap); for GPUs")
class VectorizedBackend:
    def __init__(self, store: ClientStore, device: str = "cpu", cfg: Any = None, *, max_group: int | None = None,
                 stacked: bool = True, rewrite: bool = True, **_: object):
        self.store = store
        self.device = device
        eng = getattr(cfg, "engine", None)
        self.max_group = max_group if max_group is not None else getattr(eng, "max_group", None)
        self.use_stacked = stacked  # False: always the vmap step (for tests and comparisons)
        # No channel padding: the stacked model is built from this buffer and knows plain layers only
        # (and its stacked channels are wide).
        self.serial = SerialBackend(store, device=device, rewrite=rewrite, pad_channels=False)
        self.buffers: ModelBuffers = self.serial.buffers
        self._plans: dict[ModelSpec, _Plan | str] = {}
        self._said: set[str] = set()
        self._client_bytes: dict[tuple[ModelSpec, int], int] = {}
        self._told_memory: set[ModelSpec] = set()
        self.counts = {"vectorized": 0, "serial": 0}  # tasks run each way (for reports and tests)

    def _say_once(self, msg: str) -> None:
        if msg not in self._said:
            self._said.add(msg)
            warnings.warn(f"vectorized backend: {msg}", RuntimeWarning, stacklevel=3)

    def _plan(self, spec: ModelSpec) -> _Plan | str:
        if spec not in self._plans:
            model = self.buffers.get(spec)
            why = why_not_vectorizable(model)
            plan = why if why is not None else _make_plan(model, spec, self.use_stacked)
            drops = dropout_layers(model)
            if isinstance(plan, _Plan) and plan.stacked is None and drops:
                plan = (f"dropout ({drops[0]}) is replayed per client only on the stacked path, "
                        f"which this model cannot take: {plan.why_vmap}")
            if isinstance(plan, _Plan) and drops and self.store.channels_last and len(spec.input_shape) == 3:
                images = [n for n, d in dropout_input_dims(model, spec.input_shape).items() if d > 2]
                if images:
                    plan = (f"dropout ({images[0]}) acts on image activations, and trained channels-last "
                            f"their masks follow a memory layout the stacked path cannot replay "
                            f"(engine.memory_format=contiguous lifts this)")
            if isinstance(plan, _Plan) and plan.why_vmap is not None and self.use_stacked:
                self._say_once(f"{spec.name} trains through vmap (slower per step): {plan.why_vmap}")
            self._plans[spec] = plan
        return self._plans[spec]

    def path(self, spec: ModelSpec) -> str:
        """How clients of ``spec`` train here: 'stacked', 'vmap' or 'serial'."""
        plan = self._plan(spec)
        return "serial" if isinstance(plan, str) else "stacked" if plan.stacked is not None else "vmap"

    def run(self, tasks: list[ClientTask]) -> list[ClientResult]:
        out: list[ClientResult | None] = [None] * len(tasks)
        groups: list[tuple[tuple[Any, ...], list[int]]] = []
        alone: list[int] = []
        for i, t in enumerate(tasks):
            if t.kind != "train" or t.train is None:
                alone.append(i)
                continue
            plan = self._plan(t.spec)
            if isinstance(plan, str):
                self._say_once(f"{t.spec.name} runs serially: {plan}")
                alone.append(i)
                continue
            split = t.extras.get("split", "train")
            n = len(self.store.get(t.client, split))
            if set(t.state) != plan.keys or n == 0 or ((n == 1 or t.train.batch_size == 1) and self._has_bn(t.spec)):
                # The serial procedure handles (and reports) these cases: a one-sample batch trains a
                # BatchNorm model there only where torch can take its statistics, and is refused where
                # not; masked statistics here would train it either way.
                alone.append(i)
                continue
            key = (t.spec, t.train, split, None if t.param_masks is None else tuple(sorted(t.param_masks)))
            for gk, members in groups:
                if gk == key:
                    members.append(i)
                    break
            else:
                groups.append((key, [i]))
        for _, members in groups:
            if len(members) == 1:
                alone.extend(members)
                continue
            lo = 0
            while lo < len(members):
                want = min(self.max_group or len(members), len(members) - lo)
                chunk = members[lo:lo + self._fits(tasks[members[0]], want)]
                results = self._train_chunk([tasks[i] for i in chunk])
                if results is None:  # out of memory: max_group was halved; the same clients again
                    continue
                for i, r in zip(chunk, results, strict=True):
                    out[i] = r
                self.counts["vectorized"] += len(chunk)
                lo += len(chunk)
        for i, r in zip(alone, self.serial.run([tasks[i] for i in alone]), strict=True):
            out[i] = r
        self.counts["serial"] += len(alone)
        assert all(r is not None for r in out)
        return out  # type: ignore[return-value]

    def _has_bn(self, spec: ModelSpec) -> bool:
        return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.serial.buffers.get(spec).modules())

    def _fits(self, task: ClientTask, want: int) -> int:
        """How many of ``want`` clients like ``task`` to train at once in the memory the device has
        free (at least one; a single client is what the serial procedure would need anyway)."""
        avail = available_bytes(self.device)
        if avail is None or want <= 1:
            return want
        assert task.train is not None
        key = (task.spec, task.train.batch_size)
        if key not in self._client_bytes:
            self._client_bytes[key] = client_bytes(self.buffers.get(task.spec), task.spec.input_shape,
                                                   task.train.batch_size)
        each = self._client_bytes[key]
        n = max(1, min(want, int(avail * MEMORY_SHARE) // each))
        if n < want and task.spec not in self._told_memory:
            self._told_memory.add(task.spec)
            gib = 2 ** 30
            self._say_once(f"a group of {want} {task.spec.name} clients needs up to {want * each / gib:.1f} GiB "
                           f"({each / gib:.2f} each) and {self.device} has {avail / gib:.1f} GiB free; training "
                           f"at most {n} at once (engine.max_group sets a lower cap)")
        return n

    def _train_chunk(self, tasks: list[ClientTask]) -> list[ClientResult] | None:
        """``_train_group``, or None after halving ``max_group`` when the group did not fit in the
        device's memory (a group of one that does not fit raises)."""
        try:
            return self._train_group(tasks)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if len(tasks) == 1 or not out_of_memory(e):
                raise
        # Outside the except block, so the failed step's tensors (held by the traceback) are freed.
        if str(self.device).startswith("cuda"):
            torch.cuda.empty_cache()
        self.max_group = max(1, len(tasks) // 2)
        self._say_once(f"a group of {len(tasks)} {tasks[0].spec.name} clients ran out of memory on {self.device}; "
                       f"training at most {self.max_group} at once from now on (set engine.max_group to choose)")
        return None

    # ------------------------------------------------------------------ the batched step
    def _train_group(self, tasks: list[ClientTask]) -> list[ClientResult]:
        plan = self._plan(tasks[0].spec)
        assert isinstance(plan, _Plan)
        tr = tasks[0].train
        assert tr is not None
        dev = self.device
        split = tasks[0].extras.get("split", "train")
        datas = [self.store.get(t.client, split) for t in tasks]
        sizes = [len(d) for d in datas]
        image = datas[0].x.dim() == 4
        per = [client_schedule(t, n, image) for t, n in zip(tasks, sizes, strict=True)]
        # Longest schedule first, so the clients still training at any step are a prefix.
        order = sorted(range(len(tasks)), key=lambda g: -len(per[g]))
        tasks, datas = [tasks[g] for g in order], [datas[g] for g in order]
        sizes, per = [sizes[g] for g in order], [per[g] for g in order]
        offsets = [0]
        for n in sizes[:-1]:
            offsets.append(offsets[-1] + n)
        x_all = torch.cat([d.x for d in datas]).to(dev)
        y_all = torch.cat([d.y for d in datas]).to(dev)
        sch = _build_schedule(per, offsets, tr.augment if image else "none", dev)
        G = len(tasks)
        # One copy to the device per distinct start state (FedAvg's cohort shares one), not per client.
        on_dev: dict[int, dict[str, Tensor]] = {}
        for t in tasks:
            if id(t.state) not in on_dev:
                on_dev[id(t.state)] = {k: t.state[k].to(dev) for k in plan.keys}
        start = {k: torch.stack([on_dev[id(t.state)][k] for t in tasks]) for k in plan.keys}
        cur = {k: v.clone() for k, v in start.items()}
        params = {k: cur[k] for k in plan.trainable}
        fixed = {k: cur[k] for k in plan.frozen + plan.buffers}
        nc = tasks[0].spec.num_classes
        lmask = torch.stack([t.label_mask.to(dev) if t.label_mask is not None
                             else torch.ones(nc, dtype=torch.bool, device=dev) for t in tasks])
        pmasks = None
        if tasks[0].param_masks is not None:
            pmasks = {k: torch.stack([t.param_masks[k].to(dev) for t in tasks])  # type: ignore[index]
                      for k in tasks[0].param_masks}
        opt = _Optimizer(tr, params)
        ctx, model = plan.ctx, plan.model

        def loss_fn(p: dict[str, Tensor], f: dict[str, Tensor], x: Tensor, y: Tensor, w: Tensor,
                    lm: Tensor) -> tuple[Tensor, tuple[Tensor, dict[str, tuple[Tensor, Tensor]]]]:
            ctx.weight, ctx.stats = w, {}
            logits = functional_call(model, {**p, **f}, (x,)).masked_fill(~lm, 0.0)
            ce = F.cross_entropy(logits, y, reduction="none")
            loss = (ce * w).sum() / w.sum().clamp_min(1)
            stats, ctx.stats, ctx.weight = ctx.stats, {}, None
            return loss, (loss.detach(), stats)

        vmapped = vmap(grad(loss_fn, has_aux=True))
        Step = tuple[dict[str, Tensor], tuple[Tensor, dict[str, tuple[Tensor, Tensor]]]]

        def vmap_step(k: int, xb: Tensor, yb: Tensor, w: Tensor, lm: Tensor, full: bool) -> Step:
            return vmapped({n: v[:k] for n, v in params.items()}, {n: v[:k] for n, v in fixed.items()},
                           xb, yb, w, lm)

        def stacked_step(k: int, xb: Tensor, yb: Tensor, w: Tensor, lm: Tensor, full: bool) -> Step:
            assert plan.stacked is not None
            sm, sctx = plan.stacked
            sctx.channels_last = self.store.channels_last and image
            leaves = {n: params[n][:k].detach().requires_grad_() for n in plan.trainable}
            logits, stats = forward_stacked(sm, sctx, {**leaves, **{n: v[:k] for n, v in fixed.items()}}, xb, w, nc,
                                            full=full)
            logits = logits.masked_fill(~lm[:, None, :], 0.0)
            ce = F.cross_entropy(logits.reshape(-1, nc), yb.reshape(-1), reduction="none").view(k, -1)
            # Each client's mean loss; their sum has each client's own gradient in its own weights.
            per = (ce * w).sum(1) / w.sum(1).clamp_min(1)
            gs = torch.autograd.grad(per.sum(), list(leaves.values()), materialize_grads=True)
            return dict(zip(leaves, gs, strict=True)), (per.detach(), stats)

        step_fn = stacked_step if plan.stacked is not None else vmap_step
        rng = None
        if plan.stacked is not None and plan.has_dropout:
            rng = plan.stacked[1].rng = ClientRng(dev, [t.seed for t in tasks])
        try:
            loss_sum, seen = self._steps(plan, tr, sch, step_fn, opt, params, cur, pmasks, x_all, y_all, lmask, rng)
        finally:
            if rng is not None:
                rng.close()
                assert plan.stacked is not None
                plan.stacked[1].rng = None
        steps = sch.steps
        results: list[ClientResult | None] = [None] * G
        # One copy back per tensor name for the whole group (each copy from a GPU waits for it), then
        # a private CPU tensor per client.
        deltas = {k: (cur[k] - start[k]).cpu() for k in plan.keys}
        seen_all, loss_all = seen.cpu(), loss_sum.cpu()
        for g, t in enumerate(tasks):
            delta = {k: deltas[k][g].clone() for k in t.state}
            n_seen = int(seen_all[g].item())
            results[order[g]] = ClientResult(t.client, t.round, delta, sizes[g], steps[g],
                                             float(loss_all[g]) / max(n_seen, 1), {"samples_processed": n_seen})
        return results  # type: ignore[return-value]

    def _steps(self, plan: _Plan, tr: LocalTrain, sch: _Schedule, step_fn: Any, opt: _Optimizer,
               params: dict[str, Tensor], cur: dict[str, Tensor], pmasks: dict[str, Tensor] | None,
               x_all: Tensor, y_all: Tensor, lmask: Tensor, rng: ClientRng | None) -> tuple[Tensor, Tensor]:
        """The group's local steps, in place on ``params``/``cur``; returns per-client loss sums and
        samples seen."""
        G = len(sch.steps)
        loss_sum = torch.zeros(G, device=self.device)
        seen = torch.zeros(G, device=self.device)
        steps = sch.steps
        for s in range(max(steps)):
            k = sum(1 for n in steps if n > s)
            real = sch.rows[s][:k]
            if rng is not None:
                rng.rows = real
            # Padding only up to this step's largest batch; with none at all (every client's batch
            # full, most steps), BatchNorm needs no masking.
            b = max(real)
            rows = sch.idx[s, :k, :b]
            xb, yb, w = x_all[rows], y_all[rows], sch.weight[s, :k, :b]
            if sch.flip is not None:
                flat = xb.flatten(0, 1)
                dy = None if sch.dy is None else sch.dy[s, :k, :b].flatten()
                dx = None if sch.dx is None else sch.dx[s, :k, :b].flatten()
                xb = augment_with(flat, tr.augment, sch.flip[s, :k, :b].flatten(), dy, dx).reshape(xb.shape)
            g, (loss, stats) = step_fn(k, xb, yb, w, lmask[:k], min(real) == b)
            if tr.grad_clip is not None:
                g = _clip(g, tr.grad_clip)
            opt.step(params, g, k)
            if pmasks is not None:
                for n, m in pmasks.items():
                    cur[n][:k].mul_(m[:k])
            for bn, (mean, var) in stats.items():
                momentum, _ = plan.bns[bn]
                nbt = cur[f"{bn}.num_batches_tracked"][:k]
                nbt.add_(1)
                f = momentum if momentum is not None else (1.0 / nbt.to(mean.dtype)).unsqueeze(1)
                cur[f"{bn}.running_mean"][:k].mul_(1 - f).add_(mean * f)
                cur[f"{bn}.running_var"][:k].mul_(1 - f).add_(var * f)
            cnt = sch.count[s, :k]
            loss_sum[:k] += loss * cnt
            seen[:k] += cnt
        return loss_sum, seen

    def close(self) -> None:
        self.serial.close()


@BACKENDS.register("auto", "vectorized on CUDA; on CPU the process pool (2+ cores, fork, engine.threads unset or 1), "
                           "else serial")
def auto_backend(store: ClientStore, device: str = "cpu", cfg: Any = None, **kw: Any) -> Any:
    if str(device).startswith("cuda"):
        return VectorizedBackend(store, device=device, cfg=cfg, **kw)
    # On a CPU, single-thread workers on separate cores are as fast as vectorized on LeNet and faster on
    # models whose cohorts split into small groups of wide sub-models (HeteroFL); see bench/README.md.
    # More threads per client were asked for explicitly: only the serial backend can honour that.
    threads = getattr(getattr(cfg, "engine", None), "threads", None) or 1
    use_process = process_backend.usable_cpus() >= 2 and fork_available() and threads == 1
    max_group = getattr(getattr(cfg, "engine", None), "max_group", None)
    if max_group is not None:
        # Allowed with auto because auto picks vectorized on CUDA; here it would do nothing, unsaid.
        warnings.warn(f"engine.max_group={max_group} is used by the vectorized backend only, and engine.backend "
                      f"auto picked {'process' if use_process else 'serial'} on this CPU; set engine.backend: "
                      f"vectorized to use it, or leave it unset", stacklevel=2)
    if use_process:
        return ProcessBackend(store, device=device, cfg=cfg, **kw)
    return SerialBackend(store, device=device, cfg=cfg, **kw)
