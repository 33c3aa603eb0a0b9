"""Sparse autoencoders on a model's residual stream (DESIGN §2.6).

Two architectures, both ``x_hat = f @ W_dec + b_dec`` with ``f = act((x - b_dec) @ W_enc + b_enc)``:

- ``topk``: keep the k largest pre-activations of each token (then ReLU), zero the rest
  (Gao et al. 2024). Dead features get an auxiliary loss: the top ``k_aux`` dead pre-activations
  reconstruct the residual error ``x - x_hat`` (coefficient ``aux_coefficient``).
- ``standard``: ReLU with an L1 penalty ``l1_coefficient * sum_i f_i`` on the features.

Decoder rows are kept at unit norm after every optimiser step, so neither the L1 penalty nor the
top-k selection can be gamed by shrinking ``f`` and growing ``W_dec``.

The site is the residual stream after decoder block ``layer`` (``ModelView.layers[l].path``'s
output), read and replaced through nnsight. For the last block this is the *pre-final-norm*
residual; ``hidden_states[-1]`` of a Hugging Face model is taken after the final norm and is a
different space.

Metrics (SAELens' definitions; all streamed as sums and counts, so they merge across batches):

- explained variance ``1 - sum_t |x_t - x_hat_t|^2 / sum_t |x_t - mean(x)|^2``;
- L0: mean number of non-zero features per token;
- dead features: features that never fired on the evaluation tokens;
- CE-loss recovered ``(CE_zero - CE_sae) / (CE_zero - CE_clean)``: the next-token loss with the
  site replaced by zeros, by the SAE's reconstruction, and left alone (scored on the answer tokens
  when the data has prompt/answer pairs, else on every real token).

Folder format (SAELens): ``cfg.json`` + ``sae_weights.safetensors`` with ``W_enc [d_in, d_sae]``,
``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``. Both the current config layout
(``architecture``, ``k``, ``meta: {hook_name, hook_layer, ...}``) and the older flat one
(``activation_fn_str``, ``activation_fn_kwargs``, ``hook_name``) load.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from surgery.core.artifacts import Artifact
from surgery.core.errors import RecipeError, SurgeryError
from surgery.core.io import read_tensors, write_json, write_tensors
from surgery.models.adapters import ModelView
from surgery.models.objectives import flat_nll

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
ARCHITECTURES = ("topk", "standard")


class SAEError(SurgeryError):
    """An SAE folder is missing, malformed, or does not fit the model it is used with."""


@dataclass
class SAEConfig:
    """What an SAE is and where it reads. ``hook_name`` is the module path of the site's block."""

    d_in: int
    d_sae: int
    architecture: str = "topk"
    k: int = 16
    l1_coefficient: float = 1.0
    hook_name: str = ""
    hook_layer: int = -1
    model_name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # training figures, kept under "surgery"

    def to_saelens(self) -> dict[str, Any]:
        """The ``cfg.json`` dict in SAELens' layout (our own keys live under ``"surgery"``)."""
        cfg: dict[str, Any] = {
            "architecture": self.architecture, "d_in": self.d_in, "d_sae": self.d_sae,
            "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
            "normalize_activations": "none", "reshape_activations": "none",
            "meta": {"model_name": self.model_name, "hook_name": self.hook_name, "hook_layer": self.hook_layer},
            "surgery": {"l1_coefficient": self.l1_coefficient, **self.extra},
        }
        if self.architecture == "topk":
            cfg["k"] = self.k
        return cfg

    @classmethod
    def from_saelens(cls, cfg: dict[str, Any], where: str) -> "SAEConfig":
        """Read either SAELens config layout; unknown keys are ignored, missing ones are errors."""
        meta = cfg.get("meta") or cfg.get("metadata") or {}
        architecture = cfg.get("architecture")
        k = cfg.get("k")
        if architecture is None:  # the older flat layout
            fn = cfg.get("activation_fn_str", "relu")
            architecture = "topk" if fn == "topk" else "standard"
            k = (cfg.get("activation_fn_kwargs") or {}).get("k", k)
        if architecture not in ARCHITECTURES:
            raise SAEError(f"unsupported SAE architecture {architecture!r} (supported: {', '.join(ARCHITECTURES)})", where=where)
        for key in ("d_in", "d_sae"):
            if not isinstance(cfg.get(key), int) or cfg[key] < 1:
                raise SAEError(f"cfg.json needs a positive integer {key!r}", where=where)
        if architecture == "topk" and (not isinstance(k, int) or not 1 <= k <= cfg["d_sae"]):
            raise SAEError(f"a topk SAE needs an integer 'k' in 1..d_sae, got {k!r}", where=where)
        if cfg.get("normalize_activations", "none") not in ("none", None):
            raise SAEError(f"normalize_activations={cfg['normalize_activations']!r} is not supported (fold it first)", where=where)
        ours = cfg.get("surgery") or {}
        return cls(
            d_in=cfg["d_in"], d_sae=cfg["d_sae"], architecture=architecture, k=int(k or 1),
            l1_coefficient=float(ours.get("l1_coefficient", 1.0)),
            hook_name=str(meta.get("hook_name", cfg.get("hook_name", "")) or ""),
            hook_layer=_int_or(meta.get("hook_layer", cfg.get("hook_layer")), -1),
            model_name=str(meta.get("model_name", cfg.get("model_name", "")) or ""),
            extra={key: value for key, value in ours.items() if key != "l1_coefficient"},
        )


