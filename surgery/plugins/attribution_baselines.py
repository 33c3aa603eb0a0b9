"""Baseline head attributions behind the ``attribute`` stage: ``grad-x-act``, ``ablation``, ``shapley``.

All three gate the same sites as ``ig`` (:mod:`surgery.engines.gates`) and, where a sign exists, keep its
convention (negative = the unit lowers the loss):

- ``grad-x-act`` (Michel et al. 2019): ``I_{l,h} = mean_x |dL(x)/dalpha_{l,h}|`` at alpha = 1 (the
  gate's activation is 1, so gradient x activation is the gradient). Options: ``absolute: false``
  keeps the signed mean gradient (a first-order estimate of ``L(1) - L(0)``); bertology's
  per-layer L2 normalisation (``I_l / ||I_l||_2``) and global min-max normalisation.
- ``ablation``: ``A_{l,h} = L(1) - L(alpha_{l,h} = b)``, one unit at the baseline at a time (all of
  them batched along the batch dimension). DESIGN writes ``L(alpha_h=0) - L(1)``; the sign is
  flipped here so that, like IG, negative means useful.
- ``shapley``: permutation sampling. Each sampled order adds the units of a group one at a time to a
  coalition that starts at the baseline; a unit's value is its mean marginal change of the loss
  ``L(S + h) - L(S)``. Efficiency holds exactly for every permutation: per group the values sum to
  ``L(group at 1) - L(group at baseline)``. Groups: every unit of the model (``scope: all``) or each
  layer with the others at 1 (``scope: per-layer``). Antithetic sampling pairs each order with its
  reverse; a budget of at least n! orders enumerates them all (exact Shapley values).
"""
from __future__ import annotations

import itertools
import math
from typing import Iterator, Literal, Sequence

import torch
from pydantic import Field

from surgery.core.artifacts import Artifact
from surgery.engines.attribution import AttributeOptions, Attribution, GateAttribution, completeness, zero_rows
from surgery.engines.gates import GateSite, LossFn, evaluate_points

# --- grad-x-act -------------------------------------------------------------------------------

def gate_gradient_at_one(model: torch.nn.Module, sites: Sequence[GateSite], batch: dict, loss_fn: LossFn) -> Attribution:
    """Per-sample ``dL/dalpha`` at every gate = 1 ``[B, sites, units]``; ``loss_base`` is empty."""
    gates_p = [torch.ones(1, s.units) for s in sites]
    grad_sites = torch.ones(1, len(sites), dtype=torch.bool)
    chunk = next(iter(evaluate_points(model, sites, batch, gates_p, loss_fn, 1, grad_sites)))
    rows = batch["input_ids"].shape[0]
    per_sample = zero_rows(sites, batch)
    for l, site in enumerate(sites):
        per_sample[:, l, : site.units] = chunk.grads_nbu[l][0].double()
    return Attribution(per_sample, chunk.loss_nb[0].double(), torch.zeros(rows, 0, dtype=torch.float64))


def normalise(scores_lu: torch.Tensor, per_layer_l2: bool, global_min_max: bool) -> torch.Tensor:
    """bertology's normalisations: each layer divided by its L2 norm, then (x - min) / (max - min)."""
    out = scores_lu.double().clone()
    if per_layer_l2:
        out = out / out.norm(dim=1, keepdim=True).clamp_min(1e-20)
    if global_min_max:
        lo, hi = out.min(), out.max()
        out = (out - lo) / (hi - lo).clamp_min(1e-20)
    return out


class GradXActOptions(AttributeOptions):
    absolute: bool = Field(True, description="Michel et al.: mean of |dL/dalpha| (false: signed mean gradient)")
    normalize_layers: bool = Field(False, description="divide each layer's scores by their L2 norm")
    normalize_global: bool = Field(False, description="min-max scale all scores to [0, 1]")


class GradXAct(GateAttribution):
    """Gradient x activation head importance (Michel et al. 2019): |dL/dgate| at gate 1."""

    method = "grad-x-act"
    Options = GradXActOptions

    def attribute_batch(self, model: torch.nn.Module, sites: Sequence[GateSite], batch: dict,
                        loss_fn: LossFn) -> Attribution:
        attribution = gate_gradient_at_one(model, sites, batch, loss_fn)
        if self.options.absolute:
            attribution.per_sample = attribution.per_sample.abs()
        return attribution

    def extra_meta(self) -> dict:
        opts = self.options
        return {"absolute": opts.absolute, "normalize_layers": opts.normalize_layers,
                "normalize_global": opts.normalize_global}

    def finish(self, artifact: Artifact) -> Artifact:
        opts = self.options
        if opts.normalize_layers or opts.normalize_global:
            artifact.tensors["raw_scores"] = artifact.tensors["scores"]
            artifact.tensors["scores"] = normalise(artifact.tensors["scores"], opts.normalize_layers,
                                                   opts.normalize_global).float()
        if opts.absolute or opts.normalize_global:
            artifact.meta["signed"] = False
            artifact.meta["convention"] = "unsigned: larger = more important"
        return artifact


# --- ablation ---------------------------------------------------------------------------------

