"""Every hook model-surgery calls. Each docstring is the contract a plugin implements.

Stage hooks (``capture`` ... ``evaluate``) are never broadcast: the runner calls exactly the
plugin a recipe step names (``Manager.call_stage``), so several plugins can implement one stage side
by side. Each stage hook receives one :class:`surgery.runtime.context.StepContext` called ``ctx``; the step's
validated options are ``ctx.options`` (an instance of the schema the plugin returned from
``option_schema``). A stage hook returns an :class:`surgery.core.artifacts.Artifact` that the runner saves
under ``<output>/<NN>-<stage>-<plugin>/``; ``weight`` and ``constrain`` return objects used by other
steps instead (see their contracts).

Registration hooks (``register_*``) are broadcast to every plugin at start-up; each receives a
``register`` callable so plugins add named things without the core knowing them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:  # imported for annotations only; the core stays importable without plugins
    import click
    from pydantic import BaseModel

    from surgery.core.artifacts import Artifact
    from surgery.runtime.context import StepContext

hookspec = pluggy.HookspecMarker("surgery")
hookimpl = pluggy.HookimplMarker("surgery")

STAGES = (
    "capture", "weight", "score", "cluster", "align", "fuse",
    "attribute", "prune", "constrain", "tune", "evaluate",
)


# --- options ---------------------------------------------------------------------------------

@hookspec(firstresult=True)
def option_schema(stage: str) -> "type[BaseModel] | None":
    """Return the pydantic model that validates this plugin's options for ``stage``.

    Called on one plugin at a time, before any model or data is loaded, by ``surgery validate``,
    ``surgery run`` and ``surgery describe``. The schema should forbid unknown keys
    (``model_config = ConfigDict(extra="forbid")``; :class:`surgery.core.options.Options` does this) and
    give every field a type, a default where one is sensible, and a ``description``. Keys the core
    reads itself (``plugin``, ``name``, ``models``, ``data``, ``inputs``, ``as``) are removed
    before validation. Return ``None`` for a stage this plugin does not implement.
    """


# --- stages ------------------------------------------------------------------------------------

@hookspec(firstresult=True)
def capture(ctx: "StepContext") -> "Artifact":
    """Record activation profiles of each model in ``ctx.models`` over the probe set ``ctx.data``.

    Statistics are streamed (weighted sums, cross-products, counts, sketches), never per-token
    tensors, so memory does not grow with the number of tokens. Per-token weights come from
    ``ctx.weighter()`` (uniform unless the recipe has a ``weight`` step). Returns an Artifact whose
    tensors are keyed ``"<model>/<layer>/<statistic>"`` and whose meta names the models and layers.
    """


@hookspec(firstresult=True)
def weight(ctx: "StepContext") -> Any:
    """Return a token weighter: an object with ``weights(logits_btv, input_ids_bt, mask_bt) -> w_bt``.

    ``capture`` plugins call it (through ``ctx.weighter()``) on each batch to obtain non-negative
    per-token weights; padded positions must get weight 0. The uniform weighter returns ``mask_bt``.
    The weight step itself records only its options; it is cheap and may appear anywhere in a recipe.
    """


@hookspec(firstresult=True)
def score(ctx: "StepContext") -> "Artifact":
    """Score every neuron (and/or head) from upstream ``capture`` artifacts.

    Returns an Artifact with tensors ``"<model>/<layer>/score"`` (one float per neuron, higher =
    more important, unless the plugin documents otherwise in meta["convention"]).
    """


@hookspec(firstresult=True)
def cluster(ctx: "StepContext") -> "Artifact":
    """Group each layer's neurons into ensembles, deterministically given ``ctx.seed``.

    Returns tensors ``"<model>/<layer>/labels"`` (int64, one cluster id per neuron, ids 0..k-1).
    """


@hookspec(firstresult=True)
def align(ctx: "StepContext") -> "Artifact":
    """Map the donor model's neurons (and ensembles) onto the base model's.

    Returns tensors ``"<donor>/<layer>/perm"`` (int64: perm[i] = donor neuron matched to base neuron
    i; applying it to the donor's MLP rows/columns preserves the donor's function) and optionally
    ``"<donor>/<layer>/ensemble_map"``.
    """


@hookspec(firstresult=True)
def fuse(ctx: "StepContext") -> "Artifact":
    """Build a merged model from ``ctx.models`` (the first is the base) and upstream artifacts.

    Must save the merged weights with ``ctx.save_model(...)`` or ``ctx.save_state_dict(...)`` so
    the result reloads with stock ``transformers``; the runner then offers it to later steps under
    the step's ``as`` name. Returns an Artifact with figures in ``meta``.
    """


@hookspec(firstresult=True)
def attribute(ctx: "StepContext") -> "Artifact":
    """Attribute an objective to attention heads (and optionally neurons) of ``ctx.models[0]``.

    Returns tensors ``"scores"`` [layers, heads] (sign convention: negative = the head lowers the
    loss, i.e. is useful), optionally ``"per_sample"`` [samples, layers, heads], and in meta the
    completeness check (sum of attributions vs objective difference).
    """


@hookspec(firstresult=True)
def prune(ctx: "StepContext") -> "Artifact":
    """Choose heads/neurons to remove from ``ctx.models[0]`` using an upstream ``attribute`` or
    ``score`` artifact, save the pruned model (``ctx.save_model``), and return the prune plan
    (tensors ``"head_mask"`` [layers, heads], ``"neuron_mask/<layer>"``) with the objective before and
    after, parameters removed and the prune curve in meta.
    """


@hookspec(firstresult=True)
def constrain(ctx: "StepContext") -> Any:
    """Return a differentiable drift penalty: an object ``c`` with
    ``c.penalty(policy_model, batch) -> Tensor[batch]`` (>= 0, 0 when the policy equals the reference)
    against the reference model named in the options.

    Called by the ``tune`` step and by coefficient searches in ``fuse`` plugins via
    ``ctx.call("constrain", plugin, options)``. Must not modify either model.
    """


@hookspec(firstresult=True)
def tune(ctx: "StepContext") -> "Artifact":
    """Fine-tune ``ctx.models[0]`` (e.g. preference optimisation to heal a surgered model), save it
    with ``ctx.save_model`` and return the training curve and figures.
    """


@hookspec(firstresult=True)
def evaluate(ctx: "StepContext") -> "Artifact":
    """Evaluate each of ``ctx.models`` (task accuracy, probe loss ...); figures go in ``meta``."""


# --- registration ------------------------------------------------------------------------------

@hookspec
def register_architectures(register: Callable[..., None]) -> None:
    """Add architecture adapters: ``register(model_type, build_view)`` where
    ``build_view(model, part) -> surgery.models.adapters.ModelView`` (``part`` names a sub-model such as
    LLaVA's ``language`` or ``vision``). ``model_type`` is ``config.model_type``.
    """


@hookspec
def register_objectives(register: Callable[..., None]) -> None:
    """Add objectives: ``register(name, objective)``; see :class:`surgery.models.objectives.Objective`."""


@hookspec
def register_data_sources(register: Callable[..., None]) -> None:
    """Add data sources: ``register(name, load, schema=None)`` where ``load(spec, seed) -> list[dict]``
    returns examples (``{"text": ...}``, optionally ``"prompt"``/``"answer"``, preference fields or
    ``"pixel_values"``) and ``schema`` (an Options subclass) validates the source's own recipe keys."""


@hookspec
def register_models(register: Callable[..., None]) -> None:
    """Add named models for ``builtin:NAME``: ``register(name, build)`` where ``build(cache_dir)``
    returns the path of a directory that ``transformers`` ``from_pretrained`` can load."""


@hookspec
def register_commands(cli: "click.Group") -> None:
    """Add click commands to the ``surgery`` command group.

    A command reaches the plugin manager of its invocation, and through it the registries, as
    ``click.get_current_context().obj`` (a :class:`surgery.runtime.manager.Manager`).
    """
