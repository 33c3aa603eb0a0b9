"""LAPE-TEFM: trajectory-flat neuron importance, spectral ensembles, TOS mapping, interference-masked
projection fusion and the flat step (DESIGN §2.3, seed 001). Plugin ``lape-tefm`` (score, cluster,
align, fuse) on top of a ``capture: {plugin: lape}`` step (:mod:`surgery.plugins.lape`).

Notation: phi_i(x) = [a, g, L] of neuron i on probe input x (``M/l/phi_x`` [X, I, 3]), phi_i = its
mean over x, A the base (first model), B the donor (second), C the parent (option ``parent``, else
the upstream capture's parent, else none), E_k ensemble k, W_i neuron i's weight vector (its
gate/up rows and down column, concatenated; every slice :func:`surgery.models.adapters.neuron_slices` lists).

- ``score``   ``g' = phi[1]``; ``Hess = g'^2 + phi[2] + eps``;
  ``TFI = |g'| MI(phi[0], phi[2]) / (Hess + eps)``, MI the Gaussian MI ``-0.5 log(1 - rho^2)`` of
  the correlation across probe inputs x of phi_i(x)[0] and phi_i(x)[2].
- ``cluster`` spectral clustering (Ng-Jordan-Weiss) of ``R_ij = cos(f_i, f_j)``, f_i the per-input
  phi vectors concatenated (each column centred across the layer's neurons, the a / g / L blocks
  scaled to equal RMS): affinity ``max(R, 0)`` with a zero diagonal, the k leading eigenvectors of
  ``D^-1/2 A D^-1/2``, rows normalised, spherical k-means (seeded by the recipe seed and the layer).
- ``align``   ``TOS_{k,p} = mean_{i in E_k, j in E_p} cos(f_A,i, f_B,j) * exp(-beta |Hess_A,k - Hess_B,p|)``
  (Hess of an ensemble = its members' mean), Hungarian on TOS -> ``ensemble_map``; the same formula
  per neuron pair, Hungarian -> ``perm`` (used where the donor's neurons are compared with the base's).
- ``fuse``    per base ensemble k and its donor ensemble p = ensemble_map[k]:
  ``tau_p = mean_{j in E_p}(W_B,j - W_C,j) + sigma g'_B,p u_p`` (``member_weights: tfi``: the mean
  weighted by the donor's TFI; W_C = the base's matched neuron
  when there is no parent; u_p the unit mean weight vector of E_p, g'_B,p the members' mean g');
  ``Int_p = ||phi_B,p - phi_A,k||_2 / (Hess_B,p + eps)``, ``M_k = 1 - sigmoid(beta Int_p)``;
  ``d_k = sum_{i in E_k} phi_A,i[0] W_A,i / sum_{i in E_k} |phi_A,i[0]|``;
  ``P = <tau, d_k> / (|d_k|^2 + eps) d_k``, ``tau_proj = M_k P``, ``tau_ortho = tau - tau_proj``
  (``split: projection``: ``tau - P``); every member i of E_k becomes
  ``W*_i = W_A,i + lambda_proj tau_proj + lambda_ortho tau_ortho``. Other tensors:
  ``W_A + blend (W_B - W_C)``, or the base's (``keep``). (lambda_proj, lambda_ortho) is the grid
  point minimising the search criterion: ``var-g`` (the merged model's variance across probe inputs of
  g' = phi[1], mean over neurons, from ``search_paths`` LAPE paths per input) or a named
  ``constrain`` plugin's mean drift of the merged model from each of the two models.
  Optional flat step: ``W <- W - eta g / (|g| + eps)`` with g the probe loss gradient (global norm).

Every deviation from the seed is listed in docs/methods/lape_tefm.md.
"""
from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
from pydantic import Field

from surgery import hookimpl
from surgery.core.artifacts import Artifact
from surgery.core.errors import ModelError, RecipeError, SurgeryError
from surgery.core.options import Options, check_at_most
from surgery.engines.merge import tensor_classes
from surgery.engines.paths import PathSettings, encode_model, probe_spec, prompt_ids
from surgery.engines.permute import ensemble_similarity, invert, match
from surgery.engines.statistics import gaussian_mi, kmeans, layer_seed
from surgery.models.adapters import LayerView, neuron_slices

