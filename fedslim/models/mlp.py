"""Multi-layer perceptron of McMahan et al., "Communication-Efficient Learning of Deep Networks from
Decentralized Data" (AISTATS 2017): two hidden layers of 200 units with ReLU (199,210 parameters on
MNIST)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from fedslim.models.coupling import Member, chain_groups
from fedslim.models.layers import (
    COMMON_OPTIONS,
    Scaler,
    check_common_args,
    init_weights,
    int_shape,
    make_norm,
    parse_options,
    scaled,
)
from fedslim.registry import MODELS

HIDDEN = (200, 200)


class MLP(nn.Module):
    """Flatten -> [Linear -> Scaler -> norm -> ReLU] x len(hidden) -> Dropout -> Linear."""

    def __init__(self, in_features: int, hidden: tuple[int, ...], num_classes: int, *, norm: str = "none",
                 track_running_stats: bool = True, scaler_rate: float = 1.0, dropout: float = 0.0):
        super().__init__()
        self.flatten = nn.Flatten()
        layers: list[nn.Module] = []
        prev = in_features
        for h in hidden:
            layers += [nn.Linear(prev, h), Scaler(scaler_rate),
                       make_norm(norm, h, track_running_stats=track_running_stats, dim=1), nn.ReLU()]
            prev = h
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.features(self.flatten(x))))

    def channel_groups(self) -> list[list[Member]]:
        """Coupled channel dimensions (see :mod:`fedslim.models.coupling`): a plain chain."""
        return chain_groups(self)


@MODELS.register("mlp", "MLP 200-200 (McMahan et al. 2017); any input shape, flattened")
def mlp(*, num_classes: int, input_shape: tuple[int, ...], width: float = 1.0, **options: Any) -> nn.Module:
    """McMahan's 2NN: hidden layers of ``ceil(200 * width)`` units; input of any shape, flattened.

    Options: ``norm`` ("none" default | "bn" (BatchNorm1d) | "gn") after each hidden layer;
    ``track_running_stats`` (bool, default True; BN only); ``scaler_rate`` (HeteroFL Scaler, default 1);
    ``dropout`` (before the classifier, default 0).
    """
    check_common_args("mlp", num_classes, width)
    opts = parse_options("mlp", options, {**COMMON_OPTIONS, "norm": "none"})
    shape = int_shape(input_shape)
    if not shape:
        raise ValueError(f"model 'mlp' expects input_shape of positive integers, got {tuple(input_shape)}")
    model = MLP(math.prod(shape), tuple(scaled(h, width) for h in HIDDEN), num_classes, **opts)
    return init_weights(model)
