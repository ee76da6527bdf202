"""Name -> factory registries (models, datasets, partitioners, algorithms, codecs, backends)."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A name that is not registered; the message lists the allowed names and the closest one."""

    def __init__(self, kind: str, name: str, allowed: list[str], field: str | None = None):
        self.kind, self.name, self.allowed, self.field = kind, name, allowed, field
        close = difflib.get_close_matches(name, allowed, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        where = f"{field}: " if field else ""
        super().__init__(f"{where}unknown {kind} '{name}'{hint}; allowed: {', '.join(sorted(allowed))}")

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return str(self.args[0])


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._docs: dict[str, str] = {}

    def register(self, name: str, doc: str = "") -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' registered twice")
            self._items[name] = obj
            self._docs[name] = doc or (getattr(obj, "__doc__", "") or "").strip().split("\n")[0]
            return obj

        return deco

    def get(self, name: str, field: str | None = None) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(self.kind, name, list(self._items), field) from None

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list[str]:
        return sorted(self._items)

    def doc(self, name: str) -> str:
        return self._docs.get(name, "")


# The project's registries. Implementations register themselves on import; ``fedslim.plugins``
# imports every implementation module so that the registries are complete.
DATASETS: Registry = Registry("dataset")
PARTITIONERS: Registry = Registry("partitioner")
MODELS: Registry = Registry("model")
ALGORITHMS: Registry = Registry("algorithm")
CODECS: Registry = Registry("codec")
BACKENDS: Registry = Registry("backend")
CLIENT_PROCEDURES: Registry = Registry("client procedure")
