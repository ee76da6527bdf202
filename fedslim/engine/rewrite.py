"""Rewrites of a client's training model that keep what it computes, on smaller or better-shaped tensors.

Pool before activation. In ``Sequential(..., ReLU(), MaxPool2d(2), ...)`` the activation runs on the
full feature map and the pooling throws three quarters of it away. ``max`` commutes with a
non-decreasing function, so ``MaxPool(ReLU(x)) == ReLU(MaxPool(x))`` value for value, and swapping
the two runs the activation (and its backward) on the pooled map only. The gradients are the same
too, not merely close. Where the window's maximum is positive, both orders send the gradient to the
window's first maximal element. Where it is not, ReLU's derivative is zero in both orders, so it
does not matter which element the pooling picked (ReLU-first picks the first of the zeros, a tie;
pool-first picks the first maximum of x). The tests check forward values and gradients bit for bit,
including windows of ties.

Every client model the engine trains comes from ``ModelBuffers`` and is rewritten there (serial,
process, Ray, and the vectorized backend, whose stacked model is built from that buffer). It matters
most to the stacked model, whose feature maps hold every client's channels and no longer fit in the
cache: ``bench/vectorized_step.py --clients 12 --steps 19 --threads 1 --rewrite-ab`` gave a stacked
LeNet-5 cohort step of 70.97 ms against 89.35 ms without the rewrite (1.26x; 1.09x in an earlier
run of the same comparison), and a serial one of 81.46 against 84.16 ms (1.03x).

Only the activations for which the argument holds exactly in floating point are moved: ``ReLU`` and
``ReLU6`` (clamps: no rounding, and no new ties outside the regions where the derivative is zero).
``LeakyReLU`` is left alone: rounding ``slope * x`` can make two different negative inputs equal, and
the tie then sends the gradient to a different element. Poolings that return indices are left alone
(their output is a tuple), and so are layers not held in an ``nn.Sequential``, whose order is the
model's own ``forward``.

The modules keep their names, so ``state_dict`` keys, which belong to the convolutions and norms around
them, do not change.

Narrow channels padded (``pad_narrow_channels``). oneDNN's channels-last kernels work on vectors of
eight float32 channels; a convolution with fewer output channels (LeNet-5's six), the max-pool after
it and the convolution that reads them run on partly empty vectors. Padding that channel dimension to
eight with constant zeros (zero rows of the first convolution's weight and bias, zero columns of the
second's) makes a one-core LeNet-5 Adam step (batch 64, channels-last, fused Adam, pooling moved)
1.125x faster (6 -> 8 channels; 1.113x with two such processes at once, 1.098x for 3 -> 8 at width
0.5). Wider layers lose (12 -> 16 at width 2: 0.962x), and so does NCHW (0.950x), so only channel
counts below eight are padded, only in channels-last models on the CPU, and not in the vectorized
backend's model (its stacked copy holds every client's channels and knows plain layers only). Figures from
``bench/step_cost.py [--width W] [--pad-to N] [--procs 2]``, as printed in bench/README.md.

The padding is a constant made in each forward (``F.pad`` of the real weight), so the parameters, their
names, shapes and optimizer state are untouched, and the padded channels are exactly zero. (Once
:mod:`fedslim.engine.flat` has flattened the model for training, the padded weight is stored as such
and the real one is a view of it; the forward then pads nothing, and the zero channels stay zero
because their gradients are exactly zero.) Zero channels stay zero through the layers between: zero
weights and bias give zero, ReLU, max-pooling and Scaler keep zero, and the next convolution multiplies
them by zero weights. Only the layers between the two convolutions must keep a zero channel zero and
leave the other channels alone, so the chain may hold only ReLU, ReLU6, max-pooling, Identity and
Scaler: no norm (it would see the padded channels), no dropout (it would draw masks for them, and so
different masks for the real ones). The real channels hold the same sums; the second convolution adds
exact zeros to them, but its kernel may group the additions differently, so they are equal up to
float32 rounding, not by construction (on the development machine a LeNet-5 client update came out
bit for bit alike: tests/test_rewrite.py checks it within tolerance only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedslim.models.layers import Scaler

_ACTIVATIONS = (nn.ReLU, nn.ReLU6)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)


def pool_before_activation(model: nn.Module) -> list[str]:
    """Swap every ``activation, max-pool`` pair held in an ``nn.Sequential`` of ``model`` (in place).
    Returns the qualified names of the pools moved."""
    moved: list[str] = []
    for prefix, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        i = 0
        while i < len(names) - 1:
            a, p = seq._modules[names[i]], seq._modules[names[i + 1]]
            if type(a) in _ACTIVATIONS and type(p) in _POOLS and not p.return_indices:
                seq._modules[names[i]], seq._modules[names[i + 1]] = p, a
                moved.append(f"{prefix}.{names[i + 1]}" if prefix else names[i + 1])
                i += 2
            else:
                i += 1
    return moved


# Channel vectors of oneDNN's float32 CPU kernels (AVX2: 8 lanes); see the module docstring.
NARROW_CHANNELS = 8
# Layers that map a zero channel to a zero channel and treat channels independently.
_ZERO_KEEPING = (nn.ReLU, nn.ReLU6, nn.MaxPool2d, nn.Identity, Scaler)


class ChannelPaddedConv2d(nn.Conv2d):
    """A ``Conv2d`` whose weight is zero-padded by ``pad_out`` output and ``pad_in`` input channels
    in its forward. Made only by :func:`pad_narrow_channels`, which sets both attributes."""

    pad_out: int
    pad_in: int
    padded_layout: torch.memory_format
    # Set by fedslim.engine.flat: the padded weight (and bias) stored as such, of which the module's
    # own parameters and their gradients are views.
    full_weight: torch.Tensor | None = None
    full_bias: torch.Tensor | None = None

    def _stored(self, real: torch.Tensor | None, full: torch.Tensor | None) -> bool:
        """Whether ``real`` and its gradient are still views of ``full`` and its gradient. A deep copy
        or ``.to()`` of the module breaks the first, an optimizer's ``zero_grad(set_to_none=True)`` the
        second; the gradient would then land where that optimizer does not look, so the forward pads
        the real weight instead."""
        return (real is not None and full is not None and real.grad is not None and full.grad is not None
                and real.data_ptr() == full.data_ptr() and real.grad.data_ptr() == full.grad.data_ptr())

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self._stored(weight, self.full_weight) and (self.full_bias is None or self._stored(bias, self.full_bias)):
            assert self.full_weight is not None
            return super()._conv_forward(input, self.full_weight, bias if self.full_bias is None else self.full_bias)
        if self.pad_in:
            weight = F.pad(weight, (0, 0, 0, 0, 0, self.pad_in))
        if self.pad_out:
            weight = F.pad(weight, (0, 0, 0, 0, 0, 0, 0, self.pad_out))
            if bias is not None:
                bias = F.pad(bias, (0, self.pad_out))
        # F.pad returns NCHW whatever the weight's layout; give the kernel the model's.
        return super()._conv_forward(input, weight.contiguous(memory_format=self.padded_layout), bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pad_out={self.pad_out}, pad_in={self.pad_in}"


def _plain_conv(m: nn.Module) -> bool:
    return type(m) in (nn.Conv2d, ChannelPaddedConv2d) and m.groups == 1 and m.padding_mode == "zeros"


def _padded(conv: nn.Conv2d, layout: torch.memory_format) -> ChannelPaddedConv2d:
    if type(conv) is not ChannelPaddedConv2d:
        # Same object, same parameters and hooks: only the forward changes.
        conv.__class__ = ChannelPaddedConv2d
        conv.pad_out = conv.pad_in = 0
    assert isinstance(conv, ChannelPaddedConv2d)
    conv.padded_layout = layout
    return conv


def pad_narrow_channels(model: nn.Module, width: int = NARROW_CHANNELS, channels_last: bool = True) -> list[str]:
    """Pad to ``width`` the channels that a ``Conv2d`` with fewer outputs passes, through zero-keeping
    layers only, to the next ``Conv2d`` of the same ``nn.Sequential`` (in place). ``channels_last``:
    the layout the model runs in (the padded weights are laid out to match). Returns the qualified
    names of the first convolution of each padded pair."""
    layout = torch.channels_last if channels_last else torch.contiguous_format
    padded: list[str] = []
    for prefix, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for i, name in enumerate(names):
            a = seq._modules[name]
            if a is None or not _plain_conv(a) or a.out_channels >= width:
                continue
            for later in names[i + 1:]:
                b = seq._modules[later]
                if isinstance(b, nn.Conv2d):
                    if _plain_conv(b) and b.in_channels == a.out_channels:
                        pad = width - a.out_channels
                        _padded(a, layout).pad_out = pad
                        _padded(b, layout).pad_in = pad
                        padded.append(f"{prefix}.{name}" if prefix else name)
                    break
                if type(b) not in _ZERO_KEEPING or getattr(b, "return_indices", False):
                    break
    return padded


def _strided_pointwise(conv: nn.Conv2d) -> bool:
    return (conv.kernel_size == (1, 1) and conv.stride != (1, 1) and conv.padding == (0, 0)
            and conv.dilation == (1, 1) and conv.padding_mode == "zeros")


class SubsampledConv2d(nn.Conv2d):
    """A 1x1 ``Conv2d`` with stride s computed as the stride-1 convolution of every s-th row and column
    of its input: the same products and sums (a 1x1 kernel never reads between the strided positions),
    so the same values up to the rounding of a different kernel's summation order (tested). Made by
    :func:`avoid_narrow_strided_pointwise` only."""

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        sh, sw = self.stride
        return F.conv2d(input[:, :, ::sh, ::sw], weight, bias, 1, 0, 1, self.groups)


def avoid_narrow_strided_pointwise(model: nn.Module, width: int = NARROW_CHANNELS) -> list[str]:
    """Turn into :class:`SubsampledConv2d` (in place) every 1x1 ``Conv2d`` with a stride and fewer than
    ``width`` input channels per group. torch 2.13's CPU kernel for such a convolution in channels-last
    corrupts the heap (a pre-activation ResNet-18's shortcut at width 1/16: crashes or hangs within a
    few steps, forward and weight gradient alike); at stride 1 the same shapes are fine. Returns the
    qualified names of the convolutions changed."""
    changed: list[str] = []
    for name, m in model.named_modules():
        if type(m) is nn.Conv2d and _strided_pointwise(m) and m.in_channels // m.groups < width:
            m.__class__ = SubsampledConv2d
            changed.append(name)
    return changed
