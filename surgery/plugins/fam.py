"""FAM: neuron importance (FAI), neuron ensembles and importance-weighted fusion (DESIGN §2.1, seeds 000/001).

Stages, for MLP neurons i of every layer (a_i = channel i of the down projection's input, d_i its
write direction, x / y the MLP's input / output, w_t the token weights of the recipe's ``weight``
step, plain mean by default, TLINP with ``- weight: {plugin: tlinp}``):

- ``capture``  streamed over the probe set with :mod:`surgery.engines.capture` (memory independent of the
  number of tokens): weighted sums of a_i, |a_i|, a_i^2, x, y, s_i = <y, d_i/|d_i|>, s_i^2, a_i s_i,
  the diagonal Fisher sum of w_t (dL/da_i)^2 (a backward pass of the ``objective``, causal-LM by
  default, L = sum over rows of the row-mean NLL) and a random-projection sketch of a_i over the
  probe tokens. The artifact keeps the raw sums (``"<model>/<layer>/<key>"``), so captures over
  probe shards merge by adding them.
- ``score``    ``FAI_i = |A_i| * MI_i / (Hess_i + eps)`` with |A_i| = weighted mean |a_i|,
  ``MI_i = -0.5 log(1 - rho_i^2)`` the Gaussian MI of a_i and s_i (rho clipped to 1 - 1e-6) and
  Hess_i the weighted mean of (dL/da_i)^2.
- ``cluster``  k groups per layer: spherical k-means (k-means++ start, seeded by the recipe seed
  and the layer) on the unit-normalised centred sketches, i.e. on activation correlations.
- ``fuse``     per base neuron i and each donor m with its aligned neuron pi_m(i) (``align`` step,
  identity without one): ``W*_i = sum_m s_m W_m,pi_m(i) / sum_m s_m`` (s = FAI; base included) on
  the gate/up rows and down columns; every other tensor is ``(1 - blend) W_base + blend mean(W_donors)``
  with ``blend`` per tensor class, or kept from the base (``keep: [norms, ...]``). Heterogeneous
  pairs pair tensors through ``map:`` (:mod:`surgery.models.hetero`). Options: s = (FAI / layer mean,
  with ``normalize: layer``) ** ``score_power``; ``pool: ensemble`` / ``ensemble-share`` averages
  each model's scores / shares over the base neuron's ensemble (the ``cluster`` step's labels);
  ``parent: C`` merges task vectors, ``W*_i = W_C,i + scale * N * sum_m c_m,i (W_m,pi_m(i) - W_C,i)``
  with c_m,i = s_m,i / sum_m s_m,i, and ``W_C + scale * sum_m (W_m - W_C)`` for every other tensor.

Deviations from the seeds are in docs/methods/fam.md.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from surgery import hookimpl
from surgery.core.artifacts import Artifact
from surgery.core.errors import RecipeError, SurgeryError
from surgery.core.options import Options, check_at_most
from surgery.engines.capture import (
    Capture, Stats, Stream, mlp_activations, mlp_inputs, mlp_outputs, mlp_write_projection
)
from surgery.engines.merge import MAP_HELP, TensorClass, map_option, stream_merge_named, tensor_classes
from surgery.engines.statistics import gaussian_mi, kmeans, layer_seed
from surgery.models.adapters import ModelView

# --- options -----------------------------------------------------------------------------------

class CaptureOptions(Options):
    sketch_dim: int = Field(128, ge=2, description="random-projection sketch size per neuron (clustering, alignment)")
    fisher: bool = Field(True, description="capture the diagonal Fisher term (needs a backward pass)")
    objective: str = Field("causal-lm", description="objective whose gradient gives the Fisher term")
    batch_size: int | None = Field(None, ge=1, description="probe batch size (default: the data entry's)")


class ScoreOptions(Options):
    eps: float = Field(1e-8, gt=0, description="added to the Fisher term in FAI's denominator")


class ClusterOptions(Options):
    k: int = Field(8, ge=1, description="ensembles per layer (at most the number of neurons)")
    iterations: int = Field(50, ge=1, description="k-means iterations")


class FuseOptions(Options):
    blend: float = Field(0.5, ge=0, le=1, description="donor share of tensors that are not MLP neurons")
    blend_by_class: dict[TensorClass, float] = Field({}, description="blend per tensor class (overrides blend)")
    keep: list[TensorClass] = Field([], description="tensor classes kept from the base model")
    score_power: float = Field(1.0, ge=0, description="neurons are weighted by FAI**score_power (1: DESIGN; 0: plain mean)")
    normalize: Literal["none", "layer"] = Field("none", description="'layer': divide each model's FAI by its mean over "
                                               "the layer's neurons first, so no model outweighs another by scale")
    pool: Literal["neuron", "ensemble", "ensemble-share"] = Field(
        "neuron", description="'ensemble': each model's score for a neuron is its mean score over the base neuron's "
        "ensemble; 'ensemble-share': each model's share c_m is averaged over the ensemble (both need a cluster step)")
    parent: str | None = Field(None, description="recipe model C all models were fine-tuned from: merge task vectors "
                               "W* = W_C + scale * sum_m N c_m (W_m - W_C) (c_m the FAM weights; blend unused)")
    scale: float = Field(0.5, description="with a parent: lambda on the summed task vectors (0.5 with equal weights "
                         "and two models = the plain average; 1 = task arithmetic)")
    map: str | dict | None = Field(None, description=MAP_HELP)
    max_shard_mb: float | None = Field(256.0, gt=0, description="cap on each output safetensors shard (MiB)")


# --- capture -----------------------------------------------------------------------------------

def fam_streams(model: torch.nn.Module, layer, fisher: bool = True) -> list[Stream]:
    """The streams FAM folds for one layer (see the module docstring)."""
    return [
        mlp_activations(layer, absolute=True, sketch=True, fisher=fisher, cross=("write",)),
        mlp_inputs(layer),
        mlp_outputs(layer),
        mlp_write_projection(model, layer),
    ]


def capture_model(module: torch.nn.Module, view: ModelView, batches, *, weighter=None, objective=None,
                  fisher: bool = True, sketch_dim: int = 128, seed: int = 0) -> dict[str, Stats]:
    """FAM statistics of every layer of ``module`` over ``batches``, keyed by layer index."""
    plan = {str(layer.index): fam_streams(module, layer, fisher) for layer in view.layers}
    engine = Capture(module, plan, weighter=weighter, objective=objective if fisher else None,
                     sketch_dim=sketch_dim, seed=seed)
    for batch in batches:
        engine.add(batch)
    return engine.result()


def sharded_batches(ctx, batch_iter) -> list[dict]:
    """This process's share of the probe batches, each with its rows' global ``row_index`` (so the
    sketches' random projections do not depend on how the probe set is split over processes)."""
    all_batches, start = [], 0
    for batch in batch_iter:
        rows = batch["input_ids"].shape[0]
        all_batches.append({**batch, "row_index": torch.arange(start, start + rows)})
        start += rows
    mine = [batch for _, batch in ctx.shard(all_batches)]
    ctx.log(f"this process captures {len(mine)} of {len(all_batches)} probe batches")
    if not mine:
        raise SurgeryError(f"{ctx.where}: {len(all_batches)} probe batches are too few for this many processes")
    return mine


def layer_stats(artifact: Artifact, model: str, layer: str) -> Stats:
    return Stats.from_tensors(artifact.tensors, prefix=f"{model}/{layer}/")


def layers_of(artifact: Artifact, model: str, where: str) -> list[str]:
    layers = artifact.meta.get("layers", {}).get(model)
    if layers is None:
        raise SurgeryError(f"{where}: the upstream capture has no model {model!r} (it has {sorted(artifact.meta.get('layers', {}))})")
    return [str(layer) for layer in layers]


# --- score -------------------------------------------------------------------------------------


def fai(stats: Stats, eps: float = 1e-8) -> dict[str, torch.Tensor]:
    """FAI_i = |A_i| * MI_i / (Hess_i + eps) and its three terms, each [intermediate]."""
    mean_abs = stats.mean_abs("act")
    mi = gaussian_mi(stats.correlation("act", "write"))
    hess = stats.fisher("act") if "act/fisher" in stats.sums else torch.ones_like(mean_abs)
    return {"score": mean_abs * mi / (hess + eps), "abs": mean_abs, "mi": mi, "fisher": hess}


# --- cluster -----------------------------------------------------------------------------------

def neuron_features(stats: Stats) -> torch.Tensor:
    """Unit-normalised centred sketches, one row per neuron: [intermediate, k]."""
    sketch_ki = stats.sketch("act")
    return torch.nn.functional.normalize(sketch_ki.t().double(), dim=1)


# --- fuse --------------------------------------------------------------------------------------


def neuron_coefficients(scores: list[torch.Tensor]) -> torch.Tensor:
    """c_m[i] = s_m[i] / sum_m s_m[i] (negative scores count as 0; equal shares where all are 0): [M, I]."""
    s_mi = torch.stack([s.double() for s in scores]).clamp_min(0)
    total_i = s_mi.sum(0)
    return torch.where(total_i > 0, s_mi / total_i.clamp_min(1e-300), torch.full_like(s_mi, 1 / len(scores)))


def fuse_neurons(tensors: list[torch.Tensor], scores: list[torch.Tensor], axis: int, offset: int,
                 parent: torch.Tensor | None = None, scale: float = 0.5) -> torch.Tensor:
    """Importance-weighted merge of already aligned tensors over the neuron block at ``offset`` along
    ``axis``: slice i = sum_m c_m[i] W_m[i] (:func:`neuron_coefficients`), or with a ``parent`` W_C
    ``W_C[i] + scale * sum_m M c_m[i] (W_m[i] - W_C[i])``; the rest of the tensor is the first model's."""
    coef_mi = neuron_coefficients(scores)
    out = tensors[0].clone()
    n = coef_mi.shape[1]
    block = [t.narrow(axis, offset, n).double() for t in tensors]
    shape = [1] * out.dim()
    shape[axis] = n
    if parent is None:
        mixed = sum(c.view(shape) * b for c, b in zip(coef_mi, block))
    else:
        origin = parent.narrow(axis, offset, n).double()
        mixed = origin + scale * len(tensors) * sum(c.view(shape) * (b - origin) for c, b in zip(coef_mi, block))
    out.narrow(axis, offset, n).copy_(mixed.to(out.dtype))
    return out


def pooled(scores_i: torch.Tensor, labels_i: torch.Tensor) -> torch.Tensor:
    """Each neuron's score replaced by the mean score of its ensemble: [I]."""
    k = int(labels_i.max()) + 1
    one_ik = torch.nn.functional.one_hot(labels_i.long(), k).double()
    means_k = (one_ik.T @ scores_i.double()) / one_ik.sum(0).clamp_min(1)
    return means_k[labels_i.long()]


def prepared_scores(scores_i: torch.Tensor, normalize: str, power: float) -> torch.Tensor:
    """``(s / mean s) ** power`` (``normalize: layer``) or ``s ** power``, negatives as 0."""
    s = scores_i.double().clamp_min(0)
    if normalize == "layer" and s.mean() > 0:
        s = s / s.mean()
    return s ** power


class FamFuser:
    """``combine(name, tensors)`` for :func:`stream_merge_named`: FAM on neuron slices, blend elsewhere.

    ``tensors`` are the models' (base first), then the parent's when ``opts.parent`` is set;
    ``labels`` are the base model's ensemble labels per layer (used with ``pool: ensemble``).
    """

    def __init__(self, classes: dict[str, TensorClass], slices: dict, scores: list[dict[str, torch.Tensor]],
                 perms: list[dict[str, torch.Tensor]], opts: FuseOptions,
                 labels: dict[str, torch.Tensor] | None = None) -> None:
        self.classes, self.slices, self.scores, self.perms, self.opts = classes, slices, scores, perms, opts
        self.labels = labels or {}

    def __call__(self, name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
        parent = tensors[-1] if self.opts.parent else None
        models = tensors[:-1] if self.opts.parent else tensors
        klass = self.classes.get(name, "other")
        if klass in self.opts.keep:
            return models[0]
        if name in self.slices:
            return self._neurons(name, models, parent)
        if parent is not None:
            return parent + self.opts.scale * sum(t - parent for t in models)
        blend = self.opts.blend_by_class.get(klass, self.opts.blend)
        donors = torch.stack(models[1:]).mean(0)
        return (1 - blend) * models[0] + blend * donors

    def _neurons(self, name: str, tensors: list[torch.Tensor], parent: torch.Tensor | None) -> torch.Tensor:
        out = tensors
        for layer, axis, offset in self.slices[name]:
            aligned = [out[0]]
            scores = [self.scores[0][layer]]
            for donor, tensor in enumerate(out[1:], start=1):
                perm = self.perms[donor - 1].get(layer)
                if perm is None:
                    aligned.append(tensor)
                    scores.append(self.scores[donor][layer])
                    continue
                index = torch.arange(tensor.shape[axis])
                index[offset:offset + perm.numel()] = perm + offset
                aligned.append(tensor.index_select(axis, index))
                scores.append(self.scores[donor][layer][perm])
            if self.opts.pool == "ensemble":
                scores = [pooled(s, self.labels[layer]) for s in scores]
            elif self.opts.pool == "ensemble-share":
                scores = [pooled(c, self.labels[layer]) for c in neuron_coefficients(scores)]
            fused = fuse_neurons(aligned, scores, axis, offset, parent, self.opts.scale)
            out = [fused] + aligned[1:]
        return out[0]


# --- the plugin --------------------------------------------------------------------------------

class Fam:
    """FAM: FAI neuron importance, sketch ensembles and importance-weighted neuron fusion."""

    @hookimpl
    def option_schema(self, stage: str):
        return {"capture": CaptureOptions, "score": ScoreOptions, "cluster": ClusterOptions, "fuse": FuseOptions}.get(stage)

    @hookimpl
    def capture(self, ctx) -> Artifact:
        opts = ctx.options
        weighter = ctx.weighter()
        objective = ctx.objective(opts.objective) if opts.fisher else None
        tensors, layers, figures = {}, {}, {}
        for name in ctx.models:
            loaded = ctx.model(name)
            view = loaded.view
            mine = sharded_batches(ctx, ctx.batches(loaded.tokenizer, batch_size=opts.batch_size))
            stats = capture_model(loaded.module, view, ctx.progress(mine, desc=f"fam capture {name}", total=len(mine)),
                                  weighter=weighter, objective=objective, fisher=opts.fisher,
                                  sketch_dim=opts.sketch_dim, seed=ctx.seed)
            model_tensors = {}
            for layer, layer_stats_ in stats.items():
                model_tensors.update(layer_stats_.tensors(prefix=f"{name}/{layer}/"))
            tensors.update(ctx.all_reduce(model_tensors))
            layers[name] = [layer.index for layer in view.layers]
            first = str(view.layers[0].index)
            figures[f"{name}/tokens"] = int(tensors[f"{name}/{first}/count"])
            figures[f"{name}/weight"] = float(tensors[f"{name}/{first}/weight"])
        meta = {"models": list(ctx.models), "layers": layers, "sketch_dim": opts.sketch_dim, "fisher": opts.fisher,
                "weighting": getattr(weighter, "meta", {}).get("weighting", "uniform")}
        return Artifact(tensors=tensors, meta=meta, figures=figures)

    @hookimpl
    def score(self, ctx) -> Artifact:
        captured = ctx.upstream("capture")
        tensors, figures = {}, {}
        for name in ctx.models:
            for layer in layers_of(captured, name, ctx.where):
                terms = fai(layer_stats(captured, name, layer), ctx.options.eps)
                tensors.update({f"{name}/{layer}/{key}": value.float() for key, value in terms.items()})
            scores = torch.cat([tensors[f"{name}/{l}/score"] for l in layers_of(captured, name, ctx.where)])
            figures[f"{name}/score_mean"] = float(scores.mean())
        return Artifact(tensors=tensors, meta={"models": ctx.models, "layers": captured.meta["layers"],
                                               "convention": "higher = more important"}, figures=figures)

    @hookimpl
    def cluster(self, ctx) -> Artifact:
        captured = ctx.upstream("capture")
        tensors = {}
        for model_index, name in enumerate(ctx.models):
            for layer in layers_of(captured, name, ctx.where):
                features = neuron_features(layer_stats(captured, name, layer))
                check_at_most(ctx.options.k, features.shape[0], f"{ctx.where}.k", f"neurons of layer {layer} of {name!r}")
                generator = torch.Generator().manual_seed(layer_seed(ctx.seed, model_index, layer))
                tensors[f"{name}/{layer}/labels"] = kmeans(features, ctx.options.k, generator, ctx.options.iterations)
        return Artifact(tensors=tensors, meta={"models": ctx.models, "layers": captured.meta["layers"], "k": ctx.options.k})

    @hookimpl
    def fuse(self, ctx) -> Artifact:
        opts = ctx.options
        if len(ctx.models) < 2:
            raise RecipeError(f"{ctx.where}.models: a merge needs at least two models, got {ctx.models}")
        base = ctx.model(ctx.models[0])
        classes, slices = tensor_classes(base.module, base.view)
        scored = ctx.upstream("score")
        scores = [{layer: prepared_scores(s, opts.normalize, opts.score_power)
                   for layer, s in _scores_of(scored, name, ctx.where).items()} for name in ctx.models]
        perms = _perms(ctx, ctx.models[1:])
        labels = _base_labels(ctx) if opts.pool != "neuron" else None
        fuser = FamFuser(classes, slices, scores, perms, opts, labels)
        models = [*ctx.models, opts.parent] if opts.parent else None
        artifact = stream_merge_named(ctx, fuser, opts.max_shard_mb, map_option(ctx), models=models)
        artifact.meta.update(blend=opts.blend, keep=opts.keep, aligned=any(perms), pool=opts.pool,
                             parent=opts.parent, normalize=opts.normalize, score_power=opts.score_power)
        return artifact


def _base_labels(ctx) -> dict[str, torch.Tensor]:
    """The base model's ensemble labels per layer from the upstream cluster step."""
    try:
        clusters = ctx.upstream("cluster")
    except SurgeryError:
        raise SurgeryError(f"{ctx.where}.pool: {ctx.options.pool!r} needs a `cluster` step before the fuse") from None
    base = ctx.models[0]
    return {key[len(base) + 1:-len("/labels")]: value for key, value in clusters.tensors.items()
            if key.startswith(f"{base}/") and key.endswith("/labels")}


def _scores_of(scored: Artifact, name: str, where: str) -> dict[str, torch.Tensor]:
    suffix = "/score"
    found = {key[len(name) + 1:-len(suffix)]: value for key, value in scored.tensors.items()
             if key.startswith(f"{name}/") and key.endswith(suffix)}
    if not found:
        raise SurgeryError(f"{where}: the upstream score step has no scores for model {name!r}")
    return found


def _perms(ctx, donors: list[str]) -> list[dict[str, torch.Tensor]]:
    """Per donor, the align step's permutation per layer (empty without an align step)."""
    try:
        aligned = ctx.upstream("align")
    except SurgeryError:
        return [{} for _ in donors]
    return [{key[len(d) + 1:-len("/perm")]: value for key, value in aligned.tensors.items()
             if key.startswith(f"{d}/") and key.endswith("/perm")} for d in donors]


fam = Fam()
