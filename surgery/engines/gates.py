"""Run a model under per-row unit gates through nnsight; return per-row losses and gate gradients.

A *gate site* is the input of one module (an attention output projection, an MLP down
projection) split into ``units`` equal slices of ``unit_dim`` channels (heads of ``head_dim``
channels, or single neurons). Gates ``g_s`` of shape ``[rows, units]`` multiply each slice of each
row::

    o.input = (x.view(R, T, U, d) * g_s.view(R, 1, U, 1)).view(R, T, U * d)

Rows are independent, so one trace over a batch repeated ``P`` times with a different gate value
per repeat evaluates ``P`` gate settings at once: ``d(sum_r loss_r)/d g_s[r]`` is the gradient of
row ``r``'s own loss. Integrated gradients, ablation and Shapley sampling are all built on this.

Gating a unit at 0 equals zeroing its slice of the module's input weights (columns of a Linear,
rows of a GPT-2 Conv1D); the bias, shared by all units, is untouched.
"""
from __future__ import annotations

import inspect
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from surgery.models.adapters import envoy_at

# the batch keys a Hugging Face model takes as inputs; everything else (labels, weights) is the objective's
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "pixel_values")

LossFn = Callable[[torch.Tensor, dict], torch.Tensor]  # (logits_btv, batch) -> loss_b
# a loss function with an ``output`` attribute receives that model output field instead of the logits


@dataclass(frozen=True)
class GateSite:
    """The input of module ``path`` (dotted, from the model root) seen as ``units`` x ``unit_dim``."""

    path: str
    units: int
    unit_dim: int


@dataclass
class GateResult:
    """Per-row losses ``loss_r`` and, for each site, the gradient ``[rows, units]`` (None if not gated)."""

    loss_r: torch.Tensor
    grads: list[torch.Tensor | None]


def head_sites(view: Any) -> list[GateSite]:
    """One site per layer: the attention output projection's input, split into heads."""
    return [GateSite(layer.attn.out_proj, layer.attn.num_heads, layer.attn.head_dim) for layer in view.layers]


def neuron_sites(view: Any) -> list[GateSite]:
    """One site per layer: the MLP down projection's input, one unit per neuron."""
    return [GateSite(layer.mlp.down, layer.mlp.intermediate_size, 1) for layer in view.layers]


def model_inputs(batch: dict, model: torch.nn.Module | None = None) -> dict:
    """The keys of ``batch`` that the model's forward takes (and ``use_cache=False`` where it has one:
    nothing here generates, and a key/value cache costs memory in every layer)."""
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUT_KEYS}
    if model is not None and "use_cache" in inspect.signature(model.forward).parameters:
        inputs["use_cache"] = False
    return inputs


def repeat_rows(batch: dict, times: int) -> dict:
    """Repeat every row-indexed tensor ``times`` times, point-major: row ``p * B + b`` is row ``b``."""
    rows = batch["input_ids"].shape[0]
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows:
            out[key] = value.repeat(times, *([1] * (value.dim() - 1)))
        else:
            out[key] = value
    return out


def gated_losses(model: torch.nn.Module, sites: Sequence[GateSite], batch: dict,
                 gates: Sequence[torch.Tensor | None], loss_fn: LossFn) -> torch.Tensor:
    """Per-row losses ``[rows]`` with each site's units scaled by ``gates[s]`` ``[rows, units]``."""
    with torch.no_grad():
        return _run(model, sites, batch, list(gates), loss_fn)


def gate_gradients(model: torch.nn.Module, sites: Sequence[GateSite], batch: dict,
                   gates: Sequence[torch.Tensor | None], loss_fn: LossFn) -> GateResult:
    """Per-row losses and ``d loss_r / d gates[s][r]`` for every gated site, in one forward/backward.

    Parameters get no gradients (they are frozen for the call), so the backward pass computes
    only what the gate gradients need.
    """
    leaves = [None if g is None else g.detach().clone().requires_grad_(True) for g in gates]
    with _frozen(model), torch.enable_grad():
        loss_r = _run(model, sites, batch, leaves, loss_fn)
        used = [g for g in leaves if g is not None]
        grads = torch.autograd.grad(loss_r.sum(), used, allow_unused=True) if used else ()
    it = iter(grads)
    out = []
    for g in leaves:
        if g is None:
            out.append(None)
            continue
        grad = next(it)
        out.append(torch.zeros_like(g) if grad is None else grad.detach())
    return GateResult(loss_r.detach(), out)


def _run(model: torch.nn.Module, sites: Sequence[GateSite], batch: dict,
         gates: list[torch.Tensor | None], loss_fn: LossFn) -> torch.Tensor:
    if len(gates) != len(sites):
        raise ValueError(f"{len(gates)} gate tensors for {len(sites)} sites")
    nm = _wrapped(model)
    order = _module_order(model)
    gated = sorted((order[site.path], i) for i, (site, gate) in enumerate(zip(sites, gates)) if gate is not None)
    with nm.trace(**model_inputs(batch, model)):
        for _, i in gated:  # nnsight serves module inputs in execution order
            site, gate, envoy = sites[i], gates[i], envoy_at(nm, sites[i].path)
            x_rtd = envoy.input
            rows, tokens = x_rtd.shape[0], x_rtd.shape[1]
            g = gate.to(x_rtd.dtype).view(rows, 1, site.units, 1)
            envoy.input = (x_rtd.view(rows, tokens, site.units, site.unit_dim) * g).view(x_rtd.shape)
        output_bt = getattr(nm.output, getattr(loss_fn, "output", "logits")).save()
    return loss_fn(output_bt, batch)


