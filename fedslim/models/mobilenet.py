"""MobileNet-V2 (Sandler et al., CVPR 2018) for CIFAR-sized inputs.

Paper block layout (inverted residual: 1x1 expansion -> 3x3 depthwise -> 1x1 linear projection, ReLU6,
identity residual when stride is 1 and input and output widths agree), with the CIFAR changes of the
common CIFAR port (kuangliu/pytorch-cifar): the stem convolution and the second stage use stride 1,
so only three stages down-sample; global average pooling makes any input size work (8x8 included).
The head keeps the 1x1 convolution to 1280 channels. 2.2 M parameters for 10 classes at width 1.

For DAC-style searched architectures the option ``hidden_channels`` sets the expanded (depthwise)
channel count of every expanding block directly, and the option ``gates`` puts a
:class:`ChannelGate` on those channels (DAC's supernet).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fedslim.models.coupling import CouplingBuilder, Member
from fedslim.models.layers import (
    COMMON_OPTIONS,
    Scaler,
    check_common_args,
    image_shape,
    init_weights,
    make_norm,
    parse_options,
    scaled,
)
from fedslim.registry import MODELS

STEM = 32
HEAD = 1280
# (expansion t, output channels c, repeats n, stride of the first repeat s); CIFAR strides.
CFG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def block_plan() -> list[tuple[int, int, int, int]]:
    """Width-1 (in, expanded, out, stride) of every inverted-residual block, in order."""
    plan, prev = [], STEM
    for t, c, n, s in CFG:
        for i in range(n):
            plan.append((prev, prev * t, c, s if i == 0 else 1))
            prev = c
    return plan


NUM_EXPANDING = sum(1 for cin, hid, _, _ in block_plan() if hid != cin)


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, groups: int, act: bool, *, norm: str,
             track_running_stats: bool, scaler_rate: float) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        Scaler(scaler_rate),
        make_norm(norm, cout, track_running_stats=track_running_stats),
    ]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class ChannelGate(nn.Module):
    """DAC's channel gate on each channel: ``sigmoid(logits[c])`` (``hard=False``), or (``hard=True``)
    1 where the logit is at least 0 and 0 elsewhere, with the sigmoid's gradient (straight-through), so
    that the network trains as the architecture the gates would extract and the logits still learn.

    The logits are a buffer, not a parameter: the search trains them with an optimizer of their own
    (:mod:`fedslim.algorithms.dac`), and the weights' optimizer and every other procedure leave them
    alone. Built at logit 0; the search sends the logits it wants.
    """

    def __init__(self, channels: int, hard: bool = False):
        super().__init__()
        self.hard = hard
        self.register_buffer("logits", torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(self.logits)
        if self.hard:
            # Parenthesised so an open gate is exactly 1: (1 + p) - p may round off by an ulp.
            p = (self.logits >= 0).to(p.dtype) + (p - p.detach())
        return x * p.view(1, -1, *([1] * (x.dim() - 2)))

    def extra_repr(self) -> str:
        return f"{self.logits.numel()}, hard={self.hard}"


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, hidden: int, cout: int, stride: int, *, expand: bool, residual: bool,
                 gate: str | None = None, **kw: Any):
        super().__init__()
        # Whether the block expands and whether it adds the residual are decided by the caller from
        # the width-1 plan, so parameter names and the graph are the same at every width.
        self.expand = _conv_bn(cin, hidden, 1, 1, 1, True, **kw) if expand else None
        self.depthwise = _conv_bn(hidden, hidden, 3, stride, hidden, True, **kw)
        # On the expanded channels, after the depthwise convolution's activation: a closed gate takes
        # the channel out of the expansion, the depthwise convolution and the projection alike.
        self.gate = ChannelGate(hidden, hard=gate == "hard") if gate and expand else None
        self.project = _conv_bn(hidden, cout, 1, 1, 1, False, **kw)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.expand(x) if self.expand is not None else x
        out = self.depthwise(out)
        if self.gate is not None:
            out = self.gate(out)
        out = self.project(out)
        return out + x if self.residual else out


class MobileNetV2(nn.Module):
    def __init__(self, in_channels: int, width: float, num_classes: int,
                 hidden_channels: Sequence[int] | None, *, norm: str, track_running_stats: bool,
                 scaler_rate: float, dropout: float, gates: str | None = None):
        super().__init__()
        kw = {"norm": norm, "track_running_stats": track_running_stats, "scaler_rate": scaler_rate}
        stem = scaled(STEM, width)
        self.stem = _conv_bn(in_channels, stem, 3, 1, 1, True, **kw)
        blocks: list[nn.Module] = []
        prev = stem
        chosen = iter(hidden_channels) if hidden_channels is not None else None
        for base_in, base_hidden, base_out, stride in block_plan():
            expand = base_hidden != base_in
            cout = scaled(base_out, width)
            if not expand:
                hidden = prev
            elif chosen is not None:
                hidden = next(chosen)
            else:
                hidden = scaled(base_hidden, width)
            residual = stride == 1 and base_in == base_out
            blocks.append(InvertedResidual(prev, hidden, cout, stride, expand=expand, residual=residual,
                                           gate=gates, **kw))
            prev = cout
        self.blocks = nn.Sequential(*blocks)
        head = scaled(HEAD, width)
        self.head = _conv_bn(prev, head, 1, 1, 1, True, **kw)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.blocks(self.stem(x)))
        return self.classifier(self.dropout(self.flatten(self.pool(out))))

    def channel_groups(self) -> list[list[Member]]:
        """Coupled channel dimensions (see :mod:`fedslim.models.coupling`). The depthwise convolution
        keeps its input channels; an identity residual ties a block's output to its input."""
        b = CouplingBuilder(self)

        def conv_bn(name: str, seq: nn.Sequential, g_in: int | None) -> int:
            g = b.layer(f"{name}.0", seq[0], g_in)
            b.norm(f"{name}.2", seq[2], g)
            return g

        g = conv_bn("stem", self.stem, None)
        for i, block in enumerate(self.blocks):
            p = f"blocks.{i}"
            h = conv_bn(f"{p}.expand", block.expand, g) if block.expand is not None else g
            h = conv_bn(f"{p}.depthwise", block.depthwise, h)
            if block.gate is not None:
                b.add(h, f"{p}.gate.logits", 0)
            out = conv_bn(f"{p}.project", block.project, h)
            g = b.tie(out, g) if block.residual else out
        g = conv_bn("head", self.head, g)
        b.head("classifier", self.classifier, g)
        return b.groups()


