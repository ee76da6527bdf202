"""Stacked models: G clients' copies of one model run as one ordinary module, without ``vmap``.

Activations keep the clients side by side along the channel axis: a batch of B samples for each of k
clients is one tensor of shape ``(B, k*C, ...)``, client-major (client 0's C channels, then client 1's).
In that layout every per-sample, per-channel operation (activations, pooling, Scaler, residual adds,
flattening) already acts on each client separately, and only the layers that hold weights or mix
samples need a stacked version:

* ``Conv2d`` becomes one grouped convolution: the k weight tensors are concatenated along the output
  channels and ``groups`` is multiplied by k;
* ``Linear`` becomes one batched matrix product (``baddbmm``) over ``(k, B, F)``;
* ``BatchNorm`` normalises each client's channels over that client's weight-1 samples (the padding of
  a short batch is left out, as in :class:`fedslim.engine.vectorized.MaskedBatchNorm`);
* ``GroupNorm`` becomes one GroupNorm with k times the groups (a sample's groups never span clients);
* ``Dropout`` draws each client's mask from that client's own random state, with the very call
  (``F.dropout`` on the client's real samples, contiguous) that serial training makes after seeding
  the global generator with the task's seed, so the masks are the same bit for bit
  (:class:`ClientRng`; for image activations trained channels-last see :func:`dropout_input_dims`).
  Other dropout layers (``Dropout2d``, ``AlphaDropout``) are refused.

The weights come from a context (``StackCtx.params``, each with a leading client axis) rather than
from module parameters, so one stacked module serves every cohort and every prefix of k clients.

Why not ``torch.func.vmap`` alone: vmap gives the same batched kernels but each step pays for its
transforms in Python, and on a GPU a small model's step is bound by that host time. Here a step of
all k clients costs the host about what two serial client steps do, half what vmap's costs
(bench/vectorized_step.py with tiny batches). On a CPU the wide kernels also use several cores well (a LeNet
grouped convolution of 25 clients scales to 2 threads where 25 small ones do not) and channels-last
max-pooling over k*C channels vectorises where C = 6 does not.

A model whose layers are not all understood here (a layer with weights of another type) is refused
with the reason; a model whose forward does something the layout does not survive (mixing channels
across the whole tensor, say) is caught by :func:`check_stacked`, which compares the stacked module
with per-client forward passes once per model. Either way the vectorized backend falls back to vmap.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fedslim.engine.rewrite import SubsampledConv2d
from fedslim.models.profile import forward_zeros

Tensor = torch.Tensor


class StackCtx:
    """What the stacked layers read (weights, sample weights) and write (batch statistics) per call."""

    def __init__(self) -> None:
        self.params: dict[str, Tensor] = {}
        self.weight: Tensor | None = None  # (k, B) sample weights: 1 real, 0 padding
        self.full = False  # every weight is 1: no padding in this call
        self.stats: dict[str, tuple[Tensor, Tensor]] = {}  # BN name -> (mean, unbiased var), each (k, C)
        self.channels_last = False
        self.rng: ClientRng | None = None  # per-client dropout states; needed only by StackedDropout


class ClientRng:
    """The random state each client's dropout would draw from when trained alone.

    Serial training seeds the global generator with the task's seed and lets ``nn.Dropout`` draw from
    it. Here each client keeps the state that generator would have (the device's default generator,
    seeded and read back); a client's masks are drawn by putting its state into the generator, calling
    ``F.dropout`` exactly as serial does, and taking the advanced state back. The generator's own state
    is restored by :meth:`close`. ``rows`` holds each client's number of real samples in the current
    step (set by the caller; padding samples draw nothing, as they do not exist in serial)."""

    def __init__(self, device: torch.device | str, seeds: list[int]):
        dev = torch.device(device)
        if dev.type == "cuda":
            torch.cuda.init()  # default_generators stays empty until CUDA has started in this process
            index = dev.index if dev.index is not None else torch.cuda.current_device()
            self.gen = torch.cuda.default_generators[index]
        elif dev.type == "cpu":
            self.gen = torch.default_generator
        else:
            raise ValueError(f"per-client dropout states on {dev.type!r}: only cpu and cuda are supported")
        self._saved = self.gen.get_state()
        self.states = []
        for seed in seeds:
            self.gen.manual_seed(seed)
            self.states.append(self.gen.get_state())
        self.gen.set_state(self._saved)
        self.rows: list[int] = [0] * len(seeds)

    def dropout_mask(self, client: int, shape: tuple[int, ...], p: float, like: Tensor,
                     memory_format: torch.memory_format) -> Tensor:
        """What ``F.dropout(x, p)`` multiplies a (shape) ``x`` by, drawn from ``client``'s state."""
        ones = torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=memory_format).fill_(1)
        self.gen.set_state(self.states[client])
        try:
            return F.dropout(ones, p, True)
        finally:
            self.states[client] = self.gen.get_state()

    def close(self) -> None:
        self.gen.set_state(self._saved)


