"""Malformed recipes: one line naming the file, step and key; exit 2; nothing loaded or written."""
from __future__ import annotations

import pytest

import surgery.models
import surgery.runner

GOOD = """
name: t
models: {a: A_DIR, b: B_DIR}
steps:
  - fuse: {plugin: linear, weights: [0.5, 0.5]}
output: OUT_DIR
"""

# (case id, recipe text or a transformation of GOOD, --set overrides, text the message must contain)
CASES = [
    ("empty", "", [], "empty"),
    ("not-a-mapping", "- a\n- b\n", [], "must be a mapping"),
    ("bad-yaml", "name: [unclosed\n", [], "invalid YAML"),
    ("python-tag", "name: !!python/object/apply:os.system ['echo pwned']\n", [], "invalid YAML"),
    ("unknown-top-key", GOOD.replace("steps:", "stepz:"), [], "did you mean 'steps'"),
    ("seed-type", GOOD + "seed: abc\n", [], "seed: expected int"),
    ("steps-not-list", GOOD.split("steps:")[0] + "steps: {fuse: linear}\noutput: x\n", [], "steps: expected a non-empty list"),
    ("steps-empty", GOOD.split("steps:")[0] + "steps: []\n", [], "non-empty list"),
    ("step-two-keys", GOOD.replace("  - fuse:", "  - {fuse: {plugin: linear}, prune: {}}\n  - fuse:"), [], "steps[0]: a step is a one-key mapping"),
    ("unknown-stage", GOOD.replace("- fuse:", "- fusee:"), [], "did you mean 'fuse'"),
    ("missing-plugin", GOOD.replace("plugin: linear, ", ""), [], "steps[0].fuse.plugin: required"),
    ("unknown-plugin", GOOD.replace("plugin: linear", "plugin: lineer"), [], "did you mean 'linear'"),
    ("plugin-wrong-stage", GOOD.replace("- fuse: {plugin: linear, weights: [0.5, 0.5]}", "- attribute: {plugin: linear}"), [], "no attribute plugin named 'linear'"),
    ("unknown-option", GOOD.replace("weights:", "weigths:"), [], "steps[0].fuse.weigths: unknown key (did you mean 'weights'?)"),
    ("option-type", GOOD.replace("weights: [0.5, 0.5]", "normalize: maybe"), [], "steps[0].fuse.normalize"),
    ("option-range", GOOD.replace("weights: [0.5, 0.5]", "max_shard_mb: -1"), [], "steps[0].fuse.max_shard_mb"),
    ("unknown-model-ref", GOOD.replace("weights: [0.5, 0.5]", "models: [a, c]"), [], "steps[0].fuse.models: unknown model 'c'"),
    ("missing-model-dir", GOOD.replace("A_DIR", "./no/such/dir"), [], "models.a: model directory not found"),
    ("unknown-builtin", GOOD.replace("A_DIR", "builtin:no-such-model"), [], "models.a: unknown built-in model 'no-such-model'"),
    ("model-type", GOOD.replace("A_DIR", "7"), [], "models.a"),
    ("duplicate-step-name", GOOD.replace("weights: [0.5, 0.5]}", "name: m}\n  - fuse: {plugin: linear, name: m}"), [], "duplicate step name 'm'"),
    ("dangling-input", GOOD.replace("weights: [0.5, 0.5]", "inputs: {score: nope}"), [], "steps[0].fuse.inputs.score: no earlier step named 'nope'"),
    ("set-missing-step", GOOD, ["steps.5.plugin=ties"], "there is no step 5"),
    ("set-no-equals", GOOD, ["steps.0.plugin"], "expected KEY=VALUE"),
    ("set-unknown-plugin", GOOD, ["steps.0.plugin=tiez"], "steps[0].fuse.plugin"),
    ("output-type", GOOD.replace("output: OUT_DIR", "output: [1, 2]"), [], "output: expected a directory path"),
    ("missing-plugin-file", "plugins: [./nope_plugin.py]\n" + GOOD, [], "plugins[0]: plugin file not found"),
    ("plugins-type", "plugins: 3\n" + GOOD, [], "plugins: expected list"),
]


@pytest.fixture
def no_loading(monkeypatch):
    """Make any attempt to load or build a model fail loudly."""

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded during validation")

    monkeypatch.setattr(surgery.models, "load_model", boom)
    monkeypatch.setattr(surgery.runner, "load_model", boom)
    monkeypatch.setattr(surgery.models, "resolve_path", boom)
    monkeypatch.setattr(surgery.runner, "resolve_path", boom)


@pytest.mark.parametrize("case_id,text,overrides,expected", CASES, ids=[c[0] for c in CASES])
def test_malformed_recipe(case_id, text, overrides, expected, tmp_path, tiny_checkpoints, surgery_cli, no_loading):
    a, b = tiny_checkpoints
    out = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text.replace("A_DIR", str(a)).replace("B_DIR", str(b)).replace("OUT_DIR", str(out)))
    args = ["run", recipe] + [x for o in overrides for x in ("--set", o)]
    result = surgery_cli(*args)
    assert result.exit_code == 2, result
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith(f"error: {recipe}: "), lines[0]
    assert expected in lines[0], lines[0]
    assert "Traceback" not in result.err + result.out
    assert not out.exists()


def test_missing_recipe_file(tmp_path, surgery_cli):
    result = surgery_cli("validate", tmp_path / "nope.yaml")
    assert result.exit_code == 2
    assert result.err.strip() == f"error: recipe file not found: {tmp_path / 'nope.yaml'}"


def test_non_utf8_recipe(tmp_path, surgery_cli):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("name: caf\xe9\n".encode("latin-1"))
    result = surgery_cli("validate", recipe)
    assert result.exit_code == 2 and "not UTF-8" in result.err


def test_debug_shows_traceback(tmp_path, surgery_cli):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: [\n")
    with pytest.raises(Exception):
        surgery_cli("--debug", "validate", recipe)
