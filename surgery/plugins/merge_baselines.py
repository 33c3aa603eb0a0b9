"""Weight-space merge baselines: linear, task arithmetic, TIES and DARE (DESIGN §2.7).

All stream: for each tensor name, one tensor of each model is read from its memory-mapped
safetensors file, combined in float32, cast back to the base dtype and handed to a shard writer.
With task vectors tau_i = W_i - W_base (base = the first model):

- linear:          W* = sum_i w_i W_i                  (weights default to 1/N each)
- task-arithmetic: W* = W_base + sum_i lambda_i tau_i
- ties:            (Yadav et al. 2023) per tensor, trim each tau_i to its ``density`` share of largest
                   |entries|; elect a sign per entry, gamma = sign(sum_i trimmed tau_i); disjoint mean
                   over the donors whose trimmed entry is non-zero with sign gamma (``normalize``;
                   else their sum); W* = W_base + lambda * merged
- dare:            (Yu et al. 2024) drop each entry of tau_i with probability 1 - density and rescale
                   the rest by 1/density (or, ``rescale: l1``, to tau_i's L1 norm as mergekit does);
                   W* = W_base + lambda * sum_i w_i dropped tau_i (or, with ``sign_election``, TIES'
                   elect + disjoint mean of the dropped vectors). The masks are drawn from a
                   generator seeded by (recipe seed, tensor name, donor index), so a merge is
                   reproducible and independent of tensor order.

``convention: mergekit`` reproduces mergekit's TIES/DARE tensor by tensor: exactly k = int(density n)
entries kept by sorting (the paper's rule keeps ceil(density n), ties at the threshold included),
a zero sign sum elects + (the paper: no sign), the weights scale the task vectors before the sign
election, lambda applies after normalising. Every number option is a per-layer gradient or a list of
per-tensor filters (:mod:`surgery.engines.merge_params`); per-donor options take one entry per donor.

Every plugin takes ``map:`` (see :mod:`surgery.models.hetero`): for a heterogeneous pair such as a LLaVA
base and a plain Llama donor, base tensors are paired with donor tensors by declared rules and the
tensors the map keeps (the vision tower) are copied from the base untouched.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from surgery import hookimpl
from surgery.core.artifacts import Artifact
from surgery.core.errors import RecipeError
from surgery.engines import tensor_merge
from surgery.engines.merge import StreamOptions, stream_merge_named
from surgery.engines.merge_params import SETTING_HELP, DensityChecks, Setting, TensorParams
from surgery.models.checkpoint import CheckpointReader

CONVENTION_HELP = ("paper: k = ceil(density n) by threshold, no sign on a zero sum, election on unweighted task vectors; "
                   "mergekit: k = int(density n) by sort, + on a zero sum, weights before the election")


class LinearOptions(StreamOptions):
    weights: list[Setting] | None = Field(None, min_length=1, description=f"one weight per model (default: equal weights); each a {SETTING_HELP}")
    normalize: bool = Field(True, description="divide the weights by their sum (per tensor)")



class TaskArithmeticOptions(StreamOptions):
    scale: float | list[Setting] = Field(1.0, description=f"lambda per donor (one number for all, or one {SETTING_HELP} per donor)")



def _per_model_settings(value, default: float, count: int, where: str, key: str) -> list:
    """One setting per model from a number (or None: ``default``) or a list of settings."""
    if value is None or isinstance(value, (int, float)):
        return [default if value is None else value] * count
    if len(value) != count:
        raise RecipeError(f"{where}.{key}: expected {count} values (one per {'model' if key == 'weights' and count > 1 else 'entry'}), got {len(value)}")
    return list(value)


def _params(ctx) -> TensorParams:
    """Layer positions of the base model's tensors, for per-layer gradients."""
    return TensorParams(CheckpointReader(ctx.model_path(ctx.models[0])).names())


