"""model-surgery: capture, score, align, fuse, attribute, prune and heal transformer models."""
from surgery.core.version import VERSION as __version__
from surgery.hookspecs import hookimpl

__all__ = ["hookimpl", "__version__"]