def _int_or(value: Any, default: int) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


class SparseAutoencoder(nn.Module):
    """``encode(x_nd) -> f_nf`` and ``decode(f_nf) -> x_hat_nd`` over the last dimension."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w_dec = torch.randn(cfg.d_sae, cfg.d_in)
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.t().clone())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.W_enc.dtype) - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.cfg.architecture == "standard":
            return F.relu(pre)
        top = pre.topk(self.cfg.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, F.relu(top.values))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_activations(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp(min=1e-8))


# --- SAELens folder format --------------------------------------------------------------------

def save_sae(sae: SparseAutoencoder, directory: str | Path) -> Path:
    """Write ``cfg.json`` and ``sae_weights.safetensors`` (atomically) into ``directory``."""
    directory = Path(directory)
    tensors = {name: p.detach().float().contiguous() for name, p in sae.named_parameters()}
    write_tensors(directory / WEIGHTS_FILE, tensors)
    write_json(directory / CFG_FILE, sae.cfg.to_saelens())
    return directory


def load_sae(directory: str | Path, device: str | torch.device = "cpu") -> SparseAutoencoder:
    """Load an SAE folder in SAELens' format; shapes are checked against ``cfg.json``."""
    directory = Path(directory)
    cfg_path, weights_path = directory / CFG_FILE, directory / WEIGHTS_FILE
    for path in (cfg_path, weights_path):
        if not path.is_file():
            raise SAEError(f"no {path.name} in the SAE folder", where=str(directory))
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SAEError(f"cfg.json is not valid JSON: {exc}", where=str(directory)) from None
    if not isinstance(raw, dict):
        raise SAEError("cfg.json must hold a JSON object", where=str(directory))
    cfg = SAEConfig.from_saelens(raw, where=str(directory))
    try:
        tensors = read_tensors(weights_path)
    except Exception as exc:  # safetensors raises its own types for truncated files
        raise SAEError(f"{WEIGHTS_FILE} is not a valid safetensors file ({exc})", where=str(directory)) from None
    sae = SparseAutoencoder(cfg)
    expected = {name: tuple(p.shape) for name, p in sae.named_parameters()}
    for name, shape in expected.items():
        if name not in tensors:
            raise SAEError(f"{WEIGHTS_FILE} has no tensor {name!r}", where=str(directory))
        if tuple(tensors[name].shape) != shape:
            raise SAEError(f"{name} has shape {list(tensors[name].shape)}, cfg.json implies {list(shape)}", where=str(directory))
    sae.load_state_dict({name: tensors[name].float() for name in expected})
    return sae.to(device).eval()


# --- the residual-stream site ------------------------------------------------------------------

def site_path(model_view: ModelView, layer: int) -> str:
    """Module path of decoder block ``layer`` (negative counts from the end) of the viewed model."""
    layers = model_view.layers
    if not -len(layers) <= layer < len(layers):
        raise SAEError(f"layer {layer} is out of range; the model has {len(layers)} layers")
    return layers[layer].path


def layer_index(model_view: ModelView, layer: int) -> int:
    return layer % model_view.num_layers