class _Stacked(nn.Module):
    def __init__(self, name: str, ctx: StackCtx):
        super().__init__()
        self.name, self.ctx = name, ctx

    def _p(self, attr: str) -> Tensor | None:
        return self.ctx.params.get(f"{self.name}.{attr}")


class StackedConv2d(_Stacked):
    def __init__(self, m: nn.Conv2d, name: str, ctx: StackCtx):
        super().__init__(name, ctx)
        self.stride, self.padding, self.dilation, self.groups = m.stride, m.padding, m.dilation, m.groups
        self.subsample = isinstance(m, SubsampledConv2d)

    def forward(self, x: Tensor) -> Tensor:
        w, b = self._p("weight"), self._p("bias")
        assert w is not None
        k = w.shape[0]
        wf = w.flatten(0, 1)
        if self.ctx.channels_last:
            wf = wf.contiguous(memory_format=torch.channels_last)
        bias = None if b is None else b.flatten()
        if self.subsample:  # as SubsampledConv2d computes it
            sh, sw = self.stride
            return F.conv2d(x[:, :, ::sh, ::sw], wf, bias, 1, 0, 1, self.groups * k)
        return F.conv2d(x, wf, bias, self.stride, self.padding, self.dilation, self.groups * k)


class StackedLinear(_Stacked):
    def __init__(self, m: nn.Linear, name: str, ctx: StackCtx):
        super().__init__(name, ctx)

    def forward(self, x: Tensor) -> Tensor:
        w, b = self._p("weight"), self._p("bias")
        assert w is not None
        k, n = w.shape[0], x.shape[0]
        if x.dim() != 2:
            raise ValueError(f"stacked Linear {self.name}: expects (B, k*features) inputs, got {tuple(x.shape)}")
        xb = x.view(n, k, -1).transpose(0, 1)  # (k, B, F)
        wt = w.transpose(1, 2)
        out = torch.bmm(xb, wt) if b is None else torch.baddbmm(b.unsqueeze(1), xb, wt)
        return out.transpose(0, 1).reshape(n, -1)


