"""The CNN of McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
Data" (AISTATS 2017): two 5x5 convolutions (32, 64 channels, 'same' padding) each followed by 2x2 max
pooling, a 512-unit fully connected layer and the output layer (1,663,370 parameters on MNIST)."""

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

CHANNELS = (32, 64)
FC = 512


def _side(n: int) -> int:
    return n // 2 // 2


class TwoCNN(nn.Module):
    def __init__(self, in_shape: tuple[int, int, int], width: float, num_classes: int, *, norm: str,
                 track_running_stats: bool, scaler_rate: float, dropout: float):
        super().__init__()
        c, h, w = in_shape
        c1, c2, fc = scaled(CHANNELS[0], width), scaled(CHANNELS[1], width), scaled(FC, width)
        self.features = nn.Sequential(
            nn.Conv2d(c, c1, 5, padding=2), Scaler(scaler_rate),
            make_norm(norm, c1, track_running_stats=track_running_stats), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding=2), Scaler(scaler_rate),
            make_norm(norm, c2, track_running_stats=track_running_stats), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.flatten = nn.Flatten()
        self.fc = nn.Sequential(nn.Linear(c2 * _side(h) * _side(w), fc), Scaler(scaler_rate), nn.ReLU())
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(fc, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.fc(self.flatten(self.features(x)))))

    def channel_groups(self) -> list[list[Member]]:
        """Coupled channel dimensions (see :mod:`fedslim.models.coupling`): a plain chain."""
        return chain_groups(self)


@MODELS.register("twocnn", "CNN of McMahan et al. 2017 (conv5x5 32/64, fc 512); inputs >= 4x4")
def twocnn(*, num_classes: int, input_shape: tuple[int, ...], width: float = 1.0, **options: Any) -> nn.Module:
    """McMahan's CNN on (C, H, W) inputs of at least 4x4 (28x28 MNIST, 32x32 CIFAR, 8x8 digits).

    Options: ``norm`` ("none" default, as in the paper | "bn" | "gn") after each convolution;
    ``track_running_stats`` (bool, default True; BN only); ``scaler_rate`` (HeteroFL Scaler after
    each hidden layer, default 1); ``dropout`` (before the classifier, default 0).
    """
    check_common_args("twocnn", num_classes, width)
    opts = parse_options("twocnn", options, {**COMMON_OPTIONS, "norm": "none"})
    shape = image_shape("twocnn", input_shape)
    require_spatial("twocnn", shape, _side, "two 2x2 max-pools")
    return init_weights(TwoCNN(shape, width, num_classes, **opts))
