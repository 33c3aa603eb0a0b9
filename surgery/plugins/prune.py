"""Prune attention heads or MLP neurons by attribution: ``magnitude``, ``sign-aware``, ``layerwise``,
``iterative`` and ``random`` (DESIGN §2.5, seed 003).

Scores come from the latest (or ``inputs:``-named) ``attribute`` step: ``scores`` [layers, units],
sign convention negative = the unit lowers the loss (useful). Each strategy is an *order*: the
units pruned first come first; a plan prunes the first ``round(fraction * units)`` of them.

- ``magnitude``: smallest ``|score|`` first.
- ``sign-aware``: harmful units (``score > harmful_min``) by descending score first, then the
  others by ascending ``|score|``, so useful units (large negative scores) go last. With the default
  ``harmful_min = 0`` this is descending score. (Seed 003's example code gives harmful units
  ``importance = score`` and prunes the *smallest* importance first, i.e. the least harmful first:
  the opposite of what it describes. This implements the description.)
- ``layerwise``: a ratio per layer by depth (default shallow 20% / middle 30% / deep 15%, with
  the seed's boundaries 5/32 and 20/32 of the depth), units chosen within each layer by magnitude or
  sign-aware order.
- ``iterative``: prune ``step`` of the units, re-attribute the masked model with an attribute
  plugin, repeat until ``max_fraction`` or until the objective rises more than ``max_increase``
  (relative) above the unpruned model; the round that crossed it is undone.
- ``random``: a seeded random order (the floor every strategy must beat).
- ``layer-matched-random``: as many units of each layer as an earlier prune step removed there
  (``inputs: {prune: STEP}``, else the latest prune step), chosen at random within the layer: the
  control that separates *how many per layer* from *which ones* in a strategy's result.


Outputs: ``masked`` (pruned heads' columns of the output projection and pruned neurons'
down-projection columns zeroed; stock ``from_pretrained`` loads it) or ``compact`` (weights sliced,
:mod:`surgery.models.pruned`). For compact GQA layers each KV group loses the same number of query heads
(the plan's number of pruned heads is filled with "slices", the j-th head of every group of a layer,
best mean position in the order first) and every layer keeps at least one head and one neuron, so the actual
fraction can differ a little from the requested one.
Every prune reports the objective before and after (gated model and saved model), the parameters
removed and the prune curve (objective vs fraction pruned, JSON and PNG).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch
from pydantic import Field, field_validator, model_validator

from surgery import hookimpl
from surgery.core.artifacts import Artifact
from surgery.core.errors import RecipeError, SurgeryError
from surgery.core.options import Options
from surgery.engines.attribution import loss_function, points_per_chunk, prepared_batches, sites_for
from surgery.engines.diagnostics import save_curve
from surgery.engines.gates import GateSite, evaluate_points, model_inputs
from surgery.models.adapters import ModelView, module_at, neuron_slices, out_proj_head_axis
from surgery.models.objectives import read_output
from surgery.models.pruned import compact_model, pruned_view

Mask = torch.Tensor  # bool [layers, max units], True = pruned


# --- orders -----------------------------------------------------------------------------------

def magnitude_order(scores: Sequence[float]) -> list[int]:
    """Indices by ascending ``|score|`` (ties: lower index first)."""
    return sorted(range(len(scores)), key=lambda i: (abs(scores[i]), i))


def sign_aware_order(scores: Sequence[float], harmful_min: float = 0.0) -> list[int]:
    """Harmful (``score > harmful_min``) by descending score, then the rest by ascending ``|score|``."""
    harmful = sorted((i for i in range(len(scores)) if scores[i] > harmful_min), key=lambda i: (-scores[i], i))
    rest = sorted((i for i in range(len(scores)) if scores[i] <= harmful_min), key=lambda i: (abs(scores[i]), i))
    return harmful + rest


def random_order(n: int, seed: int) -> list[int]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def depth_ratios(layers: int, ratios: Sequence[float], bounds: Sequence[float]) -> list[float]:
    """Per-layer prune ratio: ``ratios[0]`` below ``bounds[0]`` of the depth, ``ratios[2]`` from ``bounds[1]``."""
    out = []
    for l in range(layers):
        position = l / layers
        out.append(ratios[0] if position < bounds[0] else ratios[2] if position >= bounds[1] else ratios[1])
    return out


# --- plans ------------------------------------------------------------------------------------

@dataclass
class Units:
    """The prunable units of a model: one gate site per layer, with the view for structure."""

    sites: list[GateSite]
    view: ModelView
    target: str

    @property
    def counts(self) -> list[int]:
        return [s.units for s in self.sites]

    @property
    def total(self) -> int:
        return sum(self.counts)

    def flat_index(self) -> list[tuple[int, int]]:
        return [(l, u) for l, n in enumerate(self.counts) for u in range(n)]

    def empty_mask(self) -> Mask:
        return torch.zeros(len(self.sites), max(self.counts), dtype=torch.bool)


def global_plan(units: Units, order: Sequence[int], fraction: float) -> Mask:
    """Prune the first ``round(fraction * total)`` units of a global order (indices into ``flat_index``)."""
    mask = units.empty_mask()
    flat = units.flat_index()
    for i in order[: round(fraction * units.total)]:
        mask[flat[i]] = True
    return mask


def layer_plan(units: Units, orders: Sequence[Sequence[int]], ratios: Sequence[float]) -> Mask:
    """Prune ``round(ratio_l * units_l)`` units of each layer, first in that layer's order."""
    mask = units.empty_mask()
    for l, (order, ratio) in enumerate(zip(orders, ratios)):
        for u in order[: round(min(1.0, ratio) * units.counts[l])]:
            mask[l, u] = True
    return mask