TensorClass = Literal["mlp", "attention", "norms", "embeddings", "lm_head", "other"]


# --- options -----------------------------------------------------------------------------------

class ScoreOptions(Options):
    eps: float = Field(1e-8, gt=0, description="added to Hess, and to Hess in TFI's denominator")


class ClusterOptions(Options):
    k: int = Field(8, ge=1, description="ensembles per layer (at most the number of neurons)")
    iterations: int = Field(50, ge=1, description="k-means iterations on the spectral embedding")


class AlignOptions(Options):
    beta: float = Field(0.1, ge=0, description="flatness penalty: TOS factor exp(-beta |Hess_A - Hess_B|)")


class FuseOptions(Options):
    parent: str | None = Field(None, description="recipe model C for task vectors W_B - W_C (default: the lape capture's parent, else the base)")
    beta: float = Field(0.1, ge=0, description="interference mask M = 1 - sigmoid(beta * Int)")
    sigma: float = Field(1.0, description="weight of the g' term added to each ensemble's task vector")
    split: Literal["design", "projection"] = Field("design", description="'design': tau_proj = M P, tau_ortho = tau - "
                                                   "tau_proj (DESIGN §2.3); 'projection': tau_ortho = tau - P (the "
                                                   "masked share of P is dropped)")
    member_weights: Literal["uniform", "tfi"] = Field("uniform", description="ensemble task vector tau_p: plain mean "
                                                      "of its members' W_B - W_C, or their TFI-weighted mean")
    eps: float = Field(1e-8, gt=0, description="numerical floor in Int and in the projection")
    lambda_proj: float = Field(0.5, description="lambda_proj when search is 'none'")
    lambda_ortho: float = Field(0.5, description="lambda_ortho when search is 'none'")
    search: str = Field("var-g", description="choose (lambda_proj, lambda_ortho): 'var-g', 'none', or a constrain plugin (logit-mse, seqkl, fpo)")
    search_options: dict[str, Any] = Field(default_factory=dict, description="options of the constrain plugin (a 'reference' there replaces the two models)")
    grid: list[float] = Field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0], min_length=1, description="values tried for each lambda")
    search_paths: int = Field(4, ge=1, description="var-g: LAPE paths per probe input for each candidate")
    search_inputs: int | None = Field(16, ge=1, description="probe inputs used by the search (default 16; null: all)")
    pair_neurons: Literal["index", "align"] = Field("index", description="without a parent, W_C,j is the base neuron with the same index j ('index') or the one the align step matched to j ('align')")
    blend: float = Field(0.5, description="tensors outside the MLP neurons: W_A + blend (W_B - W_C)")
    keep: list[TensorClass] = Field(default_factory=list, description="tensor classes kept from the base model")
    flat_step: bool = Field(False, description="end with W - eta g/(|g| + eps), g the probe loss gradient")
    eta: float = Field(1e-4, ge=0, description="flat step size (in the units of the global weight norm)")
    objective: str = Field("causal-lm", description="objective of the flat step's gradient")


# --- score -------------------------------------------------------------------------------------

def correlation_across_inputs(u_xi: torch.Tensor, v_xi: torch.Tensor) -> torch.Tensor:
    """Pearson correlation per column over the rows (inputs x); 0 where either column is constant."""
    u = u_xi.double() - u_xi.double().mean(0)
    v = v_xi.double() - v_xi.double().mean(0)
    scale = (u.square().sum(0) * v.square().sum(0)).sqrt()
    rho = (u * v).sum(0) / scale.clamp_min(1e-300)
    return torch.where(scale > 1e-300, rho, torch.zeros_like(rho)).clamp(-1, 1)


