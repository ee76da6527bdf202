"""ConvBN-9: the "9-block ConvBN ConvNet" QuantFL trains on CIFAR-10.

Nine blocks of 3x3 convolution -> BatchNorm -> ReLU, channels 64-64-M-128-128-M-256-256-256-M-512-512,
then global average pooling and one linear classifier (5.3 M parameters on CIFAR-10). The QuantFL
seed names the network but not its channel list; this is our reading of it: a plain VGG-style
chain of ConvBN blocks (no residual adds), which keeps it sliceable by every sub-model method.
Three 2x2 max-pools need inputs of at least 8x8, so it also runs on 28x28 MNIST and 8x8 digits.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

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

CFG9: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512)


class ConvBNNet(nn.Module):
    def __init__(self, cfg: tuple[int | str, ...], in_channels: int, width: float, num_classes: int, *,
                 norm: str, track_running_stats: bool, scaler_rate: float, dropout: float):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            c = scaled(int(v), width)
            # bias=False: the norm's shift makes a convolution bias redundant, as in ConvBN blocks
            # everywhere; with norm "none" there is nothing to absorb it, so the bias comes back.
            layers += [nn.Conv2d(prev, c, 3, padding=1, bias=norm == "none"), Scaler(scaler_rate),
                       make_norm(norm, c, track_running_stats=track_running_stats), nn.ReLU()]
            prev = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.flatten(self.pool(self.features(x)))))

    def channel_groups(self) -> list[list[tuple[str, int, int]]]:
        """Coupled channel dimensions (see :mod:`fedslim.models.coupling`): a plain chain."""
        from fedslim.models.coupling import chain_groups

        return chain_groups(self)


@MODELS.register("convbn9", "QuantFL's 9-block ConvBN ConvNet (9 x conv3x3-BN-ReLU + linear); inputs >= 8x8")
def convbn9(*, num_classes: int, input_shape: tuple[int, ...], width: float = 1.0, **options: Any) -> nn.Module:
    """ConvBN-9 on (C, H, W) inputs of at least 8x8.

    Options: ``norm`` ("bn" default | "gn" | "none"); ``track_running_stats`` (bool, default True;
    False = HeteroFL static BN); ``scaler_rate`` (HeteroFL Scaler after each convolution, default 1);
    ``dropout`` (before the classifier, default 0).
    """
    check_common_args("convbn9", num_classes, width)
    opts = parse_options("convbn9", options, COMMON_OPTIONS)
    shape = image_shape("convbn9", input_shape)
    pools = CFG9.count("M")
    require_spatial("convbn9", shape, lambda n: n >> pools, f"{pools} 2x2 max-pools")
    return init_weights(ConvBNNet(CFG9, shape[0], width, num_classes, **opts))