def ranks_of(units: Units, order: Sequence[int]) -> torch.Tensor:
    """Position of each unit in a global order, ``[layers, max units]`` (lower = pruned earlier)."""
    ranks = torch.full(units.empty_mask().shape, len(order), dtype=torch.long)
    flat = units.flat_index()
    for position, i in enumerate(order):
        ranks[flat[i]] = position
    return ranks


def compactable(units: Units, mask: Mask, ranks: torch.Tensor) -> Mask:
    """Adjust a plan so it can be compacted: equal heads per KV group, >= 1 unit kept per layer.

    A GQA layer can only lose ``p`` query heads from every one of its ``g`` KV groups (``p`` < group
    size). Its candidate *slices* are "the j-th head of every group" (heads ranked by the order within
    their group), each ranked by its heads' mean position in the order; the plan keeps its number of
    pruned GQA heads and fills it with the best-ranked slices (to the nearest slice).
    """
    mask = mask.clone()
    per_group = _heads_per_group(units, mask, ranks)
    for l, n in enumerate(units.counts):
        layer_ranks = ranks[l, :n].tolist()
        attn = units.view.layers[l].attn
        if l in per_group:
            groups, size = attn.num_kv_heads, attn.num_heads // attn.num_kv_heads
            mask[l, :n] = False
            for g in range(groups):
                members = sorted(range(g * size, (g + 1) * size), key=lambda h: (layer_ranks[h], h))
                for h in members[:per_group[l]]:
                    mask[l, h] = True
        elif bool(mask[l, :n].all()):
            mask[l, max(range(n), key=lambda u: (layer_ranks[u], u))] = False  # keep the last in the order
    return mask


def _heads_per_group(units: Units, mask: Mask, ranks: torch.Tensor) -> dict[int, int]:
    """For each GQA layer, how many query heads each of its KV groups loses."""
    if units.target != "heads":
        return {}
    slices, wanted, per_group = [], 0, {}
    for l, n in enumerate(units.counts):
        attn = units.view.layers[l].attn
        if attn.num_kv_heads == attn.num_heads:
            continue
        groups, size = attn.num_kv_heads, attn.num_heads // attn.num_kv_heads
        per_group[l] = 0
        wanted += int(mask[l, :n].sum())
        ranked = [sorted(range(g * size, (g + 1) * size), key=lambda h: (int(ranks[l, h]), h)) for g in range(groups)]
        for j in range(size - 1):  # keep one head per group
            position = sum(int(ranks[l, members[j]]) for members in ranked) / groups
            slices.append((position, l, j, groups))
    taken = 0
    for _, l, j, groups in sorted(slices):
        if taken + groups / 2 > wanted:
            break
        if j == per_group[l]:  # a layer's slices go in order
            per_group[l] += 1
            taken += groups
    return per_group


