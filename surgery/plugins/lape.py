"""LAPE: length-agnostic, path-sampled neuron encodings; the ``capture`` plugin ``lape`` (DESIGN §2.3, seed 001).

For every probe input x (its ``prompt``, or its ``text`` when it has none) and every causal model M
of the step, N_s = ``paths`` continuations S_k are sampled with top-p sampling, path k of input x
having ``len_k ~ U{len_min, ..., len_max}`` tokens. Lengths and the sampling noise come from a
generator seeded by (recipe seed, input index, k), so a path does not depend on how inputs are
batched. Paths of several inputs are generated together, left-padded, with the KV cache; one
teacher-forced nnsight pass over ``[x; S_k]`` then reads, per path and layer l:

- ``log p(S_k|x) = sum_t log p(s_t | s_<t, x)``: the model's own (unfiltered, temperature 1)
  distribution, ``z[s_t] - logsumexp(z)`` in float32;
- ``a_{l,i}(S_k)``: neuron i's activation (the down projection's input) averaged over the path's
  tokens; ``Y_l(S_k)``: the MLP output (the down projection's output) averaged the same way;
- ``L_norm(S_k) = -log p(S_k|x) / len_k``.

Path weights, self-normalised in log space (the seed's ``p(S_k|x) gamma^(len_k - 1)`` underflows to
0 for any real path)::

    omega_k = softmax_k( log p(S_k|x) + (len_k - 1) log gamma )

``g_{l,i}(S_k) = a_{l,i}(S_k) <Y_l(S_k) - Y_ref, d_i / |d_i|>`` with d_i neuron i's write
direction; ``Y_ref`` is the parent model C's MLP output on the same path (option ``parent``) or
else ``sum_k omega_k Y_l(S_k)``. Then ``phi_{l,i}(x) = sum_k omega_k [a, g, L_norm]`` and
``phi_{l,i}`` = its mean over x.

Artifact tensors per model M and layer l: ``M/l/phi_x`` [X, I, 3], ``M/l/phi`` [I, 3] and
``M/l/plain_x`` [X, I] (the plain token mean of a over all sampled path tokens, the baseline LAPE is
compared with); per model ``M/paths/{logp,lengths,nll,omega}`` [X, N_s]. Nothing per token is
kept: memory grows with X * I, never with the number of tokens.
"""
from __future__ import annotations

from pydantic import Field, model_validator

from surgery import hookimpl
from surgery.core.artifacts import Artifact
from surgery.core.errors import RecipeError
from surgery.core.options import Options
from surgery.engines.paths import PathSettings, effective_sample_size, encode_model, probe_spec, prompt_ids
from surgery.models.adapters import ModelView

# --- options -----------------------------------------------------------------------------------

class LapeOptions(Options):
    paths: int = Field(50, ge=1, description="N_s: sampled continuations per probe input")
    len_min: int = Field(8, ge=1, description="shortest path length in tokens")
    len_max: int = Field(32, ge=1, description="longest path length in tokens (lengths ~ U{len_min..len_max})")
    top_p: float = Field(0.9, gt=0, le=1, description="nucleus sampling mass")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (path log-probabilities use the model's own distribution)")
    gamma: float = Field(0.99, gt=0, le=1, description="length discount: weight factor gamma^(len - 1)")
    parent: str | None = Field(None, description="recipe model C whose MLP outputs on the same paths give Y_ref")
    layers: list[int] | None = Field(None, description="layer indices to encode (default: every layer)")
    batch_size: int | None = Field(None, ge=1, description="probe inputs generated together (rows = batch_size x paths; default: the data entry's)")

    @model_validator(mode="after")
    def _lengths(self) -> "LapeOptions":
        if self.len_min > self.len_max:
            raise ValueError(f"len_min ({self.len_min}) must not exceed len_max ({self.len_max})")
        return self


# --- path weights ------------------------------------------------------------------------------


# --- sampling ----------------------------------------------------------------------------------


# --- what one teacher-forced pass reads ---------------------------------------------------------


# --- phi ---------------------------------------------------------------------------------------


# --- the encoder -------------------------------------------------------------------------------


# --- the plugin --------------------------------------------------------------------------------

class Lape:
    """LAPE: path-sampled, length-discounted neuron encodings phi = [a, g, L] per probe input."""

    @hookimpl
    def option_schema(self, stage: str):
        return LapeOptions if stage == "capture" else None

    @hookimpl
    def capture(self, ctx) -> Artifact:
        opts = ctx.options
        settings = PathSettings.of(opts)
        parent = _parent(ctx, opts.parent)
        spec = probe_spec(ctx)
        batch_size = opts.batch_size or spec.batch_size
        tensors, layers, figures = {}, {}, {}
        for name in ctx.models:
            loaded = ctx.model(name)
            _check_layers(ctx, name, opts.layers, loaded.view)
            prompts = prompt_ids(loaded.tokenizer, ctx.examples(), spec.max_tokens)
            pad_id = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
            progress = lambda it, total: ctx.progress(it, desc=f"lape {name}", total=total)  # noqa: E731
            encoded = encode_model(loaded.module, loaded.view, prompts, settings, batch_size=batch_size, seed=ctx.seed,
                                   layers=opts.layers, parent=parent.module if parent else None,
                                   parent_view=parent.view if parent else None, pad_id=pad_id, progress=progress)
            tensors.update({f"{name}/{key}": value for key, value in encoded.items()})
            layers[name] = list(opts.layers) if opts.layers is not None else [layer.index for layer in loaded.view.layers]
            omega = encoded["paths/omega"]
            figures[f"{name}/inputs"] = len(prompts)
            figures[f"{name}/ess_mean"] = float(effective_sample_size(omega).mean())
            figures[f"{name}/weighted_length"] = float((omega.double() * encoded["paths/lengths"].double()).sum(-1).mean())
        meta = {"models": list(ctx.models), "layers": layers, "parent": opts.parent,
                "settings": {k: getattr(settings, k) for k in PathSettings.__dataclass_fields__}}
        return Artifact(tensors=tensors, meta=meta, figures=figures)


def _parent(ctx, name: str | None):
    if name is None:
        return None
    if name not in ctx.run.recipe.models and name not in ctx.run.produced:
        raise RecipeError(f"{ctx.where}.parent: unknown model {name!r} (recipe models: {sorted(ctx.run.recipe.models)})")
    return ctx.model(name)


def _check_layers(ctx, name: str, wanted: list[int] | None, view: ModelView) -> None:
    if wanted is None:
        return
    unknown = sorted(set(wanted) - {layer.index for layer in view.layers})
    if unknown:
        raise RecipeError(f"{ctx.where}.layers: {unknown} do not exist in model {name!r} ({view.num_layers} layers)")


lape = Lape()
