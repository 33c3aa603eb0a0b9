"""Integrated gradients over head (or neuron) gates: the ``ig`` attribute plugin (DESIGN §2.4).

Gates ``alpha_{l,h}`` scale each head's slice of the attention output projection's input
(:mod:`surgery.engines.gates`). With a baseline ``b`` (0 = head off, a scalar, or a random value per head)
and quadrature nodes/weights ``(t_k, w_k)`` on [0, 1]:

- per-layer: for each layer l, ``alpha_l(t) = b + t (1 - b)`` with every other layer at 1;
  ``IG_{l,h} = (1 - b) sum_k w_k dL/dalpha_{l,h}(t_k)``.
  Completeness per layer: ``sum_h IG_{l,h} = L(alpha = 1) - L(alpha_l = b)``.
- joint: every gate moves together, ``alpha_l(t) = b + s_l(t) (1 - b)`` with ``s_l(t) = t``, or with
  the per-layer schedule ``s_l(t) = t^(1 + l/L)`` (seed 004's fix);
  ``IG_{l,h} = (1 - b) sum_k w_k s_l'(t_k) dL/dalpha_{l,h}(t_k)`` (chain rule).
  Completeness: ``sum_{l,h} IG_{l,h} = L(1) - L(b)``.

``L`` is the objective's per-sample loss; the scores are the mean over samples of per-sample IG.
Sign convention: IG < 0 means the head lowers the loss (it is useful). The integration points of
one batch run along the batch dimension, as many per trace as the memory budget allows.
Under data parallelism (``surgery run --nproc N``) each process attributes its share of the batches
and the per-sample rows are summed into place over processes, so every output is the 1-process one.
"""
from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import torch
from pydantic import Field, model_validator

from surgery.engines.attribution import (
    AttributeOptions, Attribution, GateAttribution, baseline_values, completeness, zero_rows
)
from surgery.engines.gates import GateSite, LossFn, evaluate_points

QUADRATURES = ("riemann-left", "riemann-right", "riemann-middle", "trapezoid", "gauss-legendre")
Quadrature = Literal["riemann-left", "riemann-right", "riemann-middle", "trapezoid", "gauss-legendre"]


# --- quadrature and baselines -------------------------------------------------------------------

