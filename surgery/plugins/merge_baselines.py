"""Weight-space merge baselines: linear, task arithmetic, TIES and DARE (DESIGN §2.7).

All stream: for each tensor name, one tensor of each model is read from its memory-mapped
safetensors file, combined in float32, cast back to the base dtype and handed to a shard writer.
With task vectors tau_i = W_i - W_base (base = the first model):

- linear:          W* = sum_i w_i W_i                  (weights default to 1/N each)
- task-arithmetic: W* = W_base + sum_i lambda_i tau_i
- ties:            (Yadav et al. 2023) per tensor, trim each tau_i to its ``density`` share of largest
                   |entries|; elect a sign per entry, gamma = sign(sum_i trimmed tau_i); disjoint mean
                   over the donors whose trimmed entry is non-zero with sign gamma;
                   W* = W_base + lambda * merged
- dare:            (Yu et al. 2024) drop each entry of tau_i with probability 1 - density and rescale
                   the rest by 1/density; W* = W_base + lambda * sum_i dropped tau_i (or, with
                   ``sign_election``, TIES' elect + disjoint mean of the dropped vectors). The masks
                   are drawn from a generator seeded by (recipe seed, tensor name, donor index), so a
                   merge is reproducible and independent of tensor order.

Every plugin takes ``map:`` (see :mod:`surgery.models.hetero`): for a heterogeneous pair such as a LLaVA
base and a plain Llama donor, base tensors are paired with donor tensors by declared rules and the
tensors the map keeps (the vision tower) are copied from the base untouched.
"""
from __future__ import annotations

import math
import zlib

import torch
from pydantic import Field

from surgery import hookimpl
from surgery.core.artifacts import Artifact
from surgery.core.errors import RecipeError
from surgery.engines.merge import StreamOptions, per_model, stream_merge, stream_merge_named


class LinearOptions(StreamOptions):
    weights: list[float] | None = Field(None, min_length=1, description="one weight per model (default: equal weights)")
    normalize: bool = Field(True, description="divide the weights by their sum")


class TaskArithmeticOptions(StreamOptions):
    scale: float | list[float] = Field(1.0, description="lambda per donor (one number for all, or a list)")


class Linear:
    """Linear merge: a weighted average of the models' tensors."""

    @hookimpl
    def option_schema(self, stage: str):
        return LinearOptions if stage == "fuse" else None

    @hookimpl
    def fuse(self, ctx) -> Artifact:
        opts = ctx.options
        weights = per_model(opts.weights or 1.0, len(ctx.models), ctx.where, "weights")
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
        scales = per_model(ctx.options.scale, len(ctx.models) - 1, ctx.where, "scale")

        def combine(tensors: list[torch.Tensor]) -> torch.Tensor:
            base = tensors[0]
            out = base.clone()
            for lam, t in zip(scales, tensors[1:]):
                out.add_(t - base, alpha=lam)
            return out

        artifact = stream_merge(ctx, combine, ctx.options.max_shard_mb)
        artifact.meta["scale"] = scales
        return artifact


class TiesOptions(StreamOptions):
    density: float = Field(0.2, gt=0, le=1, description="share of each task vector's entries kept (largest |entries|)")
    scale: float = Field(1.0, description="lambda applied to the merged task vector")


class DareOptions(StreamOptions):
    density: float = Field(0.5, gt=0, le=1, description="share of each task vector's entries kept (at random)")
    scale: float = Field(1.0, description="lambda applied to the merged task vector")
    sign_election: bool = Field(False, description="TIES sign election + disjoint mean of the dropped vectors (DARE-TIES)")


def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """``tau`` with all but its ``ceil(density * n)`` largest-magnitude entries set to 0."""
    n = tau.numel()
    keep = max(1, math.ceil(density * n))
    if keep >= n:
        return tau.clone()
    magnitude = tau.abs().flatten()
    threshold = torch.kthvalue(magnitude, n - keep + 1).values
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


def elect_and_mean(taus: list[torch.Tensor]) -> torch.Tensor:
    """TIES: gamma = sign(sum tau_i); mean of the entries that are non-zero and agree with gamma."""
    stacked = torch.stack(taus)
    gamma = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == gamma) & (stacked != 0)
    total = (stacked * agree).sum(0)
    count = agree.sum(0)
    return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))


def ties_combine(tensors: list[torch.Tensor], density: float, scale: float) -> torch.Tensor:
    base = tensors[0]
    taus = [trim(t - base, density) for t in tensors[1:]]
    return base + scale * elect_and_mean(taus)


def dare_drop(tau: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each entry with probability ``density`` and rescale the kept ones by 1/density."""
    if density >= 1:
        return tau.clone()
    keep = torch.rand(tau.shape, generator=generator) < density
    return torch.where(keep, tau / density, torch.zeros_like(tau))


def dare_generator(seed: int, name: str, donor_index: int) -> torch.Generator:
    """A generator that depends only on (seed, tensor name, donor), not on the tensor order."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode()) * 31 + donor_index) % 2**63)


def dare_combine(name: str, tensors: list[torch.Tensor], opts: DareOptions, seed: int) -> torch.Tensor:
    base = tensors[0]
    taus = [dare_drop(t - base, opts.density, dare_generator(seed, name, i)) for i, t in enumerate(tensors[1:])]
    merged = elect_and_mean(taus) if opts.sign_election else torch.stack(taus).sum(0)
    return base + opts.scale * merged


class Ties:
    """TIES merging: trim task vectors, elect a sign per entry, disjoint mean."""

    @hookimpl
    def option_schema(self, stage: str):
        return TiesOptions if stage == "fuse" else None

    @hookimpl
    def fuse(self, ctx) -> Artifact:
        opts = ctx.options
        artifact = stream_merge(ctx, lambda tensors: ties_combine(tensors, opts.density, opts.scale), opts.max_shard_mb)
        artifact.meta.update(density=opts.density, scale=opts.scale)
        return artifact


class Dare:
    """DARE merging: random drop and rescale of task vectors, then add (or TIES-merge) them."""

    @hookimpl
    def option_schema(self, stage: str):
        return DareOptions if stage == "fuse" else None

    @hookimpl
    def fuse(self, ctx) -> Artifact:
        opts, seed = ctx.options, ctx.seed
        artifact = stream_merge_named(ctx, lambda name, tensors: dare_combine(name, tensors, opts, seed), opts.max_shard_mb)
        artifact.meta.update(density=opts.density, scale=opts.scale, sign_election=opts.sign_election)
        return artifact


linear = Linear()
task_arithmetic = TaskArithmetic()
ties = Ties()
dare = Dare()
