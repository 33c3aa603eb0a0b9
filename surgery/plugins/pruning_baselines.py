"""Structured pruning scores from the field, behind the ``attribute`` stage so that every ``prune``
strategy can use them: ``weight-magnitude``, ``wanda`` and ``taylor``. All are unsigned importances (larger = keep;
``magnitude`` prunes the smallest first) for attention heads or MLP neurons, the same units ``ig``
gates.

- ``weight-magnitude``: the L1 norm of a unit's input columns of the output projection (heads) or
  down projection (neurons), ``sum_{i, j in unit} |W_ij|``: the data-free classic.
- ``wanda`` (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs", structured as in
  Wanda-sp/FLAP): per weight ``|W_ij| * ||X_j||_2`` with ``X_j`` input channel j of the output
  projection (heads) or down projection (neurons) over every real token of the data; a unit's score
  sums its input channels' column ``sum_i |W_ij| ||X_j||``. No gradient; one forward pass per batch.
- ``taylor`` (Ma et al. 2023, LLM-Pruner, first-order element-wise term): per weight
  ``|w * dL/dw|`` with ``L`` the objective summed over the data (one backward per batch,
  accumulated), summed over the parameters a unit owns: for a head its query rows (and key/value
  rows when it has its own, i.e. no grouped-query sharing) and its output-projection columns, biases
  included; for a neuron its gate/up rows and down-projection column (LLM-Pruner's "sum"
  aggregation of a dependency group). At a minimum of ``L`` (e.g. ``embedding-distortion`` at the
  unmodified model) every gradient is 0 and the score says nothing: use an objective the model is
  not at the optimum of (``causal-lm``, ``masked-lm``, ``embedding-contrastive``).
"""
from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from pydantic import Field

from surgery import hookimpl
from surgery.core.artifacts import Artifact
from surgery.core.errors import DataError
from surgery.core.options import Options
from surgery.engines.attribution import AttributeOptions, input_device, loss_function, prepared_batches, sites_for
from surgery.engines.diagnostics import save_heatmap, sign_stats
from surgery.engines.gates import GateSite, _module_order, _wrapped, model_inputs
from surgery.models.adapters import AttentionSite, envoy_at, module_at, neuron_slices
from surgery.models.objectives import read_output


# --- wanda ------------------------------------------------------------------------------------

def input_square_sums(model: torch.nn.Module, sites: Sequence[GateSite], batches: Sequence[dict]) -> list[torch.Tensor]:
    """Per site, the sum over every real token of each input channel squared ``[channels]`` (float64)."""
    nm = _wrapped(model)
    order = _module_order(model)
    ordered = sorted(range(len(sites)), key=lambda i: order[sites[i].path])
    totals = [torch.zeros(s.units * s.unit_dim, dtype=torch.float64) for s in sites]
    with torch.no_grad():
        for batch in batches:
            saved = {}
            with nm.trace(**model_inputs(batch, model)):
                for i in ordered:  # nnsight serves module inputs in execution order
                    saved[i] = envoy_at(nm, sites[i].path).input.save()
            mask_bt1 = batch["attention_mask"].to(saved[ordered[0]].device)[..., None].double()
            for i, x_btc in saved.items():
                totals[i] += (x_btc.double() ** 2 * mask_bt1).sum((0, 1)).cpu()
    return totals


