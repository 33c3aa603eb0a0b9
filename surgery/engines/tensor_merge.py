"""Per-tensor merge formulas shared by the fuse plugins (pure functions of float tensors).

Spherical family (``plugins/slerp.py``):

- slerp:       v(t) = sin((1-t) theta)/sin(theta) v0 + sin(t theta)/sin(theta) v1, theta the angle
               between v0 and v1 as flat vectors; linear interpolation when |cos theta| > 0.9995.
- nuslerp:     the same over rows or columns (or flattened), with t = w1 / (w0 + w1), optionally on
               task vectors against a base; linear where sin(theta) < 1e-8.
- multislerp:  barycentric interpolation on the sphere: unit vectors u_i, weighted mean direction m,
               tangent vectors u_i - (u_i . m) m, their weighted sum v; exp map
               m cos|v| + v sin|v|/|v|, scaled by the weighted mean norm.
- karcher:     the weighted Riemannian (Karcher) mean of the unit vectors by fixed-point iteration
               u <- cos|T| u + sin|T| T/|T|, T = sum_i a_i theta_i/sin(theta_i) (u_i - cos(theta_i) u),
               scaled by the weighted mean norm.
- model_stock: (Jang et al. 2024) w_H = t w_avg + (1-t) w_0, t = N cos / (1 + (N-1) cos), cos the mean
               pairwise cosine of the fine-tunes' offsets from the base w_0 (t = 0 where 1 + (N-1) cos = 0).

Task-vector family (``plugins/task_vectors.py`` and the TIES/DARE baselines): a sparsifier per
donor, then an optional sign consensus and a (normalised) weighted sum; see :func:`combine_deltas`.
"""
from __future__ import annotations

import math
import zlib
from typing import Literal, Sequence

import torch

DOT_THRESHOLD = 0.9995


def lerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    return (1 - t) * v0 + t * v1


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = DOT_THRESHOLD,
          eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation of two tensors seen as flat vectors (``t = 0`` gives ``v0``)."""
    u0, u1 = _unit(v0.flatten(), eps), _unit(v1.flatten(), eps)
    dot = float(torch.dot(u0, u1))
    if abs(dot) > dot_threshold:
        return lerp(t, v0, v1)
    theta = math.acos(dot)
    return (math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)


def _unit(v: torch.Tensor, eps: float) -> torch.Tensor:
    norm = torch.linalg.vector_norm(v)
    return v / norm if norm > eps else v


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool = False, flatten: bool = True,
            eps: float = 1e-8) -> torch.Tensor:
    """Slerp of every row (``row_wise``), every column, or the flattened tensors (``flatten``)."""
    shape = v0.shape
    if flatten or v0.dim() < 2:
        a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    elif row_wise:  # the vectors run along dim 0: interpolate each column of the matrix
        a, b = v0.transpose(0, -1), v1.transpose(0, -1)
    else:
        a, b = v0, v1
    ua = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp(min=1e-7)
    ub = b / torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (ua * ub).sum(-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps ** 2  # sin(theta) <= eps
    theta = torch.acos(torch.where(colinear, 0, cos))
    out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    out = torch.where(colinear, lerp(t, a, b), out)
    if not (flatten or v0.dim() < 2) and row_wise:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def multislerp(tensors: Sequence[torch.Tensor], weights: Sequence[float], base: torch.Tensor | None = None,
               normalize_weights: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Barycentric interpolation of several tensors on the hypersphere (optionally around ``base``)."""
    if len(tensors) == 1:
        return tensors[0]
    stacked = torch.stack(list(tensors))
    if base is not None:
        stacked = stacked - base
    flat = stacked.reshape(len(tensors), -1)
    w = torch.tensor(list(weights), dtype=flat.dtype)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(tensors) != 2:
            raise ValueError("the weighted mean direction is zero (antipodal inputs with balancing weights)")
        out = (stacked[0] * w[0] + stacked[1] * w[1])
        return out + base if base is not None else out
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * w[:, None]).sum(0)
    length = torch.linalg.vector_norm(tangent) + eps
    out = (mean * torch.cos(length) + tangent * (torch.sin(length) / length)) * (norms.squeeze(-1) * w).sum()
    out = out.reshape(stacked.shape[1:])
    return out + base if base is not None else out


