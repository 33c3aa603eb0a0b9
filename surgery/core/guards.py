"""Numeric guards: NaN and Inf in weights, activations, scores, gradients and step outputs.

What a non-finite value does is the recipe's ``on_nonfinite`` setting, active for the step that
meets it:

- ``stop`` (default): a one-line :class:`NumericError` naming the tensor (the model and parameter,
  with its layer, or the artifact key, which carries model and layer) stops the step.
- ``report``: the finding is recorded and the step goes on; the runner lists the findings under the
  step's ``nonfinite`` key in ``report.json`` and in ``run.log``.

The runner checks models as they are loaded, tensors read from and written to checkpoints, models
saved by a step and every artifact tensor. Plugins and engines call :func:`flag` (or the
``check_*`` helpers) for values they compute and keep only inside a step.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Iterator, Literal, Mapping

import torch

from surgery.core.errors import NumericError

Mode = Literal["stop", "report"]
MODES: tuple[str, ...] = ("stop", "report")
_LAYER = re.compile(r"(?:^|[./])(?:layers?|h|blocks?)[./](\d+)(?:[./]|$)")


@dataclass
class Policy:
    """How the current step treats non-finite values, and what it found so far."""

    mode: Mode = "stop"
    findings: list[str] = field(default_factory=list)


_policy: ContextVar[Policy | None] = ContextVar("surgery_nonfinite_policy", default=None)


def current() -> Policy:
    """The active policy (``stop`` outside any :func:`policy` block)."""
    return _policy.get() or Policy()


@contextmanager
def policy(mode: Mode = "stop") -> Iterator[Policy]:
    """Make ``mode`` the policy inside the block; the yielded object collects the findings."""
    if mode not in MODES:
        raise ValueError(f"on_nonfinite must be one of {MODES}, got {mode!r}")
    active = Policy(mode)
    token = _policy.set(active)
    try:
        yield active
    finally:
        _policy.reset(token)


def flag(message: str) -> None:
    """Report one non-finite finding: raise under ``stop``, record under ``report``."""
    active = current()
    if active.mode == "stop":
        raise NumericError(message)
    active.findings.append(message)


CHUNK = 1 << 24  # values checked at once: the temporary masks stay at 16 MiB however large the tensor


_ACCUMULATE = {torch.float16: torch.float32, torch.bfloat16: torch.float32}


def describe(tensor: torch.Tensor) -> str | None:
    """``"3 NaN, 1 Inf of 2048 values"``, or None when every value is finite (or not a float, or
    not materialised: an offloaded parameter on the meta device)."""
    if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.device.type == "meta":
        return None
    values = tensor.detach().reshape(-1)
    # one reduction, no temporary: a NaN or Inf anywhere makes the sum non-finite (a finite sum
    # proves every value finite; an overflowing one falls through to the exact count)
    if tensor.is_floating_point() and bool(torch.isfinite(values.sum(dtype=_ACCUMULATE.get(tensor.dtype, tensor.dtype)))):
        return None
    chunks = values.split(CHUNK)
    if all(bool(torch.isfinite(chunk).all()) for chunk in chunks):
        return None
    nans = sum(int(torch.isnan(chunk).sum()) for chunk in chunks)
    infs = sum(int(torch.isinf(chunk).sum()) for chunk in chunks)
    parts = [f"{nans} NaN"] if nans else []
    parts += [f"{infs} Inf"] if infs else []
    return f"{', '.join(parts)} of {tensor.numel()} values"


def layer_of(name: str) -> int | None:
    """The layer index in a parameter or key name (``model.layers.3.mlp...``, ``a/3/act``), if any."""
    match = _LAYER.search(name)
    if match:
        return int(match.group(1))
    parts = name.split("/")
    if len(parts) >= 2 and parts[1].isdigit():  # artifact keys: <model>/<layer>/...
        return int(parts[1])
    return None


def check_tensor(what: str, tensor: torch.Tensor) -> None:
    """Flag ``tensor`` if it holds NaN or Inf; ``what`` names it (``model 'a': parameter ...``)."""
    problem = describe(tensor.detach())
    if problem is not None:
        flag(f"non-finite values in {what}: {problem}")


def check_tensors(kind: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Check each named tensor; names are quoted after ``kind`` (``artifact tensor 'a/3/fai'``)."""
    for key, value in tensors.items():
        check_tensor(f"{kind} {key!r}{layer_note(key)}", value)


def check_module(model_name: str, module: torch.nn.Module) -> None:
    """Check every parameter of a loaded model, naming the parameter (module path) and its layer.

    Buffers are left alone: some architectures keep ``-inf`` masks in them on purpose.
    """
    for name, value in module.named_parameters():
        check_tensor(f"model {model_name!r}: parameter {name}{layer_note(name)}", value)


def layer_note(name: str) -> str:
    """``" (layer 3)"`` when ``name`` carries a layer index, else an empty string."""
    layer = layer_of(name)
    return f" (layer {layer})" if layer is not None else ""
