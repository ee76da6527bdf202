"""Import every implementation module so the registries in :mod:`fedslim.registry` are filled."""

from __future__ import annotations

import importlib

from fedslim.registry import (  # noqa: F401  (re-exported)
    ALGORITHMS,
    BACKENDS,
    CLIENT_PROCEDURES,
    CODECS,
    DATASETS,
    MODELS,
    PARTITIONERS,
)

_MODULES = [
    "fedslim.data.datasets",
    "fedslim.data.partition",
    "fedslim.models",
    "fedslim.codecs",
    "fedslim.engine.client",
    "fedslim.engine.backends",
    "fedslim.engine.ray_backend",
    "fedslim.engine.process_backend",
    "fedslim.engine.vectorized",
    "fedslim.algorithms",
]

for _m in _MODULES:
    importlib.import_module(_m)
