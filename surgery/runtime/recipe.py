"""Recipes: YAML files that chain plugin steps. Validated whole before anything is loaded.

```yaml
name: merge-tiny
seed: 0
plugins: [./my_plugin.py]          # optional local plugin files or modules
models: {base: builtin:tiny-llama/task-a, donor: builtin:tiny-llama/task-b}
data: {probe: {source: synthetic, tasks: [copy, reverse], max_samples: 64}}
steps:
  - fuse: {plugin: linear, models: [base, donor], weights: [0.5, 0.5]}
  - evaluate: {plugin: tasks}
output: runs/merge-tiny
```
Each step is a one-key mapping ``{stage: {plugin: NAME, ...options}}``. Core step keys: ``plugin``,
``name``, ``models``, ``data``, ``inputs`` (stage -> step name to read instead of the latest) and
``as`` (the name later steps use for a model this step saves). Everything else is the plugin's
options, validated against its schema.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic

from surgery.core import safe_yaml
from surgery.core.errors import PluginError, RecipeError, SurgeryError, located
from surgery.core.options import Options
from surgery.core.places import check_device, check_output
from surgery.core.registry import did_you_mean
from surgery.hookspecs import STAGES
from surgery.models.registries import Registries
from surgery.runtime.manager import Manager

TOP_KEYS = {"name", "seed", "plugins", "models", "data", "steps", "output", "device", "on_nonfinite"}
NONFINITE_MODES = ("stop", "report")
MAX_SEED = 2**32 - 1  # plugins derive sub-seeds by arithmetic on it; torch takes at most 64 bits
STEP_KEYS = {"plugin", "name", "models", "data", "inputs", "as", "dtype"}
OUTPUT_DTYPES = ("float32", "float16", "bfloat16")
OUTPUT_MODEL = {"fuse": "merged", "prune": "pruned", "tune": "tuned"}
# stages whose steps read every recipe model unless `models:` says otherwise
ALL_MODEL_STAGES = {"capture", "score", "cluster", "align", "fuse", "evaluate"}


@dataclass
class Step:
    index: int
    stage: str
    plugin: str
    name: str
    models: list[str]
    data: str | None
    inputs: dict[str, str]
    output_model: str | None
    options: Options
    raw_options: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None  # dtype of the model the step saves (None: the input's)

    @property
    def dirname(self) -> str:
        return f"{self.index:02d}-{self.stage}-{self.plugin}"


@dataclass
class Recipe:
    name: str
    seed: int
    plugins: list[str]
    models: dict[str, Any]  # name -> surgery.models.loading.ModelSpec
    data: dict[str, Any]  # name -> surgery.models.data.DataSpec
    steps: list[Step]
    output: Path
    device: str
    base_dir: Path
    source: str  # the file the recipe came from, for messages
    on_nonfinite: str = "stop"  # NaN/Inf: stop the step, or report it and go on (surgery.core.guards)
    plugin_files: list[str] = field(default_factory=list)  # the code `plugins:` imported and ran


def read_recipe_file(path: str | Path) -> dict[str, Any]:
    """Parse a recipe file with bounded safe YAML (:mod:`surgery.core.safe_yaml`); one-line errors for
    every way it can fail."""
    path = Path(path)
    if path.is_dir():
        raise RecipeError("is a directory, not a recipe file", where=str(path))
    if path.exists() and not path.is_file():
        raise RecipeError("not a regular file (a device, pipe or socket is never read as a recipe)", where=str(path))
    if not path.is_file():
        raise RecipeError("recipe file not found", where=str(path))
    try:
        limit = safe_yaml.max_bytes()
        size = path.stat().st_size
        if size > limit:
            raise RecipeError(f"{size} bytes, more than the {limit}-byte limit (raise it with ${safe_yaml.SIZE_ENV})",
                              where=str(path))
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise RecipeError("not UTF-8 text", where=str(path)) from None
    except OSError as exc:
        raise RecipeError(f"cannot read the recipe: {exc.strerror or exc}", where=str(path)) from None
    except RecipeError as exc:
        raise located(exc, str(path)) from None
    raw = safe_yaml.load(text, where=str(path))
    if raw is None:
        raise RecipeError("the recipe is empty", where=str(path))
    if not isinstance(raw, dict):
        raise RecipeError(f"a recipe must be a mapping of keys, got {type(raw).__name__}", where=str(path))
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """Apply ``--set a.b.2.c=value`` overrides; ``steps.N.key`` addresses step N's options."""
    raw = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"--set {item!r}: expected KEY=VALUE", where=source)
        key, text = item.split("=", 1)
        value = safe_yaml.load(text, where=f"{source}: --set {key}") if text else ""
        parts = key.split(".")
        if len(parts) >= 3 and parts[0] == "steps" and parts[1].isdigit():
            step = _override_step(raw, int(parts[1]), key, source)
            parts = parts[2:]
            target = step
        else:
            target = raw
        for part in parts[:-1]:
            target = target.setdefault(part, {}) if isinstance(target, dict) else None
            if not isinstance(target, dict):
                raise RecipeError(f"--set {key}: {part!r} is not a mapping", where=source)
        target[parts[-1]] = value
    return raw