def tefm_terms(phi_xi3: torch.Tensor, eps: float = 1e-8) -> dict[str, torch.Tensor]:
    """``grad`` g', ``hess``, ``mi`` and ``score`` TFI per neuron, each [I] (float64)."""
    phi_i3 = phi_xi3.double().mean(0)
    grad = phi_i3[:, 1]
    hess = grad.square() + phi_i3[:, 2] + eps
    mi = gaussian_mi(correlation_across_inputs(phi_xi3[..., 0], phi_xi3[..., 2]))
    return {"grad": grad, "hess": hess, "mi": mi, "score": grad.abs() * mi / (hess + eps)}


# --- cluster -----------------------------------------------------------------------------------

def neuron_features(phi_xi3: torch.Tensor) -> torch.Tensor:
    """f_i: neuron i's per-input phi vectors concatenated, [I, 3X] (float64, rows unit length).

    Each column is centred across neurons (a column that is the same for every neuron, such as L,
    becomes 0), then each of the a / g / L blocks is scaled to unit RMS so none dominates by units.
    """
    phi = phi_xi3.double()
    phi = phi - phi.mean(1, keepdim=True)
    rms_3 = phi.square().mean(dim=(0, 1)).sqrt()
    phi = torch.where(rms_3 > 1e-300, phi / rms_3.clamp_min(1e-300), torch.zeros_like(phi))
    features = phi.permute(1, 2, 0).reshape(phi.shape[1], -1)
    return torch.nn.functional.normalize(features, dim=1)


def spectral_clustering(similarity_nn: torch.Tensor, k: int, generator: torch.Generator, iterations: int = 50) -> torch.Tensor:
    """Ng-Jordan-Weiss spectral clustering of a cosine-similarity matrix: int64 labels [n] (ids 0..k-1)."""
    n = similarity_nn.shape[0]
    k = min(k, n)
    affinity = similarity_nn.double().clamp_min(0).clone()
    affinity.fill_diagonal_(0)
    degree_n = affinity.sum(1).clamp_min(1e-12)
    scaled = affinity / degree_n.sqrt()[:, None] / degree_n.sqrt()[None, :]
    _, vectors = torch.linalg.eigh((scaled + scaled.T) / 2)
    embedding_nk = torch.nn.functional.normalize(vectors[:, -k:], dim=1)
    return kmeans(embedding_nk, k, generator, iterations)


# --- align -------------------------------------------------------------------------------------

