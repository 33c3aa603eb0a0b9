"""captum's attribution methods over head (or neuron) gates: the ``captum`` attribute plugin.

The function attributed is ``F(g) = L(x; g)``, the objective's per-sample loss with every unit of
every layer scaled by its gate ``g`` (:mod:`surgery.gates`), at the input ``g = 1`` against the
baseline gates ``b`` (0 = unit off, a scalar, or U(0, 1) per unit). Any captum method that needs
only a differentiable function of its inputs applies: ``IntegratedGradients``, ``GradientShap``,
``Saliency``, ``InputXGradient``, ``FeatureAblation``, ``Occlusion``, ``KernelShap``,
``ShapleyValueSampling``, ``Lime``. Each method's own options go under ``args`` and are checked
against that method before any model is loaded.

The artifact is the one ``ig`` writes (scores ``[layers, units]``, per-sample rows, ``loss_full``,
``loss_base``, completeness where the method satisfies it), so ``prune``, ``report`` and
``compare`` read it unchanged. The sign is captum's on the loss: IntegratedGradients with
``b = 0`` equals ``ig``'s joint mode (negative = the unit lowers the loss). Saliency's default
``abs: true`` gives unsigned scores.

captum is an optional extra: ``pip install 'model-surgery[captum]'``.
"""
from __future__ import annotations

import importlib.util
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from surgery import hookimpl
from surgery.core.artifacts import Artifact
from surgery.core.errors import DataError
from surgery.engines.gates import GateSite, LossFn, frozen_parameters, gated_forward
from surgery.engines.attribution import (
    Attribution, AttributeOptions, attribution_artifact, baseline_values, completeness, gather_rows,
    loss_function, prepared_batches, sites_for,
)

INSTALL_HINT = "captum is not installed: pip install 'model-surgery[captum]' (or pip install captum)"


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IntegratedGradientsArgs(_Args):
    n_steps: int = Field(50, ge=1, description="integration points")
    method: Literal["gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"] = "gausslegendre"
    internal_batch_size: int | None = Field(None, ge=1, description="points per forward (default: all)")


class GradientShapArgs(_Args):
    n_samples: int = Field(5, ge=1, description="random points per example")
    stdevs: float = Field(0.0, ge=0, description="std of the Gaussian noise added to each input sample")


class SaliencyArgs(_Args):
    abs: bool = Field(True, description="absolute value of the gradient (unsigned scores)")


class InputXGradientArgs(_Args):
    pass


class FeatureAblationArgs(_Args):
    perturbations_per_eval: int = Field(1, ge=1, description="ablations evaluated per forward")


class OcclusionArgs(_Args):
    sliding_window_shapes: int = Field(1, ge=1, description="units occluded together (a window over the flattened units)")
    strides: int = Field(1, ge=1, description="step of the window")
    perturbations_per_eval: int = Field(1, ge=1, description="occlusions evaluated per forward")


class SamplingArgs(_Args):
    n_samples: int = Field(25, ge=1, description="sampled permutations (Shapley) or coalitions (KernelShap, Lime)")
    perturbations_per_eval: int = Field(1, ge=1, description="perturbations evaluated per forward")


ARGS: dict[str, type[_Args]] = {
    "IntegratedGradients": IntegratedGradientsArgs, "GradientShap": GradientShapArgs, "Saliency": SaliencyArgs,
    "InputXGradient": InputXGradientArgs, "FeatureAblation": FeatureAblationArgs, "Occlusion": OcclusionArgs,
    "KernelShap": SamplingArgs, "ShapleyValueSampling": SamplingArgs, "Lime": SamplingArgs,
}
PER_EXAMPLE = {"KernelShap", "Lime"}  # captum fits one surrogate per input: attribute one example at a time
COMPLETE = {"IntegratedGradients", "ShapleyValueSampling", "KernelShap", "GradientShap"}
Method = Literal["IntegratedGradients", "GradientShap", "Saliency", "InputXGradient", "FeatureAblation", "Occlusion",
                 "KernelShap", "ShapleyValueSampling", "Lime"]


class CaptumOptions(AttributeOptions):
    method: Method = Field("IntegratedGradients", description="the captum.attr class")
    args: dict[str, Any] = Field(default_factory=dict, description="options of the captum method's attribute()")
    baseline: Literal["zero", "scalar", "random"] = Field("zero", description="baseline gates: 0, `value`, or U(0,1) per unit")
    value: float = Field(0.3, ge=0, lt=1, description="the scalar baseline")
    baseline_seed: int | None = Field(None, description="seed of the random baseline and captum's sampling (default: the recipe seed)")

    @field_validator("method")
    @classmethod
    def _installed(cls, method: str) -> str:
        if not captum_installed():  # found without importing it: captum.attr takes seconds to import
            raise ValueError(INSTALL_HINT)
        return method

    @field_validator("args")
    @classmethod
    def _method_args(cls, args: dict, info: ValidationInfo) -> dict:
        method = info.data.get("method")
        if method is None:  # the method itself failed validation
            return args
        try:
            return ARGS[method].model_validate(args).model_dump()
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ValueError(f"{where}: {first['msg']} (options of {method})") from None


