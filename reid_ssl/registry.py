"""One small registry type for every kind of plug-in: backbones, losses, optimizers, datasets, index types,
person detectors, export formats.

A registry maps a name to an object (a class, a factory function or a spec) plus a one-line description.
Config validation and the command line read their choices from the registry, so registering an entry is the
only thing a new plug-in needs: it then appears in ``--help``, in config errors and in the tests that
iterate every registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from reid_ssl.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> objects, in registration order.

    Args:
        kind: what the entries are, for messages ("backbone", "loss"...).
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, obj: T | None = None, *, help: str = "") -> Callable[[T], T]:
        """Add ``obj`` under ``name`` (usable as a decorator when ``obj`` is omitted).

        Raises:
            ValueError: the name is taken (two plug-ins must not silently shadow each other).
        """

        def add(o: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = o
            doc = help or (getattr(o, "__doc__", None) or "").strip().splitlines()[:1]
            self._help[name] = doc if isinstance(doc, str) else (doc[0] if doc else "")
            return o

        if obj is not None:
            add(obj)
            return lambda o: o
        return add

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; choose one of {list(self._entries)}") from None

    def get(self, name: str) -> T:
        """Same as ``registry[name]``: the entry, or :class:`UnknownNameError` listing the choices."""
        return self[name]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def names(self, where: Callable[[T], bool] | None = None) -> tuple[str, ...]:
        """Registered names in registration order, optionally only those whose entry passes ``where``."""
        return tuple(n for n, o in self._entries.items() if where is None or where(o))

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def help(self, name: str) -> str:
        """The entry's one-line description."""
        self[name]
        return self._help[name]

    def describe(self, where: Callable[[T], bool] | None = None) -> str:
        """``name: description`` lines, for ``--help`` texts."""
        return "\n".join(f"  {n}: {self._help[n]}" for n in self.names(where))

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"