def wanda_scores(model: torch.nn.Module, sites: Sequence[GateSite], square_sums: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """``[sites, max units]``: per unit, ``sum_{i, j in unit} |W_ij| * ||X_j||`` (``|W_ij|`` alone when
    ``square_sums`` are None: weight magnitude)."""
    scores = torch.zeros(len(sites), max(s.units for s in sites), dtype=torch.float64)
    for l, (site, sq) in enumerate(zip(sites, square_sums)):
        module = module_at(model, site.path)
        weight = module.weight.detach().double()
        weight_oc = weight.T if type(module).__name__ == "Conv1D" else weight  # [out, in]
        per_channel = weight_oc.abs().sum(0).cpu()
        if sq is not None:
            per_channel = per_channel * sq.sqrt()
        scores[l, : site.units] = per_channel.view(site.units, site.unit_dim).sum(1)
    return scores


# --- taylor -----------------------------------------------------------------------------------

def head_slices(attn: AttentionSite) -> list[tuple[str, int, int]]:
    """``(parameter name, axis, slice width)`` per head: head h owns ``[h*width, (h+1)*width)`` on the axis.
    Query rows always; key/value rows only without grouped-query sharing; output columns."""
    d = attn.head_dim
    out = [(f"{attn.out_proj}.weight", 0 if attn.conv1d else 1, d)]
    own_kv = attn.num_kv_heads == attn.num_heads
    if attn.qkv_proj is not None:  # fused q/k/v (GPT-2 c_attn: [in, 3 * D] as Conv1D); head h in each block
        return out + [(f"{attn.qkv_proj}.{kind}", "fused", d) for kind in ("weight", "bias")]
    for path in [attn.q_proj] + ([attn.k_proj, attn.v_proj] if own_kv else []):
        out += [(f"{path}.weight", 0, d), (f"{path}.bias", 0, d)]
    return out


def taylor_head_scores(model: torch.nn.Module, attn: AttentionSite) -> torch.Tensor:
    """``[heads]``: sum of ``|w * grad|`` over each head's slices (parameters must hold ``.grad``)."""
    params = dict(model.named_parameters())
    scores = torch.zeros(attn.num_heads, dtype=torch.float64)
    for name, axis, width in head_slices(attn):
        param = params.get(name)
        if param is None or param.grad is None:
            continue
        saliency = (param.detach() * param.grad).abs().double()
        if axis == "fused":  # three blocks of heads along the output axis (Conv1D [in, 3D], Linear [3D, in])
            if saliency.dim() == 2 and not attn.conv1d:
                saliency = saliency.T
            blocks = saliency.reshape(-1, 3, attn.num_heads, width)
            scores += blocks.sum((0, 1, 3)).cpu()
            continue
        moved = saliency.movedim(axis, 0)
        scores += moved.reshape(attn.num_heads, width, -1).sum((1, 2)).cpu()
    return scores


def taylor_neuron_scores(model: torch.nn.Module, mlp: Any) -> torch.Tensor:
    """``[neurons]``: sum of ``|w * grad|`` over every slice a neuron owns."""
    params = dict(model.named_parameters())
    size = mlp.intermediate_size
    scores = torch.zeros(size, dtype=torch.float64)
    for piece in neuron_slices(model, mlp):
        param = params[piece.name]
        if param.grad is None:
            continue
        saliency = (param.detach() * param.grad).abs().double().movedim(piece.axis, 0)
        scores += saliency[piece.offset: piece.offset + size].reshape(size, -1).sum(1).cpu()
    return scores


def _owned_parameters(model: torch.nn.Module, view: Any, target: str) -> list[torch.nn.Parameter]:
    params = dict(model.named_parameters())
    names: set[str] = set()
    for layer in view.layers:
        if target == "heads":
            names.update(name for name, _, _ in head_slices(layer.attn))
        else:
            names.update(piece.name for piece in neuron_slices(model, layer.mlp))
    return [params[n] for n in sorted(names) if n in params]


def accumulate_gradients(model: torch.nn.Module, params: Sequence[torch.nn.Parameter], batches: Sequence[dict],
                         loss_fn) -> float:
    """``.grad`` of ``params`` = d(sum over samples of the objective)/dparam; returns the mean objective."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    for p in params:
        p.requires_grad_(True)
    total, count = 0.0, 0
    try:
        with torch.enable_grad():
            for batch in batches:
                loss_b = loss_fn(read_output(model(**model_inputs(batch, model)), loss_fn.output), batch)
                loss_b.sum().backward()
                total += float(loss_b.detach().double().sum())
                count += loss_b.shape[0]
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return total / max(count, 1)


# --- the plugins ------------------------------------------------------------------------------

class WandaOptions(Options):
    """Wanda and weight magnitude read no objective."""

    target: Literal["heads", "neurons"] = Field("heads", description="attention heads (output-projection input) or MLP neurons")


class TaylorOptions(AttributeOptions):
    pass


def _artifact(ctx, scores_lu: torch.Tensor, sites: Sequence[GateSite], method: str, extra: dict) -> Artifact:
    opts = ctx.options
    units = [s.units for s in sites]
    valid = torch.cat([scores_lu[l, :u] for l, u in enumerate(units)])
    meta = {"method": method, "target": opts.target, "objective": getattr(opts, "objective", None), "model": ctx.models[0],
            "units_per_layer": units, "signed": False, "convention": "unsigned: larger = more important",
            "sign_stats": sign_stats(valid), **extra}
    save_heatmap(scores_lu.float(), ctx.out_dir / "heatmap.png", f"{method} ({opts.target})")
    return Artifact(tensors={"scores": scores_lu.float()}, meta=meta,
                    figures={"score_mean": float(valid.mean()), "score_max": float(valid.max())})


def _batches(ctx, loaded, objective) -> list[dict]:
    batches = list(prepared_batches(ctx, loaded, objective, ctx.options.answer_only))
    if not batches:
        raise DataError(f"{ctx.where}: the data has no examples")
    return batches


class Wanda:
    """Wanda: |weight| x input-activation norm, summed over each head's or neuron's input columns."""

    @hookimpl
    def option_schema(self, stage: str):
        return WandaOptions if stage == "attribute" else None

    @hookimpl
    def attribute(self, ctx) -> Artifact:
        loaded = ctx.model(ctx.models[0])
        sites = sites_for(loaded, ctx.options.target)
        device = input_device(loaded.module)
        batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                   for batch in ctx.batches(loaded.tokenizer)]
        if not batches:
            raise DataError(f"{ctx.where}: the data has no examples")
        squares = input_square_sums(loaded.module, sites, ctx.progress(batches, desc="wanda"))
        tokens = int(sum(int(b["attention_mask"].sum()) for b in batches))
        return _artifact(ctx, wanda_scores(loaded.module, sites, squares), sites, "wanda", {"tokens": tokens})


class WeightMagnitude:
    """Weight magnitude: the L1 norm of each head's or neuron's input columns (no data)."""

    @hookimpl
    def option_schema(self, stage: str):
        return WandaOptions if stage == "attribute" else None

    @hookimpl
    def attribute(self, ctx) -> Artifact:
        loaded = ctx.model(ctx.models[0])
        sites = sites_for(loaded, ctx.options.target)
        return _artifact(ctx, wanda_scores(loaded.module, sites, [None] * len(sites)), sites, "weight-magnitude", {})


class Taylor:
    """LLM-Pruner's first-order Taylor importance: sum of |w * dL/dw| over the weights a unit owns."""

    @hookimpl
    def option_schema(self, stage: str):
        return TaylorOptions if stage == "attribute" else None

    @hookimpl
    def attribute(self, ctx) -> Artifact:
        opts = ctx.options
        loaded = ctx.model(ctx.models[0])
        model, view = loaded.module, loaded.view
        sites = sites_for(loaded, opts.target)
        objective = ctx.objective(opts.objective)
        batches = _batches(ctx, loaded, objective)
        params = _owned_parameters(model, view, opts.target)
        try:
            objective_value = accumulate_gradients(model, params, ctx.progress(batches, desc="taylor"), loss_function(objective))
            scores = torch.zeros(len(sites), max(s.units for s in sites), dtype=torch.float64)
            for l, layer in enumerate(view.layers):
                row = taylor_head_scores(model, layer.attn) if opts.target == "heads" else taylor_neuron_scores(model, layer.mlp)
                scores[l, : row.numel()] = row
        finally:
            for p in params:
                p.grad = None
        if float(scores.abs().max()) == 0.0:
            ctx.log(f"taylor: every gradient is 0 ({opts.objective} is at its minimum): the scores rank nothing")
        return _artifact(ctx, scores, sites, "taylor", {"objective_value": objective_value})


weight_magnitude = WeightMagnitude()
wanda = Wanda()
taylor = Taylor()
