"""model-surgery: capture, score, align, fuse, attribute, prune and heal transformer models.

The public API is what this package exports (``surgery.__all__``); see docs/api.md. Names are
imported on first use (module ``__getattr__``), so ``import surgery`` stays cheap: running a recipe
imports torch, listing names does not.

- Recipes: :func:`load_recipe`, :func:`run` (-> :class:`RunResult`), :func:`call` (one plugin on
  given models), :func:`load_model`, :class:`Recipe`, :class:`Manager`.
- Writing plugins: :data:`hookimpl`, :class:`Options`, :class:`Artifact`, :class:`StepContext`, the
  errors, and the shared engines that built-in plugins use: capture (:class:`Capture`,
  :func:`mlp_activations` ...), gated evaluation (:func:`evaluate_points`, :func:`gated_losses`,
  :func:`gate_gradients`, :func:`head_sites`, :func:`neuron_sites`) and the attribution artifact
  (:class:`AttributeOptions`, :class:`Attribution`, :func:`prepared_batches`,
  :func:`attribution_artifact` ...).
"""
from surgery.core.version import VERSION as __version__
from surgery.hookspecs import hookimpl

# public name -> the module that defines it
_EXPORTS = {
    # library
    "load_recipe": "surgery.runtime.api", "run": "surgery.runtime.api", "call": "surgery.runtime.api",
    "load_model": "surgery.runtime.api", "RunResult": "surgery.runtime.api", "Recipe": "surgery.runtime.recipe",
    "Manager": "surgery.runtime.manager", "StepContext": "surgery.runtime.context",
    "LoadedModel": "surgery.models.loading",
    # plugin authoring: core
    "Options": "surgery.core.options", "NoOptions": "surgery.core.options", "Artifact": "surgery.core.artifacts",
    "SurgeryError": "surgery.core.errors", "RecipeError": "surgery.core.errors", "PluginError": "surgery.core.errors",
    "ModelError": "surgery.core.errors", "DataError": "surgery.core.errors", "NumericError": "surgery.core.errors",
    "CheckpointReader": "surgery.models.checkpoint", "CheckpointWriter": "surgery.models.checkpoint",
    "lazy": "surgery.core.lazy",
    # capture
    "Capture": "surgery.engines.capture", "Stats": "surgery.engines.capture", "Stream": "surgery.engines.capture",
    "mlp_activations": "surgery.engines.capture", "mlp_inputs": "surgery.engines.capture",
    "mlp_outputs": "surgery.engines.capture", "head_outputs": "surgery.engines.capture",
    "residual": "surgery.engines.capture", "number_rows": "surgery.engines.capture",
    # gated evaluation
    "GateSite": "surgery.engines.gates", "head_sites": "surgery.engines.gates", "neuron_sites": "surgery.engines.gates",
    "gated_losses": "surgery.engines.gates", "gate_gradients": "surgery.engines.gates",
    "evaluate_points": "surgery.engines.gates", "model_inputs": "surgery.engines.gates",
    # attribution
    "AttributeOptions": "surgery.engines.attribution", "Attribution": "surgery.engines.attribution",
    "attribution_artifact": "surgery.engines.attribution", "completeness": "surgery.engines.attribution",
    "gather_rows": "surgery.engines.attribution", "loss_function": "surgery.engines.attribution",
    "points_per_chunk": "surgery.engines.attribution", "prepared_batches": "surgery.engines.attribution",
    "sites_for": "surgery.engines.attribution",
}

__all__ = ["__version__", "hookimpl", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'surgery' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
