"""Function-first fuse plugins: ``@fuse_method(name, options)`` over a per-tensor ``combine``.

``combine(call)`` receives a :class:`TensorCall`: the tensor name, the models' tensors in float32
(the step's models in order, the first one is the base where a method has one), the step's options
and ``call.value(key)`` / ``call.values(key)``, which resolve per-layer and per-tensor settings
(:mod:`surgery.engines.merge_params`) for this tensor. The plugin streams the merge tensor by tensor
(:func:`stream_merge_named`): atomic, sharded output, no whole model in memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
from pydantic import Field

from surgery import hookimpl
from surgery.core.artifacts import Artifact
from surgery.models.checkpoint import CheckpointReader
from surgery.engines import tensor_merge
from surgery.engines.merge_params import SETTING_HELP, DensityChecks, Setting, TensorParams
from surgery.core.errors import RecipeError
from surgery.core.options import Options
from surgery.engines.merge import StreamOptions, stream_merge_named


@dataclass
class TensorCall:
    """One tensor of a streamed merge, as ``combine`` sees it."""

    name: str
    tensors: list[torch.Tensor]
    options: Any
    params: TensorParams
    seed: int

    def value(self, key: str, default: float | None = None) -> float | None:
        """The option ``key`` (a setting) for this tensor."""
        return self.params.value(getattr(self.options, key, None), self.name, default)

    def values(self, key: str, count: int, default: float) -> list[float]:
        """The per-model option ``key`` (a list of settings, or None) for this tensor."""
        settings = getattr(self.options, key, None)
        return self.params.values(settings, self.name, count, default)

    def generator(self, donor: int) -> torch.Generator:
        """Random draws that depend only on (recipe seed, tensor name, donor), not on tensor order."""
        return tensor_merge.seeded_generator(self.seed, self.name, donor)


Combine = Callable[[TensorCall], torch.Tensor]


def expect_entries(ctx, key: str, count: int, what: str) -> None:
    """A per-model option ``key`` (None or a list) has ``count`` entries, one per ``what``."""
    values = getattr(ctx.options, key, None)
    if values is not None and len(values) != count:
        raise RecipeError(f"{ctx.where}.{key}: expected {count} entries (one per {what}), got {len(values)}")


class FuseMethod:
    """A streamed fuse plugin built from a per-tensor ``combine``."""

    def __init__(self, name: str, options: type[Options], combine: Combine, min_models: int = 2,
                 max_models: int | None = None, check: Callable[[Any, Any], None] | None = None) -> None:
        self.name, self.options, self.combine = name, options, combine
        self.min_models, self.max_models, self._check = min_models, max_models, check
        self.__doc__ = combine.__doc__

    @hookimpl
    def option_schema(self, stage: str):
        return self.options if stage == "fuse" else None

    @hookimpl
    def fuse(self, ctx) -> Artifact:
        self.check(ctx)
        opts, seed = ctx.options, ctx.seed
        params = TensorParams(CheckpointReader(ctx.model_path(ctx.models[0])).names())

        def combine(name: str, tensors: list[torch.Tensor]) -> torch.Tensor:
            return self.combine(TensorCall(name, tensors, opts, params, seed))

        artifact = stream_merge_named(ctx, combine, opts.max_shard_mb)
        artifact.meta.update(method=self.name, options=opts.model_dump(mode="json"))
        return artifact

    def check(self, ctx) -> None:
        count = len(ctx.models)
        if count < self.min_models or (self.max_models is not None and count > self.max_models):
            wanted = f"{self.min_models}" if self.max_models == self.min_models else (
                f"at least {self.min_models}" if self.max_models is None else f"{self.min_models} to {self.max_models}")
            raise RecipeError(f"{ctx.where}.models: {self.name} merges {wanted} models, got {count}: {ctx.models}")
        if self._check is not None:
            self._check(ctx, ctx.options)


def fuse_method(name: str, options: type[Options], min_models: int = 2, max_models: int | None = None,
                check: Callable[[Any, Any], None] | None = None) -> Callable[[Combine], FuseMethod]:
    """Decorator: ``@fuse_method("slerp", SlerpOptions, 2, 2)`` over ``def combine(call) -> Tensor``."""

    def build(combine: Combine) -> FuseMethod:
        return FuseMethod(name, options, combine, min_models, max_models, check)

    return build


# --- task vectors ---------------------------------------------------------------------------------



class TaskVectorOptions(StreamOptions, DensityChecks):
    """Options every task-vector merge takes (the first model is the base, the others donors)."""

    weights: list[Setting] | None = Field(None, description=f"one weight per donor (default 1 each); each a {SETTING_HELP}")
    density: Setting = Field(1.0, description=f"share of each task vector's entries kept ({SETTING_HELP})")
    densities: list[Setting] | None = Field(None, description="one density per donor (overrides density)")
    scale: Setting = Field(1.0, description=f"lambda applied to the merged task vector ({SETTING_HELP})")
    normalize: bool = Field(False, description="divide by the summed weights (of the donors that agree with the elected sign)")
    rescale: Literal["none", "inverse-density", "l1"] = Field(
        "none", description="after sparsifying: divide by the keep probability (the papers) or restore the L1 norm (mergekit)")
    convention: Literal["paper", "mergekit"] = Field(
        "paper", description="paper: k = ceil(density n) by threshold, no sign on a zero sum, election on unweighted "
        "task vectors; mergekit: k = int(density n) by sort, + on a zero sum, weights before the election")


def check_donors(ctx, opts) -> None:
    donors = len(ctx.models) - 1
    expect_entries(ctx, "weights", donors, "donor")
    expect_entries(ctx, "densities", donors, "donor")


def merge_task_vectors(call: TensorCall, sparsifier: str, consensus: str | None) -> torch.Tensor:
    """The step's task-vector merge of one tensor (see :func:`tensor_merge.task_vector_merge`)."""
    opts = call.options
    base, donors = call.tensors[0], call.tensors[1:]
    count = len(donors)
    density = call.value("density", 1.0)
    densities = call.values("densities", count, density) if opts.densities is not None else [density] * count
    return tensor_merge.task_vector_merge(
        base, donors, call.values("weights", count, 1.0), densities, call.value("scale", 1.0), sparsifier, consensus,
        opts.normalize, opts.rescale, opts.convention, [call.generator(i) for i in range(count)],
        call.value("gamma", 0.01), call.value("epsilon", 0.15))


def task_vector_method(name: str, options: type[TaskVectorOptions], sparsifier: str, consensus: str | None,
                       doc: str) -> FuseMethod:
    """One named setting of the task-vector merge (mergekit's generalized task arithmetic)."""

    def combine(call: TensorCall) -> torch.Tensor:
        return merge_task_vectors(call, sparsifier, consensus)

    combine.__doc__ = doc
    return FuseMethod(name, options, combine, min_models=2, check=check_donors)
