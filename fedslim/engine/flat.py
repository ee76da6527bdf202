"""A model buffer's trainable parameters as views of one flat tensor, their gradients of another.

A small client model's local step is mostly framework, not arithmetic: on one core a LeNet-5 Adam
step of batch 1 costs about 1.4 ms and oneDNN's kernels 0.09 ms of it. Part of that is per tensor:
the fused optimizer step, ``zero_grad`` and gradient clipping walk ten parameter tensors, and the
narrow-channel rewrite (:mod:`fedslim.engine.rewrite`) pads two weights and a bias on every forward
(``F.pad``, a layout copy, and the slicing back in the backward). Here every parameter's data and
gradient are views into two flat tensors, so that one fused optimizer step over one tensor, one
``zero_`` and one norm serve the whole model; and a padded convolution's weight is stored padded in
the flat tensor, its zero channels included, so that its forward uses it as it is (the module's own
``weight`` and ``bias`` are views of the real channels, so ``state_dict`` and ``load_state_dict``
see the shapes they always did).

The padded channels stay exactly zero through training without being masked: their gradients are
exactly zero (the next convolution's weights for them are zero, and so is everything they feed), and
with a zero gradient from a zero state SGD (with momentum and weight decay) and Adam leave a zero
weight at zero.

The arithmetic per element is the one the per-tensor step does, but a fused step's vectorized loop
and its scalar tail fall on other elements of a flat tensor than of separate ones, so results agree
to float32 rounding, not bit for bit, with the unflattened model. Every backend that trains on a
model buffer (serial, process, Ray) goes through here, so they still agree with each other bit for
bit.

Gradients accumulate into the flat tensor (``zero_grad`` zeroes it; it must not set them to None).
:func:`flat_parameters` re-attaches them at the start of every client update, so that a procedure
that did set them to None on the same buffer cannot make a later update train on zeros, and checks
that the views still alias the flat tensor (a deep copy or ``.to()`` of the model breaks them, and
the model is then flattened again). A model with a parameter frozen since trains per tensor, and a
padded convolution uses its stored padding only while its weight's gradient is a view of the flat
one: other code that steps ``model.parameters()`` with its own optimizer and sets gradients to None
still trains every weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedslim.engine.rewrite import ChannelPaddedConv2d
from fedslim.engine.task import LocalTrain

FLAT_ATTR = "_fedslim_flat"
ADAM_EPS = 1e-8  # torch.optim.Adam's default, which build_optimizer keeps


def _dense_strides(shape: torch.Size, like: torch.Tensor | None = None,
                   layout: torch.memory_format | None = None) -> tuple[int, ...]:
    """Strides of a dense tensor of ``shape`` laid out as ``like`` is (or in ``layout``)."""
    if like is not None:
        return torch.empty_like(like, device="meta", memory_format=torch.preserve_format).stride()
    return torch.empty(shape, device="meta", memory_format=layout or torch.contiguous_format).stride()


@dataclass
class _Region:
    offset: int
    shape: torch.Size
    stride: tuple[int, ...]

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        return flat.as_strided(self.shape, self.stride, flat.storage_offset() + self.offset)


class FlatParameters:
    """The flat parameter (``param``, with its gradient in ``param.grad``) behind one model's
    trainable parameters. Build it with :func:`flat_parameters`."""

    def __init__(self, model: nn.Module):
        params = list(model.parameters())
        self._padded: list[tuple[ChannelPaddedConv2d, _Region, _Region | None]] = []
        owned: dict[int, tuple[nn.Parameter, _Region, tuple[slice, ...]]] = {}
        n = 0

        def take(shape: torch.Size, stride: tuple[int, ...]) -> _Region:
            nonlocal n
            r = _Region(n, shape, stride)
            n += shape.numel()
            return r

        for conv in model.modules():
            if not isinstance(conv, ChannelPaddedConv2d) or not (conv.pad_in or conv.pad_out):
                continue
            w = conv.weight
            full = torch.Size((w.shape[0] + conv.pad_out, w.shape[1] + conv.pad_in, *w.shape[2:]))
            wr = take(full, _dense_strides(full, layout=conv.padded_layout))
            owned[id(w)] = (w, wr, (slice(0, w.shape[0]), slice(0, w.shape[1])))
            br = None
            if conv.bias is not None and conv.pad_out:  # an unpadded bias is a plain parameter below
                br = take(torch.Size((conv.bias.shape[0] + conv.pad_out,)), (1,))
                owned[id(conv.bias)] = (conv.bias, br, (slice(0, conv.bias.shape[0]),))
            self._padded.append((conv, wr, br))
        for p in params:
            if id(p) not in owned:
                owned[id(p)] = (p, take(p.shape, _dense_strides(p.shape, like=p)), tuple(slice(None) for _ in p.shape))

        ref = params[0]
        self.param = nn.Parameter(torch.zeros(n, dtype=ref.dtype, device=ref.device))
        self.param.grad = torch.zeros_like(self.param)
        self._owned = list(owned.values())
        with torch.no_grad():
            for p, region, index in self._owned:
                view = region.view(self.param.data)[index]
                view.copy_(p.data)
                p.data = view
        self._ids = [id(p) for p in params]
        self._addresses = [p.data_ptr() for p in params]
        self.attach()

    def attach(self) -> None:
        """Point every parameter's gradient (and each padded convolution's full weight) at the flat
        tensors again."""
        data, grad = self.param.data, self.param.grad
        assert grad is not None
        for p, region, index in self._owned:
            p.grad = region.view(grad)[index]
        for conv, wr, br in self._padded:
            conv.full_weight = wr.view(data).requires_grad_(True)
            conv.full_weight.grad = wr.view(grad)
            if br is not None:
                conv.full_bias = br.view(data).requires_grad_(True)
                conv.full_bias.grad = br.view(grad)

    def zero_grad(self) -> None:
        assert self.param.grad is not None
        self.param.grad.zero_()

    def aliases(self, model: nn.Module) -> bool:
        """Whether ``model``'s parameters are still the views this object made."""
        ps = list(model.parameters())
        return [id(p) for p in ps] == self._ids and [p.data_ptr() for p in ps] == self._addresses


