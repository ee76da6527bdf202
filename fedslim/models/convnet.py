"""ConvBN-9: the "9-block ConvBN ConvNet" QuantFL trains on CIFAR-10.

Nine blocks of 3x3 convolution -> BatchNorm -> ReLU, channels 64-64-M-128-128-M-256-256-256-M-512-512,
then global average pooling and one linear classifier (5.3 M parameters on CIFAR-10). The QuantFL
seed names the network but not its channel list; this is our reading of it: a plain VGG-style
chain of ConvBN blocks (no residual adds), which keeps it sliceable by every sub-model method.
Three 2x2 max-pools need inputs of at least 8x8, so it also runs on 28x28 MNIST and 8x8 digits.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from fedslim.models.layers import (
    COMMON_OPTIONS,
    check_common_args,
    image_shape,
    init_weights,
    parse_options,
    require_spatial,
)
from fedslim.models.vgg import VGG
from fedslim.registry import MODELS

CFG9: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512)


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
    # A ConvBN block has no convolution bias (the norm's shift absorbs it); without a norm it comes back.
    return init_weights(VGG(CFG9, shape[0], width, num_classes, conv_bias=opts["norm"] == "none", **opts))