def ablation(model: torch.nn.Module, sites: Sequence[GateSite], batch: dict, loss_fn: LossFn,
             value: float, points_per_chunk: int) -> Attribution:
    """Per-sample ``L(1) - L(unit at value)`` for every unit; point 0 is all gates at 1."""
    units = [(l, u) for l, site in enumerate(sites) for u in range(site.units)]
    gates_p = [torch.ones(1 + len(units), s.units) for s in sites]
    for p, (l, u) in enumerate(units, start=1):
        gates_p[l][p, u] = value
    loss_pb = torch.cat([c.loss_nb for c in evaluate_points(model, sites, batch, gates_p, loss_fn, points_per_chunk)]).double()
    rows = batch["input_ids"].shape[0]
    per_sample = zero_rows(sites, batch)
    for p, (l, u) in enumerate(units, start=1):
        per_sample[:, l, u] = loss_pb[0] - loss_pb[p]
    return Attribution(per_sample, loss_pb[0], torch.zeros(rows, 0, dtype=torch.float64))


class AblationOptions(AttributeOptions):
    value: float = Field(0.0, ge=0, lt=1, description="gate value of the ablated unit (0 = off)")


class Ablation(GateAttribution):
    """Ablation: L(1) - L(one unit off), every unit, batched along the batch dimension."""

    method = "ablation"
    Options = AblationOptions
    backward = False

    def attribute_batch(self, model: torch.nn.Module, sites: Sequence[GateSite], batch: dict,
                        loss_fn: LossFn) -> Attribution:
        return ablation(model, sites, batch, loss_fn, self.options.value, self.points_per_chunk(model, batch))

    def extra_meta(self) -> dict:
        return {"value": self.options.value}


# --- shapley ----------------------------------------------------------------------------------

def shapley(model: torch.nn.Module, sites: Sequence[GateSite], batch: dict, loss_fn: LossFn, permutations: int,
            generator: torch.Generator, scope: str, value: float, points_per_chunk: int,
            antithetic: bool = True) -> Attribution:
    """Permutation-sampled Shapley values of the units' gates (baseline ``value`` -> 1)."""
    groups = ([[(l, u) for l, s in enumerate(sites) for u in range(s.units)]] if scope == "all"
              else [[(l, u) for u in range(s.units)] for l, s in enumerate(sites)])
    rows = batch["input_ids"].shape[0]
    acc = zero_rows(sites, batch)
    loss_base = torch.zeros(rows, len(groups), dtype=torch.float64)
    loss_full = torch.zeros(rows, dtype=torch.float64)
    for g, group in enumerate(groups):
        orders = list(_orders(len(group), permutations, generator, antithetic))
        for order in orders:
            loss_pb = _coalition_losses(model, sites, batch, loss_fn, [group[j] for j in order], value, points_per_chunk)
            for j, unit_index in enumerate(order):
                l, u = group[unit_index]
                acc[:, l, u] += (loss_pb[j + 1] - loss_pb[j]) / len(orders)
            loss_base[:, g], loss_full = loss_pb[0], loss_pb[-1]
    return Attribution(acc, loss_full, loss_base)


def _orders(n: int, budget: int, generator: torch.Generator, antithetic: bool) -> Iterator[list[int]]:
    """``budget`` sampled orders of ``n`` units (each odd one the reverse of the one before when
    ``antithetic``), or all ``n!`` orders when the budget covers them (exact Shapley values)."""
    if n <= 8 and budget >= math.factorial(n):
        yield from (list(order) for order in itertools.permutations(range(n)))
        return
    order: list[int] = []
    for i in range(budget):
        order = order[::-1] if antithetic and i % 2 == 1 else torch.randperm(n, generator=generator).tolist()
        yield order


def _coalition_losses(model, sites, batch, loss_fn, ordered_units, value, points_per_chunk) -> torch.Tensor:
    """Losses ``[n + 1, B]``: point j has the first j units of ``ordered_units`` at 1, the rest at ``value``."""
    points = len(ordered_units) + 1
    gates_p = [torch.ones(points, s.units) for s in sites]
    for j, (l, u) in enumerate(ordered_units):
        gates_p[l][: j + 1, u] = value  # unit j joins at point j + 1
    chunks = evaluate_points(model, sites, batch, gates_p, loss_fn, points_per_chunk)
    return torch.cat([c.loss_nb for c in chunks]).double()


class ShapleyOptions(AttributeOptions):
    permutations: int = Field(8, ge=1, description="sampled orders per group (the sample budget)")
    antithetic: bool = Field(True, description="pair each sampled order with its reverse")
    scope: Literal["all", "per-layer"] = Field("all", description="permute all units together, or each layer's units")
    value: float = Field(0.0, ge=0, lt=1, description="gate value of units outside the coalition")


class Shapley(GateAttribution):
    """Shapley values of head gates by permutation sampling with a sample budget."""

    method = "shapley"
    Options = ShapleyOptions
    backward = False
    shard_batches = False  # one generator draws the orders of batch after batch

    def setup(self, ctx, sites: Sequence[GateSite]) -> None:
        self.generator = torch.Generator().manual_seed(ctx.seed)

    def attribute_batch(self, model: torch.nn.Module, sites: Sequence[GateSite], batch: dict,
                        loss_fn: LossFn) -> Attribution:
        opts = self.options
        return shapley(model, sites, batch, loss_fn, opts.permutations, self.generator, opts.scope, opts.value,
                       self.points_per_chunk(model, batch), opts.antithetic)

    def has_completeness(self) -> bool:
        return True

    def completeness(self, attribution: Attribution) -> dict:
        return completeness(attribution, per_layer=self.options.scope == "per-layer")

    def extra_meta(self) -> dict:
        opts = self.options
        return {"permutations": opts.permutations, "scope": opts.scope, "value": opts.value, "antithetic": opts.antithetic}


grad_x_act = GradXAct()
ablation_plugin = Ablation()
shapley_plugin = Shapley()