def _override_step(raw: dict[str, Any], index: int, key: str, source: str) -> dict[str, Any]:
    steps = raw.get("steps")
    if not isinstance(steps, list) or not 0 <= index < len(steps):
        count = len(steps) if isinstance(steps, list) else 0
        raise RecipeError(f"--set {key}: there is no step {index} (the recipe has {count})", where=source)
    step = steps[index]
    if not isinstance(step, dict) or len(step) != 1:
        raise RecipeError(f"--set {key}: step {index} is not a one-key mapping", where=source)
    (stage, body), = step.items()
    if body is None:
        body = step[stage] = {}
    return body


def swap_plugins(raw: dict[str, Any], swaps: list[str], manager: Manager, source: str) -> dict[str, Any]:
    """Apply ``--set-plugin N=PLUGIN``: step N runs PLUGIN, and the options it does not take are dropped."""
    raw = copy.deepcopy(raw)
    for item in swaps:
        index, _, plugin = item.partition("=")
        if not index.strip().isdigit() or not plugin.strip():
            raise RecipeError(f"--set-plugin {item!r}: expected STEP_INDEX=PLUGIN, e.g. 0=ties", where=source)
        body = _override_step(raw, int(index), f"steps.{index}.plugin", source)
        stage = next(iter(raw["steps"][int(index)]))
        try:
            manager.check_stage(plugin.strip(), stage)
        except PluginError as exc:
            raise RecipeError(f"--set-plugin {item}: {exc}", where=source) from None
        fields = manager.schema(plugin.strip(), stage).model_fields
        for key in [k for k in body if k not in fields and k not in STEP_KEYS]:
            del body[key]
        body["plugin"] = plugin.strip()
    return raw


def load_recipe(
    path: str | Path, manager: Manager, overrides: list[str] = (), output: str | None = None,
    swaps: list[str] = (),
) -> Recipe:
    """Read, override and validate a recipe file. Loads no model and no data."""
    raw = swap_plugins(read_recipe_file(path), list(swaps), manager, str(path))
    raw = apply_overrides(raw, list(overrides), str(path))
    return validate(raw, manager, base_dir=Path(path).resolve().parent, source=str(path), output=output)