def karcher(tensors: Sequence[torch.Tensor], weights: Sequence[float] | None = None, max_iter: int = 10,
            tol: float = 1e-5) -> torch.Tensor:
    """Weighted Karcher mean of the tensors' directions, scaled by the weighted mean of their norms."""
    alphas = list(weights) if weights is not None else [1.0 / len(tensors)] * len(tensors)
    if len(tensors) == 1:
        return tensors[0]
    norms = [float(torch.linalg.vector_norm(t)) for t in tensors]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    total = sum(alphas[i] for i in valid)
    a = [alphas[i] / total for i in valid]
    units = [(tensors[i] / norms[i]).flatten() for i in valid]
    u = sum(ai * ui for ai, ui in zip(a, units))
    norm_u = float(torch.linalg.vector_norm(u))
    u = units[0].clone() if norm_u < tol else u / norm_u
    for _ in range(max_iter):
        tangent = torch.zeros_like(u)
        for ai, ui in zip(a, units):
            dot = torch.clamp(torch.dot(u, ui), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) >= tol:
                tangent += ai * (theta / torch.sin(theta)) * (ui - dot * u)
        length = torch.linalg.vector_norm(tangent)
        if float(length) < tol:
            break
        u = torch.cos(length) * u + torch.sin(length) * (tangent / length)
        u_norm = torch.linalg.vector_norm(u)
        if float(u_norm) > tol:
            u = u / u_norm
    scale = sum(al * n for al, n in zip(alphas, norms))
    return (scale * u).reshape(tensors[0].shape)


