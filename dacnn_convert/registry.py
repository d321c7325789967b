"""One registry type for everything looked up by name: fits, datasets, benchmark methods.

A decorator writes into a dict (as timm/models/_registry.py does); a failed lookup is a
UsageError that lists the valid names and the closest match.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from .errors import UsageError, choose

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Named entries of one kind (``kind`` names them in errors: "dataset", "method", ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: add the decorated object under ``name`` (a second one under a name is a bug)."""

        def wrap(entry: T) -> T:
            return self.add(name, entry)

        return wrap

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise UsageError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def get_or_raise(self, name: str, extra: tuple[str, ...] = ()) -> T:
        """The entry called ``name``; UsageError naming the valid ones (and ``extra`` forms) if none."""
        if name not in self._entries:
            choose(self.kind, name, [*self._entries, *extra])
        return self._entries[name]

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