def evaluate_points(model: torch.nn.Module, sites: Sequence[GateSite], batch: dict,
                    gates_p: Sequence[torch.Tensor], loss_fn: LossFn, points_per_chunk: int,
                    grad_sites_ps: torch.Tensor | None = None) -> Iterator[PointChunk]:
    """Evaluate ``P`` gate settings of one batch of ``B`` rows, many settings per trace.

    ``gates_p[s]`` is ``[P, units_s]``: site ``s``'s gates at point ``p`` (the same for every row).
    Points are laid along the batch dimension (``points_per_chunk`` at a time, ``B`` rows each).
    With ``grad_sites_ps`` (bool ``[P, sites]``: where gradients are wanted) each chunk also
    returns gate gradients; without it the chunk runs under ``no_grad``. A site is left out of a
    chunk's trace when its gates are all 1 there and no gradient is wanted from it.
    """
    rows = batch["input_ids"].shape[0]
    points = gates_p[0].shape[0]
    step = max(1, points_per_chunk)
    for start in range(0, points, step):
        stop = min(points, start + step)
        chunk = [g[start:stop] for g in gates_p]
        active = [bool((g != 1).any()) for g in chunk]
        if grad_sites_ps is not None:
            wanted = grad_sites_ps[start:stop].any(dim=0).tolist()
            active = [a or w for a, w in zip(active, wanted)]
        device = batch["input_ids"].device
        gates = [g.repeat_interleave(rows, dim=0).to(device) if a else None for g, a in zip(chunk, active)]
        batch_r = repeat_rows(batch, stop - start)
        n = stop - start
        if grad_sites_ps is None:
            loss_r = gated_losses(model, sites, batch_r, gates, loss_fn)
            yield PointChunk(start, stop, loss_r.view(n, rows).cpu(), [None] * len(sites))
            continue
        result = gate_gradients(model, sites, batch_r, gates, loss_fn)
        grads = [None if g is None else g.view(n, rows, -1).cpu() for g in result.grads]
        yield PointChunk(start, stop, result.loss_r.view(n, rows).cpu(), grads)


@dataclass
class PointChunk:
    """Points ``start..stop`` of an :func:`evaluate_points` call: losses ``[n, B]``, grads ``[n, B, units]``
    (on the CPU, whatever the model's device)."""

    start: int
    stop: int
    loss_nb: torch.Tensor
    grads_nbu: list[torch.Tensor | None]


_WRAPPED: "weakref.WeakKeyDictionary[torch.nn.Module, Any]" = weakref.WeakKeyDictionary()


_ORDER: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, int]]" = weakref.WeakKeyDictionary()


def _module_order(model: torch.nn.Module) -> dict[str, int]:
    """Module path -> registration index, which for transformer blocks is their execution order."""
    if model not in _ORDER:
        _ORDER[model] = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return _ORDER[model]


def _wrapped(model: torch.nn.Module) -> Any:
    if model not in _WRAPPED:
        with warnings.catch_warnings():  # BERT's `output` children: adapters.envoy_at knows them as E_output
            warnings.filterwarnings("ignore", message=".*has a submodule named 'output'")
            import nnsight  # imported on first use: loading every plugin should not pay for it

            _WRAPPED[model] = nnsight.NNsight(model)
    return _WRAPPED[model]


@contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def rows_per_chunk(memory_mb: float, tokens: int, layers: int, hidden: int, ffn: int, heads: int,
                   vocab: int, bytes_per_value: int = 4) -> int:
    """How many rows of ``tokens`` tokens fit a forward+backward in ``memory_mb`` (a rough estimate).

    Per token and layer we count what autograd keeps: about 12 hidden-sized tensors (norms,
    projections, residuals), 3 MLP-sized ones and the attention probabilities (``heads * tokens``);
    per token at the top, 3 vocabulary-sized tensors (logits, log-softmax, gradient).
    """
    per_token = layers * (12 * hidden + 3 * ffn + 2 * heads * tokens) + 3 * vocab
    per_row = max(1, tokens * per_token * bytes_per_value)
    return max(1, int(memory_mb * 2**20 // per_row))


def gated_forward(model: torch.nn.Module, sites: Sequence[GateSite], batch: dict,
                  gates: Sequence[torch.Tensor | None], loss_fn: LossFn) -> torch.Tensor:
    """Per-row losses ``[rows]``, differentiable in ``gates`` (a function of the gates for attribution
    libraries such as captum); call it under :func:`frozen_parameters` so parameters get no gradients."""
    return _run(model, sites, batch, list(gates), loss_fn)


frozen_parameters = _frozen
