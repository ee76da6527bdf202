"""LeNet-5 after LeCun et al., "Gradient-based learning applied to document recognition" (Proc. IEEE
1998), in its common modern form: ReLU and 2x2 max pooling instead of scaled tanh and trainable
sub-sampling, full C3 connectivity, conv 6 -> conv 16 -> fc 120 -> fc 84 -> classes (61,706
parameters on MNIST).

The network was designed for 32x32 inputs. A 5x5 convolution whose input is smaller than in that
design (first conv: < 32, second: < 14) gets 'same' padding, so 28x28 MNIST runs with padding=2 on
the first conv only (the usual MNIST LeNet-5, same 16x5x5 feature map as on 32x32) and 8x8 digits
run with both convolutions padded.
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

CHANNELS = (6, 16)
FC = (120, 84)
# Input side each 5x5 convolution sees in the original 32x32 network.
DESIGN_SIDES = (32, 14)


def _paddings(n: int) -> tuple[int, int]:
    p1 = 2 if n < DESIGN_SIDES[0] else 0
    n = (n + 2 * p1 - 4) // 2
    p2 = 2 if n < DESIGN_SIDES[1] else 0
    return p1, p2


def _side(n: int) -> int:
    p1, p2 = _paddings(n)
    n = (n + 2 * p1 - 4) // 2
    return (n + 2 * p2 - 4) // 2


class LeNet5(nn.Module):
    def __init__(self, in_shape: tuple[int, int, int], width: float, num_classes: int, *, norm: str,
                 track_running_stats: bool, scaler_rate: float, dropout: float):
        super().__init__()
        c, h, w = in_shape
        (ph1, ph2), (pw1, pw2) = _paddings(h), _paddings(w)
        c1, c2 = (scaled(x, width) for x in CHANNELS)
        f1, f2 = (scaled(x, width) for x in FC)
        self.features = nn.Sequential(
            nn.Conv2d(c, c1, 5, padding=(ph1, pw1)), Scaler(scaler_rate),
            make_norm(norm, c1, track_running_stats=track_running_stats), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding=(ph2, pw2)), Scaler(scaler_rate),
            make_norm(norm, c2, track_running_stats=track_running_stats), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.flatten = nn.Flatten()
        self.fc = nn.Sequential(
            nn.Linear(c2 * _side(h) * _side(w), f1), Scaler(scaler_rate), nn.ReLU(),
            nn.Linear(f1, f2), Scaler(scaler_rate), nn.ReLU(),
        )
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(f2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.fc(self.flatten(self.features(x)))))

    def channel_groups(self) -> list[list[Member]]:
        """Coupled channel dimensions (see :mod:`fedslim.models.coupling`): a plain chain."""
        return chain_groups(self)


@MODELS.register("lenet5", "LeNet-5 (LeCun 1998), 28x28/32x32 grey or RGB, also 8x8")
def lenet5(*, num_classes: int, input_shape: tuple[int, ...], width: float = 1.0, **options: Any) -> nn.Module:
    """LeNet-5 (ReLU, max pool) on (C, H, W) inputs of at least 4x4; see the module docstring for
    the padding rule that makes 28x28 and 8x8 work.

    Options: ``norm`` ("none" default | "bn" | "gn") after each convolution; ``track_running_stats``
    (bool, default True; BN only); ``scaler_rate`` (HeteroFL Scaler after each hidden layer,
    default 1); ``dropout`` (before the classifier, default 0).
    """
    check_common_args("lenet5", num_classes, width)
    opts = parse_options("lenet5", options, {**COMMON_OPTIONS, "norm": "none"})
    shape = image_shape("lenet5", input_shape)
    require_spatial("lenet5", shape, _side, "two 5x5 convolutions and two 2x2 max-pools")
    return init_weights(LeNet5(shape, width, num_classes, **opts))
