"""Pre-activation ResNet-18 (He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016) as
in the HeteroFL code (diaoenmao/HeteroFL-..., ``src/models/resnet.py``): 3x3 stem conv with stride 1,
four stages of pre-activation basic blocks with hidden sizes 64-128-256-512 (strides 1, 2, 2, 2),
1x1 convolution shortcuts where the shape changes, BN -> ReLU -> global average pool -> linear.

The reference's ``resnet18`` builds [1, 1, 1, 2] blocks per stage, not ResNet-18's [2, 2, 2, 2]; the
published HeteroFL size (9.6 M parameters on CIFAR-10 at rate 1) is that network, so it is the
default here (``blocks="heterofl"``) and ``blocks="standard"`` gives the [2, 2, 2, 2] network
(11.2 M). State-dict keys match the reference's (``layer1.0.n1.weight``, ``linear.weight``, ...).

Each block computes ``relu(norm1(scaler(x)))``, takes the shortcut from that pre-activation when it
has a projection (else from ``x``), then conv1 -> scaler -> norm2 -> relu -> conv2, plus shortcut.
Convolutions have no bias, as in the reference.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

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

HIDDEN = (64, 128, 256, 512)
BLOCKS = {"heterofl": (1, 1, 1, 2), "standard": (2, 2, 2, 2)}


class PreActBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, projection: bool, *, norm: str,
                 track_running_stats: bool, scaler_rate: float):
        super().__init__()
        self.n1 = make_norm(norm, in_planes, track_running_stats=track_running_stats)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.n2 = make_norm(norm, planes, track_running_stats=track_running_stats)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.scaler = Scaler(scaler_rate)
        # Decided by the caller from width-1 channel counts so the key exists at every width.
        self.shortcut: nn.Module | None = (
            nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False) if projection else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.n1(self.scaler(x)))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.n2(self.scaler(out))))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self, in_channels: int, width: float, num_classes: int, num_blocks: tuple[int, ...], *,
                 norm: str, track_running_stats: bool, scaler_rate: float, dropout: float):
        super().__init__()
        kw = {"norm": norm, "track_running_stats": track_running_stats, "scaler_rate": scaler_rate}
        hidden = [scaled(h, width) for h in HIDDEN]
        self.conv1 = nn.Conv2d(in_channels, hidden[0], 3, stride=1, padding=1, bias=False)
        base_in, cur_in = HIDDEN[0], hidden[0]
        stages: list[nn.Sequential] = []
        for i, (base, planes, n) in enumerate(zip(HIDDEN, hidden, num_blocks, strict=True)):
            blocks: list[nn.Module] = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                projection = stride != 1 or base_in != base
                blocks.append(PreActBlock(cur_in, planes, stride, projection, **kw))
                base_in, cur_in = base, planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.n4 = make_norm(norm, cur_in, track_running_stats=track_running_stats)
        self.scaler = Scaler(scaler_rate)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(cur_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.n4(self.scaler(out)))
        return self.linear(self.dropout(self.flatten(self.pool(out))))

    def channel_groups(self) -> list[list[Member]]:
        """Coupled channel dimensions (see :mod:`fedslim.models.coupling`). A block's output is
        ``conv2 + shortcut``: conv2's outputs are tied to the projection's outputs, or, without a
        projection, to the block's input channels, so a whole run of identity blocks shares one group."""
        b = CouplingBuilder(self)
        g = b.layer("conv1", self.conv1, None)
        for s, stage in enumerate((self.layer1, self.layer2, self.layer3, self.layer4), start=1):
            for j, block in enumerate(stage):
                p = f"layer{s}.{j}"
                b.norm(f"{p}.n1", block.n1, g)
                h = b.layer(f"{p}.conv1", block.conv1, g)
                b.norm(f"{p}.n2", block.n2, h)
                out = b.layer(f"{p}.conv2", block.conv2, h)
                if block.shortcut is not None:
                    g = b.tie(out, b.layer(f"{p}.shortcut", block.shortcut, g))
                else:
                    g = b.tie(out, g)
        b.norm("n4", self.n4, g)
        b.head("linear", self.linear, g)
        return b.groups()


@MODELS.register("preresnet18", "Pre-activation ResNet-18 as in HeteroFL (64-128-256-512); any input size")
def preresnet18(*, num_classes: int, input_shape: tuple[int, ...], width: float = 1.0,
                **options: Any) -> nn.Module:
    """HeteroFL's PreResNet-18 on (C, H, W) inputs of any size (three stride-2 stages; 8x8 works).

    Options: ``norm`` ("bn" default | "gn" | "none"); ``track_running_stats`` (bool, default True;
    False = HeteroFL static BN); ``scaler_rate`` (HeteroFL Scaler before each norm, default 1);
    ``dropout`` (before the linear classifier, default 0; not in the reference); ``blocks``
    ("heterofl" default: [1, 1, 1, 2] blocks per stage as in the reference code | "standard":
    [2, 2, 2, 2]).
    """
    check_common_args("preresnet18", num_classes, width)
    opts = parse_options("preresnet18", options, {**COMMON_OPTIONS, "blocks": "heterofl"})
    layout = opts.pop("blocks")
    # A list or mapping from YAML is unhashable: test the type before the dict lookup.
    if not isinstance(layout, str) or layout not in BLOCKS:
        raise ValueError(f"model.options.blocks: must be one of {', '.join(BLOCKS)} for model "
                         f"'preresnet18', got {layout!r}")
    shape = image_shape("preresnet18", input_shape)
    return init_weights(PreActResNet(shape[0], width, num_classes, BLOCKS[layout], **opts))
