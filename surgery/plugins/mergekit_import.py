"""``surgery import mergekit CONFIG.yml``: a mergekit merge configuration as an equivalent recipe.

Translated: the models and base model, the merge method and its parameters (global, per model,
per-layer gradients, and ``filter`` conditions, whose substrings become escaped regular
expressions), ``slices`` that cover every layer of every model (as a plain model list) and
passthrough slices (layer stacking). The TIES family is written with ``convention: mergekit`` and
mergekit's defaults spelled out (``normalize``, ``rescale``), so the recipe computes what mergekit
computes. Anything else is named on one line each and left out: tokenizer options, chat templates,
``modules``, a ``dtype`` other than the checkpoints', partial slices of non-passthrough methods, and
methods without a counterpart here. Random masks (DARE, DELLA) follow the same distribution as
mergekit's but not its random generator.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click
import yaml

from surgery import hookimpl
from surgery.core.errors import RecipeError
from surgery.core.io import write_text

# mergekit method -> (our plugin, mergekit's default normalize, default rescale)
TASK_VECTOR = {
    "ties": ("ties", True, False), "dare_ties": ("dare-ties", False, True), "dare_linear": ("dare-linear", False, True),
    "breadcrumbs": ("breadcrumbs", False, False), "breadcrumbs_ties": ("breadcrumbs-ties", False, False),
    "della": ("della", True, True), "della_linear": ("della-linear", False, True),
    "task_arithmetic": ("dare-linear", False, False),
}
OTHER = {"linear", "slerp", "nuslerp", "multislerp", "karcher", "model_stock", "sce", "passthrough"}
IGNORED = {"int8_mask": "int8_mask: a memory option of mergekit, no effect on the values"}


class Translation:
    """The recipe being written and the lines it could not translate."""

    def __init__(self, config: dict, base_dir: Path, name: str) -> None:
        self.config, self.base_dir, self.name = config, base_dir, name
        self.models: dict[str, str] = {}  # recipe name -> path
        self.untranslated: list[str] = []

    def skip(self, line: str) -> None:
        self.untranslated.append(line)

    def model(self, ref: str) -> str:
        """The recipe name of mergekit model reference ``ref`` (added on first use)."""
        path = self._path(str(ref))
        for name, known in self.models.items():
            if known == path:
                return name
        stem = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(str(ref).rstrip("/")).name).strip("-") or "model"
        name, i = stem, 2
        while name in self.models:
            name, i = f"{stem}-{i}", i + 1
        self.models[name] = path
        return name

    def _path(self, ref: str) -> str:
        if "+" in ref:
            self.skip(f"model {ref}: a LoRA applied on load (+adapter) is not supported; using {ref.split('+')[0]}")
            ref = ref.split("+")[0]
        candidate = Path(ref).expanduser()
        if not candidate.is_absolute() and (self.base_dir / candidate).exists():
            candidate = self.base_dir / candidate
        if candidate.exists():
            return str(candidate.resolve())
        if not ref.startswith("builtin:"):
            self.skip(f"model {ref}: not a local directory; download it and point the recipe's models.{self.model_name_hint(ref)} at it")
        return ref

    @staticmethod
    def model_name_hint(ref: str) -> str:
        return re.sub(r"[^A-Za-z0-9_-]+", "-", Path(ref.rstrip("/")).name).strip("-") or "model"


def translate(config: dict, base_dir: Path, name: str) -> tuple[dict, list[str]]:
    """``(recipe, untranslated lines)`` for a parsed mergekit configuration."""
    if not isinstance(config, dict) or "merge_method" not in config:
        raise RecipeError("not a mergekit configuration: no merge_method")
    tr = Translation(config, base_dir, name)
    method = str(config["merge_method"])
    for key in ("tokenizer_source", "tokenizer", "chat_template", "modules"):
        if config.get(key) is not None:
            tr.skip(f"{key}: not translated (the merged model keeps the first model's tokenizer and config)")
    for key in ("dtype", "out_dtype"):
        if config.get(key) not in (None, "float32"):
            tr.skip(f"{key}: {config[key]}: merges here compute in float32 and save in the first model's dtype")
    if method == "passthrough":
        fuse = _passthrough(tr)
    elif method in TASK_VECTOR or method in OTHER:
        fuse = _merge(tr, method)
    else:
        raise RecipeError(f"merge_method {method!r} has no counterpart here; translatable: "
                          + ", ".join(sorted(OTHER | set(TASK_VECTOR))))
    recipe = {"name": name, "seed": 0, "models": dict(tr.models), "steps": [{"fuse": fuse}], "output": f"runs/{name}"}
    return recipe, tr.untranslated


def _inputs(tr: Translation) -> list[dict]:
    """[{model, parameters}] from ``models:`` or from slices that each cover all layers."""
    config = tr.config
    if config.get("models"):
        return [{"model": m["model"], "parameters": m.get("parameters") or {}} for m in config["models"]]
    slices = config.get("slices") or []
    if len(slices) != 1:
        raise RecipeError(f"{len(slices)} output slices: only passthrough stacks slices here; other methods merge whole models")
    out = []
    for source in slices[0]["sources"]:
        start, _end = source["layer_range"]
        if start != 0:
            tr.skip(f"slices: {source['model']} layer_range {source['layer_range']}: a partial range merges whole models here")
        out.append({"model": source["model"], "parameters": source.get("parameters") or {}})
    if slices[0].get("parameters"):
        tr.skip("slices[0].parameters: slice-level parameters are read as global parameters")
        config.setdefault("parameters", {}).update(slices[0]["parameters"])
    return out


def _merge(tr: Translation, method: str) -> dict:
    inputs = _inputs(tr)
    base_ref = tr.config.get("base_model")
    glob = dict(tr.config.get("parameters") or {})
    for key, line in IGNORED.items():
        if glob.pop(key, None) is not None:
            tr.skip(line)
    base = tr.model(base_ref) if base_ref else None
    others = [i for i in inputs if base is None or tr.model(i["model"]) != base]
    names = ([base] if base else []) + [tr.model(i["model"]) for i in others]

    def per_model(key: str, default: Any = None) -> list:
        return [_setting(i["parameters"].get(key, glob.get(key, default))) for i in others]

    fuse: dict[str, Any] = {"models": names}
    if method in TASK_VECTOR:
        plugin, normalize, rescale = TASK_VECTOR[method]
        _need_base(base, method)
        fuse.update(plugin=plugin, convention="mergekit", weights=per_model("weight", 1.0),
                    normalize=bool(glob.pop("normalize", normalize)))
        densities = per_model("density", 1.0)
        fuse.update(_one_or_many(densities, "density", "densities"))
        rescaled = bool(glob.pop("rescale", rescale))
        if plugin != "ties":
            fuse["rescale"] = "l1" if rescaled else "none"
        elif rescaled:
            tr.skip("rescale: ties here does not rescale its trimmed task vectors")
        if "lambda" in glob:
            fuse["scale"] = _setting(glob.pop("lambda"))
        for key in ("gamma", "epsilon"):
            values = per_model(key)
            if any(v is not None for v in values):
                if any(v != values[0] for v in values):
                    tr.skip(f"{key}: one value per model is not supported; using {values[0]}")
                fuse[key] = values[0]
        if method in ("breadcrumbs", "breadcrumbs_ties") and "gamma" not in fuse:
            fuse["gamma"] = 0.01
        if method in ("della", "della_linear") and "epsilon" not in fuse:
            fuse["epsilon"] = 0.15
    elif method == "linear":
        fuse["models"] = [tr.model(i["model"]) for i in inputs]
        fuse.update(plugin="linear", weights=[_setting(i["parameters"].get("weight", glob.get("weight", 1.0))) for i in inputs],
                    normalize=bool(glob.pop("normalize", True)))
    elif method == "slerp":
        _need_base(base, method)
        fuse.update(plugin="slerp", t=_setting(glob.pop("t", None)))
    elif method in ("nuslerp", "multislerp"):
        fuse.update(plugin=method, weights=per_model("weight", 1.0), use_base=base is not None)
        if method == "nuslerp":
            fuse.update(row_wise=bool(glob.pop("nuslerp_row_wise", False)), flatten=bool(glob.pop("nuslerp_flatten", True)))
        else:
            fuse.update(normalize_weights=bool(glob.pop("normalize_weights", True)), eps=float(glob.pop("eps", 1e-8)))
    elif method == "karcher":
        fuse["models"] = [tr.model(i["model"]) for i in inputs] + ([base] if base and base not in [tr.model(i["model"]) for i in inputs] else [])
        fuse.update(plugin="karcher", max_iter=int(glob.pop("max_iter", 10)), tol=float(glob.pop("tol", 1e-5)))
    elif method == "model_stock":
        _need_base(base, method)
        fuse.update(plugin="model-stock", filter_wise=bool(glob.pop("filter_wise", False)))
    elif method == "sce":
        _need_base(base, method)
        fuse.update(plugin="sce", select_topk=_setting(glob.pop("select_topk", 1.0)))
    for key in sorted(set(glob) - {"weight", "density", "gamma", "epsilon", "t", "lambda", "normalize", "rescale"}):
        tr.skip(f"parameters.{key}: not a parameter of {method} here")
    return {k: v for k, v in fuse.items() if v is not None}


def _need_base(base: str | None, method: str) -> None:
    if base is None:
        raise RecipeError(f"merge_method {method} needs base_model")


def _one_or_many(values: list, one: str, many: str) -> dict:
    return {one: values[0]} if all(v == values[0] for v in values) else {many: values}


def _setting(value: Any) -> Any:
    """A mergekit parameter setting as ours: filters (substrings) become escaped regular expressions."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        out = []
        for cond in value:
            pattern = cond.get("filter")
            entry = {"value": _setting(cond["value"])}
            if pattern not in (None, "*"):
                entry["filter"] = re.escape(str(pattern))
            out.append(entry)
        return out
    return value


