"""Named registries that plugins fill through the ``register_*`` hooks."""
from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from surgery.core.errors import SurgeryError

T = TypeVar("T")


def did_you_mean(name: str, choices: list[str]) -> str:
    """A short suffix for error messages: ' (did you mean X?)' or the list of choices."""
    close = difflib.get_close_matches(name, choices, n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (choose from: {', '.join(sorted(choices))})" if choices else ""


class Registry(Generic[T]):
    """A name -> object map; ``get`` of an unknown name raises ``error`` with a did-you-mean."""

    def __init__(self, kind: str, error: type[SurgeryError] = SurgeryError) -> None:
        self.kind = kind
        self.error = error
        self._items: dict[str, T] = {}
        # fill(name) is called before a lookup (fill(None) before listing everything); the plugin
        # manager sets it so that only the plugin registering ``name`` is imported
        self.fill: Callable[[str | None], None] | None = None

    def register(self, name: str, item: T) -> None:
        self._items[name] = item

    def _filled(self, name: str | None) -> dict[str, T]:
        if self.fill is not None and (name is None or name not in self._items):
            self.fill(name)
        return self._items

    def get(self, name: str) -> T:
        items = self._filled(name)
        if name not in items:
            items = self._filled(None)
            raise self.error(f"unknown {self.kind} {name!r}" + did_you_mean(name, list(items)))
        return items[name]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._filled(name)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._filled(None)))

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._filled(None).items())
