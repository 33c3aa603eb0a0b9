"""Every hook model-surgery calls. Each docstring is the contract a plugin implements.

Hooks come in three phases:

- **options** (``option_schema``): asked of one plugin at a time, before anything is loaded.
- **stages** (``capture`` ... ``evaluate``): never broadcast. The runner calls exactly the plugin
  a recipe step names (``Manager.call_stage``, a pluggy caller restricted to that plugin), so
  several plugins implement one stage side by side; ``firstresult``: the return value is the
  plugin's. Each receives one :class:`surgery.runtime.context.StepContext` called ``ctx`` whose
  ``ctx.options`` is the step's options, validated by the schema ``option_schema`` returned. Stage
  hooks return an :class:`surgery.core.artifacts.Artifact` that the runner saves atomically under
  ``<output>/<NN>-<stage>-<plugin>/``; ``weight`` and ``constrain`` return objects other steps use.
- **registration** (``register_*``): broadcast to every plugin, each receiving a callable to add
  named things, so the core never knows them in advance.

A user-caused problem is raised as a :class:`surgery.core.errors.SurgeryError` subclass with a
one-line message; the runner adds the step's location.
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

    Called on the one plugin a step names (stops at its non-None result), before any model or data
    is loaded, by ``surgery validate``, ``surgery run``, ``surgery describe`` and
    ``StepContext.call``. The schema should forbid unknown keys (subclass
    :class:`surgery.core.options.Options`) and give every field a type, a default where one is
    sensible, and a ``description``. Keys the core reads itself (``plugin``, ``name``, ``models``,
    ``data``, ``inputs``, ``as``) are removed before validation. A validator that needs a registry
    reads it from pydantic's validation context (``info.context["registries"]``).

    :param stage: one of :data:`STAGES`.
    :returns: the schema class, or ``None`` for a stage this plugin does not implement (the step
        then takes no options).
    """


# --- stages ------------------------------------------------------------------------------------

@hookspec(firstresult=True)
def capture(ctx: "StepContext") -> "Artifact":
    """Record activation profiles of each model in ``ctx.models`` over the probe set.

    Called by the runner on the plugin a ``capture`` step names. Statistics are streamed (weighted
    sums, cross-products, counts, sketches), never per-token tensors, so memory does not grow with
    the number of tokens. Per-token weights come from ``ctx.weighter()`` (uniform unless the recipe
    has a ``weight`` step).

    :param ctx: the step; ``ctx.batches(tokenizer)`` gives the probe data.
    :returns: an Artifact with tensors keyed ``"<model>/<layer>/<statistic>"``; meta names the
        models and layers.
    """


@hookspec(firstresult=True)
def weight(ctx: "StepContext") -> Any:
    """Return a token weighter for the recipe's ``capture`` steps.

    Called on the plugin the recipe's ``weight`` step names: by the runner for the step itself
    (cheap; it may appear anywhere in a recipe) and whenever a capture plugin asks
    ``ctx.weighter()``.

    :param ctx: the ``weight`` step.
    :returns: an :class:`surgery.core.artifacts.Artifact` subclass (saved like any step's) with
        ``weights(logits_btv, input_ids_bt, mask_bt) -> w_bt``: non-negative per-token weights, 0 on
        padding (the uniform weighter returns ``mask_bt``).
    """


@hookspec(firstresult=True)
def score(ctx: "StepContext") -> "Artifact":
    """Score every neuron (and/or head) from upstream ``capture`` artifacts.

    Called by the runner on the plugin a ``score`` step names; ``ctx.upstream("capture")`` gives
    the capture.

    :param ctx: the step.
    :returns: an Artifact with tensors ``"<model>/<layer>/score"`` (one float per neuron, higher =
        more important unless meta["convention"] says otherwise).
    """


@hookspec(firstresult=True)
def cluster(ctx: "StepContext") -> "Artifact":
    """Group each layer's neurons into ensembles, deterministically given ``ctx.seed``.

    Called by the runner on the plugin a ``cluster`` step names.

    :param ctx: the step.
    :returns: an Artifact with tensors ``"<model>/<layer>/labels"`` (int64, one ensemble id per
        neuron, ids 0..k-1).
    """


@hookspec(firstresult=True)
def align(ctx: "StepContext") -> "Artifact":
    """Map the donor model's neurons (and ensembles) onto the base model's.

    Called by the runner on the plugin an ``align`` step names; ``ctx.models[0]`` is the base.

    :param ctx: the step.
    :returns: an Artifact with tensors ``"<donor>/<layer>/perm"`` (int64: ``perm[i]`` = the donor
        neuron matched to base neuron i; applying it to the donor's MLP rows/columns preserves the
        donor's function) and optionally ``"<donor>/<layer>/ensemble_map"``.
    """


@hookspec(firstresult=True)
def fuse(ctx: "StepContext") -> "Artifact":
    """Build a merged model from ``ctx.models`` (the first is the base) and upstream artifacts.

    Called by the runner on the plugin a ``fuse`` step names. The merged weights must be saved with
    ``ctx.save_model(...)`` or streamed through ``ctx.model_writer(...)`` so the result reloads with
    stock ``transformers``; the runner then offers it to later steps under the step's ``as`` name.

    :param ctx: the step.
    :returns: an Artifact whose figures (coefficients chosen, parameters merged) go to the report.
    """


