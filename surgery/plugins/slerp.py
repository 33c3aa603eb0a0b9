"""Spherical merges: slerp, nuslerp, multislerp and the Karcher mean (formulas in docs/methods/merge_methods.md).

- slerp (Shoemake 1985): two models, ``t`` (0 gives the first): spherical interpolation of each
  tensor as a flat vector; linear interpolation when |cos theta| > 0.9995 (near-parallel tensors).
- nuslerp: two models with ``weights`` (t = w2 / (w1 + w2)), slerp per row / column / flattened;
  with ``use_base`` the first of three models is a base and the other two are interpolated as task
  vectors around it.
- multislerp: any number of models with ``weights``: barycentric interpolation on the hypersphere,
  optionally of task vectors around a base (``use_base``).
- karcher: the weighted Riemannian mean of the tensors' directions times their weighted mean norm.

Every number option takes a per-layer gradient or per-tensor filters (:mod:`surgery.engines.merge_params`).
"""
from __future__ import annotations

import torch
from pydantic import Field

from surgery.engines import tensor_merge
from surgery.engines.merge_methods import StreamOptions, TensorCall, expect_entries, fuse_method
from surgery.engines.merge_params import SETTING_HELP, Setting
from surgery.core.errors import RecipeError


class SlerpOptions(StreamOptions):
    t: Setting = Field(..., description=f"interpolation factor, 0 = first model, 1 = second ({SETTING_HELP})")


class WeightedOptions(StreamOptions):
    weights: list[Setting] | None = Field(None, description=f"one weight per model (default equal); each a {SETTING_HELP}")


class NuSlerpOptions(WeightedOptions):
    use_base: bool = Field(False, description="the first of three models is a base; slerp the others' task vectors")
    row_wise: bool = Field(False, description="interpolate along rows' columns (dim 0) instead of each row")
    flatten: bool = Field(True, description="interpolate each tensor as one flat vector")


class MultiSlerpOptions(WeightedOptions):
    use_base: bool = Field(False, description="the first model is a base; interpolate the others' task vectors")
    normalize_weights: bool = Field(True, description="divide the weights by their sum")
    eps: float = Field(1e-8, gt=0, description="guard for zero norms")


class KarcherOptions(WeightedOptions):
    max_iter: int = Field(10, ge=1, description="fixed-point iterations")
    tol: float = Field(1e-5, gt=0, description="stop when the tangent step is shorter than this")


def _weights(call: TensorCall, count: int) -> list[float]:
    return call.values("weights", count, 1.0)


@fuse_method("slerp", SlerpOptions, min_models=2, max_models=2)
def slerp(call: TensorCall) -> torch.Tensor:
    """Spherical interpolation of two models (linear for near-parallel tensors)."""
    return tensor_merge.slerp(call.value("t"), call.tensors[0], call.tensors[1])


def _nuslerp_models(ctx, opts) -> None:
    wanted = 3 if opts.use_base else 2
    if len(ctx.models) != wanted:
        raise RecipeError(f"{ctx.where}.models: nuslerp merges two models{' around a base (base first)' if opts.use_base else ''}: "
                          f"expected {wanted}, got {len(ctx.models)}")
    expect_entries(ctx, "weights", 2, "interpolated model")


@fuse_method("nuslerp", NuSlerpOptions, min_models=2, max_models=3, check=_nuslerp_models)
def nuslerp(call: TensorCall) -> torch.Tensor:
    """Slerp of two models' rows, columns or flattened tensors, optionally as task vectors around a base."""
    opts = call.options
    base, pair = (call.tensors[0], call.tensors[1:]) if opts.use_base else (None, call.tensors)
    w0, w1 = _weights(call, 2)
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    if base is None:
        return tensor_merge.nuslerp(t, pair[0], pair[1], opts.row_wise, opts.flatten)
    return base + tensor_merge.nuslerp(t, pair[0] - base, pair[1] - base, opts.row_wise, opts.flatten)


def _multislerp_models(ctx, opts) -> None:
    interpolated = len(ctx.models) - (1 if opts.use_base else 0)
    if interpolated < 2:
        raise RecipeError(f"{ctx.where}.models: multislerp interpolates at least two models"
                          f"{' besides the base' if opts.use_base else ''}, got {interpolated}")
    expect_entries(ctx, "weights", interpolated, "interpolated model")


@fuse_method("multislerp", MultiSlerpOptions, min_models=2, check=_multislerp_models)
def multislerp(call: TensorCall) -> torch.Tensor:
    """Barycentric spherical interpolation of several models (optionally task vectors around a base)."""
    opts = call.options
    base, others = (call.tensors[0], call.tensors[1:]) if opts.use_base else (None, call.tensors)
    return tensor_merge.multislerp(others, _weights(call, len(others)), base, opts.normalize_weights, opts.eps)


def _karcher_models(ctx, opts) -> None:
    expect_entries(ctx, "weights", len(ctx.models), "model")


@fuse_method("karcher", KarcherOptions, min_models=2, check=_karcher_models)
def karcher(call: TensorCall) -> torch.Tensor:
    """Weighted Karcher (Riemannian) mean of the models' tensors."""
    opts = call.options
    count = len(call.tensors)
    weights = None if opts.weights is None else call.values("weights", count, 1.0)
    return tensor_merge.karcher(call.tensors, weights, opts.max_iter, opts.tol)