def _passthrough(tr: Translation) -> dict:
    slices = []
    for i, piece in enumerate(tr.config.get("slices") or []):
        sources = piece["sources"]
        if len(sources) != 1:
            raise RecipeError(f"slices[{i}]: passthrough takes one source per slice, got {len(sources)}")
        source = sources[0]
        entry = {"model": tr.model(source["model"]), "layers": list(source["layer_range"])}
        scale = (source.get("parameters") or {}).get("scale", (piece.get("parameters") or {}).get("scale"))
        if scale is not None:
            entry["scale"] = _setting(scale)
        slices.append(entry)
    if not slices:
        raise RecipeError("passthrough without slices: nothing to stack")
    models = list(dict.fromkeys(s["model"] for s in slices))
    return {"plugin": "passthrough", "models": models, "slices": slices}


def import_mergekit(config_path: Path, out_path: Path | None = None) -> tuple[Path, list[str]]:
    """Translate ``config_path`` and write the recipe; returns its path and the untranslated lines."""
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise RecipeError(f"{config_path}: cannot read ({str(exc).splitlines()[0]})") from None
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", config_path.stem)
    try:
        recipe, untranslated = translate(config, config_path.resolve().parent, name)
    except RecipeError as exc:
        raise RecipeError(f"{config_path}: {exc}") from None
    out_path = out_path or Path(f"{name}.surgery.yaml")
    header = f"# translated from mergekit configuration {config_path.name} by `surgery import mergekit`\n"
    header += "".join(f"# not translated: {line}\n" for line in untranslated)
    write_text(out_path, header + yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None, width=110))
    return out_path, untranslated


class MergekitImport:
    """``surgery import mergekit CONFIG.yml``: a mergekit configuration as an equivalent recipe."""

    @hookimpl
    def register_commands(self, cli: click.Group) -> None:
        @cli.group(name="import")
        def import_group() -> None:
            """Translate another tool's configuration into a recipe."""

        @import_group.command(name="mergekit")
        @click.argument("config", type=click.Path(dir_okay=False, exists=True))
        @click.option("--output", "-o", type=click.Path(dir_okay=False), default=None,
                      help="Recipe file to write (default: CONFIG's name + .surgery.yaml here).")
        def mergekit_command(config: str, output: str | None) -> None:
            """Write the recipe equivalent to mergekit's CONFIG; name what cannot be translated."""
            path, untranslated = import_mergekit(Path(config), Path(output) if output else None)
            for line in untranslated:
                click.echo(f"not translated: {line}", err=True)
            click.echo(f"wrote {path}")


mergekit_import = MergekitImport()
