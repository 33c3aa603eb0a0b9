"""Base class for plugin option schemas."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from surgery.core.errors import RecipeError


class Options(BaseModel):
    """Plugin options: typed, documented, unknown keys rejected.

    Subclass it, give every field a type, a default where sensible and a ``description``
    (``Field(0.5, ge=0, le=1, description="...")``); ``surgery describe`` prints them.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoOptions(Options):
    """For stages that take no options."""


def check_at_most(value: int, limit: int, key: str, what: str) -> None:
    """A count option larger than what there is to count is an error, not a silent clamp."""
    if value > limit:
        raise RecipeError(f"{key}: {value} is more than the {limit} {what}")