class Linear:
    """Linear merge: a weighted average of the models' tensors."""

    @hookimpl
    def option_schema(self, stage: str):
        return LinearOptions if stage == "fuse" else None

    @hookimpl
    def fuse(self, ctx) -> Artifact:
        opts = ctx.options
        settings = _per_model_settings(opts.weights, 1.0, len(ctx.models), ctx.where, "weights")
        params = _params(ctx)

        def combine(name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
            weights = params.values(settings, name, len(tensors), 1.0)
            if opts.normalize:
                total = sum(weights)
                if total == 0:
                    raise RecipeError(f"{ctx.where}.weights: weights sum to 0 at {name} and cannot be normalised")
                weights = [w / total for w in weights]
            out = tensors[0] * weights[0]
            for w, t in zip(weights[1:], tensors[1:]):
                out.add_(t, alpha=w)
            return out

        artifact = stream_merge_named(ctx, combine, opts.max_shard_mb)
        artifact.meta["weights"] = opts.model_dump(mode="json")["weights"]
        return artifact


class TaskArithmetic:
    """Task arithmetic: base + sum of lambda_i (model_i - base)."""

    @hookimpl
    def option_schema(self, stage: str):
        return TaskArithmeticOptions if stage == "fuse" else None

    @hookimpl
    def fuse(self, ctx) -> Artifact:
        settings = _per_model_settings(ctx.options.scale, 1.0, len(ctx.models) - 1, ctx.where, "scale")
        params = _params(ctx)

        def combine(name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
            base = tensors[0]
            out = base.clone()
            for lam, t in zip(params.values(settings, name, len(tensors) - 1, 1.0), tensors[1:]):
                out.add_(t - base, alpha=lam)
            return out

        artifact = stream_merge_named(ctx, combine, ctx.options.max_shard_mb)
        artifact.meta["scale"] = ctx.options.model_dump(mode="json")["scale"]
        return artifact


class TiesOptions(StreamOptions, DensityChecks):
    density: Setting = Field(0.2, description=f"share of each task vector's entries kept, largest |entries| ({SETTING_HELP})")
    scale: Setting = Field(1.0, description=f"lambda applied to the merged task vector ({SETTING_HELP})")
    weights: list[Setting] | None = Field(None, description="one weight per donor (default 1 each)")
    densities: list[Setting] | None = Field(None, description="one density per donor (overrides density)")
    normalize: bool = Field(True, description="disjoint mean: divide by the summed weights of the donors that agree")
    convention: Literal["paper", "mergekit"] = Field("paper", description=CONVENTION_HELP)


class DareOptions(TiesOptions):
    density: Setting = Field(0.5, description=f"share of each task vector's entries kept, at random ({SETTING_HELP})")
    sign_election: bool = Field(False, description="TIES sign election + disjoint mean of the dropped vectors (DARE-TIES)")
    normalize: bool | None = Field(None, description="divide by the summed weights (default: with sign_election only)")
    rescale: Literal["inverse-density", "l1", "none"] = Field(
        "inverse-density", description="kept entries divided by the density (the paper) or rescaled to the task vector's L1 norm (mergekit)")


def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """``tau`` with all but its ``ceil(density * n)`` largest-magnitude entries set to 0."""
    return tau * tensor_merge.magnitude_mask(tau, density, "paper")


def elect_and_mean(taus: list[torch.Tensor]) -> torch.Tensor:
    """TIES: gamma = sign(sum tau_i); mean of the entries that are non-zero and agree with gamma."""
    return tensor_merge.combine_deltas(taus, [1.0] * len(taus), "sum", True, "paper")


def ties_combine(tensors: list[torch.Tensor], density: float, scale: float) -> torch.Tensor:
    count = len(tensors) - 1
    return tensor_merge.task_vector_merge(tensors[0], tensors[1:], [1.0] * count, [density] * count, scale,
                                          "magnitude", "sum", True, "none", "paper")


def dare_drop(tau: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each entry with probability ``density`` and rescale the kept ones by 1/density."""
    return tensor_merge.sparsify(tau, density, "random", "inverse-density", "paper", generator)


dare_generator = tensor_merge.seeded_generator


def _task_vector_fuse(ctx, sparsifier: str, consensus: str | None, normalize: bool, rescale: str) -> Artifact:
    opts, seed = ctx.options, ctx.seed
    donors = len(ctx.models) - 1
    weights = _per_model_settings(opts.weights, 1.0, donors, ctx.where, "weights")
    densities = ([opts.density] * donors if opts.densities is None
                 else _per_model_settings(opts.densities, 1.0, donors, ctx.where, "densities"))
    params = _params(ctx)

    def combine(name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        generators = [dare_generator(seed, name, i) for i in range(donors)] if sparsifier == "random" else None
        return tensor_merge.task_vector_merge(
            tensors[0], tensors[1:], params.values(weights, name, donors, 1.0), params.values(densities, name, donors, 1.0),
            params.value(opts.scale, name, 1.0), sparsifier, consensus, normalize, rescale, opts.convention, generators)

    artifact = stream_merge_named(ctx, combine, opts.max_shard_mb)
    artifact.meta.update(opts.model_dump(mode="json", exclude={"map", "max_shard_mb"}))
    return artifact


class Ties:
    """TIES merging: trim task vectors, elect a sign per entry, disjoint mean."""

    @hookimpl
    def option_schema(self, stage: str):
        return TiesOptions if stage == "fuse" else None

    @hookimpl
    def fuse(self, ctx) -> Artifact:
        return _task_vector_fuse(ctx, "magnitude", "sum", ctx.options.normalize, "none")


class Dare:
    """DARE merging: random drop and rescale of task vectors, then add (or TIES-merge) them."""

    @hookimpl
    def option_schema(self, stage: str):
        return DareOptions if stage == "fuse" else None

    @hookimpl
    def fuse(self, ctx) -> Artifact:
        opts = ctx.options
        normalize = opts.sign_election if opts.normalize is None else opts.normalize
        return _task_vector_fuse(ctx, "random", "sum" if opts.sign_election else None, normalize, opts.rescale)


linear = Linear()
task_arithmetic = TaskArithmetic()
ties = Ties()
dare = Dare()
