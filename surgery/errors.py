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
