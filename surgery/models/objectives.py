"""Objectives: the losses that attribution, Fisher terms and probes differentiate.

An objective is an object with a ``name`` and two methods:

- ``prepare(batch, generator) -> batch``: returns a new batch dict ready for the model (e.g. with
  tokens masked and ``labels`` set on the positions the loss counts); random choices are drawn
  from ``generator`` only, so a run is reproducible from its seed. The input batch is not modified.
- ``loss(logits_btv, batch) -> loss_b``: one loss per row, the mean negative log-likelihood over
  the row's counted positions (a row with none counts 0).

Two optional attributes widen this to models without an LM head:

- ``output`` (default ``"logits"``): the field of the model's output that ``loss`` receives in place
  of the logits (``"last_hidden_state"`` for a bare encoder). Recipes are checked against it before
  anything loads (:mod:`surgery.embeddings`: a model/objective mismatch is a validation error).
- ``reference(model, batch, directory) -> dict``: extra batch entries computed once from the
  unmodified model (e.g. its embeddings, which a distortion objective compares the gated model's
  to); callers merge them into the prepared batch before any gate or prune touches the model.

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

from typing import TYPE_CHECKING, Protocol, runtime_checkable
from surgery.core.lazy import lazy

if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F
else:
    torch = lazy("torch")  # imported on first use: validating a recipe needs no torch
    F = lazy("torch.nn.functional")


from surgery.core.errors import ModelError

IGNORE_INDEX = -100
NLL_BLOCK = 256  # entries per float32 partial sum in flat_nll


@runtime_checkable
class Objective(Protocol):
    name: str

    def prepare(self, batch: dict, generator: torch.Generator) -> dict:
        """Return the batch the model sees (masked tokens, ``labels``); never modify ``batch``."""

    def loss(self, logits_btv: torch.Tensor, batch: dict) -> torch.Tensor:
        """Per-row loss ``[B]``: mean NLL over the row's counted positions."""


class ObjectiveLoss:
    """``objective.loss`` as a loss function that also names the model output it reads."""

    def __init__(self, objective: Objective) -> None:
        self.objective = objective
        self.output = output_field(objective)

    def __call__(self, output_bt: torch.Tensor, batch: dict) -> torch.Tensor:
        return self.objective.loss(output_bt, batch)


def output_field(objective: Objective) -> str:
    """The model output field the objective's loss reads (``logits`` unless it says otherwise)."""
    return getattr(objective, "output", "logits")


def read_output(model_output, field: str) -> torch.Tensor:
    """``model_output.<field>``; a one-line error when the model does not return it."""
    value = getattr(model_output, field, None)
    if value is None:
        raise ModelError(f"the model ({type(model_output).__name__}) returns no {field!r}; "
                          f"pick an objective that reads what it returns")
    return value


def with_reference(objective: Objective, model: torch.nn.Module, batch: dict, directory=None) -> dict:
    """The prepared batch plus the objective's reference entries from ``model`` (if it has any)."""
    reference = getattr(objective, "reference", None)
    return batch if reference is None else {**batch, **reference(model, batch, directory)}


def token_nll(logits_btv: torch.Tensor, labels_bt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL ``[B, T]`` (0 where ``labels == -100``) and the counted-position mask ``[B, T]``."""
    counted_bt = labels_bt != IGNORE_INDEX
    nll_n = flat_nll(logits_btv.flatten(0, 1), labels_bt.masked_fill(~counted_bt, 0).flatten())
    return nll_n.view(labels_bt.shape) * counted_bt, counted_bt


def flat_nll(logits_nv: torch.Tensor, labels_n: torch.Tensor) -> torch.Tensor:
    """``-log softmax(logits)[label]`` per row of a flat ``[N, V]`` layout, float32 out.

    ``logsumexp`` over a large vocabulary loses precision in float32 when the sum of ``exp`` runs
    along one long accumulator (F.cross_entropy over a strided ``[B, V, T]`` view errs up to 3e-4
    per token on a 49k vocabulary, the flat layout ~5e-5 on peaked logits). Here ``exp(z - max)``
    is summed in blocks of ``NLL_BLOCK`` entries and the block sums in float64: per-token relative
    error ~1e-7 against a float64 oracle, at ~1.5x the time of F.cross_entropy.
    """
    z_nv = logits_nv.float()
    max_n1 = z_nv.detach().amax(-1, keepdim=True)
    exp_nv = torch.exp(z_nv - max_n1)
    pad = (-exp_nv.shape[-1]) % NLL_BLOCK
    if pad:
        exp_nv = F.pad(exp_nv, (0, pad))
    sum_n = exp_nv.view(exp_nv.shape[0], -1, NLL_BLOCK).sum(-1).sum(-1, dtype=torch.float64)
    picked_n = z_nv.gather(-1, labels_n[:, None])[:, 0]
    return (max_n1[:, 0].double() + sum_n.log() - picked_n.double()).float()


def row_mean(values_bt: torch.Tensor, counted_bt: torch.Tensor) -> torch.Tensor:
    """Mean of ``values_bt`` over each row's counted positions ``[B]``; 0 for a row with none."""
    return values_bt.sum(1) / counted_bt.sum(1).clamp(min=1)


def default_labels(batch: dict) -> torch.Tensor:
    """``batch["labels"]``, or ``input_ids`` with -100 on padding when the batch has none."""
    if "labels" in batch:
        return batch["labels"]
    return batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