def quadrature(rule: str, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes ``t_k`` and weights ``w_k`` (float64, ``[steps]``) integrating over [0, 1]."""
    if steps < 1 or (rule == "trapezoid" and steps < 2):
        raise ValueError(f"{rule} needs more steps than {steps}")
    k = torch.arange(steps, dtype=torch.float64)
    if rule == "riemann-left":
        return k / steps, torch.full((steps,), 1.0 / steps, dtype=torch.float64)
    if rule == "riemann-right":
        return (k + 1) / steps, torch.full((steps,), 1.0 / steps, dtype=torch.float64)
    if rule == "riemann-middle":
        return (k + 0.5) / steps, torch.full((steps,), 1.0 / steps, dtype=torch.float64)
    if rule == "trapezoid":
        w = torch.full((steps,), 1.0 / (steps - 1), dtype=torch.float64)
        w[0] = w[-1] = 0.5 / (steps - 1)
        return k / (steps - 1), w
    if rule == "gauss-legendre":
        x, w = np.polynomial.legendre.leggauss(steps)
        return torch.from_numpy((x + 1) / 2), torch.from_numpy(w / 2)
    raise ValueError(f"unknown quadrature {rule!r}; choose from {', '.join(QUADRATURES)}")


def schedule_exponents(schedule: str, layers: int) -> torch.Tensor:
    """``lambda_l`` of ``s_l(t) = t^(1 + lambda_l)``: 0 everywhere (linear) or ``l / L`` (per-layer)."""
    if schedule == "linear":
        return torch.zeros(layers, dtype=torch.float64)
    if schedule == "per-layer":
        return torch.arange(layers, dtype=torch.float64) / layers
    raise ValueError(f"unknown schedule {schedule!r}")


# --- integrated gradients on one batch --------------------------------------------------------


def ig_per_layer(model: torch.nn.Module, sites: Sequence[GateSite], batch: dict, loss_fn: LossFn,
                 base: Sequence[torch.Tensor], t_k: torch.Tensor, w_k: torch.Tensor,
                 points_per_chunk: int) -> Attribution:
    """Per-layer IG of one batch. Each layer's nodes are batched in chunks of their own, so a chunk
    gates one layer and its backward pass stops at that layer."""
    acc = zero_rows(sites, batch)
    for l, site in enumerate(sites):
        gates_p = [torch.ones(len(t_k), s.units, dtype=torch.float64) for s in sites]
        gates_p[l] = base[l] + t_k[:, None] * (1 - base[l])
        grad_sites = torch.zeros(len(t_k), len(sites), dtype=torch.bool)
        grad_sites[:, l] = True
        for chunk in evaluate_points(model, sites, batch, _cast(gates_p), loss_fn, points_per_chunk, grad_sites):
            grads_nbu = chunk.grads_nbu[l].double()
            weights_n = w_k[chunk.start:chunk.stop, None, None]
            acc[:, l, : site.units] += (weights_n * grads_nbu).sum(0) * (1 - base[l])
    loss_full, loss_base = _endpoint_losses(model, sites, batch, loss_fn, base, points_per_chunk, per_layer=True)
    return Attribution(acc, loss_full, loss_base)


def ig_joint(model: torch.nn.Module, sites: Sequence[GateSite], batch: dict, loss_fn: LossFn,
             base: Sequence[torch.Tensor], t_k: torch.Tensor, w_k: torch.Tensor,
             points_per_chunk: int, schedule: str = "linear") -> Attribution:
    """Joint IG of one batch: all gates move together along ``s_l(t)``; one point per node."""
    lam = schedule_exponents(schedule, len(sites))
    s_kl = t_k[:, None] ** (1 + lam[None, :])
    ds_kl = (1 + lam[None, :]) * t_k[:, None] ** lam[None, :]
    gates_p = [base[l] + s_kl[:, l, None] * (1 - base[l]) for l in range(len(sites))]
    grad_sites = torch.ones(len(t_k), len(sites), dtype=torch.bool)
    acc = zero_rows(sites, batch)
    for chunk in evaluate_points(model, sites, batch, _cast(gates_p), loss_fn, points_per_chunk, grad_sites):
        for l, site in enumerate(sites):
            weights_n = (w_k * ds_kl[:, l])[chunk.start:chunk.stop, None, None]
            acc[:, l, : site.units] += (weights_n * chunk.grads_nbu[l].double()).sum(0) * (1 - base[l])
    loss_full, loss_base = _endpoint_losses(model, sites, batch, loss_fn, base, points_per_chunk, per_layer=False)
    return Attribution(acc, loss_full, loss_base)


def _endpoint_losses(model, sites, batch, loss_fn, base, points_per_chunk, per_layer: bool):
    """L(1) ``[B]`` and L(b) ``[B, sites]`` (per-layer) or ``[B, 1]`` (joint), batched, no grad."""
    n_sites = len(sites)
    extra = n_sites if per_layer else 1
    gates_p = [torch.ones(1 + extra, s.units, dtype=torch.float64) for s in sites]
    for l in range(n_sites):
        gates_p[l][1 + l if per_layer else 1] = base[l]
    losses = [c.loss_nb for c in evaluate_points(model, sites, batch, _cast(gates_p), loss_fn, points_per_chunk)]
    loss_pb = torch.cat(losses).double()
    return loss_pb[0], loss_pb[1:].T.contiguous()


def _cast(gates_p: list[torch.Tensor]) -> list[torch.Tensor]:
    return [g.float() for g in gates_p]


# --- options ---------------------------------------------------------------------------------


class IGOptions(AttributeOptions):
    mode: Literal["per-layer", "joint"] = Field("per-layer", description="integrate one layer at a time, or all gates together")
    baseline: Literal["zero", "scalar", "random"] = Field("zero", description="gate value at t=0: 0, `value`, or U(0,1) per unit")
    value: float = Field(0.3, ge=0, lt=1, description="the scalar baseline")
    baseline_seed: int | None = Field(None, description="seed of the random baseline (default: the recipe seed)")
    quadrature: Quadrature = Field("gauss-legendre", description="integration rule on [0, 1]")
    steps: int = Field(16, ge=1, le=4096, description="number of integration points")
    schedule: Literal["linear", "per-layer"] = Field("linear", description="joint mode: s_l(t) = t, or t^(1 + l/L)")

    @model_validator(mode="after")
    def _check(self) -> "IGOptions":
        if self.quadrature == "trapezoid" and self.steps < 2:
            raise ValueError("trapezoid needs steps >= 2")
        if self.schedule == "per-layer" and self.mode != "joint":
            raise ValueError("schedule: per-layer applies to mode: joint only")
        return self


# --- the plugin -------------------------------------------------------------------------------

class IG(GateAttribution):
    """Integrated gradients of an objective over head (or neuron) gates, per layer or joint."""

    method = "ig"
    Options = IGOptions

    def setup(self, ctx, sites: Sequence[GateSite]) -> None:
        opts = self.options
        seed = ctx.seed if opts.baseline_seed is None else opts.baseline_seed
        self.base = baseline_values(opts.baseline, sites, opts.value, seed)
        self.t_k, self.w_k = quadrature(opts.quadrature, opts.steps)

    def attribute_batch(self, model: torch.nn.Module, sites: Sequence[GateSite], batch: dict,
                        loss_fn: LossFn) -> Attribution:
        args = (model, sites, batch, loss_fn, self.base, self.t_k, self.w_k, self.points_per_chunk(model, batch))
        if self.options.mode == "per-layer":
            return ig_per_layer(*args)
        return ig_joint(*args, schedule=self.options.schedule)

    def baseline_groups(self, sites: Sequence[GateSite]) -> int:
        return len(sites) if self.options.mode == "per-layer" else 1

    def has_completeness(self) -> bool:
        return True

    def completeness(self, attribution: Attribution) -> dict:
        return completeness(attribution, per_layer=self.options.mode == "per-layer")

    def extra_meta(self) -> dict:
        opts = self.options
        return {"mode": opts.mode, "baseline": opts.baseline, "quadrature": opts.quadrature, "steps": opts.steps,
                "schedule": opts.schedule, "baseline_values": [b.tolist() for b in self.base]}


ig = IG()
