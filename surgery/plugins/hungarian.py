"""Hungarian alignment of a donor's MLP neurons (and ensembles) onto the base model's (DESIGN §2.1).

Per layer, ``C[i, j]`` = correlation of base neuron i and donor neuron j over the same probe tokens,
approximated by the cosine of their centred activation sketches from the upstream ``capture`` step
(``surgery.engines.capture``: both models see the same probe rows, so they share the random projection).
``perm = argmax_perm sum_i C[i, perm[i]]`` (``scipy.optimize.linear_sum_assignment``); applying
``perm`` to the donor's gate/up rows and down columns (``surgery.engines.permute``) preserves its function.
When a ``cluster`` step ran, ensembles are matched the same way on the mean member correlation
(``ensemble_map[k]`` = the donor ensemble matched to base ensemble k). ``identity_bonus`` b adds b
to ``C[i, i]``, so a neuron is moved only when that gains more than b: for fine-tunes of one parent,
whose neurons are already aligned, it keeps sketch noise from permuting them. ``ensemble_bonus`` e
adds e to ``C[i, j]`` when j lies in the donor ensemble matched to i's ensemble: neuron matching
constrained to matched ensembles (DESIGN §2.1), softly, since matched ensembles differ in size.
"""
from __future__ import annotations

import torch
from pydantic import Field

from surgery import hookimpl
from surgery.core.artifacts import Artifact
from surgery.core.errors import SurgeryError
from surgery.core.options import Options
from surgery.engines.capture import Stats, sketch_correlation
from surgery.engines.permute import match, match_ensembles


class AlignOptions(Options):
    ensembles: bool = Field(True, description="also match ensembles when an upstream cluster step exists")
    identity_bonus: float = Field(0.0, ge=0, description="added to C[i, i]: a neuron moves only if that gains more "
                                  "correlation (for fine-tunes of one parent; ~2/sqrt(sketch_dim) covers sketch noise)")
    ensemble_bonus: float = Field(0.0, ge=0, description="added to C[i, j] when donor neuron j is in the ensemble "
                                  "matched to base neuron i's (needs a cluster step); large: neurons are matched "
                                  "within matched ensembles wherever their sizes allow")


def neuron_correlation(base: Stats, donor: Stats) -> torch.Tensor:
    """[I_base, I_donor] approximate correlations of the two models' neuron activations."""
    return sketch_correlation(base.sketch("act"), donor.sketch("act")).float()


def align_layer(base: Stats, donor: Stats, identity_bonus: float = 0.0,
                ensembles: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                ensemble_bonus: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm, correlation matrix) for one layer; perm[i] = donor neuron matched to base neuron i.

    ``identity_bonus`` b is added to the diagonal before matching: a permutation is chosen over the
    identity only if it gains more than b per moved neuron. With ``ensembles`` = (base labels, donor
    labels, ensemble_map), ``ensemble_bonus`` is added to every pair whose donor neuron lies in the
    ensemble matched to the base neuron's.
    """
    corr = neuron_correlation(base, donor)
    objective = corr.clone()
    n = min(corr.shape)
    objective[torch.arange(n), torch.arange(n)] += identity_bonus
    if ensembles is not None and ensemble_bonus:
        objective += ensemble_bonus * same_ensemble(*ensembles)
    return match(objective), corr


def same_ensemble(labels_a: torch.Tensor, labels_b: torch.Tensor, ensemble_map: torch.Tensor) -> torch.Tensor:
    """[I_a, I_b] 1.0 where donor neuron j is in the ensemble matched to base neuron i's, else 0."""
    return (ensemble_map.long()[labels_a.long()][:, None] == labels_b.long()[None, :]).float()


class Hungarian:
    """Hungarian matching of donor neurons to base neurons by activation-sketch correlation."""

    @hookimpl
    def option_schema(self, stage: str):
        return AlignOptions if stage == "align" else None

    @hookimpl
    def align(self, ctx) -> Artifact:
        captured = ctx.upstream("capture")
        clusters = _cluster_artifact(ctx) if ctx.options.ensembles else None
        base = ctx.models[0]
        layers = captured.meta["layers"]
        tensors, figures = {}, {}
        for donor in ctx.models[1:]:
            kept, matched, within = [], [], []
            for layer in (str(l) for l in layers[base]):
                stats_a = Stats.from_tensors(captured.tensors, f"{base}/{layer}/")
                stats_b = Stats.from_tensors(captured.tensors, f"{donor}/{layer}/")
                if stats_a.count != stats_b.count:
                    raise SurgeryError(f"{ctx.where}: {base!r} and {donor!r} saw different probe tokens "
                                       f"({stats_a.count} vs {stats_b.count}); their sketches cannot be compared")
                ensembles = None
                if clusters is not None:
                    labels_a, labels_b = clusters.tensors[f"{base}/{layer}/labels"], clusters.tensors[f"{donor}/{layer}/labels"]
                    ensemble_map = match_ensembles(neuron_correlation(stats_a, stats_b), labels_a, labels_b)
                    tensors[f"{donor}/{layer}/ensemble_map"] = ensemble_map
                    ensembles = (labels_a, labels_b, ensemble_map)
                perm, corr = align_layer(stats_a, stats_b, ctx.options.identity_bonus, ensembles, ctx.options.ensemble_bonus)
                tensors[f"{donor}/{layer}/perm"] = perm
                kept.append(float((perm == torch.arange(perm.numel())).float().mean()))
                matched.append(float(corr[torch.arange(perm.numel()), perm].mean()))
                if ensembles is not None:
                    within.append(float(same_ensemble(*ensembles)[torch.arange(perm.numel()), perm].mean()))
            figures[f"{donor}/identity_share"] = sum(kept) / len(kept)
            figures[f"{donor}/matched_correlation"] = sum(matched) / len(matched)
            if within:
                figures[f"{donor}/within_matched_ensembles"] = sum(within) / len(within)
        return Artifact(tensors=tensors, meta={"models": ctx.models, "layers": layers, "ensembles": clusters is not None},
                        figures=figures)


def _cluster_artifact(ctx) -> Artifact | None:
    try:
        return ctx.upstream("cluster")
    except SurgeryError:
        return None


hungarian = Hungarian()