def validate(
    raw: dict[str, Any], manager: Manager, base_dir: Path, source: str = "<recipe>", output: str | None = None
) -> Recipe:
    """Check every key, type, range, plugin and reference; return the typed recipe."""
    from surgery.models.loading import parse_model_spec

    _check_string_keys(raw, source)
    _check_keys(raw, TOP_KEYS, source, "")
    name = _typed(raw, "name", str, source, default=Path(source).stem)
    seed = _typed(raw, "seed", int, source, default=0)
    if not 0 <= seed <= MAX_SEED:
        raise RecipeError(f"seed: expected an integer from 0 to {MAX_SEED}, got {_short_repr(seed)}", where=source)
    device = _typed(raw, "device", str, source, default="cpu")
    _wrap(lambda: check_device(device), source, "device")
    on_nonfinite = _typed(raw, "on_nonfinite", str, source, default="stop")
    if on_nonfinite not in NONFINITE_MODES:
        raise RecipeError(f"on_nonfinite: expected one of {', '.join(NONFINITE_MODES)}, got {on_nonfinite!r}", where=source)
    plugins = _typed(raw, "plugins", list, source, default=[])
    plugin_files: list[str] = []
    for i, ref in enumerate(plugins):
        if not isinstance(ref, str) or not ref.strip():
            raise RecipeError(f"plugins[{i}]: expected a file or module name", where=source)
        try:
            plugin_files.append(manager.source_file(manager.add(ref, base_dir)) or ref)
        except PluginError as exc:
            raise RecipeError(f"plugins[{i}]: {exc}", where=source) from None
    models_raw = _typed(raw, "models", dict, source, default={})
    models = {}
    for key, value in models_raw.items():
        models[key] = _wrap(lambda: parse_model_spec(value, base_dir, manager.registries.models), source, f"models.{key}")
    data_raw = _typed(raw, "data", dict, source, default={})
    if data_raw:
        from surgery.models.data import parse_data_spec
    sources = manager.registries.data_sources
    data = {key: _wrap(lambda: parse_data_spec(value, sources, base_dir), source, f"data.{key}") for key, value in data_raw.items()}
    steps_raw = raw.get("steps")
    if not isinstance(steps_raw, list) or not steps_raw:
        raise RecipeError("steps: expected a non-empty list of steps", where=source)
    out = output or raw.get("output") or f"runs/{name}"
    if not isinstance(out, str):
        raise RecipeError("output: expected a directory path", where=source)
    steps = _validate_steps(steps_raw, manager, models, data, source)
    _check_objectives(steps, models, manager.registries, source)
    output_path = Path(out)  # relative to the working directory, like any CLI output path
    _wrap(lambda: check_output(output_path), source, "--output" if output else "output")
    return Recipe(name, seed, plugins, models, data, steps, output_path, device, base_dir, source, on_nonfinite,
                  plugin_files)


def _validate_steps(steps_raw: list, manager: Manager, models: dict, data: dict, source: str) -> list[Step]:
    steps: list[Step] = []
    known_models = list(models)
    unsaved: dict[str, str] = {}  # model a step would make but does not save -> that step
    latest_unsaved: str | None = None  # that model, when the latest step making one saves none
    names: set[str] = set()
    for index, item in enumerate(steps_raw):
        step = _parse_step(item, index, manager, f"steps[{index}]", source)
        where = f"steps[{index}].{step.stage}"
        if not step.models and latest_unsaved and step.stage not in ALL_MODEL_STAGES | {"evaluate"}:
            raise RecipeError(f"{where}.models: by default this step reads {latest_unsaved!r}, which "
                              f"{unsaved[latest_unsaved]} does not save (save_model: false); name the models: this "
                              "step reads, or save that model", where=source)
        step.models = step.models or _default_models(step.stage, known_models, steps, list(models))
        for model in step.models:
            if model in unsaved:
                raise RecipeError(f"{where}.models: {model!r} is never saved ({unsaved[model]} has save_model: false)",
                                  where=source)
            if model not in known_models:
                raise RecipeError(f"{where}.models: unknown model {model!r}" + did_you_mean(model, known_models), where=source)
        if step.data is None and data:
            step.data = next(iter(data))
        if step.data is not None and step.data not in data:
            raise RecipeError(f"{where}.data: unknown data {step.data!r}" + did_you_mean(step.data, list(data)), where=source)
        for stage, ref in step.inputs.items():
            match = [s for s in steps if s.name == ref]
            if not match:
                raise RecipeError(f"{where}.inputs.{stage}: no earlier step named {ref!r}" + did_you_mean(ref, [s.name for s in steps]), where=source)
        if step.name in names:
            raise RecipeError(f"{where}.name: duplicate step name {step.name!r}", where=source)
        names.add(step.name)
        if step.stage in OUTPUT_MODEL:
            named = step.output_model is not None
            step.output_model = step.output_model or _fresh_name(OUTPUT_MODEL[step.stage], known_models, index)
            if step.output_model in models:
                raise RecipeError(f"{where}.as: {step.output_model!r} is already a recipe model", where=source)
            latest_unsaved = None
            if getattr(step.options, "save_model", True) is False:  # e.g. prune's report-only mode
                if named:
                    raise RecipeError(f"{where}.as: names a model this step does not save (save_model: false)", where=source)
                unsaved[step.output_model] = where
                latest_unsaved = step.output_model
                step.output_model = None
            else:
                known_models.append(step.output_model)
        steps.append(step)
    return steps


