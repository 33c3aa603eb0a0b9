"""What every gate-attribution method shares: options, sites, batches, memory budget, artifact.

An attribute plugin (``ig``, ``grad-x-act``, ``ablation``, ``shapley``, third-party ones) subclasses
:class:`GateAttribution` and writes only its math, ``attribute_batch(model, sites, batch, loss_fn)``:
per-sample scores ``[B, sites, units]`` of one batch. The base class validates the options, prepares
the batches, sizes the point chunks to the memory budget, shares the batches among data-parallel
processes and gathers their rows, checks completeness where the method has it, and writes the common
artifact (``scores`` ``[layers, units]``, sign statistics, a heatmap) that ``prune``, ``report`` and
``compare`` read. The free functions below are the same pieces for plugins that need another shape.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar, Iterator, Literal, Sequence

import numpy as np
import torch
from pydantic import Field, ValidationInfo, field_validator

from surgery.core.artifacts import Artifact
from surgery.core.errors import DataError, SurgeryError
from surgery.core.options import Options
from surgery.engines.diagnostics import save_heatmap, sign_stats
from surgery.engines.gates import GateSite, LossFn, head_sites, neuron_sites, rows_per_chunk
from surgery.hookspecs import hookimpl
from surgery.models.objectives import IGNORE_INDEX, ObjectiveLoss, with_reference


@dataclass
class Attribution:
    """Per-sample attributions of one or more batches.

    ``per_sample`` ``[B, sites, units]`` (units padded with 0 where sites differ in size),
    ``loss_full`` ``[B]`` = L(all gates 1), ``loss_base`` ``[B, sites]`` (per-layer: L with layer l at
    its baseline) or ``[B, 1]`` (joint: L with every gate at its baseline).
    """

    per_sample: torch.Tensor
    loss_full: torch.Tensor
    loss_base: torch.Tensor

    @staticmethod
    def concat(parts: list["Attribution"]) -> "Attribution":
        return Attribution(*(torch.cat([getattr(p, f) for p in parts]) for f in ("per_sample", "loss_full", "loss_base")))


def baseline_values(kind: str, sites: Sequence[GateSite], value: float = 0.0, seed: int = 0) -> list[torch.Tensor]:
    """The baseline gate of every unit of every site: 0, ``value``, or U(0, 1) drawn with ``seed``."""
    if kind == "zero":
        return [torch.zeros(s.units, dtype=torch.float64) for s in sites]
    if kind == "scalar":
        return [torch.full((s.units,), float(value), dtype=torch.float64) for s in sites]
    if kind == "random":
        generator = torch.Generator().manual_seed(seed)
        return [torch.rand(s.units, generator=generator, dtype=torch.float64) for s in sites]
    raise ValueError(f"unknown baseline {kind!r}")


def completeness(attribution: Attribution, per_layer: bool) -> dict:
    """Sum of mean attributions vs the mean objective difference, per layer or in total."""
    ig_l = attribution.per_sample.mean(0).sum(-1)  # [sites]
    diff = (attribution.loss_full[:, None] - attribution.loss_base).mean(0)  # [sites] or [1]
    if per_layer:
        sums, diffs = ig_l, diff
    else:
        sums, diffs = ig_l.sum()[None], diff
    rel = (sums - diffs).abs() / diffs.abs().clamp_min(1e-12)
    return {
        "mode": "per-layer" if per_layer else "joint",
        "sum_ig": sums.tolist(), "objective_diff": diffs.tolist(), "relative_error": rel.tolist(),
        "max_relative_error": float(rel.max()), "max_abs_error": float((sums - diffs).abs().max()),
    }


class AttributeOptions(Options):
    """Options every attribute plugin of this family takes."""

    objective: str = Field("causal-lm", description="registered objective: causal-lm, masked-lm, masked-diffusion, ...")
    target: Literal["heads", "neurons"] = Field("heads", description="attention heads (output-projection input) or MLP neurons")
    keep_per_sample: bool = Field(False, description="also save per-sample attributions [samples, layers, units]")
    memory_mb: float = Field(1024.0, gt=0, description="memory budget of one batched forward/backward (sets points per trace)")
    answer_only: bool = Field(False, description="count only answer tokens of prompt/answer data in the objective")

    @field_validator("objective")
    @classmethod
    def _known_objective(cls, name: str, info: ValidationInfo) -> str:
        registries = (info.context or {}).get("registries")
        if registries is not None:  # validated inside a recipe; a bare construction checks at run time
            try:
                registries.objectives.get(name)
            except SurgeryError as exc:
                raise ValueError(str(exc)) from None
        return name


def sites_for(loaded, target: str) -> list[GateSite]:
    """Gate sites of a loaded model: heads or neurons, one site per layer."""
    return head_sites(loaded.view) if target == "heads" else neuron_sites(loaded.view)


def prepared_batches(ctx, loaded, objective, answer_only: bool = False) -> Iterator[dict]:
    """The step's data as objective-prepared batches on the model's device (random masks seeded).

    An objective with a ``reference`` (e.g. ``embedding-distortion``) gets its entries from the model
    as it is now, before any gate. With ``answer_only`` the objective counts only the answer tokens of prompt/answer examples
    (``labels`` set to -100 elsewhere before ``prepare``; masking objectives then mask only answers).
    """
    generator = torch.Generator().manual_seed(ctx.seed)
    tokenizer = loaded.tokenizer
    device = input_device(loaded.module)
    for batch in ctx.batches(tokenizer):
        if tokenizer is not None and getattr(tokenizer, "mask_token_id", None) is not None:
            batch.setdefault("mask_token_id", tokenizer.mask_token_id)
        if answer_only and "answer_mask" in batch:
            batch["labels"] = batch["labels"].masked_fill(batch["answer_mask"] == 0, IGNORE_INDEX)
        batch = objective.prepare(batch, generator)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        yield with_reference(objective, loaded.module, batch, loaded.path)


def input_device(model: torch.nn.Module) -> torch.device:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return embeddings.weight.device if embeddings is not None else next(model.parameters()).device


def points_per_chunk(memory_mb: float, model: torch.nn.Module, batch: dict) -> int:
    """Integration points per trace for this batch under the memory budget (at least 1)."""
    config = model.config.get_text_config()
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    ffn = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    rows, tokens = batch["input_ids"].shape
    dtype_bytes = next(model.parameters()).element_size()
    fit = rows_per_chunk(memory_mb, tokens, config.num_hidden_layers, hidden, ffn,
                         config.num_attention_heads, config.vocab_size, max(4, dtype_bytes))
    return max(1, fit // rows)


def attribution_artifact(ctx, attribution: Attribution, sites: Sequence[GateSite], method: str,
                         check: dict | None = None, extra_meta: dict | None = None) -> Artifact:
    """Scores (mean over samples), optional per-sample vectors, meta, figures and a heatmap PNG."""
    opts = ctx.options
    scores = attribution.per_sample.mean(0).float()
    tensors = {"scores": scores, "loss_full": attribution.loss_full.float(), "loss_base": attribution.loss_base.float()}
    if opts.keep_per_sample:
        tensors["per_sample"] = attribution.per_sample.float()
    units = [s.units for s in sites]
    stats = sign_stats(_valid(scores, units))
    meta = {
        "method": method, "target": opts.target, "objective": opts.objective, "model": ctx.models[0],
        "units_per_layer": units, "samples": int(attribution.per_sample.shape[0]),
        "convention": "signed: negative = the unit lowers the loss (useful)",
        "signed": True, "completeness": check, "sign_stats": stats, **(extra_meta or {}),
    }
    figures = {"objective": float(attribution.loss_full.mean()), "share_positive": stats["share_positive"],
               "samples": meta["samples"]}
    if check is not None:
        figures["completeness_error"] = check["max_relative_error"]
    save_heatmap(scores, ctx.out_dir / "heatmap.png", f"{method} ({opts.target}, {opts.objective})")
    return Artifact(tensors=tensors, meta=meta, figures=figures)


def _valid(scores_lu: torch.Tensor, units: list[int]) -> torch.Tensor:
    """The real entries of a padded [layers, units] score matrix, flattened."""
    return torch.cat([scores_lu[l, :u] for l, u in enumerate(units)])


def gather_rows(ctx, parts: dict[int, Attribution], rows_per_batch: list[int], sites: Sequence[GateSite],
                per_layer: bool | int) -> Attribution:
    """All batches' per-sample rows in data order. Each data-parallel process fills the rows of its
    own batches in zero tensors and the all-reduced sum fills the rest (exact: one non-zero term).
    ``per_layer``: a ``loss_base`` column per site (True) or one (False), or the number of columns."""
    n = sum(rows_per_batch)
    groups = (len(sites) if per_layer else 1) if isinstance(per_layer, bool) else per_layer
    full = Attribution(torch.zeros(n, len(sites), max(s.units for s in sites), dtype=torch.float64),
                       torch.zeros(n, dtype=torch.float64), torch.zeros(n, groups, dtype=torch.float64))
    starts = np.cumsum([0, *rows_per_batch])
    for index, part in parts.items():
        for field in ("per_sample", "loss_full", "loss_base"):
            getattr(full, field)[starts[index]:starts[index + 1]] = getattr(part, field).cpu()
    ctx.all_reduce({"per_sample": full.per_sample, "loss_full": full.loss_full, "loss_base": full.loss_base})
    return full


def loss_function(objective) -> LossFn:
    return ObjectiveLoss(objective)


def zero_rows(sites: Sequence[GateSite], batch: dict) -> torch.Tensor:
    """Per-sample scores of ``batch`` set to 0: ``[B, sites, max units]`` float64."""
    rows = batch["input_ids"].shape[0]
    return torch.zeros(rows, len(sites), max(s.units for s in sites), dtype=torch.float64)


# --- the base class ---------------------------------------------------------------------------


class GateAttribution:
    """Base class of the attribute plugins over head or neuron gates.

    A subclass sets ``method`` (the name in the artifact) and ``Options`` (an
    :class:`AttributeOptions` subclass) and implements :meth:`attribute_batch`; per-step state (a
    baseline, quadrature nodes, a generator) goes in :meth:`setup`. The ``attribute`` hook works on a
    copy of the registered plugin, so ``self.options`` and that state belong to one step.
    """

    method: ClassVar[str] = ""
    Options: ClassVar[type[AttributeOptions]] = AttributeOptions
    shard_batches: ClassVar[bool] = True
    """Each data-parallel process attributes its share of the batches; set False for a method whose
    batches are not independent (one random generator drawn from batch after batch)."""
    backward: ClassVar[bool] = True
    """Whether a point needs a backward pass; forward-only methods fit about three times the points."""

    options: AttributeOptions

    @hookimpl
    def option_schema(self, stage: str) -> type[AttributeOptions] | None:
        return self.Options if stage == "attribute" else None

    @hookimpl
    def attribute(self, ctx) -> Artifact:
        return copy.copy(self)._run(ctx)

    # --- what a subclass writes ---------------------------------------------------------------

    def setup(self, ctx, sites: Sequence[GateSite]) -> None:
        """Prepare per-step state from ``self.options`` and ``ctx`` (nothing by default)."""

    def attribute_batch(self, model: torch.nn.Module, sites: Sequence[GateSite], batch: dict,
                        loss_fn: LossFn) -> Attribution:
        """Per-sample attributions of one prepared batch (``Attribution.per_sample`` ``[B, sites, units]``)."""
        raise NotImplementedError(f"{type(self).__name__} must implement attribute_batch")

    def baseline_groups(self, sites: Sequence[GateSite]) -> int:
        """Columns of ``Attribution.loss_base``: one per site, 1 (all gates together), or 0 (none)."""
        return 0

    def has_completeness(self) -> bool:
        """Whether the attributions should sum to an objective difference (IG, Shapley)."""
        return False

    def completeness(self, attribution: Attribution) -> dict:
        """The completeness check of all samples' attributions (see :func:`completeness`)."""
        return completeness(attribution, per_layer=False)

    def extra_meta(self) -> dict:
        """Method settings recorded in the artifact's meta."""
        return {}

    def finish(self, artifact: Artifact) -> Artifact:
        """Post-process the artifact (a normalisation, an unsigned convention); unchanged by default."""
        return artifact

    # --- shared -------------------------------------------------------------------------------

    def points_per_chunk(self, model: torch.nn.Module, batch: dict) -> int:
        """Gate points per trace of ``batch`` under the options' memory budget."""
        return points_per_chunk(self.options.memory_mb, model, batch) * (1 if self.backward else 3)

    def _run(self, ctx) -> Artifact:
        self.options = opts = ctx.options
        loaded = ctx.model(ctx.models[0])
        sites = sites_for(loaded, opts.target)
        objective = ctx.objective(opts.objective)
        self.setup(ctx, sites)
        # every process prepares every batch (the seeded masks agree) and attributes its share of them
        batches = list(prepared_batches(ctx, loaded, objective, opts.answer_only))
        if not batches:
            raise DataError(f"{ctx.where}: the data has no examples")
        loss_fn = loss_function(objective)
        mine = ctx.shard(batches) if self.shard_batches else list(enumerate(batches))
        parts = {index: self.attribute_batch(loaded.module, sites, batch, loss_fn)
                 for index, batch in ctx.progress(mine, desc=self.method)}
        if self.shard_batches:
            rows = [b["input_ids"].shape[0] for b in batches]
            attribution = gather_rows(ctx, parts, rows, sites, self.baseline_groups(sites))
        else:
            attribution = Attribution.concat([parts[i] for i in sorted(parts)])
        check = self.completeness(attribution) if self.has_completeness() else None
        artifact = attribution_artifact(ctx, attribution, sites, self.method, check, self.extra_meta())
        return self.finish(artifact)
