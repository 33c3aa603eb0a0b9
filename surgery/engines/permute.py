"""Neuron matching and function-preserving permutations of MLP weights.

A hidden neuron i of an MLP owns row i of every input projection (gate, up, fc_in, and their biases)
and column i of the output projection (down, fc_out). Permuting all of them with the same ``perm``
reorders the neurons without changing what the MLP computes. Where a tensor keeps the neuron index
is declared as :class:`surgery.models.adapters.ParamSlice` ``(tensor name, axis, offset)`` triples
(``surgery.models.adapters.neuron_slices`` lists them for any adapted model; Conv1D weights are stored
transposed, fused gate+up weights hold two blocks), which is all these helpers need to know.

Matching is a linear assignment (``scipy.optimize.linear_sum_assignment``) on a similarity matrix,
used for single neurons (e.g. ``surgery.engines.capture.sketch_correlation`` of two models' activation
sketches) and for ensembles (mean member similarity).
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import torch

from surgery.models.adapters import ParamSlice


def match(similarity_ab: torch.Tensor) -> torch.Tensor:
    """``perm`` with ``perm[i]`` = the column matched to row i, maximising the total similarity.

    ``similarity_ab`` is [n_a, n_b] with n_a <= n_b; returns int64 [n_a].
    """
    if similarity_ab.shape[0] > similarity_ab.shape[1]:
        raise ValueError(f"cannot match {similarity_ab.shape[0]} rows to {similarity_ab.shape[1]} columns")
    values = np.nan_to_num(similarity_ab.detach().double().cpu().numpy(), nan=-1.0)
    from scipy.optimize import linear_sum_assignment  # imported on first use, like nnsight in gates

    rows, cols = linear_sum_assignment(values, maximize=True)
    perm = torch.empty(similarity_ab.shape[0], dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return perm


def ensemble_similarity(similarity_ab: torch.Tensor, labels_a: torch.Tensor, labels_b: torch.Tensor) -> torch.Tensor:
    """Mean member similarity of every ensemble pair: [k_a, k_b] (empty ensembles score -inf)."""
    k_a, k_b = int(labels_a.max()) + 1, int(labels_b.max()) + 1
    one_a = torch.nn.functional.one_hot(labels_a.long(), k_a).double()  # [n_a, k_a]
    one_b = torch.nn.functional.one_hot(labels_b.long(), k_b).double()
    sums = one_a.T @ similarity_ab.double() @ one_b
    counts = one_a.sum(0)[:, None] * one_b.sum(0)[None, :]
    return torch.where(counts > 0, sums / counts.clamp_min(1), torch.tensor(float("-inf"), dtype=torch.float64)).float()


def match_ensembles(similarity_ab: torch.Tensor, labels_a: torch.Tensor, labels_b: torch.Tensor) -> torch.Tensor:
    """``ensemble_map[k]`` = the ensemble of b matched to ensemble k of a (Hungarian on mean similarity)."""
    scores = ensemble_similarity(similarity_ab, labels_a, labels_b)
    return match(torch.where(torch.isinf(scores), torch.full_like(scores, -1e9), scores))


def permute_tensor(tensor: torch.Tensor, axis: int, perm: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """``tensor`` with the block ``[offset, offset + len(perm))`` along ``axis`` reordered by ``perm``
    (slice offset+i of the result = slice offset+perm[i]); the rest is unchanged."""
    index = torch.arange(tensor.shape[axis], device=tensor.device)
    index[offset:offset + perm.numel()] = perm.to(tensor.device) + offset
    return torch.index_select(tensor, axis, index)


def permute_state(state: Mapping[str, torch.Tensor], slices: Iterable[ParamSlice], perm: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors named in ``slices`` with their neurons permuted (tensors not named are not returned).

    Several slices may name one tensor (a fused gate+up weight); all of them are applied.
    """
    out: dict[str, torch.Tensor] = {}
    for name, axis, offset in slices:
        out[name] = permute_tensor(out.get(name, state[name]), axis, perm, offset)
    return out


@torch.no_grad()
def permute_module_(module: torch.nn.Module, slices: Iterable[ParamSlice], perm: torch.Tensor) -> None:
    """Permute the named parameters of ``module`` in place (function-preserving for a whole MLP)."""
    params = dict(module.named_parameters())
    for name, tensor in permute_state(params, slices, perm).items():
        params[name].copy_(tensor)


def invert(perm: torch.Tensor) -> torch.Tensor:
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return inverse


def is_permutation(perm: torch.Tensor, size: int) -> bool:
    return perm.numel() == size and torch.equal(torch.sort(perm).values, torch.arange(size))
