"""Built-in objectives: ``causal-lm``, ``masked-lm``, ``masked-diffusion`` and ``embedding-distortion``.

- ``causal-lm``: next-token NLL, ``labels`` shifted by one, averaged over the row's counted
  positions (``labels != -100``; without ``labels``, every real token).
- ``masked-lm``: each maskable token (real, counted by ``labels`` when given, not in
  ``special_tokens_mask``) is replaced by the mask token with probability ``mask_prob`` (0.15;
  always the mask token, no 80/10/10 split); a row with maskable tokens gets at least one. NLL of
  the original tokens at the masked positions, averaged per row.
- ``masked-diffusion`` (LLaDA/Dream): per row a mask ratio ``t ~ U(min_ratio, 1]`` (``min_ratio`` =
  1e-3 as in LLaDA, keeping the 1/t weight finite), each maskable token masked with probability t;
  ``loss_b = (1/t_b) * sum_{masked} NLL / n_b`` with n_b the row's maskable-token count: an unbiased
  estimate of the diffusion ELBO term, to be used with a bidirectional model.

- ``embedding-distortion`` (embedding models, e.g. sentence-transformers MiniLM): ``1 - cos(e, e_ref)``
  per row, with ``e`` the pooled final hidden states of the (gated, pruned) model and ``e_ref`` the
  unmodified model's, pooled as the checkpoint implies (:func:`surgery.embeddings.pooling_mode`;
  mean over real tokens for MiniLM). 0 when nothing changed; reads ``last_hidden_state``.

- ``embedding-contrastive``: the in-batch contrastive loss sentence-transformers models are trained
  with (MultipleNegativesRankingLoss, symmetric): rows come in (query, document) pairs, rows 2k and
  2k+1 (data source ``stdlib-pairs``); with ``s_kj = cos(q_k, d_j) / temperature`` (0.05) a query
  row's loss is ``-log softmax_j(s_kj)[k]`` and a document row's ``-log softmax_j(s_jk)[k]``. Rows of
  one batch repeated for several gate settings (point-major) are contrasted within their own copy.

The mask token id comes from ``batch["mask_token_id"]`` (data loaders set it from the tokenizer);
an objective built with ``MaskedLM(mask_token_id=...)`` uses its own id when the batch has none.
``prepare`` also records ``mask_ratio`` ``[B]`` and ``num_tokens`` ``[B]`` (masked-diffusion).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from surgery import hookimpl
from surgery.core.errors import DataError
from surgery.engines.gates import model_inputs
from surgery.models.embeddings import HIDDEN, pool, pooling_mode
from surgery.models.objectives import IGNORE_INDEX, default_labels, read_output, row_mean, token_nll


@hookimpl
def register_objectives(register: Callable[..., None]) -> None:
    register("causal-lm", CausalLM())
    register("masked-lm", MaskedLM())
    register("masked-diffusion", MaskedDiffusion())
    register("embedding-distortion", EmbeddingDistortion())
    register("embedding-contrastive", EmbeddingContrastive())


@dataclass(frozen=True)
class CausalLM:
    name: str = "causal-lm"

    def prepare(self, batch: dict, generator: torch.Generator) -> dict:
        return {**batch, "labels": default_labels(batch)}

    def loss(self, logits_btv: torch.Tensor, batch: dict) -> torch.Tensor:
        labels_bt = default_labels(batch)[:, 1:]
        nll_bt, counted_bt = token_nll(logits_btv[:, :-1], labels_bt)
        return row_mean(nll_bt, counted_bt)


@dataclass(frozen=True)
class MaskedLM:
    name: str = "masked-lm"
    mask_prob: float = 0.15
    mask_token_id: int | None = None

    def prepare(self, batch: dict, generator: torch.Generator) -> dict:
        maskable_bt = maskable(batch)
        draw_bt = _uniform(maskable_bt.shape, generator, maskable_bt.device)
        masked_bt = maskable_bt & (draw_bt < self.mask_prob)
        masked_bt |= _at_least_one(maskable_bt, masked_bt, draw_bt)
        return _apply_mask(batch, masked_bt, mask_id(batch, self.mask_token_id, self.name))

    def loss(self, logits_btv: torch.Tensor, batch: dict) -> torch.Tensor:
        nll_bt, counted_bt = token_nll(logits_btv, batch["labels"])
        return row_mean(nll_bt, counted_bt)


@dataclass(frozen=True)
class MaskedDiffusion:
    name: str = "masked-diffusion"
    min_ratio: float = 1e-3
    mask_token_id: int | None = None

    def prepare(self, batch: dict, generator: torch.Generator) -> dict:
        maskable_bt = maskable(batch)
        rows = maskable_bt.shape[0]
        t_b = 1.0 - _uniform((rows,), generator, maskable_bt.device)  # U(0, 1]
        t_b = self.min_ratio + (1.0 - self.min_ratio) * t_b
        masked_bt = maskable_bt & (_uniform(maskable_bt.shape, generator, maskable_bt.device) < t_b[:, None])
        prepared = _apply_mask(batch, masked_bt, mask_id(batch, self.mask_token_id, self.name))
        return {**prepared, "mask_ratio": t_b, "num_tokens": maskable_bt.sum(1)}

    def loss(self, logits_btv: torch.Tensor, batch: dict) -> torch.Tensor:
        nll_bt, _ = token_nll(logits_btv, batch["labels"])
        return nll_bt.sum(1) / (batch["mask_ratio"] * batch["num_tokens"].clamp(min=1))


@dataclass(frozen=True)
class EmbeddingDistortion:
    name: str = "embedding-distortion"
    output: str = HIDDEN

    def prepare(self, batch: dict, generator: torch.Generator) -> dict:
        return dict(batch)

    def reference(self, model: torch.nn.Module, batch: dict, directory=None) -> dict:
        mode = pooling_mode(directory, model)
        with torch.no_grad():
            hidden_btd = read_output(model(**model_inputs(batch, model)), self.output)
        return {"reference_bd": pool(hidden_btd, batch["attention_mask"], mode).detach(), "pooling": mode}

    def loss(self, hidden_btd: torch.Tensor, batch: dict) -> torch.Tensor:
        if "reference_bd" not in batch:
            raise DataError(f"objective {self.name!r} needs the unmodified model's embeddings "
                            f"(the batch has no 'reference_bd'; prepare it with surgery.objectives.with_reference)")
        e_bd = pool(hidden_btd, batch["attention_mask"], batch["pooling"])
        reference_bd = batch["reference_bd"].to(e_bd.device).float()
        return 1.0 - F.cosine_similarity(e_bd, reference_bd, dim=-1, eps=1e-12)


@dataclass(frozen=True)
class EmbeddingContrastive:
    name: str = "embedding-contrastive"
    output: str = HIDDEN
    temperature: float = 0.05

    def prepare(self, batch: dict, generator: torch.Generator) -> dict:
        rows = batch["input_ids"].shape[0]
        if rows % 2:
            raise DataError(f"objective {self.name!r} needs (query, document) row pairs: a batch has {rows} rows; "
                            f"keep batch_size and max_samples even")
        return {**batch, "row_index": torch.arange(rows)}

    def reference(self, model: torch.nn.Module, batch: dict, directory=None) -> dict:
        return {"pooling": pooling_mode(directory, model)}

    def loss(self, hidden_btd: torch.Tensor, batch: dict) -> torch.Tensor:
        rows = int(batch["row_index"].max()) + 1
        e_rd = F.normalize(pool(hidden_btd, batch["attention_mask"], batch["pooling"]), dim=-1)
        e_pkd = e_rd.view(-1, rows // 2, 2, e_rd.shape[-1])  # [copies, pairs, (query, document), D]
        sim_pkj = e_pkd[:, :, 0] @ e_pkd[:, :, 1].transpose(1, 2) / self.temperature
        query_pk = -sim_pkj.log_softmax(-1).diagonal(dim1=1, dim2=2)
        document_pk = -sim_pkj.log_softmax(1).diagonal(dim1=1, dim2=2)
        return torch.stack([query_pk, document_pk], dim=-1).reshape(-1)


def maskable(batch: dict) -> torch.Tensor:
    """Positions a masking objective may mask ``[B, T]``: real, counted, not special tokens."""
    maskable_bt = (batch["attention_mask"] != 0) & (default_labels(batch) != IGNORE_INDEX)
    if "special_tokens_mask" in batch:
        maskable_bt &= batch["special_tokens_mask"] == 0
    return maskable_bt


def mask_id(batch: dict, default: int | None, objective: str) -> int:
    value = batch.get("mask_token_id", default)
    if value is None:
        raise DataError(f"objective {objective!r} needs a mask token: the batch has no 'mask_token_id' "
                        f"(the tokenizer defines no mask token)")
    return int(value)


def _uniform(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _at_least_one(maskable_bt: torch.Tensor, masked_bt: torch.Tensor, draw_bt: torch.Tensor) -> torch.Tensor:
    """Mask the lowest-draw maskable token of rows that would otherwise have none masked."""
    empty_b = maskable_bt.any(1) & ~masked_bt.any(1)
    first_b = draw_bt.masked_fill(~maskable_bt, 2.0).argmin(1)
    extra_bt = torch.zeros_like(masked_bt)
    extra_bt[empty_b, first_b[empty_b]] = True
    return extra_bt


def _apply_mask(batch: dict, masked_bt: torch.Tensor, token_id: int) -> dict:
    input_ids = batch["input_ids"]
    return {**batch, "input_ids": input_ids.masked_fill(masked_bt, token_id),
            "labels": input_ids.masked_fill(~masked_bt, IGNORE_INDEX)}
