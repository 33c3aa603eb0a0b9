"""The installed plugins' registries, for tests that call engines and models directly.

One manager serves the whole test session: building it loads every built-in plugin once.
"""
from __future__ import annotations

from functools import lru_cache

from surgery.runtime.manager import Manager


@lru_cache(maxsize=1)
def manager() -> Manager:
    return Manager()


def registries():
    return manager().registries


def view(model, part: str = "language"):
    return registries().view(model, part)


def get_objective(name: str):
    return registries().objectives.get(name)
