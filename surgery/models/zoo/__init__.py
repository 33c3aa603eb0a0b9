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

from pathlib import Path
from typing import Any

from surgery.core.io import read_json
from surgery.models.zoo.architectures import make_bidirectional, prepare_for_inference
from surgery.models.zoo.build import ZOO_FILE, build, build_many, cache_root, entry_dir, is_built, load
from surgery.models.zoo.catalog import ENTRIES, Entry, entry_hash, eval_tasks, get_entry
from surgery.models.zoo.tasks import accuracy, make_examples
from surgery.models.zoo.tokenizer import build_tokenizer

__all__ = [
    "Entry", "accuracy", "build", "build_many", "build_tokenizer", "cache_root", "entries", "entry_dir",
    "get_entry", "info", "is_built", "load", "make_bidirectional", "make_examples", "prepare_for_inference",
]


def entries() -> dict[str, Entry]:
    """Every zoo entry by name."""
    return dict(ENTRIES)


def info(name: str, cache_dir: Path | str | None = None) -> dict[str, Any]:
    """What is known about entry ``name``: its record, and once built, ``zoo.json``'s figures."""
    entry = get_entry(name)
    path = entry_dir(name, cache_dir)
    if (path / ZOO_FILE).is_file():
        return {**read_json(path / ZOO_FILE), "built": True, "path": str(path)}
    return {"name": name, "description": entry.description, "entry": entry.record(), "hash": entry_hash(entry),
            "eval_tasks": list(eval_tasks(entry)), "built": False, "path": str(path)}