def masked_batch_norm(xv: Tensor, w: Tensor, weight: Tensor | None, bias: Tensor | None,
                      eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode BatchNorm of k clients' channels, each over its own weight-1 samples.

    ``xv`` is (B, k, C, *spatial), ``w`` the (k, B) sample weights (0: padding), ``weight`` and
    ``bias`` (k, C) or None. Returns the normalised ``xv`` and each client's batch mean and unbiased
    variance, (k, C) each."""
    n, k = xv.shape[:2]
    sp = xv.shape[3:]
    tail = [1] * len(sp)
    wv = w.t().to(xv.dtype).reshape(n, k, 1, *tail)
    dims = [0, *range(3, xv.dim())]
    cnt = (w.sum(1).to(xv.dtype) * sp.numel()).unsqueeze(1)  # (k, 1)
    mean = (xv * wv).sum(dims) / cnt.clamp_min(1)
    shape = [1, k, -1, *tail]
    xc = xv - mean.reshape(shape)
    ss = (xc * xc * wv).sum(dims)
    y = xc * torch.rsqrt(ss / cnt.clamp_min(1) + eps).reshape(shape)
    if weight is not None and bias is not None:
        y = y * weight.reshape(shape) + bias.reshape(shape)
    return y, mean, ss / (cnt - 1).clamp_min(1)


class StackedBatchNorm(_Stacked):
    """Training-mode BatchNorm per client over its weight-1 samples; statistics go out through the
    context (the caller folds them into the running buffers), as MaskedBatchNorm does under vmap."""

    def __init__(self, m: nn.modules.batchnorm._BatchNorm, name: str, ctx: StackCtx):
        super().__init__(name, ctx)
        self.eps, self.track = m.eps, m.track_running_stats

    def forward(self, x: Tensor) -> Tensor:
        w = self.ctx.weight
        assert w is not None
        k, n = w.shape
        if self.ctx.full:
            return self._unmasked(x, k)
        y, mean, var = masked_batch_norm(x.view(n, k, -1, *x.shape[2:]), w, self._p("weight"), self._p("bias"),
                                         self.eps)
        if self.track:
            self.ctx.stats[self.name] = (mean.detach(), var.detach())
        return y.reshape(x.shape)

    def _unmasked(self, x: Tensor, k: int) -> Tensor:
        # Without padding, torch's own BatchNorm over the k*C stacked channels is each client's
        # BatchNorm (a channel never spans clients), in a fraction of the masked version's passes.
        # With momentum 1 the "running" buffers come back holding the batch mean and unbiased
        # variance, which the caller folds into the clients' own running statistics.
        g, b = self._p("weight"), self._p("bias")
        mean = var = None
        if self.track:
            mean = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
            var = torch.ones(x.shape[1], dtype=x.dtype, device=x.device)
        y = F.batch_norm(x, mean, var, None if g is None else g.flatten(), None if b is None else b.flatten(),
                         True, 1.0, self.eps)
        if mean is not None and var is not None:
            self.ctx.stats[self.name] = (mean.view(k, -1), var.view(k, -1))
        return y


class StackedGroupNorm(_Stacked):
    def __init__(self, m: nn.GroupNorm, name: str, ctx: StackCtx):
        super().__init__(name, ctx)
        self.num_groups, self.eps = m.num_groups, m.eps

    def forward(self, x: Tensor) -> Tensor:
        g, b = self._p("weight"), self._p("bias")
        assert g is not None and b is not None  # stack_model refuses GroupNorm without affine weights
        return F.group_norm(x, self.num_groups * g.shape[0], g.flatten(), b.flatten(), self.eps)


class StackedDropout(_Stacked):
    """``nn.Dropout`` per client, each mask drawn as serial training draws it (see :class:`ClientRng`)."""

    def __init__(self, m: nn.Dropout, name: str, ctx: StackCtx):
        super().__init__(name, ctx)
        self.p = m.p

    def forward(self, x: Tensor) -> Tensor:
        rng, w = self.ctx.rng, self.ctx.weight
        if rng is None or w is None:
            raise RuntimeError(f"stacked Dropout {self.name}: no per-client random states were given (StackCtx.rng)")
        k, n = w.shape
        c = x.shape[1] // k
        # Masks are drawn in memory order, so a client's must be drawn in the layout its activation
        # has in serial training: contiguous, as the backend only comes here with image activations
        # when training is not channels-last (see dropout_input_dims).
        mask = torch.ones_like(x)
        for i in range(k):
            m = rng.rows[i]
            if m > 0:
                mask[:m, i * c:(i + 1) * c] = rng.dropout_mask(i, (m, c, *x.shape[2:]), self.p, x,
                                                               torch.contiguous_format)
        return x * mask


def _draws_masks(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0


def dropout_layers(model: nn.Module) -> list[str]:
    """Names of the layers that draw random masks in training (dropout with p > 0)."""
    return [name for name, m in model.named_modules() if _draws_masks(m)]


def dropout_input_dims(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """How many dimensions each dropout layer's input has (one forward, see ``forward_zeros``).

    A mask is drawn in the memory order of the tensor it covers. On flat (B, F) activations that
    order is fixed; on image activations trained channels-last it follows whatever layout the kernels
    before the layer produce, which the stacked path cannot see, so the backend keeps such models off
    it."""
    dims: dict[str, int] = {}
    names = {m: name for name, m in model.named_modules() if _draws_masks(m)}
    if not names:
        return dims

    def record(m: nn.Module, args: tuple[Tensor, ...]) -> None:
        dims[names[m]] = args[0].dim()

    handles = [m.register_forward_pre_hook(record) for m in names]
    try:
        forward_zeros(model, input_shape)
    finally:
        for h in handles:
            h.remove()
    return dims


# The layers with weights that have a stacked version; matched by exact type, because a subclass may
# compute something else in its forward (weight standardisation, say).
_STACKED: dict[type[nn.Module], type[_Stacked]] = {
    nn.Conv2d: StackedConv2d, SubsampledConv2d: StackedConv2d, nn.Linear: StackedLinear, nn.GroupNorm: StackedGroupNorm,
    nn.BatchNorm1d: StackedBatchNorm, nn.BatchNorm2d: StackedBatchNorm, nn.BatchNorm3d: StackedBatchNorm,
}


def stack_model(model: nn.Module) -> tuple[nn.Module, StackCtx] | str:
    """A stacked copy of ``model`` (see the module docstring) and its context, or why there is none."""
    for name, m in model.named_modules():
        kind = type(m)
        if kind is nn.Conv2d and (m.padding_mode != "zeros" or isinstance(m.padding, str)):
            return f"Conv2d {name} pads with {m.padding_mode!r}/{m.padding!r}"
        if kind is nn.GroupNorm and not m.affine:
            return f"GroupNorm {name} has no affine weights"
        if kind not in _STACKED and any(True for _ in m.parameters(recurse=False)):
            return f"layer {name} ({kind.__name__}) has weights of a kind the stacked model does not know"
        if _draws_masks(m) and kind is not nn.Dropout:
            return f"layer {name} ({kind.__name__}) draws masks the stacked model does not replay"
    sm = copy.deepcopy(model)
    ctx = StackCtx()
    for name, m in list(sm.named_modules()):
        stacked_cls = StackedDropout if _draws_masks(m) else _STACKED.get(type(m))
        if stacked_cls is None:
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(sm.get_submodule(parent_name) if parent_name else sm, attr,
                stacked_cls(m, name, ctx))  # type: ignore[call-arg]
    sm.train()
    return sm, ctx


def stack_input(x: Tensor, channels_last: bool) -> Tensor:
    """(k, B, C, ...) per-client batches -> (B, k*C, ...), the stacked layout."""
    k, n = x.shape[:2]
    if channels_last and x.dim() == 5:
        # One copy straight into channels-last strides: (B, H, W, k*C) memory, seen as (B, k*C, H, W).
        _, _, c, h, w = x.shape
        # (reshape alone may return a strided view here, which oneDNN would copy at every layer)
        return x.permute(1, 3, 4, 0, 2).reshape(n, h, w, k * c).contiguous().permute(0, 3, 1, 2)
    return x.transpose(0, 1).reshape(n, k * x.shape[2], *x.shape[3:]).contiguous()


def forward_stacked(sm: nn.Module, ctx: StackCtx, params: dict[str, Tensor], x: Tensor, weight: Tensor,
                    num_classes: int, full: bool = False) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor]]]:
    """Logits (k, B, classes) of k clients' models on their batches x (k, B, ...), and BN statistics.
    ``full``: the caller knows every weight is 1 (no padding), so BatchNorm can skip its masking."""
    ctx.params, ctx.weight, ctx.stats, ctx.full = params, weight, {}, full
    try:
        out = sm(stack_input(x, ctx.channels_last))
        stats = ctx.stats
    finally:
        ctx.params, ctx.weight, ctx.stats, ctx.full = {}, None, {}, False
    k, n = x.shape[:2]
    return out.view(n, k, num_classes).transpose(0, 1), stats


def check_stacked(model: nn.Module, sm: nn.Module, ctx: StackCtx, input_shape: tuple[int, ...],
                  num_classes: int, rtol: float = 1e-9) -> str | None:
    """Compare the stacked module with per-client forward passes of ``model`` (training mode, two
    clients with different weights, two samples each). None if they agree, else what differed.

    In float64: on a GPU, float32 convolutions may run in TF32 (10-bit mantissa), where a grouped and
    a plain convolution differ by ~1e-3 of their outputs; a layout error differs by the outputs' size.
    Dropout layers draw their masks from per-client seeds on the stacked side and from the global
    generator seeded alike on the per-client side, so the check covers the masks too."""
    dev = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    trainable = {k for k, p in model.named_parameters()}
    stacked = {}
    for key, v in state.items():
        if v.is_floating_point():
            v = v.double()
            other = v + 0.05 * torch.randn(v.shape, generator=gen, dtype=v.dtype).to(dev) if key in trainable else v
            stacked[key] = torch.stack([v, other])
        else:
            stacked[key] = torch.stack([v, v])
    x = torch.randn(2, 2, *input_shape, generator=gen, dtype=torch.float64).to(dev)
    was_training = model.training
    model.train()  # functional_call's BatchNorm updates go to the stacked copies, not to the model
    seeds = [11, 12]
    want_parts = []
    try:
        if dropout_layers(model):
            ctx.rng = ClientRng(dev, seeds)
            ctx.rng.rows = [2, 2]
        with torch.no_grad(), torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            ones = torch.ones(2, 2, device=dev, dtype=torch.float64)
            got, _ = forward_stacked(sm, ctx, stacked, x, ones, num_classes)
            for g in range(2):
                torch.manual_seed(seeds[g])
                want_parts.append(functional_call(model, {k: v[g] for k, v in stacked.items()}, (x[g],)))
            want = torch.stack(want_parts)
    except Exception as e:  # the layout broke something in the model's forward
        return f"the stacked forward failed ({type(e).__name__}: {e})"
    finally:
        model.train(was_training)
        if ctx.rng is not None:
            ctx.rng.close()
            ctx.rng = None
    if got.shape != want.shape:
        return f"the stacked forward gave shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    err = float((got - want).abs().max())
    scale = float(want.abs().max()) or 1.0
    if not err <= rtol * scale:
        return f"the stacked forward differs from per-client forwards by {err:.3g} (scale {scale:.3g})"
    return None
