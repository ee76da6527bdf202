"""VGG-16 with batch norm for CIFAR-sized inputs (Simonyan & Zisserman, ICLR 2015; the CIFAR form of
e.g. kuangliu/pytorch-cifar): 13 3x3 convolutions 64-64-M-128-128-M-256x3-M-512x3-M-512x3-M, each
Conv -> BN -> ReLU, then global average pooling and one linear classifier (14.7 M parameters on
CIFAR-10). Five 2x2 max-pools need inputs of at least 32x32."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fedslim.models.coupling import Member, chain_groups
from fedslim.models.layers import (
    COMMON_OPTIONS,
    Scaler,
    check_common_args,
    image_shape,
    init_weights,
    make_norm,
    parse_options,
    require_spatial,
    scaled,
)
from fedslim.registry import MODELS

CFG16: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    def __init__(self, cfg: tuple[int | str, ...], in_channels: int, width: float, num_classes: int, *,
                 norm: str, track_running_stats: bool, scaler_rate: float, dropout: float,
                 conv_bias: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            c = scaled(int(v), width)
            layers += [nn.Conv2d(prev, c, 3, padding=1, bias=conv_bias), Scaler(scaler_rate),
                       make_norm(norm, c, track_running_stats=track_running_stats), nn.ReLU()]
            prev = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.flatten(self.pool(self.features(x)))))

    def channel_groups(self) -> list[list[Member]]:
        """Coupled channel dimensions (see :mod:`fedslim.models.coupling`): a plain chain."""
        return chain_groups(self)


@MODELS.register("vgg16", "VGG-16 with BN for CIFAR (13 conv + linear); inputs >= 32x32")
def vgg16(*, num_classes: int, input_shape: tuple[int, ...], width: float = 1.0, **options: Any) -> nn.Module:
    """CIFAR VGG-16 on (C, H, W) inputs of at least 32x32.

    Options: ``norm`` ("bn" default | "gn" | "none"); ``track_running_stats`` (bool, default True;
    False = HeteroFL static BN); ``scaler_rate`` (HeteroFL Scaler after each convolution, default 1);
    ``dropout`` (before the classifier, default 0).
    """
    check_common_args("vgg16", num_classes, width)
    opts = parse_options("vgg16", options, COMMON_OPTIONS)
    shape = image_shape("vgg16", input_shape)
    pools = CFG16.count("M")
    require_spatial("vgg16", shape, lambda n: n >> pools, f"{pools} 2x2 max-pools")
    return init_weights(VGG(CFG16, shape[0], width, num_classes, **opts))
