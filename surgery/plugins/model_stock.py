"""Model Stock (Jang et al. 2024, arXiv:2403.19522): fine-tunes averaged and pulled towards the base.

With base w_0 (the first model) and N >= 2 fine-tunes w_i, offsets d_i = w_i - w_0 and cos the mean
pairwise cosine of the d_i (per tensor, or per row with ``filter_wise``):

    t = N cos / (1 + (N - 1) cos),    w_H = t * mean_i(w_i) + (1 - t) * w_0
"""
from __future__ import annotations

import torch
from pydantic import Field

from surgery.engines import tensor_merge
from surgery.engines.merge_methods import StreamOptions, TensorCall, fuse_method


class ModelStockOptions(StreamOptions):
    filter_wise: bool = Field(False, description="one interpolation ratio per row instead of per tensor")


@fuse_method("model-stock", ModelStockOptions, min_models=3)
def model_stock(call: TensorCall) -> torch.Tensor:
    """Model Stock: the fine-tunes' mean moved towards the base by their offsets' mean cosine."""
    return tensor_merge.model_stock(call.tensors[0], call.tensors[1:], call.options.filter_wise)