@hookspec(firstresult=True)
def attribute(ctx: "StepContext") -> "Artifact":
    """Attribute an objective to attention heads or MLP neurons of ``ctx.models[0]``.

    Called by the runner on the plugin an ``attribute`` step names, and by ``prune`` plugins that
    re-attribute (``ctx.call("attribute", plugin, options)``). Subclassing
    :class:`surgery.engines.attribution.GateAttribution` leaves a plugin only ``attribute_batch``.

    :param ctx: the step; ``ctx.objective(name)`` gives the loss.
    :returns: an Artifact with tensors ``"scores"`` [layers, units] (signed: negative = the unit
        lowers the loss, i.e. is useful, unless meta["signed"] is false), optionally
        ``"per_sample"`` [samples, layers, units], and in meta the completeness check (sum of
        attributions vs objective difference) where the method has one.
    """


@hookspec(firstresult=True)
def prune(ctx: "StepContext") -> "Artifact":
    """Remove heads or neurons from ``ctx.models[0]`` using an upstream ``attribute`` or ``score``
    artifact, and save the pruned model with ``ctx.save_model``.

    Called by the runner on the plugin a ``prune`` step names.

    :param ctx: the step; ``ctx.upstream("attribute")`` gives the scores.
    :returns: an Artifact with the plan (tensors ``"head_mask"`` [layers, heads] and
        ``"neuron_mask/<layer>"``) and in meta the objective before and after, the parameters
        removed and the prune curve.
    """


@hookspec(firstresult=True)
def constrain(ctx: "StepContext") -> Any:
    """Return a differentiable drift penalty against the reference model named in the options.

    Called by ``tune`` plugins and by coefficient searches in ``fuse`` plugins through
    ``ctx.call("constrain", plugin, options)``. Must not modify either model.

    :param ctx: the child context of the calling step.
    :returns: an object ``c`` with ``c.penalty(policy_model, batch) -> Tensor[batch]`` (>= 0, 0 when
        the policy equals the reference); see :class:`surgery.engines.tuning.Constraint` for what a
        ``tune`` loop also uses.
    """


@hookspec(firstresult=True)
def tune(ctx: "StepContext") -> "Artifact":
    """Fine-tune ``ctx.models[0]`` (e.g. preference optimisation to heal a surgered model).

    Called by the runner on the plugin a ``tune`` step names; the tuned model is saved with
    ``ctx.save_model``.

    :param ctx: the step.
    :returns: an Artifact with the training curve and figures.
    """


@hookspec(firstresult=True)
def evaluate(ctx: "StepContext") -> "Artifact":
    """Evaluate each of ``ctx.models`` (task accuracy, probe loss ...).

    Called by the runner on the plugin an ``evaluate`` step names.

    :param ctx: the step.
    :returns: an Artifact whose figures are keyed ``"<model>/<measure>"``.
    """


# --- registration ------------------------------------------------------------------------------

@hookspec
def register_architectures(register: Callable[..., None]) -> None:
    """Add architecture adapters.

    Broadcast to every plugin when a manager first builds its registries (and again after a plugin
    is added); lookups go through ``ctx.registries.view(model)``.

    :param register: ``register(model_type, build_view)``: ``model_type`` is ``config.model_type``;
        ``build_view(model, part) -> surgery.models.adapters.ModelView`` (``part`` names a sub-model
        such as LLaVA's ``language`` or ``vision``).
    """


@hookspec
def register_objectives(register: Callable[..., None]) -> None:
    """Add objectives (losses) that ``ctx.objective(name)`` finds.

    Broadcast to every plugin when a manager first builds its registries.

    :param register: ``register(name, objective)``; see :class:`surgery.models.objectives.Objective`.
    """


@hookspec
def register_data_sources(register: Callable[..., None]) -> None:
    """Add data sources that a recipe's ``data:`` entries name with ``source:``.

    Broadcast to every plugin when a manager first builds its registries.

    :param register: ``register(name, load, schema=None)``: ``load(spec, seed) -> list[dict]``
        returns examples (``{"text": ...}``, optionally ``"prompt"``/``"answer"``, preference fields
        or ``"pixel_values"``); ``schema`` (an Options subclass) validates the source's own keys.
    """


@hookspec
def register_models(register: Callable[..., None]) -> None:
    """Add named models that recipes load as ``builtin:NAME``.

    Broadcast to every plugin when a manager first builds its registries.

    :param register: ``register(name, build)``: ``build(cache_dir)`` returns the path of a
        directory that ``transformers`` ``from_pretrained`` loads.
    """


@hookspec
def register_commands(cli: "click.Group") -> None:
    """Add click commands to the ``surgery`` command group.

    Broadcast to every plugin once, when the command line starts. A command reaches the plugin
    manager of its invocation, and through it the registries, as
    ``click.get_current_context().obj`` (a :class:`surgery.runtime.manager.Manager`).

    :param cli: the ``surgery`` group; add commands with ``@cli.command(...)``.
    """