def model_stock(base: torch.Tensor, tuned: Sequence[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    """Model Stock: interpolate the fine-tunes' average towards the base by the offsets' mean cosine."""
    if len(tuned) < 2:
        raise ValueError("model_stock needs at least two fine-tuned models besides the base")
    shape = base.shape
    if filter_wise:
        w0 = base if base.dim() > 1 else base[None]
        ws = [w if w.dim() > 1 else w[None] for w in tuned]
    else:
        w0, ws = base.flatten(), [w.flatten() for w in tuned]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            norms = torch.linalg.vector_norm(offsets[i], dim=-1) * torch.linalg.vector_norm(offsets[j], dim=-1)
            cosines.append(((offsets[i] * offsets[j]).sum(-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6  # cos = -1/(N-1): no finite ratio, keep the base
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(cos), denominator))
    average = sum(ws) / n
    return (t * average + (1 - t) * w0).reshape(shape)


# --- task vectors ---------------------------------------------------------------------------------

Convention = Literal["paper", "mergekit"]
Rescale = Literal["none", "inverse-density", "l1"]


def keep_count(n: int, density: float, convention: Convention) -> int:
    """Entries kept of ``n`` (at least 1): ``ceil(density n)`` in the paper convention, ``int(density n)`` in mergekit's."""
    if convention == "mergekit":
        return max(1, int(density * n))
    return max(1, math.ceil(density * n))


def magnitude_mask(tau: torch.Tensor, density: float, convention: Convention) -> torch.Tensor:
    """1 on the largest-|entry| share ``density`` of ``tau``.

    paper: a threshold at the k-th largest |entry| (ties at the threshold all kept);
    mergekit: exactly k entries by a descending sort (ties broken by sort order).
    """
    n = tau.numel()
    if density >= 1:
        return torch.ones_like(tau)
    k = keep_count(n, density, convention)
    if convention == "mergekit":
        mask = torch.zeros(n, dtype=tau.dtype)
        mask[torch.argsort(tau.abs().flatten(), descending=True)[:k]] = 1
        return mask.reshape(tau.shape)
    if k >= n:
        return torch.ones_like(tau)
    threshold = torch.kthvalue(tau.abs().flatten(), n - k + 1).values
    return (tau.abs() >= threshold).to(tau.dtype)


def outlier_mask(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the ``gamma`` share of largest |entries| and the smallest, keep ``density``.

    With n_top = int(gamma n) and k = int(density n), the entries ranked n_bot .. n_bot + k in
    ascending |entry| are kept, n_bot = max(0, n - k - n_top) (fewer outliers dropped when k + n_top > n).
    """
    if density >= 1:
        return torch.ones_like(tau)
    n = tau.numel()
    target, n_top = int(density * n), int(gamma * n)
    n_bot = max(0, n - target - n_top)
    order = torch.sort(tau.abs().flatten(), descending=False).indices
    mask = torch.zeros(n, dtype=tau.dtype)
    mask[order[n_bot:n_bot + target]] = 1
    return mask.reshape(tau.shape)


def random_mask(tau: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``."""
    if density >= 1:
        return torch.ones_like(tau)
    return (torch.rand(tau.shape, generator=generator) < density).to(tau.dtype)


def della_probabilities(tau: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA MagPrune keep probabilities: rank r of |entry| within each row (1 = smallest),
    p = density - epsilon + 2 epsilon (r - 1)/(n - 1)."""
    if not (0 < density - epsilon and density + epsilon < 1):
        raise ValueError(f"della: density +/- epsilon must lie in (0, 1), got {density} +/- {epsilon}")
    rows = tau if tau.dim() >= 2 else tau[None]
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(tau.dtype)  # 0 = smallest
    width = rows.shape[1] - 1
    rank_norm = ranks / width if width > 0 else torch.zeros_like(ranks)
    return ((density - epsilon) + rank_norm * 2 * epsilon).reshape(tau.shape)


def della_mask(tau: torch.Tensor, density: float, epsilon: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, keep probabilities) of DELLA's MagPrune."""
    if density >= 1:
        return torch.ones_like(tau), torch.ones_like(tau)
    probs = della_probabilities(tau, density, epsilon)
    return (torch.rand(tau.shape, generator=generator) < probs).to(tau.dtype), probs


def rescale_masked(tau: torch.Tensor, mask: torch.Tensor, rescale: Rescale, keep_prob: torch.Tensor | float,
                   eps: float = 1e-7) -> torch.Tensor:
    """``tau * mask``, rescaled by 1/p (``inverse-density``) or to ``tau``'s L1 norm (``l1``, mergekit)."""
    masked = tau * mask
    if rescale == "inverse-density":
        return masked / keep_prob
    if rescale == "l1":
        before, after = tau.abs().sum(), masked.abs().sum()
        if before < eps or after < eps:
            return masked
        return masked * (before / after)
    return masked


def elect_mask(weighted: torch.Tensor, consensus: Literal["sum", "count"], convention: Convention) -> torch.Tensor:
    """Entries whose sign agrees with the elected sign of ``weighted`` (donors on dim 0).

    gamma = sign(sum_i weighted_i) (``sum``) or the majority of signs (``count``); a zero total elects
    no sign in the paper convention and + in mergekit's.
    """
    signs = torch.sign(weighted)
    total = weighted.sum(0) if consensus == "sum" else signs.sum(0)
    gamma = torch.where(total >= 0, 1.0, -1.0).to(weighted.dtype) if convention == "mergekit" else torch.sign(total)
    return ((signs == gamma) & (weighted != 0)).to(weighted.dtype)


def combine_deltas(deltas: Sequence[torch.Tensor], weights: Sequence[float], consensus: Literal["sum", "count"] | None,
                   normalize: bool, convention: Convention) -> torch.Tensor:
    """Merged task vector from sparsified ``deltas``.

    mergekit: d_i' = w_i d_i; with a consensus, mask m_i from the d_i'; merged = sum_i m_i d_i', divided
    (``normalize``) by sum_i m_i w_i (1 where 0). Without a consensus the divisor is sum_i w_i.
    paper: the weights scale the deltas after the election, which uses the unweighted deltas.
    """
    stacked = torch.stack(list(deltas))
    w = torch.tensor(list(weights), dtype=stacked.dtype).reshape(-1, *([1] * (stacked.dim() - 1)))
    weighted = stacked * w
    if consensus is None:
        merged = weighted.sum(0)
        divisor = w.sum(0).expand_as(merged).clone()
        divisor[divisor.abs() < 1e-8] = 1
    else:
        mask = elect_mask(weighted if convention == "mergekit" else stacked, consensus, convention)
        merged = (weighted * mask).sum(0)
        divisor = (w * mask).sum(0)
        divisor[divisor == 0] = 1
    return merged / divisor if normalize else merged


def seeded_generator(seed: int, name: str, donor: int) -> torch.Generator:
    """A generator that depends only on (seed, tensor name, donor), not on the tensor order."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode()) * 31 + donor) % 2**63)


def sparsify(tau: torch.Tensor, density: float, sparsifier: str, rescale: Rescale, convention: Convention,
             generator: torch.Generator | None = None, gamma: float = 0.01, epsilon: float = 0.15) -> torch.Tensor:
    """``tau`` masked by ``sparsifier`` (none, magnitude, outliers, random, della) at ``density``, then rescaled."""
    if sparsifier == "none" or density >= 1:
        return tau
    if sparsifier == "magnitude":
        mask, keep = magnitude_mask(tau, density, convention), density
    elif sparsifier == "outliers":
        mask, keep = outlier_mask(tau, density, gamma), density
    elif sparsifier == "random":
        mask, keep = random_mask(tau, density, generator), density
    elif sparsifier == "della":
        mask, keep = della_mask(tau, density, epsilon, generator)
    else:
        raise ValueError(f"unknown sparsifier {sparsifier!r}")
    return rescale_masked(tau, mask, rescale, keep)


def task_vector_merge(base: torch.Tensor, tuned: Sequence[torch.Tensor], weights: Sequence[float],
                      densities: Sequence[float], scale: float, sparsifier: str, consensus: Literal["sum", "count"] | None,
                      normalize: bool, rescale: Rescale, convention: Convention,
                      generators: Sequence[torch.Generator] | None = None, gamma: float = 0.01,
                      epsilon: float = 0.15) -> torch.Tensor:
    """W_base + lambda * combine_deltas(sparsify(W_i - W_base), w_i) (lambda applied after normalising)."""
    deltas = [sparsify(t - base, d, sparsifier, rescale, convention, generators[i] if generators else None, gamma, epsilon)
              for i, (t, d) in enumerate(zip(tuned, densities))]
    merged = combine_deltas(deltas, weights, consensus, normalize, convention)
    return base + merged * scale if scale != 1 else base + merged


def sce(base: torch.Tensor, tuned: Sequence[torch.Tensor], select_topk: float = 1.0) -> torch.Tensor:
    """SCE (Wan et al. 2024): Select the top-k entries by variance across donors, Calculate donor
    weights sum(tau_i^2)/sum_j sum(tau_j^2), Erase entries against the elected sign (mergekit's rule)."""
    taus = torch.stack([t - base for t in tuned])
    if select_topk < 1:
        var = torch.var(taus, dim=0, unbiased=False)
        k = int(int(torch.count_nonzero(var)) * select_topk)
        mask = torch.zeros(var.numel(), dtype=taus.dtype)
        if k > 0:
            mask[torch.topk(var.abs().flatten(), k=k, largest=True).indices] = 1
        taus = taus * mask.reshape(var.shape)
    erase = elect_mask(taus, "sum", "mergekit")
    weights = taus.pow(2).mean(dim=tuple(range(1, taus.dim()))) if taus.dim() > 1 else taus.pow(2)
    total = float(weights.sum())
    weights = torch.full_like(weights, 1 / len(tuned)) if abs(total) < 1e-6 else weights / total
    weights = weights.reshape(-1, *([1] * (taus.dim() - 1)))
    erased = weights * erase
    return base + (taus * erased).sum(0) / erased.sum(0).clamp(min=1e-6)
