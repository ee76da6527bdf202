"""Model zoo: every family registers its factory in :data:`fedslim.registry.MODELS` on import.

``build_model(name, num_classes=..., input_shape=..., width=..., **options)`` is the one entry point.
Conventions shared by all families (width scaling, stable parameter names) are in
:mod:`fedslim.models.layers`; sizes and MACs in :mod:`fedslim.models.profile`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

# Imported for their registration side effect.
from fedslim.models import (  # noqa: F401
    alexnet,
    convnet,
    heterofl_cnn,
    lenet,
    mlp,
    mobilenet,
    resnet,
    twocnn,
    vgg,
)
from fedslim.models.layers import Scaler, batch_norms, scaled, set_bn_tracking, set_scaler_rate
from fedslim.models.profile import count_macs, count_params, profile_spec
from fedslim.registry import MODELS

__all__ = [
    "MODELS",
    "Scaler",
    "batch_norms",
    "build_model",
    "count_macs",
    "count_params",
    "profile_spec",
    "scaled",
    "set_bn_tracking",
    "set_scaler_rate",
]


def build_model(name: str, *, num_classes: int, input_shape: tuple[int, ...], width: float = 1.0,
                **options: Any) -> nn.Module:
    """Build model ``name`` for samples of ``input_shape`` (one sample, e.g. (1, 28, 28)).

    ``width`` scales every hidden channel/unit count to ``ceil(base * width)``; unknown names raise
    :class:`fedslim.registry.UnknownNameError`, unknown or invalid options a ``ValueError`` naming the
    ``model.options`` field. The model is in training mode, initialised from torch's global RNG.
    """
    factory = MODELS.get(name, field="model.name")
    return factory(num_classes=num_classes, input_shape=tuple(input_shape), width=width, **options)
