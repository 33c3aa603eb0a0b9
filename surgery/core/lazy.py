"""Heavy modules imported on first use, so that reading recipes and listing plugins stays fast.

``torch = lazy("torch")`` at the top of a module binds a stand-in that imports torch the first time
one of its attributes is read and from then on holds torch's attributes itself (later reads cost
what a plain module's do). Keep ``import torch`` under ``if TYPE_CHECKING:`` for type checkers.
Only attribute reads are deferred: a module-level ``@torch.no_grad()`` or ``class X(torch.nn.Module)``
imports torch when the module is imported, which is correct, only not lazy.
"""
from __future__ import annotations

import functools
import importlib
import types
from typing import Any, Callable


class _Lazy(types.ModuleType):
    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") and attr.endswith("__"):  # introspection (copy, pickle, doctest ...)
            raise AttributeError(attr)
        module = importlib.import_module(self.__name__)
        self.__dict__.update({k: v for k, v in vars(module).items() if k not in ("__name__", "__spec__")})
        return getattr(module, attr)


def lazy(name: str) -> Any:
    """A stand-in for module ``name`` that imports it when first used."""
    return _Lazy(name)


def no_grad(fn: Callable) -> Callable:
    """``@torch.no_grad()`` that imports torch when ``fn`` is called, not when it is defined."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper
