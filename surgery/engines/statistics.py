"""Small statistics the merge methods share: Gaussian mutual information, seeded k-means."""
from __future__ import annotations

import torch

RHO_MAX = 1 - 1e-6



def gaussian_mi(rho: torch.Tensor) -> torch.Tensor:
    """MI of two jointly Gaussian variables with correlation rho: -0.5 log(1 - rho^2)."""
    rho = rho.clamp(-RHO_MAX, RHO_MAX)
    return -0.5 * torch.log1p(-rho.square())



def kmeans(features_nf: torch.Tensor, k: int, generator: torch.Generator, iterations: int = 50) -> torch.Tensor:
    """Spherical k-means (cosine), k-means++ start; int64 labels [n] using every id 0..k-1."""
    n = features_nf.shape[0]
    k = min(k, n)
    centres = _kmeans_pp(features_nf, k, generator)
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iterations):
        new = (features_nf @ centres.T).argmax(dim=1)
        new = _fill_empty(features_nf, centres, new, k)
        if torch.equal(new, labels):
            break
        labels = new
        for c in range(k):
            centres[c] = torch.nn.functional.normalize(features_nf[labels == c].sum(0), dim=0)
    return labels



def _kmeans_pp(features_nf: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    n = features_nf.shape[0]
    chosen = [int(torch.randint(n, (1,), generator=generator))]
    distance_n = 1 - features_nf @ features_nf[chosen[0]]
    for _ in range(1, k):
        p = distance_n.clamp_min(0)
        p = p / p.sum() if p.sum() > 0 else torch.full_like(p, 1 / n)
        chosen.append(int(torch.multinomial(p.float(), 1, generator=generator)))
        distance_n = torch.minimum(distance_n, 1 - features_nf @ features_nf[chosen[-1]])
    return features_nf[chosen].clone()



def _fill_empty(features_nf: torch.Tensor, centres: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Give every empty cluster the point farthest from its own centre (deterministic)."""
    labels = labels.clone()
    for c in range(k):
        if (labels == c).any():
            continue
        fit_n = (features_nf * centres[labels]).sum(1)
        sizes = torch.bincount(labels, minlength=k)
        fit_n[sizes[labels] <= 1] = float("inf")  # never empty another cluster
        labels[int(fit_n.argmin())] = c
    return labels



def layer_seed(seed: int, model_index: int, layer: str) -> int:
    return (seed * 1_000_003 + model_index * 10_007 + int(layer)) % 2**63