def flattenable(model: nn.Module) -> bool:
    """Every parameter trainable, of one floating dtype, on one device, and not sparse."""
    ps = list(model.parameters())
    return bool(ps) and all(p.requires_grad and p.is_floating_point() and p.layout == torch.strided
                            and p.dtype == ps[0].dtype and p.device == ps[0].device for p in ps)


def flat_parameters(model: nn.Module) -> FlatParameters | None:
    """The model's :class:`FlatParameters`, made on first use and re-attached on every later one;
    None where the model cannot be flattened (see :func:`flattenable`): it then trains per tensor."""
    if not flattenable(model):  # checked every time: a parameter may have been frozen since
        return None
    flat = getattr(model, FLAT_ATTR, None)
    if isinstance(flat, FlatParameters) and flat.aliases(model):
        flat.attach()
        return flat
    flat = FlatParameters(model)
    setattr(model, FLAT_ATTR, flat)
    return flat


class FlatStep:
    """torch.optim's fused SGD or Adam step on the flat parameter, without the ``Optimizer`` around it.

    The same ATen kernels that ``torch.optim.SGD(fused=True)`` and ``torch.optim.Adam(fused=True)``
    call, with the same arguments and state (tests/test_flat.py checks the results bit for bit), and
    without the Python each ``step()`` of theirs runs first (parameter groups, state lookups, device
    grouping): 2 % of a one-core LeNet-5 step. Made fresh for every client update, as the optimizer
    is: local optimizer state does not carry over between rounds."""

    def __init__(self, param: nn.Parameter, train: LocalTrain):
        o = train.optimizer
        if o.name not in ("sgd", "adam"):
            raise ValueError(f"train.optimizer.name: unknown optimizer {o.name!r}")
        self.param, self.name, self.lr = param, o.name, float(train.lr)
        self.weight_decay = float(o.weight_decay)
        self.momentum, self.nesterov = float(o.momentum), bool(o.nesterov and o.momentum > 0)
        self.betas = (float(o.betas[0]), float(o.betas[1]))
        self.exp_avg = self.exp_avg_sq = self.buf = None
        self.steps = 0
        if o.name == "adam":
            self.exp_avg, self.exp_avg_sq = torch.zeros_like(param), torch.zeros_like(param)
            self.step_t = torch.zeros((), dtype=torch.float32, device=param.device)

    def step(self) -> None:
        p, g = self.param.data, self.param.grad
        assert g is not None
        if self.name == "adam":
            assert self.exp_avg is not None and self.exp_avg_sq is not None
            torch._foreach_add_([self.step_t], 1)
            torch._fused_adam_([p], [g], [self.exp_avg], [self.exp_avg_sq], [], [self.step_t], amsgrad=False,
                               lr=self.lr, beta1=self.betas[0], beta2=self.betas[1], weight_decay=self.weight_decay,
                               eps=ADAM_EPS, maximize=False, grad_scale=None, found_inf=None)
        else:
            first = self.buf is None and self.momentum > 0
            if first:
                self.buf = torch.empty_like(g)
            torch._fused_sgd_([p], [g], [] if self.momentum == 0 else [self.buf], weight_decay=self.weight_decay,
                              momentum=self.momentum, lr=self.lr, dampening=0.0, nesterov=self.nesterov,
                              maximize=False, is_first_step=first, grad_scale=None, found_inf=None)
        self.steps += 1


def flat_step(param: nn.Parameter, train: LocalTrain) -> FlatStep | torch.optim.Optimizer:
    """A :class:`FlatStep` where this torch has the fused kernels on the parameter's device, else
    torch.optim's own optimizer (the same arithmetic, per step a little more Python)."""
    if param.device.type in ("cpu", "cuda") and hasattr(torch, "_fused_adam_") and hasattr(torch, "_fused_sgd_"):
        return FlatStep(param, train)
    from fedslim.engine.client import build_optimizer

    return build_optimizer([param], train)
