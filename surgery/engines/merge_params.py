"""Per-layer and per-tensor values of a merge option (mergekit's parameter settings).

A :data:`Setting` is

- a number: the same value for every tensor;
- a list of numbers, a gradient: the value at layer ``i`` of ``L`` is the list interpolated linearly at
  ``t = i / (L - 1)`` (``[0, 0.5, 1]`` ramps from 0 at the first layer to 1 at the last); tensors
  outside the layers (embeddings, final norm, head) take ``t = 0``, as in mergekit;
- a list of ``{filter: REGEX, value: number-or-gradient}``: the first entry whose regular expression
  is found in the tensor's name gives the value (``filter`` omitted or ``"*"`` matches every tensor);
  a tensor no entry matches gets the option's default.

Regular expressions are compiled when the recipe is validated, before any model is loaded.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Sequence, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")


class Conditional(BaseModel):
    """A value for the tensors whose name matches ``filter``."""

    model_config = ConfigDict(extra="forbid")
    filter: str | None = Field(None, description="regular expression searched in the tensor name ('*' or omitted: all)")
    value: Union[float, list[float]] = Field(..., description="number or per-layer gradient")

    @field_validator("filter")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None and pattern != "*":
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"filter {pattern!r} is not a regular expression ({exc})") from None
        return pattern

    @field_validator("value")
    @classmethod
    def _nonempty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("a gradient needs at least one value")
        return value


def parse_setting(value: Any) -> Any:
    """A setting's raw value checked before its type: one clear error at the option's location."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, list) and value:
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            return [float(v) for v in value]
        if all(isinstance(v, (dict, Conditional)) for v in value):
            try:
                return [Conditional.model_validate(v) for v in value]
            except ValidationError as exc:
                first = exc.errors()[0]
                raise ValueError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    raise ValueError("expected a number, a per-layer gradient [v0, ..., vn] or a list of {filter: REGEX, value: ...}")


Setting = Annotated[Union[float, list[float], list[Conditional]], BeforeValidator(parse_setting)]
SETTING_HELP = "number, per-layer gradient [v0, ..., vn], or [{filter: REGEX, value: ...}] by tensor name"


def numbers(setting: Setting | None) -> list[float]:
    """Every number a setting can take (its gradient points and filtered values)."""
    if setting is None:
        return []
    if isinstance(setting, (int, float)):
        return [float(setting)]
    out: list[float] = []
    for item in setting:
        out += numbers(item.value) if isinstance(item, Conditional) else [float(item)]
    return out


def check_range(setting: Setting | None, above: float | None = None, at_most: float | None = None,
                at_least: float | None = None) -> Setting | None:
    """Pydantic validator body: every value of ``setting`` is > ``above``, >= ``at_least``, <= ``at_most``."""
    for value in numbers(setting):
        if above is not None and not value > above:
            raise ValueError(f"Input should be greater than {above:g} (got {value:g})")
        if at_least is not None and not value >= at_least:
            raise ValueError(f"Input should be greater than or equal to {at_least:g} (got {value:g})")
        if at_most is not None and not value <= at_most:
            raise ValueError(f"Input should be less than or equal to {at_most:g} (got {value:g})")
    return setting


def layer_of(name: str) -> int | None:
    """The layer index in a tensor name (``model.layers.3.mlp...`` -> 3), else None."""
    match = LAYER_PATTERN.search(name)
    return int(match.group(1)) if match else None


def layer_count(names: Sequence[str]) -> int:
    layers = [i for i in map(layer_of, names) if i is not None]
    return max(layers) + 1 if layers else 0


def position(name: str, n_layers: int) -> float:
    """mergekit's ``t`` of a tensor: i / (L - 1) inside layer i (1 when L = 1), 0 outside the layers."""
    layer = layer_of(name)
    if layer is None:
        return 0.0
    return layer / (n_layers - 1) if n_layers > 1 else 1.0


def interpolate(gradient: Sequence[float], t: float) -> float:
    scaled = t * (len(gradient) - 1)
    i0 = int(scaled)
    i1 = min(len(gradient) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * gradient[i0] + frac * gradient[i1]


def evaluate(setting: Setting | Conditional | None, name: str, t: float) -> float | None:
    """The value of ``setting`` for tensor ``name`` at layer position ``t`` (None: no filter matched)."""
    if setting is None or isinstance(setting, (int, float)):
        return setting
    if isinstance(setting, Conditional):
        return evaluate(setting.value, name, t)
    if all(isinstance(v, (int, float)) for v in setting):
        return interpolate(setting, t)
    for cond in setting:
        if cond.filter in (None, "*") or re.search(cond.filter, name):
            return evaluate(cond.value, name, t)
    return None


class TensorParams:
    """Resolves settings for the tensors of one model (its layer count fixes the gradients' scale)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.n_layers = layer_count(names)

    def value(self, setting: Setting | None, name: str, default: float | None = None) -> float | None:
        found = evaluate(setting, name, position(name, self.n_layers))
        return default if found is None else found

    def values(self, settings: Sequence[Setting] | None, name: str, count: int, default: float) -> list[float]:
        """One value per model from a per-model list (None: ``default`` for each)."""
        if settings is None:
            return [default] * count
        return [self.value(s, name, default) for s in settings]


class DensityChecks(BaseModel):
    """Validators for the ``density`` / ``densities`` options of the sparsifying merges: each in (0, 1]."""

    @field_validator("density", check_fields=False)
    @classmethod
    def _density(cls, value):
        return check_range(value, above=0, at_most=1)

    @field_validator("densities", check_fields=False)
    @classmethod
    def _densities(cls, values):
        for value in values or []:
            check_range(value, above=0, at_most=1)
        return values
