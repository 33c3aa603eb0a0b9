"""Streamed weight-space merges: the machinery every ``fuse`` plugin that combines tensors shares.

``stream_merge_named`` reads each tensor of every input model one at a time (base first, then the
donors through the tensor map of a heterogeneous pair), combines them, and writes the result shard by
shard, so no whole model is ever held in memory.
"""
from __future__ import annotations

from typing import Callable, Literal

import torch
from pydantic import Field

from surgery.core.artifacts import Artifact
from surgery.core.errors import RecipeError
from surgery.core.options import Options
from surgery.models.adapters import ModelView, neuron_slices
from surgery.models.checkpoint import CheckpointReader
from surgery.models.hetero import TensorMap, checkpoint_names, load_map, plan_merge

MAP_HELP = "tensor map for a heterogeneous pair: a built-in name (e.g. llava-from-llama), a YAML file, or inline rules"



class StreamOptions(Options):
    max_shard_mb: float | None = Field(256.0, gt=0, description="cap on each output safetensors shard (MiB)")
    map: str | dict | None = Field(None, description=MAP_HELP)



def stream_merge(ctx, combine: Callable[[list[torch.Tensor]], torch.Tensor], max_shard_mb: float | None,
                 tensor_map: TensorMap | None = None) -> Artifact:
    """Apply ``combine`` to each tensor of ``ctx.models`` (float32, base first) and save the result."""
    return stream_merge_named(ctx, lambda _name, tensors: combine(tensors), max_shard_mb, tensor_map)



def stream_merge_named(ctx, combine: Callable[[str, list[torch.Tensor]], torch.Tensor], max_shard_mb: float | None,
                       tensor_map: TensorMap | None = None, models: list[str] | None = None) -> Artifact:
    """Like :func:`stream_merge`, with ``combine(base_tensor_name, tensors)``.

    ``models`` (default: the step's) are the recipe models read, base first. Base tensors that
    ``tensor_map`` keeps, and non-float tensors, are copied from the base.
    """
    models = models or ctx.models
    if len(models) < 2:
        raise RecipeError(f"{ctx.where}.models: a merge needs at least two models, got {models}")
    tensor_map = tensor_map if tensor_map is not None else map_option(ctx)
    readers = [CheckpointReader(ctx.model_path(name)) for name in models]
    base = readers[0]
    donors = {name: (reader.names(), reader.shape) for name, reader in zip(models[1:], readers[1:])}
    plan = plan_merge(base.names(), base.shape, donors, tensor_map)
    writer = ctx.model_writer(like=models[0], max_shard_mb=max_shard_mb)
    # every output tensor has its base tensor's name, dtype and shape: lay the shards out up front
    writer.reserve([(name, base.dtype(name), base.shape(name)) for name in base.names()])
    merged = kept = 0
    try:
        for name in ctx.progress(base.names(), desc="merging tensors"):
            first = base.get(name)
            sources = plan.sources[name]
            if sources is None or not first.is_floating_point():
                writer.add(name, first)
                kept += first.numel()
                continue
            tensors = [first.float()] + [r.get(source).float() for r, source in zip(readers[1:], sources)]
            writer.add(name, combine(name, tensors).to(first.dtype))
            merged += first.numel()
            del first, tensors  # unmap the inputs before the next tensor is read
    except BaseException:
        writer.abort()
        raise
    model_dir = writer.close()
    unused = {donor: len(names) for donor, names in plan.unused.items() if names}
    meta = {"models": models, "map": tensor_map.name, "unused_donor_tensors": unused}
    return Artifact(meta=meta, figures={"merged_params": merged, "kept_params": kept}, model_dir=model_dir)



def map_option(ctx) -> TensorMap:
    """The step's ``map`` option resolved (relative files against the recipe's directory)."""
    spec = getattr(ctx.options, "map", None)
    base_dir = getattr(getattr(getattr(ctx, "run", None), "recipe", None), "base_dir", None)
    return load_map(spec, base_dir)



def per_model(value: float | list[float], count: int, where: str, key: str) -> list[float]:
    values = [value] * count if isinstance(value, (int, float)) else list(value)
    if len(values) != count:
        raise RecipeError(f"{where}.{key}: expected {count} values (one per model), got {len(values)}")
    return values


def tensor_classes(module: torch.nn.Module, view: ModelView) -> tuple[dict[str, TensorClass], dict[str, list]]:
    """(class of every tensor, neuron slices ``[(layer, axis, offset)]`` per tensor), both keyed by
    checkpoint tensor name."""
    prefixes: dict[str, TensorClass] = {view.embed: "embeddings"}
    if view.lm_head:
        prefixes[view.lm_head] = "lm_head"
    if view.final_norm:
        prefixes[view.final_norm] = "norms"
    slices: dict[str, list] = {}
    for layer in view.layers:
        for path in (layer.attn.out_proj, layer.attn.q_proj, layer.attn.k_proj, layer.attn.v_proj, layer.attn.qkv_proj):
            if path:
                prefixes[path] = "attention"
        for path in layer.norms:
            prefixes[path] = "norms"
        for path in (layer.mlp.down, layer.mlp.up, layer.mlp.gate):
            if path:
                prefixes[path] = "mlp"
        for item in neuron_slices(module, layer.mlp):
            slices.setdefault(item.name, []).append((str(layer.index), item.axis, item.offset))
    saved_as = checkpoint_names(module)
    classes = {saved_as[name]: class_of(name, prefixes) for name in saved_as}
    return classes, {saved_as.get(name, name): value for name, value in slices.items()}



def class_of(name: str, prefixes: dict[str, TensorClass]) -> TensorClass:
    module = name.rpartition(".")[0]
    while module:
        if module in prefixes:
            return prefixes[module]
        module = module.rpartition(".")[0]
    return "other"


TensorClass = Literal["mlp", "attention", "norms", "embeddings", "lm_head", "other"]