# --- evaluation -------------------------------------------------------------------------------

class Evaluator:
    """The objective of the step's data under gate masks (batched: one point per mask)."""

    def __init__(self, ctx, loaded, units: Units, objective_name: str, memory_mb: float, answer_only: bool = False) -> None:
        self.model = loaded.module
        self.units = units
        self.objective = ctx.objective(objective_name)
        self.loss_fn = loss_function(self.objective)
        self.batches = list(prepared_batches(ctx, loaded, self.objective, answer_only))
        if not self.batches:
            raise SurgeryError(f"{ctx.where}: the data has no examples")
        self.memory_mb = memory_mb

    def losses(self, masks: Sequence[Mask]) -> list[float]:
        """Mean per-sample objective for each mask (pruned units gated to 0)."""
        totals = torch.zeros(len(masks), dtype=torch.float64)
        count = 0
        for batch in self.batches:
            gates_p = [torch.stack([(~m[l, :n]).float() for m in masks]) for l, n in enumerate(self.units.counts)]
            chunk = points_per_chunk(self.memory_mb, self.model, batch) * 3  # forward only
            losses = [c.loss_nb for c in evaluate_points(self.model, self.units.sites, batch, gates_p, self.loss_fn, chunk)]
            totals += torch.cat(losses).double().sum(1)
            count += batch["input_ids"].shape[0]
        return (totals / count).tolist()

    def model_loss(self, module: torch.nn.Module) -> float:
        """Mean per-sample objective of another module (e.g. the saved pruned model), no gates."""
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in self.batches:
                output = read_output(module(**model_inputs(batch, module)), self.loss_fn.output)
                total += float(self.loss_fn(output, batch).double().sum())
                count += batch["input_ids"].shape[0]
        return total / count


# --- parameters and outputs -------------------------------------------------------------------

def removed_params(model: torch.nn.Module, units: Units, mask: Mask) -> int:
    """Parameters a plan makes dead (= removed by compacting): per head its q rows, output-projection
    columns and, for KV groups left without query heads, k/v rows; per neuron every slice it owns."""
    total = 0
    for l, n in enumerate(units.counts):
        pruned = [u for u in range(n) if mask[l, u]]
        if not pruned:
            continue
        layer = units.view.layers[l]
        if units.target == "heads":
            total += _head_params(model, layer.attn, pruned)
        else:
            for piece in neuron_slices(model, layer.mlp):
                param = model.get_parameter(piece.name)
                total += param.numel() // param.shape[piece.axis] * len(pruned)
    return total


def _head_params(model: torch.nn.Module, attn: Any, pruned: list[int]) -> int:
    d = attn.head_dim

    def rows(path: str, count: int) -> int:  # count head-sized slices of a projection's outputs
        module = module_at(model, path)
        width = module.weight.shape[0] if attn.conv1d else module.weight.shape[1]
        bias = d * count if getattr(module, "bias", None) is not None else 0
        return width * d * count + bias

    out_proj = module_at(model, attn.out_proj).weight
    total = out_proj.shape[1 - out_proj_head_axis(attn)] * d * len(pruned)
    group = attn.num_heads // attn.num_kv_heads
    dead_groups = sum(1 for g in range(attn.num_kv_heads) if all(h in pruned for h in range(g * group, (g + 1) * group)))
    if attn.qkv_proj is not None:  # fused q/k/v, multi-head: each head owns three slices
        return total + rows(attn.qkv_proj, 3 * len(pruned))
    total += rows(attn.q_proj, len(pruned))
    return total + rows(attn.k_proj, dead_groups) + rows(attn.v_proj, dead_groups)


def zeroed_columns(model: torch.nn.Module, units: Units, mask: Mask) -> list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]]:
    """Zero the pruned units' input slices of each site's module in place; returns what to restore."""
    saved = []
    for l, site in enumerate(units.sites):
        pruned = [u for u in range(site.units) if mask[l, u]]
        if not pruned:
            continue
        module = module_at(model, site.path)
        axis = 0 if type(module).__name__ == "Conv1D" else 1  # Conv1D weights are [in, out]
        index = torch.cat([torch.arange(u * site.unit_dim, (u + 1) * site.unit_dim) for u in pruned])
        index = index.to(module.weight.device)
        with torch.no_grad():
            saved.append((module.weight, axis, index, module.weight.index_select(axis, index).clone()))
            module.weight.index_fill_(axis, index, 0.0)
    return saved