def ensemble_means(values_n: torch.Tensor, labels_n: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Mean of ``values`` ([n] or [n, F]) over each ensemble's members: [k] or [k, F]."""
    k = k or int(labels_n.max()) + 1
    one_nk = torch.nn.functional.one_hot(labels_n.long(), k).double()
    counts_k = one_nk.sum(0).clamp_min(1)
    values = values_n.double()
    if values.dim() == 1:
        return (one_nk.T @ values) / counts_k
    return (one_nk.T @ values) / counts_k[:, None]


def flatness_factor(hess_a: torch.Tensor, hess_b: torch.Tensor, beta: float) -> torch.Tensor:
    """``exp(-beta |hess_a[k] - hess_b[p]|)``: [len(a), len(b)]."""
    return torch.exp(-beta * (hess_a.double()[:, None] - hess_b.double()[None, :]).abs())


def tos_matrix(cos_ij: torch.Tensor, labels_a: torch.Tensor, labels_b: torch.Tensor, hess_a_i: torch.Tensor,
               hess_b_j: torch.Tensor, beta: float) -> torch.Tensor:
    """``TOS_{k,p} = mean_{i in E_k, j in E_p} cos_ij * exp(-beta |Hess_A,k - Hess_B,p|)``: [k_a, k_b]."""
    mean_cos = ensemble_similarity(cos_ij, labels_a, labels_b).double()
    return mean_cos * flatness_factor(ensemble_means(hess_a_i, labels_a), ensemble_means(hess_b_j, labels_b), beta)


# --- fuse: neuron weight vectors ----------------------------------------------------------------

def neuron_matrix(params: dict[str, torch.Tensor], slices: Sequence, size: int) -> torch.Tensor:
    """W_i for every neuron: its slices moved to the front and concatenated, [I, F] (float64)."""
    blocks = [params[name].detach().narrow(axis, offset, size).movedim(axis, 0).reshape(size, -1).double()
              for name, axis, offset in slices]
    return torch.cat(blocks, dim=1)


@torch.no_grad()
def set_neuron_matrix_(params: dict[str, torch.Tensor], slices: Sequence, size: int, matrix_if: torch.Tensor) -> None:
    """Write ``matrix_if`` back into the slices :func:`neuron_matrix` read (in place)."""
    start = 0
    for name, axis, offset in slices:
        target = params[name].narrow(axis, offset, size)
        moved_shape = target.movedim(axis, 0).shape
        width = math.prod(moved_shape[1:])
        block = matrix_if[:, start:start + width].reshape(moved_shape).movedim(0, axis)
        target.copy_(block.to(target.dtype))
        start += width


# --- fuse: the formulas -------------------------------------------------------------------------

def ensemble_task_vectors(w_b_jf: torch.Tensor, w_c_jf: torch.Tensor, labels_b: torch.Tensor,
                          grad_b_j: torch.Tensor, sigma: float, member_weights_j: torch.Tensor | None = None) -> torch.Tensor:
    """``tau_p = mean_{j in E_p}(W_B,j - W_C,j) + sigma g'_B,p u_p``: [k_b, F].

    With ``member_weights_j`` (>= 0, e.g. TFI) the mean is weighted by them (plain where an
    ensemble's weights sum to 0).
    """
    k = int(labels_b.max()) + 1
    tau = ensemble_means(w_b_jf - w_c_jf, labels_b, k)
    if member_weights_j is not None:
        weight_j = member_weights_j.double().clamp_min(0)
        total_k = ensemble_means(weight_j, labels_b, k)
        weighted = ensemble_means(weight_j[:, None] * (w_b_jf - w_c_jf), labels_b, k) / total_k.clamp_min(1e-300)[:, None]
        tau = torch.where(total_k[:, None] > 0, weighted, tau)
    direction = torch.nn.functional.normalize(ensemble_means(w_b_jf, labels_b, k), dim=1)
    return tau + sigma * ensemble_means(grad_b_j, labels_b, k)[:, None] * direction


def activation_directions(w_a_if: torch.Tensor, act_a_i: torch.Tensor, labels_a: torch.Tensor) -> torch.Tensor:
    """``d_k = sum_{i in E_k} phi_A,i[0] W_A,i / sum_{i in E_k} |phi_A,i[0]|``: [k_a, F]."""
    k = int(labels_a.max()) + 1
    one_ik = torch.nn.functional.one_hot(labels_a.long(), k).double()
    weighted = one_ik.T @ (act_a_i.double()[:, None] * w_a_if.double())
    return weighted / (one_ik.T @ act_a_i.double().abs()).clamp_min(1e-300)[:, None]


def interference_mask(phi_a_k3: torch.Tensor, phi_b_k3: torch.Tensor, hess_b_k: torch.Tensor, beta: float,
                      eps: float = 1e-8) -> torch.Tensor:
    """``M = 1 - sigmoid(beta ||phi_B,p - phi_A,k||_2 / (Hess_B,p + eps))`` per matched pair (row k)."""
    interference = (phi_b_k3.double() - phi_a_k3.double()).norm(dim=-1) / (hess_b_k.double() + eps)
    return 1 - torch.sigmoid(beta * interference)


def split_task_vector(tau_kf: torch.Tensor, d_kf: torch.Tensor, mask_k: torch.Tensor, eps: float = 1e-8,
                      split: str = "design") -> tuple[torch.Tensor, torch.Tensor]:
    """``(tau_proj, tau_ortho)`` with ``P = <tau, d>/(|d|^2 + eps) d`` and ``tau_proj = M P``:
    ``tau_ortho = tau - tau_proj`` (``split='design'``, so the two always sum to tau) or
    ``tau - P`` (``'projection'``: the share (1 - M) P belongs to neither part)."""
    coefficient_k = (tau_kf * d_kf).sum(-1) / (d_kf.square().sum(-1) + eps)
    projection_kf = coefficient_k[:, None] * d_kf
    proj_kf = mask_k.to(tau_kf.dtype)[:, None] * projection_kf
    return proj_kf, tau_kf - (proj_kf if split == "design" else projection_kf)


@dataclass
class LayerUpdate:
    """One layer's neuron update pieces, per base neuron: W*_i = base + l_proj proj + l_ortho ortho."""

    layer: LayerView
    base_if: torch.Tensor
    proj_if: torch.Tensor
    ortho_if: torch.Tensor
    mask_k: torch.Tensor


def layer_update(layer: LayerView, slices: Sequence, params_a: dict, params_b: dict, params_c: dict | None, *,
                 phi_a_i3, phi_b_j3, hess_a_i, hess_b_j, grad_b_j, labels_a, labels_b, ensemble_map, perm,
                 opts: FuseOptions, tfi_b_j: torch.Tensor | None = None) -> LayerUpdate:
    """The seed's phase 3 for one layer (see the module docstring); ``slices`` name module parameters."""
    size = layer.mlp.intermediate_size
    w_a = neuron_matrix(params_a, slices, size)
    w_b = neuron_matrix(params_b, slices, size)
    w_c = neuron_matrix(params_c, slices, size) if params_c is not None else w_a[invert(perm)]
    member_weights = tfi_b_j if opts.member_weights == "tfi" else None
    tau_p = ensemble_task_vectors(w_b, w_c, labels_b, grad_b_j, opts.sigma, member_weights)[ensemble_map]   # [k_a, F]
    d_k = activation_directions(w_a, phi_a_i3[:, 0], labels_a)
    k_b = int(labels_b.max()) + 1
    phi_b_k3 = ensemble_means(phi_b_j3, labels_b, k_b)[ensemble_map]
    hess_b_k = ensemble_means(hess_b_j, labels_b, k_b)[ensemble_map]
    mask_k = interference_mask(ensemble_means(phi_a_i3, labels_a), phi_b_k3, hess_b_k, opts.beta, opts.eps)
    proj_kf, ortho_kf = split_task_vector(tau_p, d_k, mask_k, opts.eps, opts.split)
    return LayerUpdate(layer, w_a, proj_kf[labels_a], ortho_kf[labels_a], mask_k)


class MergedModel:
    """The base model's copy with non-neuron tensors blended; neuron updates applied per lambda pair."""

    def __init__(self, base: torch.nn.Module, donor: torch.nn.Module, parent: torch.nn.Module | None,
                 opts: FuseOptions, base_view) -> None:
        self.module = copy.deepcopy(base).eval()
        self.params = dict(self.module.named_parameters())
        self.updates: list[LayerUpdate] = []
        self._blend_other_tensors(base, donor, parent, opts, base_view)

    @torch.no_grad()
    def _blend_other_tensors(self, base, donor, parent, opts: FuseOptions, base_view) -> None:
        classes, _ = tensor_classes(base, base_view)
        neuron_tensors = {name for layer in base_view.layers for name, _, _ in neuron_slices(base, layer.mlp)}
        donor_params = dict(donor.named_parameters())
        parent_params = dict(parent.named_parameters()) if parent is not None else None
        for name, param in self.params.items():
            if name not in donor_params or donor_params[name].shape != param.shape:
                raise ModelError(f"lape-tefm: the donor has no tensor {name!r} of shape {tuple(param.shape)}")
            if name in neuron_tensors or classes.get(name, "other") in opts.keep or not param.is_floating_point():
                continue
            reference = parent_params[name] if parent_params is not None else param
            param.copy_((param.double() + opts.blend * (donor_params[name].double() - reference.double())).to(param.dtype))

    def apply(self, lambda_proj: float, lambda_ortho: float) -> None:
        """Set every layer's neurons to ``base + lambda_proj proj + lambda_ortho ortho``."""
        for update in self.updates:
            slices = neuron_slices(self.module, update.layer.mlp)
            merged = update.base_if + lambda_proj * update.proj_if + lambda_ortho * update.ortho_if
            set_neuron_matrix_(self.params, slices, update.layer.mlp.intermediate_size, merged)


def flat_step_(module: torch.nn.Module, batches, objective, eta: float, eps: float = 1e-12) -> float:
    """``W <- W - eta g / (|g| + eps)``, g the summed probe loss gradient (global norm); returns |g|."""
    params = [p for p in module.parameters() if p.is_floating_point()]
    grads = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    device = next(module.parameters()).device
    generator = torch.Generator().manual_seed(0)
    for batch in batches:
        batch = objective.prepare(batch, generator)
        inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        with torch.enable_grad():
            logits = module(**inputs).logits
            loss = objective.loss(logits, {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}).sum()
            for grad, value in zip(grads, torch.autograd.grad(loss, params, allow_unused=True)):
                if value is not None:
                    grad += value.float()
    norm = float(torch.sqrt(sum(g.double().square().sum() for g in grads)))
    with torch.no_grad():
        for param, grad in zip(params, grads):
            param.sub_((eta * grad / (norm + eps)).to(param.dtype))
    return norm


def var_g(phi_tensors: dict[str, torch.Tensor], layers: Sequence[int]) -> float:
    """Mean over layers and neurons of the variance across probe inputs of g' = phi(x)[1]."""
    values = [phi_tensors[f"{layer}/phi_x"][..., 1].double().var(0, unbiased=False).mean() for layer in layers]
    return float(torch.stack(values).mean())


# --- upstream artifacts ------------------------------------------------------------------------

def _phi(captured: Artifact, model: str, layer: str, where: str) -> torch.Tensor:
    key = f"{model}/{layer}/phi_x"
    if key not in captured.tensors:
        raise SurgeryError(f"{where}: the upstream capture has no {key!r}; lape-tefm needs a `capture: {{plugin: lape}}` step")
    return captured.tensors[key]


def _layers(captured: Artifact, model: str, where: str) -> list[str]:
    layers = captured.meta.get("layers", {}).get(model)
    if layers is None:
        raise SurgeryError(f"{where}: the upstream capture has no model {model!r}")
    return [str(layer) for layer in layers]


def _optional(ctx, stage: str) -> Artifact | None:
    try:
        return ctx.upstream(stage)
    except SurgeryError:
        return None


def _two_models(ctx) -> tuple[str, str]:
    if len(ctx.models) != 2:
        raise RecipeError(f"{ctx.where}.models: lape-tefm merges exactly two models (base, donor), got {ctx.models}")
    return ctx.models[0], ctx.models[1]


# --- the plugin --------------------------------------------------------------------------------

class LapeTefm:
    """LAPE-TEFM: TFI scores, spectral ensembles, TOS mapping and interference-masked projection fusion."""

    @hookimpl
    def option_schema(self, stage: str):
        return {"score": ScoreOptions, "cluster": ClusterOptions, "align": AlignOptions, "fuse": FuseOptions}.get(stage)

    @hookimpl
    def score(self, ctx) -> Artifact:
        captured = ctx.upstream("capture")
        tensors, figures = {}, {}
        for name in ctx.models:
            layers = _layers(captured, name, ctx.where)
            for layer in layers:
                terms = tefm_terms(_phi(captured, name, layer, ctx.where), ctx.options.eps)
                tensors.update({f"{name}/{layer}/{key}": value.float() for key, value in terms.items()})
            figures[f"{name}/score_mean"] = float(torch.cat([tensors[f"{name}/{l}/score"] for l in layers]).mean())
        return Artifact(tensors=tensors, meta={"models": ctx.models, "layers": captured.meta["layers"],
                                               "convention": "higher = more important"}, figures=figures)

    @hookimpl
    def cluster(self, ctx) -> Artifact:
        captured = ctx.upstream("capture")
        tensors = {}
        for model_index, name in enumerate(ctx.models):
            for layer in _layers(captured, name, ctx.where):
                features = neuron_features(_phi(captured, name, layer, ctx.where))
                check_at_most(ctx.options.k, features.shape[0], f"{ctx.where}.k", f"neurons of layer {layer} of {name!r}")
                generator = torch.Generator().manual_seed(layer_seed(ctx.seed, model_index, layer))
                tensors[f"{name}/{layer}/labels"] = spectral_clustering(features @ features.T, ctx.options.k, generator,
                                                                        ctx.options.iterations)
        return Artifact(tensors=tensors, meta={"models": ctx.models, "layers": captured.meta["layers"], "k": ctx.options.k})

    @hookimpl
    def align(self, ctx) -> Artifact:
        captured, scored, clusters = ctx.upstream("capture"), ctx.upstream("score"), _optional(ctx, "cluster")
        base = ctx.models[0]
        tensors, figures = {}, {}
        for donor in ctx.models[1:]:
            identity, tos_kept = [], []
            for layer in _layers(captured, base, ctx.where):
                f_a = neuron_features(_phi(captured, base, layer, ctx.where))
                f_b = neuron_features(_phi(captured, donor, layer, ctx.where))
                cos_ij = f_a @ f_b.T
                hess_a, hess_b = scored.tensors[f"{base}/{layer}/hess"], scored.tensors[f"{donor}/{layer}/hess"]
                perm = match(cos_ij * flatness_factor(hess_a, hess_b, ctx.options.beta))
                tensors[f"{donor}/{layer}/perm"] = perm
                identity.append(float((perm == torch.arange(perm.numel())).double().mean()))
                if clusters is not None:
                    labels_a, labels_b = clusters.tensors[f"{base}/{layer}/labels"], clusters.tensors[f"{donor}/{layer}/labels"]
                    tos = tos_matrix(cos_ij, labels_a, labels_b, hess_a, hess_b, ctx.options.beta)
                    ensemble_map = match(torch.nan_to_num(tos, neginf=-1e9))
                    tensors[f"{donor}/{layer}/tos"] = tos.float()
                    tensors[f"{donor}/{layer}/ensemble_map"] = ensemble_map
                    tos_kept.append(float(tos[torch.arange(ensemble_map.numel()), ensemble_map].mean()))
            figures[f"{donor}/identity_share"] = sum(identity) / len(identity)
            if tos_kept:
                figures[f"{donor}/matched_tos"] = sum(tos_kept) / len(tos_kept)
        return Artifact(tensors=tensors, meta={"models": ctx.models, "layers": captured.meta["layers"],
                                               "ensembles": clusters is not None}, figures=figures)

    @hookimpl
    def fuse(self, ctx) -> Artifact:
        return run_fuse(ctx)


def run_fuse(ctx) -> Artifact:
    opts = ctx.options
    base_name, donor_name = _two_models(ctx)
    captured, scored, clusters = ctx.upstream("capture"), ctx.upstream("score"), _optional(ctx, "cluster")
    aligned = _optional(ctx, "align")
    if clusters is None:
        raise SurgeryError(f"{ctx.where}: lape-tefm fuses ensembles; put a `cluster: {{plugin: lape-tefm}}` step before it")
    parent_name = opts.parent or captured.meta.get("parent")
    base, donor = ctx.model(base_name), ctx.model(donor_name)
    parent = ctx.model(parent_name) if parent_name else None
    merged = MergedModel(base.module, donor.module, parent.module if parent else None, opts, base.view)
    params = (dict(base.module.named_parameters()), dict(donor.module.named_parameters()),
              dict(parent.module.named_parameters()) if parent else None)
    for layer in ctx.progress(base.view.layers, desc="lape-tefm layers"):
        key = str(layer.index)
        if f"{base_name}/{key}/phi_x" not in captured.tensors:
            continue  # a layer the capture skipped keeps the base's neurons
        merged.updates.append(_layer_update(layer, key, base.module, params, captured, scored, clusters, aligned,
                                            base_name, donor_name, opts))
    chosen, table = choose_lambdas(ctx, merged, base, parent, captured, opts)
    merged.apply(*chosen)
    figures = {"lambda_proj": chosen[0], "lambda_ortho": chosen[1],
               "mask_mean": float(torch.cat([u.mask_k for u in merged.updates]).mean()) if merged.updates else 1.0}
    if opts.flat_step:
        batches = ctx.batches(base.tokenizer)
        figures["flat_grad_norm"] = flat_step_(merged.module, batches, ctx.objective(opts.objective), opts.eta)
    ctx.save_model(merged.module, like=base_name)
    meta = {"models": ctx.models, "parent": parent_name, "search": opts.search, "criterion": table,
            "aligned": aligned is not None, "layers": [u.layer.index for u in merged.updates]}
    return Artifact(meta=meta, figures=figures)


def _layer_update(layer, key, module, params, captured, scored, clusters, aligned, base_name, donor_name, opts) -> LayerUpdate:
    labels_a, labels_b = clusters.tensors[f"{base_name}/{key}/labels"], clusters.tensors[f"{donor_name}/{key}/labels"]
    size = layer.mlp.intermediate_size
    ensemble_key, perm_key = f"{donor_name}/{key}/ensemble_map", f"{donor_name}/{key}/perm"
    k_a, k_b = int(labels_a.max()) + 1, int(labels_b.max()) + 1
    if aligned is not None and ensemble_key in aligned.tensors:
        ensemble_map = aligned.tensors[ensemble_key]
    elif k_a <= k_b:
        ensemble_map = torch.arange(k_a)
    else:
        raise SurgeryError(f"layer {key}: base has {k_a} ensembles, donor {k_b}; add an align step")
    use_perm = opts.pair_neurons == "align" and aligned is not None and perm_key in aligned.tensors
    perm = aligned.tensors[perm_key] if use_perm else torch.arange(size)
    return layer_update(
        layer, neuron_slices(module, layer.mlp), params[0], params[1], params[2],
        phi_a_i3=captured.tensors[f"{base_name}/{key}/phi"].double(), phi_b_j3=captured.tensors[f"{donor_name}/{key}/phi"].double(),
        hess_a_i=scored.tensors[f"{base_name}/{key}/hess"], hess_b_j=scored.tensors[f"{donor_name}/{key}/hess"],
        grad_b_j=scored.tensors[f"{donor_name}/{key}/grad"], labels_a=labels_a, labels_b=labels_b,
        ensemble_map=ensemble_map.long(), perm=perm.long(), opts=opts, tfi_b_j=scored.tensors[f"{donor_name}/{key}/score"])


def choose_lambdas(ctx, merged: MergedModel, base, parent, captured: Artifact, opts: FuseOptions) -> tuple[tuple[float, float], list]:
    """The grid point with the lowest criterion, and the table ``[[l_proj, l_ortho, value], ...]``."""
    if opts.search == "none":
        return (opts.lambda_proj, opts.lambda_ortho), []
    criterion = _criterion(ctx, merged, base, parent, captured, opts)
    table = []
    for lambda_proj, lambda_ortho in itertools.product(opts.grid, opts.grid):
        merged.apply(lambda_proj, lambda_ortho)
        table.append([lambda_proj, lambda_ortho, criterion()])
    best = min(table, key=lambda row: row[2])
    return (best[0], best[1]), table


def _criterion(ctx, merged: MergedModel, base, parent, captured: Artifact, opts: FuseOptions):
    examples = ctx.examples()[: opts.search_inputs] if opts.search_inputs else ctx.examples()
    if opts.search == "var-g":
        settings = PathSettings(**{**captured.meta.get("settings", {}), "paths": opts.search_paths})
        prompts = prompt_ids(base.tokenizer, examples)
        layers = [u.layer.index for u in merged.updates]
        pad_id = base.tokenizer.pad_token_id or 0

        def variance() -> float:
            encoded = encode_model(merged.module, base.view, prompts, settings, seed=ctx.seed, layers=layers,
                                   parent=parent.module if parent else None, parent_view=parent.view if parent else None,
                                   pad_id=pad_id)
            return var_g(encoded, layers)

        return variance
    references = [None] if "reference" in opts.search_options else ctx.models
    constraints = [ctx.call("constrain", opts.search, {**opts.search_options, **({"reference": r} if r else {})})
                   for r in references]
    from surgery.models.data import batches as make_batches

    spec_tokens = probe_spec(ctx).max_tokens
    probe = list(make_batches(examples, base.tokenizer, 8, spec_tokens))

    @torch.no_grad()
    def drift() -> float:
        return float(sum(c.penalty(merged.module, batch).double().mean() for c in constraints for batch in probe) / len(probe))

    return drift


lape_tefm = LapeTefm()
