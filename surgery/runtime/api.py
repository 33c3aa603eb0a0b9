"""model-surgery as a library: load and run recipes, read their results, call one plugin.

    >>> import surgery
    >>> result = surgery.run("recipes/ig.yaml", overrides=["steps.0.steps=8"], output="runs/ig-8")
    >>> result.figures["00-attribute-ig"]["completeness_error"]
    >>> scores = result.artifact("00-attribute-ig").tensors["scores"]      # [layers, heads]
    >>> pruned = result.model("pruned")                                     # a LoadedModel
    >>> again = surgery.call("attribute", "grad-x-act", models={"base": pruned}, data={...})

Everything here is what ``surgery run`` does, with Python objects in and out: a recipe is a file,
a mapping (the YAML's content) or a :class:`Recipe` from :func:`load_recipe`; results are read from
the run directory, so a finished step is reused on the next call exactly as on the command line.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from surgery.core.errors import RecipeError, SurgeryError
from surgery.runtime.manager import Manager
from surgery.runtime.recipe import Recipe, Step, apply_overrides, validate
from surgery.runtime.recipe import load_recipe as _load_recipe_file

if TYPE_CHECKING:
    from surgery.core.artifacts import Artifact
    from surgery.models.loading import LoadedModel
    from surgery.runtime.runner import Run

RecipeLike = "str | Path | Mapping[str, Any] | Recipe"


def load_recipe(recipe: str | Path | Mapping[str, Any] | Recipe, overrides: Sequence[str] = (),
                output: str | Path | None = None, manager: Manager | None = None,
                base_dir: str | Path | None = None) -> Recipe:
    """Read (a path) or take (a mapping) a recipe, apply ``--set``-style ``overrides`` and validate
    it; loads no model and no data. ``base_dir`` resolves relative paths of a mapping (default: cwd)."""
    manager = manager or Manager()
    out = str(output) if output is not None else None
    if isinstance(recipe, Recipe):
        if overrides or output is not None:
            raise RecipeError("overrides and output apply to a recipe file or mapping, not to a loaded Recipe")
        return recipe
    if isinstance(recipe, Mapping):
        raw = apply_overrides(dict(recipe), list(overrides), "<recipe>")
        return validate(raw, manager, base_dir=Path(base_dir or Path.cwd()).resolve(), source="<recipe>", output=out)
    return _load_recipe_file(recipe, manager, list(overrides), out)


@dataclass
class RunResult:
    """A finished run: its recipe, run directory and report, each step's artifact and the models."""

    recipe: Recipe
    output: Path
    report: dict[str, Any]
    run: "Run" = field(repr=False)

    @property
    def steps(self) -> list[Step]:
        return list(self.recipe.steps)

    @property
    def figures(self) -> dict[str, dict[str, Any]]:
        """Step name -> the figures that step reported (as in ``report.json``)."""
        return {entry["name"]: entry["figures"] for entry in self.report["steps"]}

    def step(self, key: str | int) -> Step:
        """A step by its ``name:`` (default ``NN-stage-plugin``), its index, or a stage run once."""
        steps = self.recipe.steps
        if isinstance(key, int):
            if not -len(steps) <= key < len(steps):
                raise SurgeryError(f"no step {key}: the run has {len(steps)}")
            return steps[key]
        for candidate in (lambda s: s.name == key, lambda s: s.dirname == key, lambda s: s.stage == key):
            found = [s for s in steps if candidate(s)]
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise SurgeryError(f"{len(found)} steps match {key!r}; name one of: {', '.join(s.name for s in found)}")
        from surgery.core.registry import did_you_mean

        raise SurgeryError(f"no step {key!r}" + did_you_mean(key, [s.name for s in steps]))

    def artifact(self, step: str | int) -> "Artifact":
        """The artifact (tensors, meta, figures, model_dir) of ``step`` (see :meth:`step`)."""
        return self.run.finished[self.step(step).name][1]

    def model(self, name: str) -> "LoadedModel":
        """A recipe model or one a step produced (its ``as:`` name), loaded (once) on the run's device."""
        return self.run.model(name)

    def model_dir(self, name: str) -> Path:
        """Where model ``name`` lives on disk (a step's ``model/`` folder for produced models)."""
        return self.run.model_path(name)


def run(recipe: str | Path | Mapping[str, Any] | Recipe, overrides: Sequence[str] = (),
        output: str | Path | None = None, device: str | None = None, manager: Manager | None = None,
        quiet: bool | None = None, models: Mapping[str, "LoadedModel"] | None = None) -> RunResult:
    """Run a recipe as ``surgery run`` does (finished steps in ``output`` are reused).

    ``models`` hands already loaded models (``RunResult.model(...)``, :func:`load_model`) to the
    run by recipe name, so they are not loaded again; the recipe still names where each comes from.
    """
    from surgery.runtime.runner import Run

    manager = manager or Manager()
    parsed = load_recipe(recipe, overrides, output, manager)
    runner = Run(parsed, manager, device, quiet)
    for name, loaded in (models or {}).items():
        if name not in parsed.models:
            raise RecipeError(f"models: {name!r} is not a model of the recipe ({', '.join(parsed.models)})")
        runner.loaded[name] = loaded
    report = runner.execute()
    return RunResult(parsed, parsed.output, report, runner)


def call(stage: str, plugin: str, models: Mapping[str, "str | Path | LoadedModel"],
         data: Mapping[str, Any] | None = None, output: str | Path | None = None, device: str | None = None,
         seed: int = 0, manager: Manager | None = None, quiet: bool | None = None, **options: Any) -> RunResult:
    """Run one plugin's ``stage`` on ``models`` (paths, ``builtin:`` names or loaded models) as a
    one-step recipe; ``data`` is one data entry (``{"source": "synthetic", ...}``); ``options`` are
    the plugin's options. The result's ``artifact(0)`` is the step's artifact. Without ``output``
    the run goes to a new temporary directory (kept; ``result.output`` says where)."""
    loaded = {name: m for name, m in models.items() if not isinstance(m, (str, Path))}
    specs = {name: str(m) if isinstance(m, (str, Path)) else _loaded_path(name, m) for name, m in models.items()}
    raw: dict[str, Any] = {"name": f"{stage}-{plugin}", "seed": seed, "models": specs,
                           "steps": [{stage: {"plugin": plugin, "models": list(specs), **options}}]}
    if data is not None:
        raw["data"] = {"data": dict(data)}
    out = output if output is not None else tempfile.mkdtemp(prefix=f"surgery-{stage}-{plugin}-")
    return run(raw, output=out, device=device, manager=manager, quiet=quiet, models=loaded)


def _loaded_path(name: str, loaded: Any) -> str:
    path = getattr(loaded, "path", None)
    if path is None:
        raise RecipeError(f"models.{name}: a loaded model needs the directory it came from (LoadedModel.path)")
    return str(path)


def load_model(model: str | Path, name: str = "model", device: str = "cpu", dtype: str = "float32",
               manager: Manager | None = None) -> "LoadedModel":
    """Load ``builtin:NAME``, a directory or a hub id as the runner does (stock transformers, eval mode)."""
    from surgery.models.loading import load_model as _load, parse_model_spec

    registries = (manager or Manager()).registries
    spec = parse_model_spec({"path": str(model), "dtype": dtype}, Path.cwd(), registries.models)
    return _load(name, spec, registries, device)
