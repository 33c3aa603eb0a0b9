"""Named registries that plugins fill through the ``register_*`` hooks."""
from __future__ import annotations

import difflib
from typing import Generic, Iterator, TypeVar

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

    def register(self, name: str, item: T) -> None:
        self._items[name] = item

    def get(self, name: str) -> T:
        if name not in self._items:
            raise self.error(f"unknown {self.kind} {name!r}" + did_you_mean(name, list(self._items)))
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._items.items())
