"""HeteroFL's ``conv`` model (Diao et al., "HeteroFL: Computation and Communication Efficient
Federated Learning for Heterogeneous Clients", ICLR 2021; dem123456789/HeteroFL ``models/conv.py``):
hidden sizes 64-128-256-512, each block Conv3x3 -> Scaler -> norm -> ReLU -> MaxPool2 (no pool after
the last block), then global average pooling and a linear classifier.

The module is one ``nn.Sequential`` called ``blocks`` laid out as in the reference, so state-dict keys
(``blocks.0.weight`` ... ``blocks.21.bias``) match reference checkpoints. Published sizes on MNIST:
1.557 M parameters at rate 1 and 6.6 K at rate 1/16 (BN affine parameters included).
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

HIDDEN = (64, 128, 256, 512)


class HeteroFLConv(nn.Module):
    def __init__(self, in_channels: int, width: float, num_classes: int, *, norm: str,
                 track_running_stats: bool, scaler_rate: float, dropout: float):
        super().__init__()
        hidden = [scaled(h, width) for h in HIDDEN]
        layers: list[nn.Module] = []
        prev = in_channels
        for i, h in enumerate(hidden):
            layers += [nn.Conv2d(prev, h, 3, 1, 1), Scaler(scaler_rate),
                       make_norm(norm, h, track_running_stats=track_running_stats), nn.ReLU()]
            if i < len(hidden) - 1:
                layers.append(nn.MaxPool2d(2))
            prev = h
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(prev, num_classes)]
        self.blocks = nn.Sequential(*layers)
        # Outside ``blocks`` so the linear layer keeps the reference's index (blocks.21).
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[-1](self.dropout(self.blocks[:-1](x)))

    def channel_groups(self) -> list[list[Member]]:
        """Coupled channel dimensions (see :mod:`fedslim.models.coupling`): a plain chain."""
        return chain_groups(self)


@MODELS.register("heterofl_cnn", "HeteroFL's conv model (64-128-256-512, Scaler, BN); inputs >= 8x8")
def heterofl_cnn(*, num_classes: int, input_shape: tuple[int, ...], width: float = 1.0,
                 **options: Any) -> nn.Module:
    """HeteroFL CNN on (C, H, W) inputs of at least 8x8 (MNIST, CIFAR, 8x8 digits).

    Options: ``norm`` ("bn" default | "gn" (GroupNorm with 4 groups, as in HeteroFL) | "none");
    ``track_running_stats`` (bool, default True; False = HeteroFL static BN, the reference's default);
    ``scaler_rate`` (Scaler after each convolution; HeteroFL sets it to the model rate, default 1);
    ``dropout`` (before the classifier, default 0; not in the reference).
    """
    check_common_args("heterofl_cnn", num_classes, width)
    opts = parse_options("heterofl_cnn", options, COMMON_OPTIONS)
    shape = image_shape("heterofl_cnn", input_shape)
    pools = len(HIDDEN) - 1
    require_spatial("heterofl_cnn", shape, lambda n: n >> pools, f"{pools} 2x2 max-pools")
    return init_weights(HeteroFLConv(shape[0], width, num_classes, **opts))
