"""Sparsified task-vector merges: DARE-TIES / DARE-linear, Model Breadcrumbs (+ TIES), DELLA (+ linear) and SCE.

All share one pipeline (formulas in docs/methods/merge_methods.md): with task vectors
tau_i = W_i - W_base (the first model is the base),

1. sparsify each tau_i at its density: ``random`` (DARE, Yu et al. 2024: keep each entry with
   probability d), ``outliers`` (Breadcrumbs, Davari & Belilovsky 2023: drop the ``gamma`` share of
   largest |entries| and the smallest, keep d), ``della`` (DELLA, Deep et al. 2024: keep with
   probability d - eps + 2 eps rank/(n - 1), ranking |entries| within each row);
2. rescale the kept entries: by 1/p (``inverse-density``), or to tau_i's L1 norm (``l1``, mergekit);
3. combine: sum_i w_i tau_i' (``-linear`` and Breadcrumbs), or with TIES' sign election
   (``-ties``, DELLA) keep the entries that agree with gamma = sign(sum_i w_i tau_i');
   ``normalize`` divides by the summed weights of the donors kept;
4. W* = W_base + lambda * merged.

SCE (Wan et al. 2024) selects the top ``select_topk`` share of entries by variance across donors,
weights each donor by its mean squared task vector, and erases entries against the elected sign.

Random masks come from a generator seeded by (recipe seed, tensor name, donor): reproducible and
independent of tensor order.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator

from surgery.engines import tensor_merge
from surgery.engines.merge_methods import (
    StreamOptions, TaskVectorOptions, TensorCall, fuse_method, task_vector_method,
)
from surgery.engines.merge_params import SETTING_HELP, Setting, check_range

Rescale = Literal["none", "inverse-density", "l1"]


class DareOptions(TaskVectorOptions):
    density: Setting = Field(0.5, description=f"probability of keeping each entry ({SETTING_HELP})")
    rescale: Rescale = Field("inverse-density", description="divide kept entries by the density (the paper) or restore the L1 norm (mergekit)")


class DareTiesOptions(DareOptions):
    normalize: bool = Field(True, description="divide by the summed weights of the donors that agree (TIES' disjoint mean)")


class BreadcrumbsOptions(TaskVectorOptions):
    density: Setting = Field(0.9, description=f"share of each task vector's entries kept ({SETTING_HELP})")
    gamma: Setting = Field(0.01, description=f"share of largest |entries| dropped as outliers ({SETTING_HELP})")
    @field_validator("gamma")
    @classmethod
    def _gamma(cls, value):
        return check_range(value, at_least=0, at_most=1)


class DellaOptions(TaskVectorOptions):
    density: Setting = Field(0.5, description=f"mean keep probability ({SETTING_HELP})")
    epsilon: Setting = Field(0.15, description=f"spread of keep probabilities by magnitude rank ({SETTING_HELP})")
    rescale: Rescale = Field("inverse-density", description="divide kept entries by their keep probability (the paper) or restore the L1 norm (mergekit)")
    @field_validator("epsilon")
    @classmethod
    def _epsilon(cls, value):
        return check_range(value, at_least=0, at_most=0.5)


class DellaTiesOptions(DellaOptions):
    normalize: bool = Field(True, description="divide by the summed weights of the donors that agree")


dare_ties = task_vector_method("dare-ties", DareTiesOptions, "random", "sum",
                               "DARE random drop and rescale, then TIES sign election.")
dare_linear = task_vector_method("dare-linear", DareOptions, "random", None,
                                 "DARE random drop and rescale, then a weighted sum of task vectors.")
breadcrumbs = task_vector_method("breadcrumbs", BreadcrumbsOptions, "outliers", None,
                                 "Model Breadcrumbs: drop outliers and small entries, weighted sum of task vectors.")
breadcrumbs_ties = task_vector_method("breadcrumbs-ties", BreadcrumbsOptions, "outliers", "sum",
                                      "Model Breadcrumbs masks with TIES sign election.")
della = task_vector_method("della", DellaTiesOptions, "della", "sum",
                           "DELLA: magnitude-ranked random drop (MagPrune), rescale, TIES sign election.")
della_linear = task_vector_method("della-linear", DellaOptions, "della", None,
                                  "DELLA's MagPrune, then a weighted sum of task vectors.")


class SceOptions(StreamOptions):
    select_topk: Setting = Field(1.0, description=f"share of entries kept by variance across donors ({SETTING_HELP})")
    @field_validator("select_topk")
    @classmethod
    def _topk(cls, value):
        return check_range(value, above=0, at_most=1)


@fuse_method("sce", SceOptions, min_models=2)
def sce(call: TensorCall) -> torch.Tensor:
    """SCE: select by variance, calculate weights from squared task vectors, erase sign conflicts."""
    return tensor_merge.sce(call.tensors[0], call.tensors[1:], call.value("select_topk", 1.0))
