"""Declarative tensor-name maps between two architectures' checkpoints (heterogeneous merges).

A merge writes the base model's tensors. A :class:`TensorMap` says, for each base tensor name,
which donor tensor it is merged with, or that it is kept from the base untouched. It is data: a
list of rules, each a regular expression matched against the whole base name, with either a donor
name template (``re`` replacement syntax, ``\\1`` ...; a list of templates is tried in order) or
``keep: true``. The first matching rule wins; a name no rule matches is merged with the donor
tensor of the same name.

```yaml
name: llava-from-llama          # base: a LLaVA checkpoint; donor: a plain Llama fine-tune
rules:
  - {base: '(vision_tower|multi_modal_projector)\\..*', keep: true}
  - {base: 'language_model\\.model\\.(.*)', donor: 'model.\\1'}
  - {base: 'language_model\\.lm_head\\.(.*)', donor: 'lm_head.\\1'}
```

Names are checkpoint names, which may differ from the loaded module's parameter names (transformers
renames some layouts on load); :func:`checkpoint_names` translates module names into them.

Several base tensors may map to one donor tensor: an mPLUG-Owl2-style layout, where a module has
``multiway.0`` (text) and ``multiway.1`` (vision) copies, merges both copies with the donor's single
tensor. Built-in maps are in :data:`BUILTIN_MAPS`; a recipe names one, gives a YAML file, or writes
the mapping inline (``load_map``).
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from surgery.core.errors import ModelError, RecipeError
from surgery.core.registry import did_you_mean


@dataclass(frozen=True)
class Rule:
    """``base`` is a regular expression over base tensor names (whole-name match); ``donor`` holds
    one or more replacement templates, tried in order (the first name the donor has is used)."""

    base: str
    donor: tuple[str, ...] = ()
    keep: bool = False

    def __post_init__(self) -> None:
        try:
            re.compile(self.base)
        except re.error as exc:
            raise RecipeError(f"tensor map rule {self.base!r}: invalid regular expression ({exc})") from None
        if self.keep == bool(self.donor):
            raise RecipeError(f"tensor map rule {self.base!r}: give exactly one of 'donor' or 'keep: true'")


@dataclass(frozen=True)
class TensorMap:
    name: str
    rules: tuple[Rule, ...] = ()

    def donor_names(self, base_name: str) -> tuple[str, ...] | None:
        """Candidate donor tensors for ``base_name`` (first present wins), or None to keep the base's."""
        for rule in self.rules:
            found = re.fullmatch(rule.base, base_name)
            if found:
                return None if rule.keep else tuple(found.expand(template) for template in rule.donor)
        return (base_name,)


IDENTITY = TensorMap("identity")

# Built-in maps, as data. "<x>-from-<y>": the base (written) layout is x, the donor's is y. Names are
# checkpoint (safetensors) names: transformers 5 saves a LLaVA as `language_model.model.*`,
# `language_model.lm_head.*`, `vision_tower.*`, `multi_modal_projector.*` (and loads the newer
# `model.language_model.*` layout too), so both layouts are listed.
BUILTIN_MAPS: dict[str, dict[str, Any]] = {
    "identity": {"rules": []},
    "llava-from-llama": {"rules": [
        {"base": r"(model\.)?(vision_tower|multi_modal_projector)\..*", "keep": True},
        {"base": r"(language_model\.model|model\.language_model)\.(.*)", "donor": r"model.\2"},
        {"base": r"(language_model\.)?lm_head\.(.*)", "donor": r"lm_head.\2"},
    ]},
    "llama-from-llava": {"rules": [
        {"base": r"model\.(.*)", "donor": [r"language_model.model.\1", r"model.language_model.\1"]},
        {"base": r"lm_head\.(.*)", "donor": [r"language_model.lm_head.\1", r"lm_head.\1"]},
    ]},
    # mPLUG-Owl2: k/v projections and layer norms have per-modality copies `<module>.multiway.<k>.*`;
    # every copy is merged with the donor's single tensor; the visual modules stay as they are.
    "multiway-from-llama": {"rules": [
        {"base": r"model\.(vision_model|visual_abstractor)\..*", "keep": True},
        {"base": r"(.*)\.multiway\.\d+\.(.*)", "donor": r"\1.\2"},
    ]},
    # the other direction takes the text copy (multiway.0) of each duplicated module
    "llama-from-multiway": {"rules": [
        {"base": r"(.*\.(?:self_attn\.k_proj|self_attn\.v_proj|input_layernorm|post_attention_layernorm))\.(.*)",
         "donor": [r"\1.multiway.0.\2", r"\1.\2"]},
    ]},
}