def captum_installed() -> bool:
    try:
        return importlib.util.find_spec("captum.attr") is not None
    except (ImportError, ValueError):  # captum missing (or blocked: None in sys.modules)
        return False


def gate_function(model: torch.nn.Module, sites: list[GateSite], batch: dict, loss_fn: LossFn):
    """``F(gates [M, U], index [M]) -> loss [M]``: row m runs example ``index[m]`` of ``batch`` with
    gates ``gates[m]`` (the units of every site side by side). captum expands ``index`` as it
    expands the inputs, so every method's row layout is followed."""
    rows = batch["input_ids"].shape[0]
    widths = [s.units for s in sites]

    def forward(gates_mu: torch.Tensor, index_m: torch.Tensor) -> torch.Tensor:
        picked = {k: v[index_m] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == rows else v
                  for k, v in batch.items()}
        return gated_forward(model, sites, picked, list(gates_mu.split(widths, dim=1)), loss_fn)

    return forward


def captum_batch(opts: CaptumOptions, model: torch.nn.Module, sites: list[GateSite], batch: dict, loss_fn: LossFn,
                 base_u: torch.Tensor, seed: int) -> Attribution:
    """Per-sample attributions of one batch ``[B, sites, units]`` with L(1) and L(b) ``[B, 1]``."""
    import captum.attr

    rows = batch["input_ids"].shape[0]
    device = batch["input_ids"].device
    forward = gate_function(model, sites, batch, loss_fn)
    ones = torch.ones(rows, int(base_u.numel()), device=device)
    base = base_u.float().to(device)[None].expand_as(ones).contiguous()
    index = torch.arange(rows, device=device)
    attributor = getattr(captum.attr, opts.method)(forward)
    groups = [[i] for i in range(rows)] if opts.method in PER_EXAMPLE else [list(range(rows))]
    parts = []
    with frozen_parameters(model), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for group in groups:
            parts.append(_attribute(attributor, opts, ones[group], base[group], index[group]).detach())
        with torch.no_grad():
            loss_full = forward(ones, index).double().cpu()
            loss_base = forward(base, index).double().cpu()
    flat = torch.cat(parts).double().cpu()
    per_sample = torch.zeros(rows, len(sites), max(s.units for s in sites), dtype=torch.float64)
    for l, chunk in enumerate(flat.split([s.units for s in sites], dim=1)):
        per_sample[:, l, : chunk.shape[1]] = chunk
    return Attribution(per_sample, loss_full, loss_base[:, None])


def _attribute(attributor, opts: CaptumOptions, inputs: torch.Tensor, base: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    args = dict(opts.args)
    if opts.method in ("Saliency", "InputXGradient"):
        return attributor.attribute(inputs.clone().requires_grad_(), additional_forward_args=(index,), **args)
    if opts.method == "GradientShap":
        return attributor.attribute(inputs, baselines=base[:1], additional_forward_args=(index,), **args)
    if opts.method == "Occlusion":
        args["sliding_window_shapes"] = (args["sliding_window_shapes"],)
    return attributor.attribute(inputs, baselines=base, additional_forward_args=(index,), **args)


class Captum:
    """captum attribution methods (IntegratedGradients, GradientShap, KernelShap, ...) over head gates."""

    @hookimpl
    def option_schema(self, stage: str):
        return CaptumOptions if stage == "attribute" else None

    @hookimpl
    def attribute(self, ctx) -> Artifact:
        opts = ctx.options
        loaded = ctx.model(ctx.models[0])
        sites = sites_for(loaded, opts.target)
        objective = ctx.objective(opts.objective)
        seed = ctx.seed if opts.baseline_seed is None else opts.baseline_seed
        base_u = torch.cat(baseline_values(opts.baseline, sites, opts.value, seed))
        batches = list(prepared_batches(ctx, loaded, objective, opts.answer_only))
        if not batches:
            raise DataError(f"{ctx.where}: the data has no examples")
        parts = {}
        for index, batch in ctx.progress(ctx.shard(batches), desc=f"captum {opts.method}"):
            parts[index] = captum_batch(opts, loaded.module, sites, batch, loss_function(objective), base_u, seed + index)
        attribution = gather_rows(ctx, parts, [b["input_ids"].shape[0] for b in batches], sites, per_layer=False)
        check = completeness(attribution, per_layer=False) if opts.method in COMPLETE else None
        extra = {"captum_method": opts.method, "args": opts.args, "baseline": opts.baseline,
                 "baseline_values": base_u.tolist()}
        artifact = attribution_artifact(ctx, attribution, sites, f"captum-{opts.method}", check, extra)
        if opts.method == "Saliency" and opts.args.get("abs", True):
            artifact.meta.update(signed=False, convention="unsigned: larger = more important")
        return artifact


captum = Captum()
