"""Federated algorithms, one file each. Every module in this package is imported so it registers."""

from __future__ import annotations

import importlib
import pkgutil

from fedslim.algorithms.base import Algorithm, RunContext

__all__ = ["Algorithm", "RunContext"]

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")
