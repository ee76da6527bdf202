"""In-memory dataset containers: every dataset is two tensors per split, never a DataLoader."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class TensorData:
    """Features ``x`` (N, C, H, W) or (N, D) float32, already normalised; labels ``y`` (N,) int64."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"x has {self.x.shape[0]} rows but y has {self.y.shape[0]}")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, idx: torch.Tensor) -> TensorData:
        return TensorData(self.x[idx], self.y[idx])

    def to(self, device: torch.device | str) -> TensorData:
        return TensorData(self.x.to(device), self.y.to(device))


@dataclass
class DatasetBundle:
    name: str
    train: TensorData
    test: TensorData
    num_classes: int
    input_shape: tuple[int, ...]  # one sample, e.g. (1, 28, 28)
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.class_names:
            self.class_names = [str(i) for i in range(self.num_classes)]