def _check_objectives(steps: list[Step], models: dict, registries: Registries, source: str) -> None:
    """Each step's objective reads an output its models return (checked from configs, no weights)."""
    from surgery.models.embeddings import LOGITS, outputs_of
    from surgery.models.loading import architecture_of
    from surgery.models.objectives import output_field

    origin = {name: name for name in models}
    for step in steps:
        name = getattr(step.options, "objective", None)
        if isinstance(name, str):
            needed = output_field(registries.objectives.get(name))
            for model in step.models:
                spec = models.get(origin.get(model, ""))
                architecture = architecture_of(spec, registries.models) if spec is not None else None
                if architecture is not None and needed not in outputs_of(architecture):
                    hint = ("it has no LM head; for an embedding model use objective: embedding-distortion"
                            if needed == LOGITS else "it returns logits; this objective needs a bare encoder")
                    raise RecipeError(f"steps[{step.index}].{step.stage}.objective: {name!r} reads the model's {needed}, "
                                      f"but model {model!r} ({spec.path}) is a {architecture}: {hint}", where=source)
        if step.output_model and step.models:
            origin[step.output_model] = origin.get(step.models[0], step.models[0])


def _parse_step(item: Any, index: int, manager: Manager, where: str, source: str) -> Step:
    if not isinstance(item, dict) or len(item) != 1:
        raise RecipeError(f"{where}: a step is a one-key mapping like '- fuse: {{plugin: linear}}'", where=source)
    (stage, body), = item.items()
    if stage not in STAGES:
        raise RecipeError(f"{where}: unknown stage {stage!r}" + did_you_mean(str(stage), list(STAGES)), where=source)
    where = f"{where}.{stage}"
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise RecipeError(f"{where}: expected a mapping of options, got {type(body).__name__}", where=source)
    plugin = body.get("plugin")
    if not isinstance(plugin, str):
        choices = ", ".join(manager.plugins_for(stage)) or "none installed"
        raise RecipeError(f"{where}.plugin: required, a {stage} plugin name (choose from: {choices})", where=source)
    try:
        manager.check_stage(plugin, stage)
    except PluginError as exc:
        raise RecipeError(f"{where}.plugin: {exc}", where=source) from None
    core = {k: body[k] for k in STEP_KEYS if k in body}
    options_raw = {k: v for k, v in body.items() if k not in STEP_KEYS}
    options = _validate_options(manager.schema(plugin, stage), options_raw, where, source, manager.registries)
    models = core.get("models", [])
    if isinstance(models, str):
        models = [models]
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise RecipeError(f"{where}.models: expected a list of model names", where=source)
    inputs = core.get("inputs", {})
    if not isinstance(inputs, dict) or not all(isinstance(v, str) for v in inputs.values()):
        raise RecipeError(f"{where}.inputs: expected a mapping stage -> step name", where=source)
    for key in inputs:
        if key not in STAGES:
            raise RecipeError(f"{where}.inputs: unknown stage {key!r}" + did_you_mean(str(key), list(STAGES)), where=source)
    for key in ("name", "data", "as"):
        if key in core and not isinstance(core[key], str):
            raise RecipeError(f"{where}.{key}: expected a string", where=source)
    dtype = core.get("dtype")
    if dtype is not None and stage not in OUTPUT_MODEL:
        raise RecipeError(f"{where}.dtype: only steps that save a model ({', '.join(OUTPUT_MODEL)}) take an output dtype",
                          where=source)
    if dtype is not None and dtype not in OUTPUT_DTYPES:
        raise RecipeError(f"{where}.dtype: expected one of {', '.join(OUTPUT_DTYPES)}, got {dtype!r}", where=source)
    name = core.get("name") or f"{index:02d}-{stage}-{plugin}"
    return Step(index, stage, plugin, name, models, core.get("data"), inputs, core.get("as"), options, options_raw,
                dtype)


