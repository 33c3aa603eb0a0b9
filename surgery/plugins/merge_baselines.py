"""Weight-space merge baselines: linear averaging and task arithmetic (DESIGN §2.7).

Both stream: for each tensor name, one tensor of each model is read from its memory-mapped
safetensors file, combined in float32, cast back to the base dtype and handed to a shard writer.

- linear:          W* = sum_i w_i W_i                  (weights default to 1/N each)
- task-arithmetic: W* = W_base + sum_i lambda_i (W_i - W_base)
"""
from __future__ import annotations

from typing import Callable

import torch
from pydantic import Field

from surgery import hookimpl
from surgery.artifacts import Artifact
from surgery.checkpoint import CheckpointReader
from surgery.errors import ModelError, RecipeError
from surgery.options import Options


class StreamOptions(Options):
    max_shard_mb: float | None = Field(256.0, gt=0, description="cap on each output safetensors shard (MiB)")


class LinearOptions(StreamOptions):
    weights: list[float] | None = Field(None, description="one weight per model (default: equal weights)")
    normalize: bool = Field(True, description="divide the weights by their sum")


class TaskArithmeticOptions(StreamOptions):
    scale: float | list[float] = Field(1.0, description="lambda per donor (one number for all, or a list)")


def stream_merge(ctx, combine: Callable[[list[torch.Tensor]], torch.Tensor], max_shard_mb: float | None) -> Artifact:
    """Apply ``combine`` to each tensor of ``ctx.models`` (float32, base first) and save the result."""
    if len(ctx.models) < 2:
        raise RecipeError(f"{ctx.where}.models: a merge needs at least two models, got {ctx.models}")
    readers = [CheckpointReader(ctx.model_path(name)) for name in ctx.models]
    base = readers[0]
    _check_compatible(ctx.models, readers)
    writer = ctx.model_writer(like=ctx.models[0], max_shard_mb=max_shard_mb)
    merged = 0
    for name in ctx.progress(base.names(), desc="merging tensors"):
        first = base.get(name)
        if not first.is_floating_point():
            writer.add(name, first)
            continue
        tensors = [first.float()] + [r.get(name).float() for r in readers[1:]]
        writer.add(name, combine(tensors).to(first.dtype))
        merged += first.numel()
    model_dir = writer.close()
    return Artifact(meta={"models": ctx.models}, figures={"merged_params": merged}, model_dir=model_dir)


def _check_compatible(names: list[str], readers: list[CheckpointReader]) -> None:
    base_names = set(readers[0].names())
    for name, reader in zip(names[1:], readers[1:]):
        other = set(reader.names())
        if other != base_names:
            missing = sorted(base_names ^ other)[0]
            raise ModelError(f"models {names[0]!r} and {name!r} have different tensors (e.g. {missing!r})")
        for tensor in sorted(base_names):
            if reader.shape(tensor) != readers[0].shape(tensor):
                raise ModelError(
                    f"models {names[0]!r} and {name!r} differ in shape at {tensor}: "
                    f"{readers[0].shape(tensor)} vs {reader.shape(tensor)}"
                )


def _per_model(value: float | list[float], count: int, where: str, key: str) -> list[float]:
    values = [value] * count if isinstance(value, (int, float)) else list(value)
    if len(values) != count:
        raise RecipeError(f"{where}.{key}: expected {count} values (one per model), got {len(values)}")
    return values


class Linear:
    """Linear merge: a weighted average of the models' tensors."""

    @hookimpl
    def option_schema(self, stage: str):
        return LinearOptions if stage == "fuse" else None

    @hookimpl
    def fuse(self, ctx) -> Artifact:
        opts = ctx.options
        weights = _per_model(opts.weights or 1.0, len(ctx.models), ctx.where, "weights")
        if opts.normalize:
            total = sum(weights)
            if total == 0:
                raise RecipeError(f"{ctx.where}.weights: weights sum to 0 and cannot be normalised")
            weights = [w / total for w in weights]

        def combine(tensors: list[torch.Tensor]) -> torch.Tensor:
            out = tensors[0] * weights[0]
            for w, t in zip(weights[1:], tensors[1:]):
                out.add_(t, alpha=w)
            return out

        artifact = stream_merge(ctx, combine, opts.max_shard_mb)
        artifact.meta["weights"] = weights
        return artifact


class TaskArithmetic:
    """Task arithmetic: base + sum of lambda_i (model_i - base)."""

    @hookimpl
    def option_schema(self, stage: str):
        return TaskArithmeticOptions if stage == "fuse" else None

    @hookimpl
    def fuse(self, ctx) -> Artifact:
        scales = _per_model(ctx.options.scale, len(ctx.models) - 1, ctx.where, "scale")

        def combine(tensors: list[torch.Tensor]) -> torch.Tensor:
            base = tensors[0]
            out = base.clone()
            for lam, t in zip(scales, tensors[1:]):
                out.add_(t - base, alpha=lam)
            return out

        artifact = stream_merge(ctx, combine, ctx.options.max_shard_mb)
        artifact.meta["scale"] = scales
        return artifact


linear = Linear()
task_arithmetic = TaskArithmetic()
