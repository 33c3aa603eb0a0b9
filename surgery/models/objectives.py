"""Objectives: the losses that attribution, Fisher terms and probes differentiate.

An objective is an object with a ``name`` and two methods:

- ``prepare(batch, generator) -> batch``: returns a new batch dict ready for the model (e.g. with
  tokens masked and ``labels`` set on the positions the loss counts); random choices are drawn
  from ``generator`` only, so a run is reproducible from its seed. The input batch is not modified.
- ``loss(logits_btv, batch) -> loss_b``: one loss per row, the mean negative log-likelihood over
  the row's counted positions (a row with none counts 0).

Batches carry ``input_ids`` and ``attention_mask`` ``[B, T]``, optionally ``labels`` aligned with
``input_ids`` (-100 where ignored; causal objectives shift them themselves),
``special_tokens_mask`` (never masked) and ``mask_token_id`` (an int, for masking objectives).

Plugins add objectives with ``register_objectives(register)``: ``register(name, objective)``::

    from surgery.models.objectives import token_nll, row_mean

    class PlainNLL:
        name = "my-objective"
        def prepare(self, batch, generator):
            return batch
        def loss(self, logits_btv, batch):
            nll_bt, counted_bt = token_nll(logits_btv, batch["labels"])
            return row_mean(nll_bt, counted_bt)

    @hookimpl
    def register_objectives(register):
        register("my-objective", PlainNLL())
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@runtime_checkable
class Objective(Protocol):
    name: str

    def prepare(self, batch: dict, generator: torch.Generator) -> dict:
        """Return the batch the model sees (masked tokens, ``labels``); never modify ``batch``."""

    def loss(self, logits_btv: torch.Tensor, batch: dict) -> torch.Tensor:
        """Per-row loss ``[B]``: mean NLL over the row's counted positions."""


def token_nll(logits_btv: torch.Tensor, labels_bt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL ``[B, T]`` (0 where ``labels == -100``) and the counted-position mask ``[B, T]``."""
    counted_bt = labels_bt != IGNORE_INDEX
    nll_bt = F.cross_entropy(logits_btv.float().transpose(1, 2), labels_bt.masked_fill(~counted_bt, 0), reduction="none")
    return nll_bt * counted_bt, counted_bt


def row_mean(values_bt: torch.Tensor, counted_bt: torch.Tensor) -> torch.Tensor:
    """Mean of ``values_bt`` over each row's counted positions ``[B]``; 0 for a row with none."""
    return values_bt.sum(1) / counted_bt.sum(1).clamp(min=1)


def default_labels(batch: dict) -> torch.Tensor:
    """``batch["labels"]``, or ``input_ids`` with -100 on padding when the batch has none."""
    if "labels" in batch:
        return batch["labels"]
    return batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
