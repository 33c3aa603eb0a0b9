"""model-surgery: capture, score, align, fuse, attribute, prune and heal transformer models."""
from surgery.hookspecs import hookimpl

__all__ = ["hookimpl"]
__version__ = "0.1.0"