def restore_columns(saved: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for weight, axis, index, values in saved:
            weight.index_copy_(axis, index, values)


def kept_lists(units: Units, mask: Mask) -> list[list[int]]:
    return [[u for u in range(n) if not mask[l, u]] for l, n in enumerate(units.counts)]


# --- options ----------------------------------------------------------------------------------

DEFAULT_CURVE = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]


class PruneOptions(Options):
    target: Literal["heads", "neurons"] = Field("heads", description="prune attention heads or MLP neurons")
    output: Literal["masked", "compact"] = Field("masked", description="zeroed columns (stock loader) or sliced weights")
    objective: str = Field("causal-lm", description="objective reported before/after and on the curve")
    curve: list[float] = Field(default_factory=lambda: list(DEFAULT_CURVE),
                               description="prune amounts evaluated for the prune curve")
    save_model: bool = Field(True, description="save the pruned model (false: report only)")
    memory_mb: float = Field(1024.0, gt=0, description="memory budget of one batched evaluation")
    answer_only: bool = Field(False, description="count only answer tokens of prompt/answer data in the objective")

    @field_validator("curve")
    @classmethod
    def _curve_range(cls, values: list[float]) -> list[float]:
        if any(v < 0 for v in values):
            raise ValueError("curve amounts must be >= 0")
        return values


class FractionOptions(PruneOptions):
    fraction: float = Field(0.3, ge=0, lt=1, description="share of all units to prune")


class SignAwareOptions(FractionOptions):
    harmful_min: float = Field(0.0, description="scores above this are harmful and go first, largest first")


class RandomOptions(FractionOptions):
    seed: int | None = Field(None, description="order seed (default: the recipe seed)")


class LayerwiseOptions(PruneOptions):
    ratios: list[float] = Field([0.2, 0.3, 0.15], description="prune ratio of shallow / middle / deep layers")
    bounds: list[float] = Field([5 / 32, 20 / 32], description="depth fractions where middle and deep layers start")
    order: Literal["magnitude", "sign-aware"] = Field("magnitude", description="which units go first within a layer")
    curve: list[float] = Field([0.0, 0.5, 1.0, 1.5], description="scales of the ratios evaluated for the prune curve")

    @model_validator(mode="after")
    def _lengths(self) -> "LayerwiseOptions":
        if len(self.ratios) != 3 or len(self.bounds) != 2:
            raise ValueError("ratios needs 3 values (shallow, middle, deep) and bounds 2")
        if not all(0 <= r <= 1 for r in self.ratios) or not 0 <= self.bounds[0] <= self.bounds[1] <= 1:
            raise ValueError("ratios must lie in [0, 1] and bounds be increasing in [0, 1]")
        return self


