"""The built-in model zoo: tiny models trained on synthetic tasks on first use, then cached.

    >>> from surgery import zoo
    >>> path = zoo.build("tiny-llama/task-a")     # trains tiny-llama/base first if needed
    >>> model, tokenizer = zoo.load(path)
    >>> zoo.info("tiny-llama/task-a")["accuracy"]

Each entry directory loads with stock ``transformers`` (``zoo.json["auto_class"]`` names the Auto
class). Bidirectional entries (``tiny-llada/*``) need :func:`make_bidirectional` after
``from_pretrained``; :func:`load` does it.
"""
from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path
from typing import Any

from surgery.core.io import read_json
from surgery.models.zoo.catalog import ENTRIES, Entry, entry_hash, eval_tasks, get_entry

__all__ = [
    "Entry", "accuracy", "build", "build_many", "build_tokenizer", "cache_root", "entries", "entry_dir",
    "get_entry", "info", "is_built", "load", "make_bidirectional", "make_examples", "prepare_for_inference",
]

# names from modules that import torch and transformers, imported when first used (the catalog is not)
_LAZY = {
    "make_bidirectional": "architectures", "prepare_for_inference": "architectures",
    "ZOO_FILE": "build", "build": "build", "build_many": "build", "cache_root": "build", "entry_dir": "build",
    "is_built": "build", "load": "build", "accuracy": "tasks", "make_examples": "tasks",
    "build_tokenizer": "tokenizer",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)


class _Package(types.ModuleType):
    """Importing the submodule ``build`` would bind it over the function ``build``: keep the function."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def entries() -> dict[str, Entry]:
    """Every zoo entry by name."""
    return dict(ENTRIES)


def info(name: str, cache_dir: Path | str | None = None) -> dict[str, Any]:
    """What is known about entry ``name``: its record, and once built, ``zoo.json``'s figures."""
    from surgery.models.zoo.build import ZOO_FILE, entry_dir

    entry = get_entry(name)
    path = entry_dir(name, cache_dir)
    if (path / ZOO_FILE).is_file():
        return {**read_json(path / ZOO_FILE), "built": True, "path": str(path)}
    return {"name": name, "description": entry.description, "entry": entry.record(), "hash": entry_hash(entry),
            "eval_tasks": list(eval_tasks(entry)), "built": False, "path": str(path)}
