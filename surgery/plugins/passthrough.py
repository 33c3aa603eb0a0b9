"""Passthrough with layer slices: a deeper or shallower model stacked from ranges of layers.

Each slice names a model and a half-open layer range ``[start, end)``; the output's layers are the
slices' layers in order, renumbered from 0 (``slices: [{model: a, layers: [0, 2]}, {model: b,
layers: [1, 2]}]`` gives a 3-layer model: a's layers 0 and 1, then b's layer 1). The tensors before
the layers (embeddings) come from the first slice's model, the ones after them (final norm, head)
from the last slice's model, as in mergekit. The config is the first slice's model's with the new
layer count (and per-layer ``layer_types`` taken from the source layers), so the result reloads
with stock ``from_pretrained``. A slice's optional ``scale`` (a number, gradient or filters over the
output's layers) multiplies its tensors.
"""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from surgery import hookimpl
from surgery.core.artifacts import Artifact
from surgery.models.checkpoint import CheckpointReader
from surgery.engines.merge_params import LAYER_PATTERN, SETTING_HELP, Setting, TensorParams, layer_count, layer_of
from surgery.core.errors import RecipeError
from surgery.core.io import read_json, write_json
from surgery.core.options import Options

PRE_LAYER = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings", "token_type_embeddings")
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


class Slice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(..., description="a model of the step")
    layers: tuple[int, int] = Field(..., description="half-open layer range [start, end)")
    scale: Setting | None = Field(None, description=f"factor on the slice's tensors ({SETTING_HELP})")

    @field_validator("layers")
    @classmethod
    def _range(cls, value):
        start, end = value
        if not 0 <= start < end:
            raise ValueError(f"layer range {list(value)} must satisfy 0 <= start < end")
        return value


class PassthroughOptions(Options):
    slices: list[Slice] = Field(..., min_length=1, description="layer ranges stacked in order")
    max_shard_mb: float | None = Field(256.0, gt=0, description="cap on each output safetensors shard (MiB)")


def renumber(name: str, layer: int) -> str:
    match = LAYER_PATTERN.search(name)
    return name[:match.start(1)] + str(layer) + name[match.end(1):]


class Passthrough:
    """Stack layer ranges of several models into one model."""

    @hookimpl
    def option_schema(self, stage: str):
        return PassthroughOptions if stage == "fuse" else None

    @hookimpl
    def fuse(self, ctx) -> Artifact:
        slices = ctx.options.slices
        readers = self._readers(ctx, slices)
        plan = self._plan(readers, slices)
        params = TensorParams([f"model.layers.{i}.x" for i in range(sum(s.layers[1] - s.layers[0] for s in slices))])
        writer = ctx.model_writer(like=slices[0].model, max_shard_mb=ctx.options.max_shard_mb)
        for out_name, (index, source) in ctx.progress(plan.items(), desc="stacking layers", total=len(plan)):
            tensor = readers[slices[index].model].get(source)
            factor = params.value(slices[index].scale, out_name, 1.0)
            if factor != 1.0 and tensor.is_floating_point():
                tensor = (tensor.float() * factor).to(tensor.dtype)
            writer.add(out_name, tensor)
        model_dir = writer.close()
        layer_sources = [(s.model, layer) for s in slices for layer in range(*s.layers)]
        self._write_config(model_dir, ctx.model_path(slices[0].model), layer_sources, ctx)
        meta = {"models": ctx.models, "slices": [s.model_dump(mode="json") for s in slices], "layers": len(layer_sources)}
        return Artifact(meta=meta, figures={"layers": len(layer_sources)}, model_dir=model_dir)

    def _readers(self, ctx, slices: list[Slice]) -> dict[str, CheckpointReader]:
        readers = {}
        for i, piece in enumerate(slices):
            if piece.model not in ctx.models:
                raise RecipeError(f"{ctx.where}.slices[{i}].model: {piece.model!r} is not one of the step's models {ctx.models}")
            readers.setdefault(piece.model, CheckpointReader(ctx.model_path(piece.model)))
            available = layer_count(readers[piece.model].names())
            if piece.layers[1] > available:
                raise RecipeError(f"{ctx.where}.slices[{i}].layers: {list(piece.layers)} exceeds {piece.model!r}'s {available} layers")
        return readers

    def _plan(self, readers: dict[str, CheckpointReader], slices: list[Slice]) -> dict[str, tuple[int, str]]:
        """Output tensor name -> (slice index, source tensor name)."""
        first, last = readers[slices[0].model].names(), readers[slices[-1].model].names()
        plan = {n: (0, n) for n in first if layer_of(n) is None and any(p in n for p in PRE_LAYER)}
        out_layer = 0
        for index, piece in enumerate(slices):
            names = readers[piece.model].names()
            for layer in range(*piece.layers):
                for name in names:
                    if layer_of(name) == layer:
                        plan[renumber(name, out_layer)] = (index, name)
                out_layer += 1
        plan.update({n: (len(slices) - 1, n) for n in last if layer_of(n) is None and not any(p in n for p in PRE_LAYER)})
        return plan

    def _write_config(self, model_dir, first_dir, layer_sources: list[tuple[str, int]], ctx) -> None:
        config = read_json(model_dir / "config.json")
        for key in LAYER_COUNT_KEYS:
            if key in config:
                config[key] = len(layer_sources)
        if isinstance(config.get("layer_types"), list):
            types = {name: read_json(ctx.model_path(name) / "config.json").get("layer_types") for name, _ in layer_sources}
            config["layer_types"] = [types[name][layer] for name, layer in layer_sources]
        write_json(model_dir / "config.json", config)


passthrough = Passthrough()
