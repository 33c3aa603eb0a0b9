"""The package version, read once from the installed distribution's metadata."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    VERSION = version("model-surgery")
except PackageNotFoundError:  # run from a source tree that was never installed
    VERSION = "0+unknown"
