"""Mean MLP activation profile: per-neuron weighted mean and second moment of each layer's neurons.

For each model in the step and each layer l, over the probe set's real tokens with weights w_t
(uniform unless the recipe has a ``weight`` step):

    mean_{l,i} = sum_t w_t a_{t,l,i} / sum_t w_t        m2_{l,i} = sum_t w_t a_{t,l,i}^2 / sum_t w_t

with a_{t,l,i} the input of layer l's MLP down projection (neuron i). Tensors
``"<model>/<layer>/mean"`` and ``"<model>/<layer>/m2"`` (float32, ``[intermediate]``); figures
``"<model>/tokens"`` (real tokens seen) and ``"<model>/weight"`` (sum of the token weights).
Under data parallelism (``surgery run --nproc N``) each process captures its share of the probe
batches and the sums are all-reduced before the means are taken.
"""
from __future__ import annotations

from pydantic import Field

from surgery import hookimpl
from surgery.core.artifacts import Artifact
from surgery.core.errors import RecipeError
from surgery.core.options import Options
from surgery.engines.capture import Capture, mlp_activations, number_rows


class MeanOptions(Options):
    layers: list[int] | None = Field(None, description="layer indices to capture (default: every layer)")
    batch_size: int | None = Field(None, ge=1, description="probe batch size (default: the data entry's)")


class Mean:
    """Per-neuron weighted mean and second moment of MLP activations (a plain activation profile)."""

    @hookimpl
    def option_schema(self, stage: str):
        return MeanOptions if stage == "capture" else None

    @hookimpl
    def capture(self, ctx) -> Artifact:
        tensors, figures, layers_of = {}, {}, {}
        weighter = ctx.weighter()
        for name in ctx.models:
            loaded = ctx.model(name)
            layers = _selected_layers(ctx, name, loaded.view.layers)
            engine = Capture(loaded.module, {str(l.index): [mlp_activations(l)] for l in layers},
                             weighter=weighter, seed=ctx.seed)
            mine = _my_batches(ctx, ctx.batches(loaded.tokenizer, batch_size=ctx.options.batch_size))
            for batch in ctx.progress(mine, desc=f"mean {name}", total=len(mine)):
                engine.add(batch)
            stats = engine.result()
            for group_stats in stats.values():
                ctx.all_reduce(group_stats.sums)  # data-parallel processes: sums add up exactly
            for group, group_stats in stats.items():
                tensors[f"{name}/{group}/mean"] = group_stats.mean("act").float()
                tensors[f"{name}/{group}/m2"] = group_stats.second_moment("act").float()
            first = next(iter(stats.values()), None)
            figures[f"{name}/tokens"] = first.count if first is not None else 0
            figures[f"{name}/weight"] = first.weight if first is not None else 0.0
            layers_of[name] = [l.index for l in layers]
        return Artifact(tensors=tensors, meta={"models": list(ctx.models), "layers": layers_of, "site": "mlp.down input"},
                        figures=figures)


def _my_batches(ctx, batches) -> list[dict]:
    """This process's share of the probe batches (all of them when alone), rows numbered globally."""
    numbered = list(number_rows(batches))
    mine = [batch for _, batch in ctx.shard(numbered)]
    if not mine:
        raise RecipeError(f"{ctx.where}: {len(numbered)} probe batches are too few for this many processes")
    return mine


def _selected_layers(ctx, name: str, layers: tuple) -> list:
    wanted = ctx.options.layers
    if wanted is None:
        return list(layers)
    unknown = sorted(set(wanted) - {l.index for l in layers})
    if unknown:
        raise RecipeError(f"{ctx.where}: layers {unknown} do not exist in model {name!r} ({len(layers)} layers)")
    return [l for l in layers if l.index in wanted]


mean = Mean()
