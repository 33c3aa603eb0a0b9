"""The newcomer commands: init writes a recipe that validates; eval prints a table."""
from __future__ import annotations

import json

import pytest
from plugin_registries import registries


@pytest.mark.parametrize("template", ["merge", "attribute"])
def test_init_writes_a_valid_recipe(template, tmp_path, monkeypatch, surgery_cli):
    monkeypatch.chdir(tmp_path)
    result = surgery_cli("init", template)
    assert result.exit_code == 0, result.err
    assert (tmp_path / f"{template}.yaml").is_file()
    assert surgery_cli("validate", f"{template}.yaml").exit_code == 0
    again = surgery_cli("init", template)
    assert again.exit_code == 2 and "exists" in again.err


def test_init_unknown_template(tmp_path, monkeypatch, surgery_cli):
    monkeypatch.chdir(tmp_path)
    result = surgery_cli("init", "merj")
    assert result.exit_code == 2 and "did you mean 'merge'" in result.err


def test_swapping_a_method_is_one_override(tmp_path, monkeypatch, surgery_cli):
    monkeypatch.chdir(tmp_path)
    surgery_cli("init", "merge")
    overrides = ["--set", "steps.0.plugin=ties", "--set", "steps.0.density=0.3", "--set", "output=swapped"]
    assert surgery_cli("validate", "merge.yaml", *overrides).exit_code == 0
    result = surgery_cli("run", "merge.yaml", *overrides)
    assert result.exit_code == 0, result.err
    done = json.loads((tmp_path / "swapped" / "00-fuse-ties" / "done.json").read_text())
    assert done["plugin"] == "ties"
    assert done["options"]["density"] == 0.3  # not ties' default (0.2): the override reached the step
    assert "plugin: linear" in (tmp_path / "merge.yaml").read_text()  # overrides leave the file as it was


def test_eval_prints_accuracy_per_task(tmp_path, monkeypatch, surgery_cli):
    monkeypatch.chdir(tmp_path)
    result = surgery_cli("eval", "builtin:tiny-llama/task-a", "--tasks", "reverse", "--n", "32", "--json")
    assert result.exit_code == 0, result.err
    figures = json.loads(result.out)
    assert figures["tiny-llama/task-a/reverse"] >= 0.9


def test_bidirectional_zoo_model_reloads_bidirectional():
    """A LLaDA-style model loaded through the recipe loader attends to later tokens."""
    import torch

    from surgery.models.loading import ModelSpec, load_model

    model = load_model("llada", ModelSpec(path="builtin:tiny-llada/base"), registries()).module
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    changed = ids.clone()
    changed[0, -1] = 9
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits[0, 0], model(changed).logits[0, 0])
