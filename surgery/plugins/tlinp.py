"""Token weighting for ``capture``: ``uniform`` (the plain mean) and ``tlinp`` (DESIGN §2.2, seed 000).

TLINP, Token-Length Invariant Neuron Profiling. Logits ``z_t`` at position t predict token t+1.

    p_t      = softmax(z_t)[next token]          (the probability of the token that actually comes next)
    Lvirt_t  = -(1/|V|) sum_v log p_{t,v} = logsumexp(z_t) - mean(z_t)
    w_t      = p_t * exp(-alpha * Lvirt_t / max_u Lvirt_u)      (max over the row's real tokens)

and ``capture`` then averages with ``sum_t w_t x_t / (sum_t w_t + eps)``. Everything is computed from
logits in float32 log space (``log p_t = z_t[next] - logsumexp(z_t)``), never as a sum of
``log(softmax)`` over the vocabulary, so a 50k vocabulary or p_t ~ 1e-30 stays finite. Padding
(``mask_bt == 0``) gets weight 0 and takes no part in the max.

The last real token of a row has no next token in the data; it is weighted by the probability of
the model's own greedy continuation (``max_v p_{t,v}``), the "generated path" case of the seed.

With ``model: NAME`` the weights come from that recipe model's logits for every capture, so all
models' statistics average over one shared token weighting (by default each captured model weighs
the tokens by its own predictions, and two fine-tunes then describe different token sets).
"""
from __future__ import annotations

import torch
from pydantic import Field

from surgery import hookimpl
from surgery.core.artifacts import Artifact
from surgery.core.options import Options
from surgery.core.errors import RecipeError


class TlinpOptions(Options):
    alpha: float = Field(0.5, gt=0, le=1, description="strength of the virtual-loss penalty (seed default 0.5)")
    model: str | None = Field(None, description="recipe model whose logits weight the tokens of every capture (one "
                              "shared token set for all models, e.g. their parent); default: each model's own logits")


def virtual_loss(logits_btv: torch.Tensor) -> torch.Tensor:
    """Cross-entropy to the uniform distribution, ``logsumexp(z) - mean(z)`` per token: [B, T]."""
    z = logits_btv.float()
    return torch.logsumexp(z, dim=-1) - z.mean(dim=-1)


def next_token_log_prob(logits_btv: torch.Tensor, input_ids_bt: torch.Tensor, mask_bt: torch.Tensor) -> torch.Tensor:
    """log p_t of the next real token (greedy token where none follows); 0 on padding: [B, T]."""
    z = logits_btv.float()
    log_norm_bt = torch.logsumexp(z, dim=-1)
    next_ids_bt = torch.roll(input_ids_bt, shifts=-1, dims=1)
    target_bt = torch.gather(z, -1, next_ids_bt.unsqueeze(-1)).squeeze(-1)
    greedy_bt = z.max(dim=-1).values
    real_bt = mask_bt.bool()
    has_next_bt = real_bt & torch.roll(real_bt, shifts=-1, dims=1)
    has_next_bt[:, -1] = False
    log_p_bt = torch.where(has_next_bt, target_bt, greedy_bt) - log_norm_bt
    return log_p_bt.masked_fill(~real_bt, 0.0)


def tlinp_weights(
    logits_btv: torch.Tensor, input_ids_bt: torch.Tensor, mask_bt: torch.Tensor, alpha: float = 0.5
) -> torch.Tensor:
    """TLINP weights ``w_t = p_t exp(-alpha Lvirt_t / max_u Lvirt_u)``; 0 on padding: [B, T] float32."""
    real_bt = mask_bt.bool()
    lvirt_bt = virtual_loss(logits_btv).masked_fill(~real_bt, 0.0)
    # Lvirt >= log|V| > 0 on every real token, so the row max is positive for any row with a token
    max_b1 = lvirt_bt.max(dim=1, keepdim=True).values.clamp_min(torch.finfo(torch.float32).tiny)
    log_w_bt = next_token_log_prob(logits_btv, input_ids_bt, mask_bt) - alpha * lvirt_bt / max_b1
    return torch.exp(log_w_bt).masked_fill(~real_bt, 0.0)


class UniformWeighter(Artifact):
    """Every real token weighs 1, padding 0 (the plain mean).

    Weighters are Artifacts so that a recipe's ``weight`` step saves its options like any step.
    """

    def __init__(self) -> None:
        super().__init__(meta={"weighting": "uniform"})

    def weights(self, logits_btv: torch.Tensor | None, input_ids_bt: torch.Tensor, mask_bt: torch.Tensor) -> torch.Tensor:
        return mask_bt.to(torch.float32)


class TlinpWeighter(Artifact):
    """TLINP token weights with a fixed ``alpha``."""

    def __init__(self, alpha: float = 0.5) -> None:
        super().__init__(meta={"weighting": "tlinp", "alpha": alpha})
        self.alpha = alpha

    def weights(self, logits_btv: torch.Tensor, input_ids_bt: torch.Tensor, mask_bt: torch.Tensor) -> torch.Tensor:
        return tlinp_weights(logits_btv, input_ids_bt, mask_bt, self.alpha)


class SharedTlinpWeighter(TlinpWeighter):
    """TLINP weights from one reference model's logits, whichever model is being captured."""

    def __init__(self, reference: torch.nn.Module, alpha: float = 0.5, name: str = "") -> None:
        super().__init__(alpha)
        self.meta["weights_from"] = name
        self.reference = reference

    @torch.no_grad()
    def weights(self, logits_btv: torch.Tensor | None, input_ids_bt: torch.Tensor, mask_bt: torch.Tensor) -> torch.Tensor:
        device = next(self.reference.parameters()).device
        out = self.reference(input_ids=input_ids_bt.to(device), attention_mask=mask_bt.to(device))
        return tlinp_weights(out.logits.float().cpu(), input_ids_bt.cpu(), mask_bt.cpu(), self.alpha).to(mask_bt.device)


class Uniform:
    """Uniform token weights: capture averages with the plain mean over real tokens."""

    @hookimpl
    def option_schema(self, stage: str):
        return None

    @hookimpl
    def weight(self, ctx) -> UniformWeighter:
        return UniformWeighter()


class Tlinp:
    """TLINP token weights: next-token probability damped by the virtual (uniform-target) loss."""

    @hookimpl
    def option_schema(self, stage: str):
        return TlinpOptions if stage == "weight" else None

    @hookimpl
    def weight(self, ctx) -> TlinpWeighter:
        name = ctx.options.model
        if name is None:
            return TlinpWeighter(ctx.options.alpha)
        if name not in ctx.run.recipe.models:
            raise RecipeError(f"{ctx.where}.model: {name!r} is not a recipe model ({sorted(ctx.run.recipe.models)})")
        return SharedTlinpWeighter(ctx.model(name).module, ctx.options.alpha, name)


uniform = Uniform()
tlinp = Tlinp()
