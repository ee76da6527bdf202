"""A CIFAR/MNIST-sized AlexNet (Krizhevsky et al., NeurIPS 2012), laid out as in the HybridCompFL
reference code (zeyneddinoz/HybridCompFL, ``model_architectures.py``) so that method can be compared
on its own model: five convolutions 64-192-384-256-256 (5x5, 5x5, 3x3, 3x3, 3x3, stride 1, 'same'
padding, 2x2 max pooling after the first two), adaptive average pooling to 6x6, then
Dropout -> FC 4096 -> ReLU -> Dropout -> FC 4096 -> ReLU -> FC classes.

At width 1 this is ~57 M parameters (the 256*6*6 x 4096 layer dominates); use ``width`` to shrink it.
"""

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

# (out channels, kernel, max-pool after)
CONVS = ((64, 5, True), (192, 5, True), (384, 3, False), (256, 3, False), (256, 3, False))
POOL_SIDE = 6
FC = (4096, 4096)


class AlexNet(nn.Module):
    def __init__(self, in_channels: int, width: float, num_classes: int, *, norm: str,
                 track_running_stats: bool, scaler_rate: float, dropout: float):
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for base, k, pool in CONVS:
            c = scaled(base, width)
            layers += [nn.Conv2d(prev, c, k, padding=k // 2), Scaler(scaler_rate),
                       make_norm(norm, c, track_running_stats=track_running_stats), nn.ReLU()]
            if pool:
                layers.append(nn.MaxPool2d(2))
            prev = c
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(POOL_SIDE)
        self.flatten = nn.Flatten()
        f1, f2 = (scaled(x, width) for x in FC)
        self.fc = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(prev * POOL_SIDE * POOL_SIDE, f1), Scaler(scaler_rate), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(f1, f2), Scaler(scaler_rate), nn.ReLU(),
        )
        self.classifier = nn.Linear(f2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.fc(self.flatten(self.pool(self.features(x)))))

    def channel_groups(self) -> list[list[Member]]:
        """Coupled channel dimensions (see :mod:`fedslim.models.coupling`): a plain chain."""
        return chain_groups(self)


@MODELS.register("alexnet", "AlexNet for CIFAR/MNIST (HybridCompFL layout, ~57 M params); inputs >= 4x4")
def alexnet(*, num_classes: int, input_shape: tuple[int, ...], width: float = 1.0, **options: Any) -> nn.Module:
    """AlexNet on (C, H, W) inputs of at least 4x4 (28x28 grey, 32x32 RGB, 8x8 also runs).

    Options: ``norm`` ("none" default, as in AlexNet | "bn" | "gn") after each convolution;
    ``track_running_stats`` (bool, default True; BN only); ``scaler_rate`` (HeteroFL Scaler after
    each hidden layer, default 1); ``dropout`` (before each of the two hidden FC layers, default 0.5
    as in AlexNet; 0 disables it).
    """
    check_common_args("alexnet", num_classes, width)
    opts = parse_options("alexnet", options, {**COMMON_OPTIONS, "norm": "none", "dropout": 0.5})
    shape = image_shape("alexnet", input_shape)
    require_spatial("alexnet", shape, lambda n: n // 2 // 2, "two 2x2 max-pools")
    return init_weights(AlexNet(shape[0], width, num_classes, **opts))