def parse_map(raw: Any, name: str = "inline") -> TensorMap:
    """A TensorMap from its data form ``{name?, rules: [{base, donor | keep}]}``."""
    if not isinstance(raw, dict) or not isinstance(raw.get("rules", []), list):
        raise RecipeError(f"tensor map {name!r}: expected a mapping with a 'rules' list")
    unknown = set(raw) - {"name", "rules"}
    if unknown:
        raise RecipeError(f"tensor map {name!r}: unknown key {sorted(unknown)[0]!r} (keys: name, rules)")
    rules = []
    for i, item in enumerate(raw.get("rules", [])):
        if not isinstance(item, dict) or set(item) - {"base", "donor", "keep"} or "base" not in item:
            raise RecipeError(f"tensor map {name!r}: rules[{i}] must be a mapping with 'base' and 'donor' or 'keep'")
        donor = item.get("donor") or ()
        donor = (donor,) if isinstance(donor, str) else tuple(str(d) for d in donor)
        rules.append(Rule(str(item["base"]), donor, bool(item.get("keep", False))))
    return TensorMap(str(raw.get("name", name)), tuple(rules))


def load_map(spec: str | dict | None, base_dir: Path | None = None) -> TensorMap:
    """A built-in map by name, a YAML file of one, or an inline mapping; None is the identity."""
    if spec is None:
        return IDENTITY
    if isinstance(spec, dict):
        return parse_map(spec)
    if spec in BUILTIN_MAPS:
        return parse_map(BUILTIN_MAPS[spec], spec)
    path = Path(spec) if Path(spec).is_absolute() or base_dir is None else base_dir / spec
    if spec.endswith((".yaml", ".yml")):
        if not path.is_file():
            raise RecipeError(f"tensor map file not found: {spec}")
        return parse_map(yaml.safe_load(path.read_text(encoding="utf-8")), path.stem)
    raise RecipeError(f"unknown tensor map {spec!r}" + did_you_mean(spec, list(BUILTIN_MAPS)) + " (or give a .yaml file)")


@dataclass(frozen=True)
class MergePlan:
    """Per base tensor: the donor tensor names merged into it (None = kept from the base)."""

    sources: dict[str, list[str] | None]
    unused: dict[str, list[str]]  # donor -> donor tensors no base tensor reads (e.g. a vision tower)


def plan_merge(
    base_names: Iterable[str], base_shape: Callable[[str], list[int]],
    donors: dict[str, tuple[list[str], Callable[[str], list[int]]]], tensor_map: TensorMap,
) -> MergePlan:
    """Resolve ``tensor_map`` for every base tensor against each donor's names and shapes.

    ``donors`` maps a donor's name to (its tensor names, its shape lookup). Raises ModelError
    naming the tensor when a mapped donor tensor is missing or has another shape.
    """
    sources: dict[str, list[str] | None] = {}
    donor_sets = {donor: set(names) for donor, (names, _) in donors.items()}
    used: dict[str, set[str]] = {donor: set() for donor in donors}
    for name in base_names:
        candidates = tensor_map.donor_names(name)
        if candidates is None:
            sources[name] = None
            continue
        sources[name] = []
        for donor, (names, shape) in donors.items():
            donor_name = next((c for c in candidates if c in donor_sets[donor]), None)
            if donor_name is None:
                close = difflib.get_close_matches(candidates[0], list(names), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ModelError(f"tensor map {tensor_map.name!r}: {name} -> {' or '.join(candidates)}, which model {donor!r} lacks{hint}")
            if shape(donor_name) != base_shape(name):
                raise ModelError(f"tensor map {tensor_map.name!r}: {name} {base_shape(name)} vs {donor!r} {donor_name} {shape(donor_name)}")
            used[donor].add(donor_name)
            sources[name].append(donor_name)
    unused = {donor: sorted(set(names) - used[donor]) for donor, (names, _) in donors.items()}
    return MergePlan(sources, unused)


def checkpoint_names(model: Any) -> dict[str, str]:
    """``{parameter name in the loaded module: tensor name in its saved checkpoint}``.

    transformers 5 renames some checkpoints on load (a LLaVA's ``language_model.model.*`` becomes
    ``model.language_model.*``) and reverts the renaming on save; this asks it for that reversal,
    name by name. Models without renamings map every name to itself.
    """
    import torch

    names = list(model.state_dict())
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # an older transformers: no renamings on load
        return {name: name for name in names}
    out = {}
    for name in names:
        reverted = revert_weight_conversion(model, {name: torch.empty(0)})
        out[name] = next(iter(reverted)) if len(reverted) == 1 else name
    return out
