"""Per-client data kept in memory as tensors (on the compute device when there is one)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedslim.data.types import DatasetBundle, TensorData


@dataclass
class ClientStore:
    bundle: DatasetBundle
    train_parts: list[torch.Tensor]  # indices into bundle.train, one per client
    test_parts: list[torch.Tensor] | None = None  # indices into bundle.train (local held-out split)
    device: str = "cpu"
    # Images kept channels-last (see fedslim.engine.host); ModelBuffers lay their models out to match.
    channels_last: bool = False

    def __post_init__(self) -> None:
        self._cache: dict[tuple[int, str], TensorData] = {}
        self._train = self.bundle.train.to(self.device)
        if self.channels_last and self._train.x.dim() == 4:
            # Row gathers (x[idx]) keep this layout, so every batch comes out channels-last.
            self._train = TensorData(self._train.x.contiguous(memory_format=torch.channels_last), self._train.y)

    @property
    def num_clients(self) -> int:
        return len(self.train_parts)

    def num_samples(self, client: int, split: str = "train") -> int:
        if split == "test" and self.test_parts is not None:
            return int(len(self.test_parts[client]))
        return int(len(self.train_parts[client]))

    def get(self, client: int, split: str = "train") -> TensorData:
        key = (client, split)
        if key not in self._cache:
            if split == "train":
                idx = self.train_parts[client]
            elif split == "test":
                if self.test_parts is None:
                    raise ValueError("no local test split: set data.local_test_fraction > 0")
                idx = self.test_parts[client]
            else:
                raise ValueError(f"unknown client split {split!r}")
            self._cache[key] = self._train.subset(idx.to(self.device))
        return self._cache[key]

    def client_labels(self, client: int) -> torch.Tensor:
        """Bool mask (num_classes,) of the labels present in the client's training data."""
        y = self.bundle.train.y[self.train_parts[client]]
        mask = torch.zeros(self.bundle.num_classes, dtype=torch.bool)
        mask[y.unique()] = True
        return mask
