from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "mnist").is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def tiny_cfg(tmp_path: Path) -> dict:
    """A federation small enough to run in a second: synthetic data, MLP, 4 clients, 3 rounds."""
    os.environ.pop("FEDSLIM_DATA", None)
    return {
        "name": "tiny",
        "seed": 3,
        "output_dir": str(tmp_path / "runs"),
        "data": {"dataset": "synthetic", "num_clients": 4,
                 "options": {"num_samples": 400, "num_classes": 4, "shape": [1, 8, 8]}},
        "model": {"name": "mlp"},
        "train": {"epochs": 1, "batch_size": 16, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}},
        "federation": {"rounds": 3, "participation": 0.5},
        "engine": {"progress": False},
    }
