"""Errors a user can cause. Each carries a one-line message; the CLI prints it and exits 2."""
from __future__ import annotations


class SurgeryError(Exception):
    """Base class for user-caused errors (bad recipe, missing file, unknown plugin, ...)."""

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None) -> None:
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class RecipeError(SurgeryError):
    """The recipe (or a --set override) is malformed."""


class PluginError(SurgeryError):
    """A plugin is unknown, cannot be imported, or raised while running a step."""


class ModelError(SurgeryError):
    """A model cannot be loaded or its architecture is unknown."""


class DataError(SurgeryError):
    """A data file or data source is missing or malformed."""


class NumericError(SurgeryError):
    """NaN or Inf found in weights, activations, scores or gradients."""


def one_line(message: str) -> str:
    """``message`` on one line: lines after the first are joined with ' | ', blanks dropped."""
    return " | ".join(line.strip() for line in str(message).splitlines() if line.strip())


def located(exc: SurgeryError, where: str) -> SurgeryError:
    """``exc`` with ``where:`` in front of its message (unless it already starts with it), same type."""
    message = str(exc)
    if message.startswith(f"{where}:"):
        return exc
    try:
        relocated = type(exc)(message, where=where)
    except TypeError:  # a subclass with its own constructor
        relocated = SurgeryError(message, where=where)
        relocated.exit_code = exc.exit_code
    return relocated
