"""Where a run may write, which device it may use, and whether it may download: checked at
validation, before anything is loaded, each failure one :class:`~surgery.errors.SurgeryError` line.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from surgery.core.errors import SurgeryError

DOWNLOAD_ENV = "SURGERY_ALLOW_DOWNLOAD"
_DEVICE = re.compile(r"(cpu|cuda|mps)(?::(\d+))?")


def downloads_allowed() -> bool:
    """True when ``$SURGERY_ALLOW_DOWNLOAD`` is 1/true/yes (``--allow-download`` sets it)."""
    return os.environ.get(DOWNLOAD_ENV, "").strip().lower() in ("1", "true", "yes")


def allow_downloads() -> None:
    """Let this process fetch hub models (the ``--allow-download`` flag)."""
    os.environ[DOWNLOAD_ENV] = "1"


def resolved_note(path: Path) -> str:
    """`` (resolves to /abs/path)`` when ``path`` is relative with ``..`` in it, else empty."""
    if ".." in path.parts or str(path).startswith("~"):
        return f" (resolves to {_absolute(path)})"
    return ""


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path.expanduser()))


def check_output(path: Path) -> Path:
    """Refuse an output directory that is the filesystem root, an existing file, a model checkpoint,
    lies under a file or cannot be written; return it unchanged otherwise."""
    absolute = _absolute(path)
    label = f"{path}{resolved_note(path)}"
    if absolute == Path(absolute.anchor):
        raise SurgeryError(f"{label}: refusing to write a run into the filesystem root")
    if absolute.exists() and not absolute.is_dir():
        raise SurgeryError(f"{label}: exists and is a file, not a directory")
    if (absolute / "config.json").is_file():
        raise SurgeryError(f"{label}: holds a model checkpoint (config.json); a run would write among its files")
    existing = absolute
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise SurgeryError(f"{label}: lies under {existing}, which is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SurgeryError(f"{label}: {existing} is not writable")
    return path


def check_device(text: str) -> str:
    """``cpu``, ``cuda``, ``cuda:N`` (N below the number of CUDA devices) or ``mps``, if this torch
    has it; return ``text``."""
    match = _DEVICE.fullmatch(text.strip())
    if match is None:
        raise SurgeryError(f"unknown device {text!r}: expected cpu, cuda, cuda:N or mps")
    kind, index = match.group(1), match.group(2)
    if kind == "cpu":
        return text
    import torch

    if kind == "mps":
        backend = getattr(torch.backends, "mps", None)
        if backend is None or not backend.is_available():
            raise SurgeryError(f"device {text!r}: this torch has no MPS backend available")
        return text
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else "no CUDA device visible"
        raise SurgeryError(f"device {text!r}: torch {torch.__version__} has no CUDA ({build}); use device: cpu")
    count = torch.cuda.device_count()
    if index is not None and int(index) >= count:
        raise SurgeryError(f"device {text!r}: only {count} CUDA device(s) here (cuda:0 to cuda:{count - 1})")
    return text
