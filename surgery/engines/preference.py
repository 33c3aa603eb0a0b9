"""Preference-optimisation math: per-token log-probabilities, drift constraints and losses (DESIGN §2.6).

Shapes: B rows, T positions, V vocabulary, F SAE features. A *response mask* ``[B, T]`` marks the
tokens being scored (the answer of a prompt/answer pair). For a causal LM the logits at position
t - 1 predict token t, so per-token quantities live on the shifted grid ``[B, T - 1]``.

Constraints (each ``[B]``, 0 when the policy equals the reference):

- SeqKL (TDPO): ``sum_t KL(p_ref,t || p_theta,t)`` over the response's predicting positions. Its
  gradient w.r.t. the policy logits is ``p_theta - p_ref`` and its Hessian at the reference is
  ``diag(p) - p p^T`` (seed 002).
- FPO: SAE features pooled over the response's real tokens (sum divided by the number of real
  tokens, never by the padded length), ``I = topk(policy) U topk(reference)``, then the mean squared
  difference over I.
- logit MSE: mean over the response's predicting positions of ``mean_v (z_theta - z_ref)^2``, with
  each position's logits centred first (softmax ignores a constant shift).

Losses (each ``[B]``; ``logratio = sum_t log p_theta - log p_ref`` over the response, ``avg`` the
same divided by the response length):

- dpo:   ``-log sig(beta (logratio_w - logratio_l))``
- simpo: ``-log sig(beta (avg_logp_w - avg_logp_l) - gamma)``  (no reference)
- tdpo1: ``-log sig(beta ((logratio_w - logratio_l) - (SeqKL_l - SeqKL_w)))``
- tdpo2: ``-log sig(beta ((logratio_w - logratio_l) - alpha (SeqKL_l - sg(SeqKL_w))))``
- fpo:   ``-log sig(beta ((avg_logratio_w - avg_logratio_l) - alpha (C_l - sg(C_w))))``, C the
  FPO constraint; beta 0.1, alpha 0.5 by default.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("dpo", "simpo", "tdpo1", "tdpo2", "fpo")
DEFAULT_BETA = {"dpo": 0.1, "simpo": 2.0, "tdpo1": 0.1, "tdpo2": 0.1, "fpo": 0.1}


# --- per-token quantities ----------------------------------------------------------------------

def shifted_mask(input_ids_bt: torch.Tensor, attention_bt: torch.Tensor, response_bt: torch.Tensor | None) -> torch.Tensor:
    """``[B, T-1]`` bool: position t-1 predicts a real response token t."""
    keep_bt = attention_bt.bool()
    if response_bt is not None:
        keep_bt = keep_bt & response_bt.bool()
    return keep_bt[:, 1:]


def token_logps(logits_btv: torch.Tensor, input_ids_bt: torch.Tensor) -> torch.Tensor:
    """``log p(token t | < t)`` on the shifted grid ``[B, T-1]`` (float32)."""
    logp_btv = F.log_softmax(logits_btv[:, :-1].float(), dim=-1)
    return logp_btv.gather(-1, input_ids_bt[:, 1:, None].to(logp_btv.device)).squeeze(-1)


def sequence_logps(logits_btv: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum of response log-probs [B], response length [B])`` of a causal-LM batch."""
    mask_bt = shifted_mask(batch["input_ids"], batch["attention_mask"], batch.get("answer_mask")).to(logits_btv.device)
    logp_bt = token_logps(logits_btv, batch["input_ids"])
    return (logp_bt * mask_bt).sum(-1), mask_bt.sum(-1).float()


def kl_per_position(policy_logits_btv: torch.Tensor, reference_logits_btv: torch.Tensor) -> torch.Tensor:
    """``KL(p_ref || p_theta)`` at every position ``[B, T]``, in float32 from log-softmaxes."""
    logp = F.log_softmax(policy_logits_btv.float(), dim=-1)
    logq = F.log_softmax(reference_logits_btv.float(), dim=-1)
    return (logq.exp() * (logq - logp)).sum(-1)


