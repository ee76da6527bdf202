"""Fill the registries in :mod:`fedslim.registry`: fedslim's own implementations, the plugins of
installed packages (entry point group ``fedslim.plugins``), and a config's ``plugins``.

A plugin is a module that registers what it brings (``@ALGORITHMS.register("name")``, and likewise
models, datasets, partitioners, codecs, backends and client procedures) when imported. A config names
it as a module (``mypackage.fedprox``) or as a Python file (``plugins/fedprox.py``, relative to the
config file's folder); see docs/plugins.md.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

from fedslim.config import ConfigError
from fedslim.registry import (  # noqa: F401  (re-exported)
    ALGORITHMS,
    BACKENDS,
    CLIENT_PROCEDURES,
    CODECS,
    DATASETS,
    MODELS,
    PARTITIONERS,
)

ENTRY_POINT_GROUP = "fedslim.plugins"

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


class PluginError(ConfigError):
    """A plugin that cannot be found or imported; the message names the config field."""


def is_file_spec(spec: str) -> bool:
    """Whether a ``plugins`` entry names a Python file rather than a module."""
    return spec.endswith(".py") or "/" in spec or "\\" in spec


def file_module_name(path: Path) -> str:
    """The name a plugin file is imported under: the same for the same file in every process (so a
    procedure it registers pickles by reference to forked and Ray workers), and no other module's."""
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    return f"fedslim_plugin_{path.stem}_{digest}"


def load_plugin(spec: str, field: str = "plugins") -> None:
    """Import one plugin (a module name, or an absolute path to a Python file) once per process."""
    if is_file_spec(spec):
        path = Path(spec)
        if not path.is_absolute():
            raise PluginError(f"{field}: {spec!r} is a relative path; a config's plugin files are found "
                              f"relative to its folder (load the config with fedslim.config.load_config)")
        name = file_module_name(path)
        if name in sys.modules:
            return
        if not path.is_file():
            raise PluginError(f"{field}: no plugin file {str(path)!r}; allowed: an existing Python file (a "
                              f"config's are found relative to its folder) or an importable module name")
        module_spec = importlib.util.spec_from_file_location(name, path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # before it runs: its dataclasses and pickled functions look it up there
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[name]
            raise PluginError(f"{field}: importing the plugin file {str(path)!r} failed: "
                              f"{type(e).__name__}: {e}") from e
        return
    if spec in sys.modules:
        return
    try:
        importlib.import_module(spec)
    except Exception as e:
        sys.modules.pop(spec, None)
        raise PluginError(f"{field}: importing the plugin module {spec!r} failed: {type(e).__name__}: {e}; "
                          f"allowed: an importable module name or a Python file") from e


def load_plugins(specs: list[str], field: str = "plugins") -> None:
    for i, spec in enumerate(specs):
        load_plugin(spec, f"{field}.{i}")


def load_entry_point_plugins() -> list[str]:
    """Import every plugin that installed packages declare (``[project.entry-points."fedslim.plugins"]``);
    returns their names. A broken one stops fedslim with its name rather than going missing."""
    loaded = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as e:
            raise PluginError(f"the installed plugin {ep.name!r} ({ep.value}, entry point group "
                              f"{ENTRY_POINT_GROUP!r}) failed to import: {type(e).__name__}: {e}") from e
        loaded.append(ep.name)
    return loaded


load_entry_point_plugins()