def _validate_options(
    schema: type[Options], raw: dict[str, Any], where: str, source: str, registries: Registries
) -> Options:
    """Validate a step's options; validators that look names up read ``info.context["registries"]``."""
    allowed = list(schema.model_fields)
    unknown = [str(key) for key in raw if key not in schema.model_fields]
    if len(unknown) == 1:
        key = unknown[0]
        hint = did_you_mean(key, allowed + sorted(STEP_KEYS)) if allowed else " (this plugin takes no options)"
        raise RecipeError(f"{where}.{key}: unknown key{hint}", where=source)
    if unknown:  # typically left over from another plugin after --set steps.N.plugin=...
        options = f"its options: {', '.join(allowed)}" if allowed else "it takes no options"
        raise RecipeError(f"{where}: unknown keys {', '.join(unknown)} ({options}; --set-plugin N=PLUGIN swaps the "
                          f"plugin and drops the keys it does not take)", where=source)
    try:
        return schema.model_validate(raw, context={"registries": registries})
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise RecipeError(f"{where}.{loc}: {err['msg']} (got {_short_repr(err.get('input'), 80)})", where=source) from None


def _default_models(stage: str, known: list[str], previous: list[Step], recipe_models: list[str]) -> list[str]:
    if stage == "evaluate":
        return list(known)
    if stage in ALL_MODEL_STAGES:
        return list(recipe_models)
    produced = [s.output_model for s in previous if s.output_model]
    return [produced[-1]] if produced else recipe_models[:1]


def _fresh_name(base: str, taken: list[str], index: int) -> str:
    return base if base not in taken else f"{base}-{index}"


def _check_string_keys(raw: dict[str, Any], source: str) -> None:
    """Every mapping key in the recipe is a string (YAML reads ``1:``, ``null:`` and ``yes:`` as
    others); the first that is not is named with its location."""
    stack: list[tuple[Any, str]] = [(raw, "")]
    while stack:
        value, where = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    place = f"{where}: key" if where else "key"
                    raise RecipeError(f"{place} {_short_repr(key)} is not a string ({type(key).__name__}; quote it)",
                                      where=source)
                stack.append((item, f"{where}.{key}" if where else key))
        elif isinstance(value, list):
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(value))


def _short_repr(value: Any, limit: int = 40) -> str:
    if isinstance(value, int) and abs(value).bit_length() > 64:
        return f"an integer of {abs(value).bit_length()} bits"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_keys(raw: dict[str, Any], allowed: set[str], source: str, prefix: str) -> None:
    for key in raw:
        if key not in allowed:
            raise RecipeError(f"{prefix}{key}: unknown key" + did_you_mean(str(key), sorted(allowed)), where=source)


def _typed(raw: dict[str, Any], key: str, kind: type, source: str, default: Any) -> Any:
    value = raw.get(key, default)
    if value is None:
        value = default
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RecipeError(f"{key}: expected {kind.__name__}, got {type(value).__name__}", where=source)
    return value


def _wrap(fn, source: str, key: str):
    try:
        return fn()
    except SurgeryError as exc:
        raise RecipeError(f"{key}: {exc}", where=source) from None
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise RecipeError(f"{key}{'.' + loc if loc else ''}: {err['msg']}", where=source) from None