class Site:
    """Reads (and optionally replaces) the residual stream after one block, through nnsight."""

    def __init__(self, model: nn.Module, path: str) -> None:
        from nnsight import NNsight

        self.model = model
        self.path = path
        self.traced = NNsight(model)

    def run(self, batch: dict, edit: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits_btv, resid_btd)``; ``edit(resid) -> new resid`` replaces the site's output."""
        from surgery.models.adapters import envoy_at

        inputs = model_inputs(batch, _device_of(self.model))
        with self.traced.trace(**inputs):
            envoy = envoy_at(self.traced, self.path)
            resid = envoy.output.save()
            if edit is not None:
                envoy.output = edit(envoy.output)
            logits = self.traced.output.logits.save()
        return logits, resid

    @torch.no_grad()
    def activations(self, batch: dict) -> torch.Tensor:
        """Residual vectors of the batch's real tokens, ``[N, d]`` (N = real tokens)."""
        _, resid_btd = self.run(batch)
        return resid_btd[batch["attention_mask"].to(resid_btd.device).bool()].float()


def model_inputs(batch: dict, device: torch.device) -> dict[str, torch.Tensor]:
    keys = ("input_ids", "attention_mask", "pixel_values")
    return {key: batch[key].to(device) for key in keys if key in batch}


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


# --- training ---------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    epochs: int = 4
    lr: float = 2e-3
    minibatch_tokens: int = 256
    dead_window_tokens: int = 4096  # a feature silent for this many tokens counts as dead
    aux_coefficient: float = 1 / 32
    seed: int = 0


def train_sae(
    cfg: SAEConfig,
    activation_batches: Callable[[], Iterable[torch.Tensor]],
    train: TrainConfig,
    progress: Callable[[Iterable, str], Iterable] = lambda it, desc: it,
) -> tuple[SparseAutoencoder, dict[str, Any]]:
    """Train an SAE on a stream of activation batches ``[N, d_in]`` (called once per epoch).

    Nothing is stored across batches except the SAE, its optimiser and the per-feature count of
    tokens since the feature last fired. Returns the SAE and a history (loss per minibatch, dead
    features at the end of each epoch).
    """
    generator = torch.Generator().manual_seed(train.seed)
    with _seeded(train.seed):
        sae = SparseAutoencoder(cfg)
    optimizer = torch.optim.Adam(sae.parameters(), lr=train.lr)
    since_fired_f = torch.zeros(cfg.d_sae, dtype=torch.long)
    history: dict[str, Any] = {"loss": [], "dead": []}
    initialised = False
    for epoch in range(train.epochs):
        for acts_nd in progress(activation_batches(), f"SAE epoch {epoch + 1}/{train.epochs}"):
            acts_nd = acts_nd.float()
            if not initialised:  # b_dec starts at the data mean (SAELens' "mean" initialisation)
                sae.b_dec.data.copy_(acts_nd.mean(0))
                initialised = True
            order = torch.randperm(acts_nd.shape[0], generator=generator)
            for start in range(0, len(order), train.minibatch_tokens):
                x_nd = acts_nd[order[start:start + train.minibatch_tokens]]
                loss, fired_f = _sae_loss(sae, x_nd, since_fired_f > train.dead_window_tokens, train.aux_coefficient)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                sae.normalize_decoder()
                since_fired_f = torch.where(fired_f, 0, since_fired_f + x_nd.shape[0])
                history["loss"].append(loss.item())
        history["dead"].append(int((since_fired_f > train.dead_window_tokens).sum()))
    return sae.eval(), history