def seqkl(policy_logits_btv: torch.Tensor, reference_logits_btv: torch.Tensor, batch: dict) -> torch.Tensor:
    """TDPO's sequence KL ``[B]``: the sum of per-position KLs over the response."""
    mask_bt = shifted_mask(batch["input_ids"], batch["attention_mask"], batch.get("answer_mask")).to(policy_logits_btv.device)
    kl_bt = kl_per_position(policy_logits_btv[:, :-1], reference_logits_btv[:, :-1].to(policy_logits_btv.device))
    return (kl_bt * mask_bt).sum(-1)


def logit_mse(policy_logits_btv: torch.Tensor, reference_logits_btv: torch.Tensor, batch: dict) -> torch.Tensor:
    """Mean over the response's predicting positions of the squared difference of centred logits ``[B]``."""
    mask_bt = shifted_mask(batch["input_ids"], batch["attention_mask"], batch.get("answer_mask")).to(policy_logits_btv.device)
    diff_btv = policy_logits_btv[:, :-1].float() - reference_logits_btv[:, :-1].float().to(policy_logits_btv.device)
    diff_btv = diff_btv - diff_btv.mean(-1, keepdim=True)
    per_position_bt = diff_btv.pow(2).mean(-1)
    return (per_position_bt * mask_bt).sum(-1) / mask_bt.sum(-1).clamp(min=1)


# --- FPO ---------------------------------------------------------------------------------------

def response_token_mask(batch: dict) -> torch.Tensor:
    """``[B, T]`` bool: the real response tokens (all real tokens when the batch has no answer mask)."""
    mask_bt = batch["attention_mask"].bool()
    if batch.get("answer_mask") is not None:
        mask_bt = mask_bt & batch["answer_mask"].bool()
    return mask_bt


def pool_features(features_btf: torch.Tensor, mask_bt: torch.Tensor) -> torch.Tensor:
    """Mean of each row's features over its real tokens ``[B, F]`` (divided by the real count)."""
    mask_bt = mask_bt.to(features_btf.device)
    summed_bf = (features_btf * mask_bt[..., None].to(features_btf.dtype)).sum(1)
    return summed_bf / mask_bt.sum(1, keepdim=True).clamp(min=1).to(features_btf.dtype)


def fpo_constraint(policy_bf: torch.Tensor, reference_bf: torch.Tensor, k: int) -> torch.Tensor:
    """Mean squared difference of pooled features over ``topk(policy) U topk(reference)`` ``[B]``."""
    k = min(k, policy_bf.shape[-1])
    reference_bf = reference_bf.to(policy_bf.device, policy_bf.dtype)
    union_bf = torch.zeros_like(policy_bf, dtype=torch.bool)
    union_bf.scatter_(-1, policy_bf.detach().topk(k, dim=-1).indices, True)
    union_bf.scatter_(-1, reference_bf.topk(k, dim=-1).indices, True)
    squared_bf = (policy_bf - reference_bf).pow(2) * union_bf
    return squared_bf.sum(-1) / union_bf.sum(-1)


# --- losses ------------------------------------------------------------------------------------

def dpo_loss(logratio_w: torch.Tensor, logratio_l: torch.Tensor, beta: float) -> torch.Tensor:
    return -F.logsigmoid(beta * (logratio_w - logratio_l))


def simpo_loss(avg_logp_w: torch.Tensor, avg_logp_l: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    return -F.logsigmoid(beta * (avg_logp_w - avg_logp_l) - gamma)


def tdpo_loss(logratio_w: torch.Tensor, logratio_l: torch.Tensor, seqkl_w: torch.Tensor, seqkl_l: torch.Tensor,
              beta: float, alpha: float, version: int) -> torch.Tensor:
    """TDPO1 (``version=1``) or TDPO2 (``version=2``: the chosen SeqKL is a constant, scaled by alpha)."""
    if version == 1:
        delta = seqkl_l - seqkl_w
    else:
        delta = alpha * (seqkl_l - seqkl_w.detach())
    return -F.logsigmoid(beta * ((logratio_w - logratio_l) - delta))


def fpo_loss(avg_logratio_w: torch.Tensor, avg_logratio_l: torch.Tensor, constraint_w: torch.Tensor,
             constraint_l: torch.Tensor, beta: float, alpha: float) -> torch.Tensor:
    return -F.logsigmoid(beta * ((avg_logratio_w - avg_logratio_l) - alpha * (constraint_l - constraint_w.detach())))