class IterativeOptions(PruneOptions):
    step: float = Field(0.1, gt=0, le=1, description="share of all units pruned per round")
    max_fraction: float = Field(0.5, gt=0, lt=1, description="stop at this share pruned")
    max_increase: float = Field(0.05, ge=0, description="stop when the objective rises more than this (relative)")
    order: Literal["magnitude", "sign-aware"] = Field("magnitude", description="order applied to each round's scores")
    attribute: dict[str, Any] = Field(default_factory=lambda: {"plugin": "ig", "steps": 8},
                                      description="attribute plugin and options used to re-score each round")
    curve: list[float] = Field(default_factory=list, description="(unused: the rounds are the curve)")

    @field_validator("attribute")
    @classmethod
    def _plugin(cls, value: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(value.get("plugin"), str):
            raise ValueError("attribute needs a 'plugin' name, e.g. {plugin: ig, steps: 8}")
        return value


# --- the plugins ------------------------------------------------------------------------------

class _Prune:
    """Shared flow: read scores, build the plan and the curve, report, save the pruned model."""

    options_class: type = FractionOptions
    name = "prune"
    needs_scores = True
    needs_sign = False

    @hookimpl
    def option_schema(self, stage: str):
        return self.options_class if stage == "prune" else None

    @hookimpl
    def prune(self, ctx) -> Artifact:
        opts = ctx.options
        loaded = ctx.model(ctx.models[0])
        units = Units(sites_for(loaded, opts.target), loaded.view, opts.target)
        scores = read_scores(ctx, units, self.needs_sign) if self.needs_scores else None
        evaluator = Evaluator(ctx, loaded, units, opts.objective, opts.memory_mb, opts.answer_only)
        mask, curve, extra = self.plan(ctx, units, scores, evaluator)
        return finish(ctx, loaded, units, mask, curve, evaluator, self.name, extra)

    def plan(self, ctx, units: Units, scores: list[float] | None, evaluator: Evaluator) -> tuple[Mask, list, dict]:
        """The prune mask, the prune curve [(fraction, objective)], and extra meta."""
        opts = ctx.options
        order = self.order(ctx, scores, units)
        make = self._maker(ctx, units, order)
        return make(opts.fraction), curve_of(units, evaluator, [make(a) for a in opts.curve]), {}

    def _maker(self, ctx, units: Units, order: list[int]) -> Callable[[float], Mask]:
        ranks = ranks_of(units, order)

        def make(amount: float) -> Mask:
            mask = global_plan(units, order, min(amount, 1.0))
            return compactable(units, mask, ranks) if ctx.options.output == "compact" else mask

        return make

    def order(self, ctx, scores: list[float] | None, units: Units) -> list[int]:
        raise NotImplementedError


class Magnitude(_Prune):
    """Prune the heads (or neurons) with the smallest |attribution| first."""

    name = "magnitude"

    def order(self, ctx, scores, units):
        return magnitude_order(scores)


class SignAware(_Prune):
    """Prune harmful heads (attribution > 0) largest first, then the smallest |attribution|; useful heads last."""

    name = "sign-aware"
    options_class = SignAwareOptions
    needs_sign = True

    def order(self, ctx, scores, units):
        return sign_aware_order(scores, ctx.options.harmful_min)


class Random(_Prune):
    """Prune a seeded random selection of heads (or neurons): the floor for every strategy."""

    name = "random"
    options_class = RandomOptions
    needs_scores = False

    def order(self, ctx, scores, units):
        seed = ctx.seed if ctx.options.seed is None else ctx.options.seed
        return random_order(units.total, seed)


class LayerMatchedOptions(PruneOptions):
    seed: int | None = Field(None, description="draw seed (default: the recipe seed)")
    curve: list[float] = Field(default_factory=list, description="(unused: the plan copies another step's counts)")


class LayerMatchedRandom(_Prune):
    """Random units with the same count per layer as an earlier prune step's plan."""

    name = "layer-matched-random"
    options_class = LayerMatchedOptions
    needs_scores = False

    def plan(self, ctx, units, scores, evaluator):
        opts = ctx.options
        counts = matched_counts(ctx.upstream("prune"), units, ctx.where)
        seed = ctx.seed if opts.seed is None else opts.seed
        mask = layer_matched_mask(units, counts, seed)
        if opts.output == "compact":
            order = sorted(range(units.total), key=lambda i: (not mask[units.flat_index()[i]], i))
            mask = compactable(units, mask, ranks_of(units, order))
        return mask, curve_of(units, evaluator, [units.empty_mask(), mask]), {"matched_counts": counts}


def matched_counts(artifact: Artifact, units: Units, where: str) -> list[int]:
    """Units pruned per layer by an earlier prune step (checked against this model's units)."""
    meta = artifact.meta
    if meta.get("target") != units.target or list(meta.get("units_per_layer", [])) != units.counts:
        raise SurgeryError(f"{where}: the matched prune step pruned {meta.get('target')} of layers "
                           f"{meta.get('units_per_layer')}; this step has {units.target} of {units.counts}")
    return [int(c) for c in meta["pruned_per_layer"]]


def layer_matched_mask(units: Units, counts: Sequence[int], seed: int) -> Mask:
    """``counts[l]`` random units of each layer l (one generator, layer by layer)."""
    generator = random.Random(seed)
    mask = units.empty_mask()
    for l, (n, count) in enumerate(zip(units.counts, counts)):
        for u in generator.sample(range(n), count):
            mask[l, u] = True
    return mask


class Layerwise(_Prune):
    """Prune a different ratio of each layer's heads by depth (shallow 20% / middle 30% / deep 15%)."""

    name = "layerwise"
    options_class = LayerwiseOptions
    needs_sign = False

    def plan(self, ctx, units, scores, evaluator):
        opts = ctx.options
        if opts.order == "sign-aware":
            require_signed(ctx)
        ratios = depth_ratios(len(units.sites), opts.ratios, opts.bounds)
        orders, start = [], 0
        for n in units.counts:
            layer_scores = scores[start:start + n]
            orders.append(magnitude_order(layer_scores) if opts.order == "magnitude" else sign_aware_order(layer_scores))
            start += n
        ranks = units.empty_mask().long()
        for l, order in enumerate(orders):
            for position, u in enumerate(order):
                ranks[l, u] = position

        def make(scale: float) -> Mask:
            mask = layer_plan(units, orders, [r * scale for r in ratios])
            return compactable(units, mask, ranks) if opts.output == "compact" else mask

        return make(1.0), curve_of(units, evaluator, [make(s) for s in opts.curve]), {"layer_ratios": ratios}


class Iterative(_Prune):
    """Prune a share of heads, re-attribute the pruned model, repeat until the objective degrades."""

    name = "iterative"
    options_class = IterativeOptions
    needs_scores = False

    def plan(self, ctx, units, scores, evaluator):
        opts = ctx.options
        attribute = dict(opts.attribute)
        plugin = attribute.pop("plugin")
        for key in ("target", "objective", "answer_only"):
            attribute.setdefault(key, getattr(opts, key))
        if opts.order == "sign-aware" and plugin == "grad-x-act" and attribute.get("absolute", True):
            raise RecipeError(f"{ctx.where}.attribute: sign-aware needs signed scores; grad-x-act gives |dL/dgate|")
        loaded = ctx.model(ctx.models[0])
        before = evaluator.losses([units.empty_mask()])[0]
        mask = units.empty_mask()
        curve = [(0.0, before)]
        limit = before * (1 + opts.max_increase)
        per_round = max(1, round(opts.step * units.total))
        target_total = round(opts.max_fraction * units.total)
        stop = {"stopped": "max_fraction", "objective_limit": limit}
        while int(mask.sum()) < target_total:
            saved = zeroed_columns(loaded.module, units, mask)
            try:
                artifact = ctx.call("attribute", plugin, attribute)
            finally:
                restore_columns(saved)
            round_scores = flat_scores(artifact, units, ctx.where, signed_needed=opts.order == "sign-aware")
            candidates = self._order(round_scores, opts.order)
            flat = units.flat_index()
            chosen = [i for i in candidates if not mask[flat[i]]][: min(per_round, target_total - int(mask.sum()))]
            trial = mask.clone()
            for i in chosen:
                trial[flat[i]] = True
            if opts.output == "compact":
                trial = compactable(units, trial, ranks_of(units, candidates))
            loss = evaluator.losses([trial])[0]
            ctx.log(f"iterative: {int(trial.sum())}/{units.total} pruned, objective {loss:.4f}")
            if int(trial.sum()) <= int(mask.sum()):
                stop["stopped"] = "no_progress"
                break
            if loss > limit:
                stop.update(stopped="objective", rejected=[int(trial.sum()) / units.total, loss])
                break
            mask = trial
            curve.append((int(mask.sum()) / units.total, loss))
        return mask, curve, stop

    @staticmethod
    def _order(scores: list[float], order: str) -> list[int]:
        return magnitude_order(scores) if order == "magnitude" else sign_aware_order(scores)


# --- shared steps -----------------------------------------------------------------------------

def read_scores(ctx, units: Units, needs_sign: bool) -> list[float]:
    """The upstream attribute step's scores for ``units``, flattened layer by layer."""
    artifact = ctx.upstream("attribute")
    return flat_scores(artifact, units, ctx.where, needs_sign)


def flat_scores(artifact: Artifact, units: Units, where: str, signed_needed: bool) -> list[float]:
    meta = artifact.meta
    if meta.get("target", "heads") != units.target:
        raise SurgeryError(f"{where}: the attribute step scored {meta.get('target')}, this step prunes {units.target}")
    if signed_needed and not meta.get("signed", True):
        raise SurgeryError(f"{where}: sign-aware pruning needs signed scores; the attribute step's are unsigned "
                           f"({meta.get('method')})")
    scores = artifact.tensors["scores"]
    if list(meta.get("units_per_layer", [])) != units.counts:
        raise SurgeryError(f"{where}: the attribute step has units per layer {meta.get('units_per_layer')}, "
                           f"the model has {units.counts}")
    return torch.cat([scores[l, :n] for l, n in enumerate(units.counts)]).double().tolist()


def require_signed(ctx) -> None:
    artifact = ctx.upstream("attribute")
    if not artifact.meta.get("signed", True):
        raise SurgeryError(f"{ctx.where}: sign-aware order needs signed scores ({artifact.meta.get('method')} gives unsigned)")


def curve_of(units: Units, evaluator: Evaluator, masks: list[Mask]) -> list[tuple[float, float]]:
    """(fraction pruned, objective) for each mask, sorted by fraction."""
    if not masks:
        return []
    losses = evaluator.losses(masks)
    return sorted((int(m.sum()) / units.total, loss) for m, loss in zip(masks, losses))


def finish(ctx, loaded, units: Units, mask: Mask, curve: list, evaluator: Evaluator, strategy: str,
           extra: dict | None = None) -> Artifact:
    """Evaluate, save the pruned model, and build the artifact."""
    opts = ctx.options
    before, after_gated = evaluator.losses([units.empty_mask(), mask])
    model = loaded.module
    params_before = sum(p.numel() for p in model.parameters())
    removed = removed_params(model, units, mask)
    meta: dict[str, Any] = {
        "strategy": strategy, "target": opts.target, "output": opts.output, "objective": opts.objective,
        "fraction": getattr(opts, "fraction", None), "fraction_pruned": int(mask.sum()) / units.total,
        "pruned_per_layer": mask.sum(1).tolist(), "units_per_layer": units.counts,
        "objective_before": before, "objective_after_gated": after_gated,
        "params_before": params_before, "params_removed": removed,
        "curve": [list(point) for point in curve], **(extra or {}),
    }
    if opts.output == "compact":
        pruned = compact_model(model, loaded.view, *_keeps(units, mask))
        meta["objective_after"] = evaluator.model_loss(pruned)
        meta["params_after"] = sum(p.numel() for p in pruned.parameters())
        if opts.save_model:
            ctx.save_model(pruned, like=ctx.models[0])
    else:
        saved = zeroed_columns(model, units, mask)
        try:
            meta["objective_after"] = evaluator.model_loss(model)
            if opts.save_model:
                ctx.save_model(model, like=ctx.models[0])
        finally:
            restore_columns(saved)
    if curve:
        save_curve({strategy: curve}, ctx.out_dir / "prune_curve.png", f"{strategy} prune of {opts.target}")
    tensors = {"head_mask": mask.float()} if opts.target == "heads" else {
        f"neuron_mask/{l}": mask[l, :n].float() for l, n in enumerate(units.counts)}
    figures = {"objective_before": before, "objective_after": meta["objective_after"],
               "fraction_pruned": meta["fraction_pruned"], "params_removed": removed}
    return Artifact(tensors=tensors, meta=meta, figures=figures)


def _keeps(units: Units, mask: Mask) -> tuple[list[list[int]] | None, list[list[int]] | None]:
    keep = kept_lists(units, mask)
    return (keep, None) if units.target == "heads" else (None, keep)


# --- registration of the pruned model classes' views ---------------------------------------------

@hookimpl
def register_architectures(register: Callable[..., None]) -> None:
    from surgery.models.architectures import llama_view
    from surgery.models.pruned import PRUNED_TYPES

    for model_type in PRUNED_TYPES:
        register(model_type, lambda model, part="language": pruned_view(llama_view(model, part), model.config))


magnitude = Magnitude()
sign_aware = SignAware()
random_prune = Random()
layer_matched_random = LayerMatchedRandom()
layerwise = Layerwise()
iterative = Iterative()