@MODELS.register("mobilenetv2", "MobileNet-V2 for CIFAR (stride-1 stem, inverted residuals); any input size")
def mobilenetv2(*, num_classes: int, input_shape: tuple[int, ...], width: float = 1.0,
                **options: Any) -> nn.Module:
    """CIFAR MobileNet-V2 on (C, H, W) inputs of any size (three stride-2 stages; 8x8 works).

    Options: ``norm`` ("bn" default | "gn" | "none"); ``track_running_stats`` (bool, default True;
    False = HeteroFL static BN); ``scaler_rate`` (HeteroFL Scaler after each convolution, default 1);
    ``dropout`` (before the classifier, default 0); ``hidden_channels`` (sequence of
    ``NUM_EXPANDING`` = 16 positive ints: the expanded channel count of each expanding block in
    order, overriding ``ceil(width * t * c_in)`` for those layers; default none); ``gates`` (none
    (default), "soft" or "hard": a :class:`ChannelGate` of that kind on the expanded channels of every
    expanding block, buffers ``blocks.<i>.gate.logits``; DAC's search supernet).
    """
    check_common_args("mobilenetv2", num_classes, width)
    opts = parse_options("mobilenetv2", options, {**COMMON_OPTIONS, "hidden_channels": None, "gates": None})
    if opts["gates"] not in (None, "soft", "hard"):
        raise ValueError(f"model.options.gates: must be none, 'soft' or 'hard' for model 'mobilenetv2', got "
                         f"{opts['gates']!r}")
    hidden = opts.pop("hidden_channels")
    if hidden is not None:
        ok = (isinstance(hidden, Sequence) and not isinstance(hidden, str) and len(hidden) == NUM_EXPANDING
              and all(isinstance(h, numbers.Integral) and not isinstance(h, bool) and h >= 1 for h in hidden))
        if not ok:
            raise ValueError(f"model.options.hidden_channels: must be {NUM_EXPANDING} positive integers "
                             f"for model 'mobilenetv2', got {hidden!r}")
        hidden = tuple(int(h) for h in hidden)
    shape = image_shape("mobilenetv2", input_shape)
    return init_weights(MobileNetV2(shape[0], width, num_classes, hidden, **opts))
