"""What every gate-attribution method shares: options, sites, batches, memory budget, artifact.

An attribute plugin (``ig``, ``grad-x-act``, ``ablation``, ``shapley``, third-party ones) computes
per-sample scores ``[B, sites, units]`` for each batch; this module prepares those batches, sizes the
point chunks to the memory budget, gathers rows over data-parallel processes, and writes the common
artifact (``scores`` ``[layers, units]`` with NaN padding, sign statistics, a heatmap) that
``prune``, ``report`` and ``compare`` read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import numpy as np
import torch
from pydantic import Field, ValidationInfo, field_validator

from surgery.core.artifacts import Artifact
from surgery.core.errors import SurgeryError
from surgery.core.options import Options
from surgery.engines.diagnostics import save_heatmap, sign_stats
from surgery.engines.gates import GateSite, LossFn, head_sites, neuron_sites, rows_per_chunk
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
                per_layer: bool) -> Attribution:
    """All batches' per-sample rows in data order. Each data-parallel process fills the rows of its
    own batches in zero tensors and the all-reduced sum fills the rest (exact: one non-zero term)."""
    n = sum(rows_per_batch)
    full = Attribution(torch.zeros(n, len(sites), max(s.units for s in sites), dtype=torch.float64),
                       torch.zeros(n, dtype=torch.float64), torch.zeros(n, len(sites) if per_layer else 1, dtype=torch.float64))
    starts = np.cumsum([0, *rows_per_batch])
    for index, part in parts.items():
        for field in ("per_sample", "loss_full", "loss_base"):
            getattr(full, field)[starts[index]:starts[index + 1]] = getattr(part, field).cpu()
    ctx.all_reduce({"per_sample": full.per_sample, "loss_full": full.loss_full, "loss_base": full.loss_base})
    return full


def loss_function(objective) -> LossFn:
    return ObjectiveLoss(objective)
