"""What travels between the server and a client update: plain data, no live objects."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fedslim.config import OptimizerConfig

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class ModelSpec:
    """Enough to build a model; hashable so backends can keep one model buffer per spec."""

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    width: float = 1.0
    options: tuple[tuple[str, Any], ...] = ()

    @staticmethod
    def make(name: str, num_classes: int, input_shape: tuple[int, ...], width: float = 1.0,
             **options: Any) -> ModelSpec:
        from fedslim.models.profile import freeze_option

        # Hashable (backends key model buffers by spec) even for a list option from YAML, such as
        # mobilenetv2's hidden_channels.
        frozen = tuple(sorted((k, freeze_option(v)) for k, v in options.items()))
        return ModelSpec(name, num_classes, tuple(input_shape), float(width), frozen)

    def with_(self, width: float | None = None, **options: Any) -> ModelSpec:
        opts = dict(self.options)
        opts.update(options)
        return ModelSpec.make(self.name, self.num_classes, self.input_shape,
                              self.width if width is None else width, **opts)

    def build(self) -> torch.nn.Module:
        from fedslim.models import build_model

        return build_model(self.name, num_classes=self.num_classes, input_shape=self.input_shape,
                           width=self.width, **dict(self.options))


@dataclass(frozen=True)
class LocalTrain:
    """Local training settings for one task (the round's lr already applied)."""

    epochs: int
    batch_size: int
    optimizer: OptimizerConfig
    lr: float
    grad_clip: float | None = None
    max_steps: int | None = None
    augment: str = "none"


@dataclass
class ClientTask:
    """One unit of client work. ``kind`` picks the client procedure (``train``, ``bn_stats`` ...)."""

    client: int
    round: int
    spec: ModelSpec
    state: State  # weights the client starts from (after the downlink codec)
    train: LocalTrain | None = None
    kind: str = "train"
    seed: int = 0  # seed of this task's random stream (see fedslim.rng)
    label_mask: torch.Tensor | None = None  # bool (num_classes,): masked cross-entropy
    param_masks: State | None = None  # 0/1 per weight: re-applied after every step (pruned models)
    down_codec: Any = None  # overrides the configured downlink pipeline (an object from fedslim.codecs)
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClientResult:
    client: int
    round: int
    delta: State  # local minus start, float tensors; exact values for integer buffers
    num_samples: int
    num_steps: int = 0
    loss: float = 0.0
    extras: dict[str, Any] = field(default_factory=dict)