def _sae_loss(sae: SparseAutoencoder, x_nd: torch.Tensor, dead_f: torch.Tensor, aux_coefficient: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstruction loss (sum over dims, mean over tokens) plus the sparsity or dead-feature term."""
    pre_nf = sae.pre_activations(x_nd)
    f_nf = sae.activate(pre_nf)
    x_hat_nd = sae.decode(f_nf)
    loss = (x_hat_nd - x_nd).pow(2).sum(-1).mean()
    if sae.cfg.architecture == "standard":
        loss = loss + sae.cfg.l1_coefficient * f_nf.sum(-1).mean()
    elif int(dead_f.sum()) > 0 and aux_coefficient > 0:
        loss = loss + aux_coefficient * _aux_loss(sae, x_nd, x_hat_nd, pre_nf, dead_f)
    return loss, (f_nf > 0).any(0)


def _aux_loss(sae: SparseAutoencoder, x_nd: torch.Tensor, x_hat_nd: torch.Tensor, pre_nf: torch.Tensor, dead_f: torch.Tensor) -> torch.Tensor:
    """Dead features reconstruct the live features' error (Gao et al. 2024, AuxK)."""
    k_aux = min(int(dead_f.sum()), max(1, sae.cfg.d_in // 2))
    residual_nd = (x_nd - x_hat_nd).detach()
    masked_nf = pre_nf.masked_fill(~dead_f, float("-inf"))
    top = masked_nf.topk(k_aux, dim=-1)
    aux_nf = torch.zeros_like(pre_nf).scatter(-1, top.indices, F.relu(top.values))
    return (aux_nf @ sae.W_dec - residual_nd).pow(2).sum(-1).mean()


class _seeded:
    """Run a block under ``torch.manual_seed(seed)`` and restore the global RNG afterwards."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self.state = torch.get_rng_state()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        torch.set_rng_state(self.state)


# --- metrics ----------------------------------------------------------------------------------

@dataclass
class SAEStats:
    """Streamed sums for explained variance, L0, MSE and dead features; ``merge`` adds two."""

    d_in: int
    d_sae: int
    tokens: int = 0
    sum_x: torch.Tensor | None = None  # [d_in]
    sum_sq: float = 0.0  # sum_t |x_t|^2
    sum_resid_sq: float = 0.0  # sum_t |x_t - x_hat_t|^2
    sum_l0: float = 0.0
    fired: torch.Tensor | None = None  # [d_sae] tokens on which each feature fired

    def __post_init__(self) -> None:
        self.sum_x = torch.zeros(self.d_in, dtype=torch.float64) if self.sum_x is None else self.sum_x
        self.fired = torch.zeros(self.d_sae, dtype=torch.long) if self.fired is None else self.fired

    @torch.no_grad()
    def update(self, x_nd: torch.Tensor, f_nf: torch.Tensor, x_hat_nd: torch.Tensor) -> None:
        x = x_nd.double()
        self.tokens += x.shape[0]
        self.sum_x += x.sum(0).cpu()
        self.sum_sq += float(x.pow(2).sum())
        self.sum_resid_sq += float((x - x_hat_nd.double()).pow(2).sum())
        active_nf = f_nf > 0
        self.sum_l0 += float(active_nf.sum())
        self.fired += active_nf.sum(0).cpu()

    def merge(self, other: "SAEStats") -> "SAEStats":
        return SAEStats(self.d_in, self.d_sae, self.tokens + other.tokens, self.sum_x + other.sum_x,
                        self.sum_sq + other.sum_sq, self.sum_resid_sq + other.sum_resid_sq,
                        self.sum_l0 + other.sum_l0, self.fired + other.fired)

    def figures(self) -> dict[str, float | int]:
        n = max(self.tokens, 1)
        total_var = self.sum_sq - float(self.sum_x.pow(2).sum()) / n
        return {
            "explained_variance": 1.0 - self.sum_resid_sq / total_var if total_var > 0 else float("nan"),
            "l0": self.sum_l0 / n,
            "mse": self.sum_resid_sq / (n * self.d_in),
            "dead_features": int((self.fired == 0).sum()),
            "tokens": self.tokens,
        }


@torch.no_grad()
def evaluate_sae(sae: SparseAutoencoder, activation_batches: Iterable[torch.Tensor]) -> SAEStats:
    """Reconstruction and sparsity statistics of ``sae`` on activation batches ``[N, d_in]``."""
    stats = SAEStats(sae.cfg.d_in, sae.cfg.d_sae)
    for x_nd in activation_batches:
        f_nf = sae.encode(x_nd)
        stats.update(x_nd, f_nf, sae.decode(f_nf))
    return stats


@torch.no_grad()
def ce_loss_recovered(site: Site, sae: SparseAutoencoder, batches: Iterable[dict]) -> dict[str, float]:
    """SAELens' CE-loss score on causal-LM batches: the share of the zero-ablation loss gap the
    SAE's reconstruction closes. Only real tokens are replaced and counted."""
    totals = {"clean": 0.0, "sae": 0.0, "zero": 0.0}
    count = 0
    for batch in batches:
        mask_bt = batch["attention_mask"].bool()
        edits = {"clean": None, "sae": _splice(sae, mask_bt), "zero": _splice(None, mask_bt)}
        for name, edit in edits.items():
            logits_btv, _ = site.run(batch, edit)
            nll_sum, n = _next_token_nll(logits_btv, batch)
            totals[name] += nll_sum
        count += n
    ce = {name: value / max(count, 1) for name, value in totals.items()}
    gap = ce["zero"] - ce["clean"]
    ce["score"] = (ce["zero"] - ce["sae"]) / gap if abs(gap) > 1e-12 else float("nan")
    return {"ce_loss_clean": ce["clean"], "ce_loss_with_sae": ce["sae"], "ce_loss_zero_ablation": ce["zero"],
            "ce_loss_recovered": ce["score"]}


def _splice(sae: SparseAutoencoder | None, mask_bt: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def edit(resid_btd: torch.Tensor) -> torch.Tensor:
        new = torch.zeros_like(resid_btd) if sae is None else sae(resid_btd).to(resid_btd.dtype)
        return torch.where(mask_bt.to(resid_btd.device)[..., None], new, resid_btd)

    return edit


def _next_token_nll(logits_btv: torch.Tensor, batch: dict) -> tuple[float, int]:
    """Summed next-token NLL and the count of scored tokens: the answer tokens when the batch
    marks them (prompt/answer data), else every real token."""
    ids_bt = batch["input_ids"].to(logits_btv.device)
    keep_bt = batch["attention_mask"].bool()
    if batch.get("answer_mask") is not None:
        keep_bt = keep_bt & batch["answer_mask"].bool()
    keep_bt = keep_bt[:, 1:].to(logits_btv.device)
    nll_bt = flat_nll(logits_btv[:, :-1].flatten(0, 1), ids_bt[:, 1:].flatten()).view(ids_bt[:, 1:].shape)
    return float(nll_bt[keep_bt].sum()), int(keep_bt.sum())


# --- convenience: everything from a model and batches ------------------------------------------

def site_activations(site: Site, batches: Callable[[], Iterable[dict]]) -> Callable[[], Iterator[torch.Tensor]]:
    """A re-iterable stream of real-token residual vectors ``[N, d]``, one item per data batch."""

    def stream() -> Iterator[torch.Tensor]:
        for batch in batches():
            yield site.activations(batch)

    return stream


def check_site(sae: SparseAutoencoder, model: nn.Module, model_view: ModelView, where: str = "") -> str:
    """The SAE's site path in ``model``; an error when the site or its width does not fit.

    ``hook_name`` is a module path of the model (the block whose output is read), or a
    TransformerLens residual hook ``blocks.<l>.hook_resid_post`` (the same site, block l).
    """
    hook = sae.cfg.hook_name
    resid_post = re.fullmatch(r"blocks\.(\d+)\.hook_resid_post", hook)
    if not hook or resid_post:
        path = site_path(model_view, int(resid_post.group(1)) if resid_post else sae.cfg.hook_layer)
    elif hook in dict(model.named_modules()):
        path = hook
    else:
        raise SAEError(f"the SAE reads {hook!r}, which is neither a module of the model nor blocks.<l>.hook_resid_post", where=where or None)
    hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd", None)
    if hidden is None:
        hidden = getattr(getattr(model.config, "text_config", None), "hidden_size", None)
    if hidden is not None and hidden != sae.cfg.d_in:
        raise SAEError(f"the SAE reads {sae.cfg.d_in}-dim activations but the model's residual stream is {hidden}-dim", where=where or None)
    return path


def summary(history: dict[str, Any]) -> dict[str, float]:
    """Last-epoch mean loss and final dead-feature count of a training history."""
    losses = history.get("loss") or [math.nan]
    tail = losses[-max(1, len(losses) // 10):]
    return {"train_loss": sum(tail) / len(tail), "dead_features_train": (history.get("dead") or [0])[-1]}


def sae_from_artifact(artifact: Artifact, where: str = "") -> SparseAutoencoder:
    """The SAE a ``capture: {plugin: sae}`` step produced."""
    if artifact.meta.get("kind") != "sae":
        raise RecipeError(f"{where}: the latest capture step did not train an SAE (use `capture: {{plugin: sae}}` or give `sae:`)")
    cfg = SAEConfig.from_saelens(artifact.meta["cfg"], where=where or "sae artifact")
    prefix = artifact.meta["prefix"]
    sae = SparseAutoencoder(cfg)
    sae.load_state_dict({name: artifact.tensors[prefix + name] for name in WEIGHTS})
    return sae.eval()


WEIGHTS = ("W_enc", "b_enc", "W_dec", "b_dec")
