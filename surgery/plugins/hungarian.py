"""Hungarian alignment of a donor's MLP neurons (and ensembles) onto the base model's (DESIGN §2.1).

Per layer, ``C[i, j]`` = correlation of base neuron i and donor neuron j over the same probe tokens,
approximated by the cosine of their centred activation sketches from the upstream ``capture`` step
(``surgery.engines.capture``: both models see the same probe rows, so they share the random projection).
``perm = argmax_perm sum_i C[i, perm[i]]`` (``scipy.optimize.linear_sum_assignment``); applying
``perm`` to the donor's gate/up rows and down columns (``surgery.engines.permute``) preserves its function.
When a ``cluster`` step ran, ensembles are matched the same way on the mean member correlation
(``ensemble_map[k]`` = the donor ensemble matched to base ensemble k). ``identity_bonus`` b adds b
to ``C[i, i]``, so a neuron is moved only when that gains more than b: for fine-tunes of one parent,
whose neurons are already aligned, it keeps sketch noise from permuting them.
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


def neuron_correlation(base: Stats, donor: Stats) -> torch.Tensor:
    """[I_base, I_donor] approximate correlations of the two models' neuron activations."""
    return sketch_correlation(base.sketch("act"), donor.sketch("act")).float()


def align_layer(base: Stats, donor: Stats, identity_bonus: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm, correlation matrix) for one layer; perm[i] = donor neuron matched to base neuron i.

    ``identity_bonus`` b is added to the diagonal before matching: a permutation is chosen over the
    identity only if it gains more than b per moved neuron.
    """
    corr = neuron_correlation(base, donor)
    objective = corr.clone()
    n = min(corr.shape)
    objective[torch.arange(n), torch.arange(n)] += identity_bonus
    return match(objective), corr


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
            kept, matched = [], []
            for layer in (str(l) for l in layers[base]):
                stats_a = Stats.from_tensors(captured.tensors, f"{base}/{layer}/")
                stats_b = Stats.from_tensors(captured.tensors, f"{donor}/{layer}/")
                if stats_a.count != stats_b.count:
                    raise SurgeryError(f"{ctx.where}: {base!r} and {donor!r} saw different probe tokens "
                                       f"({stats_a.count} vs {stats_b.count}); their sketches cannot be compared")
                perm, corr = align_layer(stats_a, stats_b, ctx.options.identity_bonus)
                tensors[f"{donor}/{layer}/perm"] = perm
                kept.append(float((perm == torch.arange(perm.numel())).float().mean()))
                matched.append(float(corr[torch.arange(perm.numel()), perm].mean()))
                if clusters is not None:
                    tensors[f"{donor}/{layer}/ensemble_map"] = match_ensembles(
                        corr, clusters.tensors[f"{base}/{layer}/labels"], clusters.tensors[f"{donor}/{layer}/labels"])
            figures[f"{donor}/identity_share"] = sum(kept) / len(kept)
            figures[f"{donor}/matched_correlation"] = sum(matched) / len(matched)
        return Artifact(tensors=tensors, meta={"models": ctx.models, "layers": layers, "ensembles": clusters is not None},
                        figures=figures)


def _cluster_artifact(ctx) -> Artifact | None:
    try:
        return ctx.upstream("cluster")
    except SurgeryError:
        return None


hungarian = Hungarian()
