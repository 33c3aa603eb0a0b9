"""Where model-surgery caches what it builds (zoo models, converted real models, the plugin index)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of the on-disk cache (``$SURGERY_CACHE``, default ``~/.cache/model-surgery``)."""
    return Path(os.environ.get("SURGERY_CACHE", Path.home() / ".cache" / "model-surgery"))
