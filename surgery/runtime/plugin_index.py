"""The plugin index: what the installed plugins offer, kept on disk so a command need not import them.

One JSON file per installation state under ``<cache>/plugin-index/``, named by a hash of the
``surgery`` entry points (name, target, distribution and version) and of the size and modification
time of every file of the top-level packages the entry points live in. Any install, removal or edit
of a plugin changes the hash, so a stale index is never read; old files are left for ``rm -r``.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
from pathlib import Path
from typing import Any, Callable

from surgery.core.cache import cache_dir
from surgery.core.version import VERSION

Entry = dict[str, Any]


def load(entry_points: list[importlib.metadata.EntryPoint], build: Callable[[], dict[str, Entry]]) -> dict[str, Entry]:
    """The index of ``entry_points``: read from the cache, or ``build()`` it and write it there."""
    path = cache_dir() / "plugin-index" / f"{key(entry_points)}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    index = build()
    try:
        from surgery.core.io import write_text

        write_text(path, json.dumps(index, indent=1, sort_keys=True))
    except OSError:
        pass  # a read-only cache costs speed, not correctness
    return index


def key(entry_points: list[importlib.metadata.EntryPoint]) -> str:
    """A hash of the entry points and of the files of the packages that provide them."""
    digest = hashlib.sha256(VERSION.encode())
    tops: set[str] = set()
    for ep in sorted(entry_points, key=lambda e: e.name):
        dist = getattr(ep, "dist", None)
        digest.update(f"{ep.name}={ep.value};{getattr(dist, 'name', '')}={getattr(dist, 'version', '')}\n".encode())
        tops.add(ep.value.split(":")[0].split(".")[0])
    for top in sorted(tops):
        for path in _package_files(top):
            stat = path.stat()
            digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def _package_files(top: str) -> list[Path]:
    """The source files of top-level module or package ``top`` (found without importing it)."""
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    if spec.submodule_search_locations:
        return sorted(p for d in spec.submodule_search_locations for p in Path(d).rglob("*.py"))
    return [Path(spec.origin)] if spec.origin and Path(spec.origin).is_file() else []
