"""``surgery import mergekit``: configurations become recipes that validate, run and follow mergekit's rules."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_checkpoint
from safetensors.torch import load_file

from surgery.engines import tensor_merge as tm
from surgery.plugins.mergekit_import import translate
from surgery.runtime.manager import Manager
from surgery.runtime.recipe import validate
from surgery.runtime.runner import run_recipe


@pytest.fixture(scope="module")
def trio(tmp_path_factory, tiny_checkpoints) -> tuple[Path, Path, Path]:
    a, b = tiny_checkpoints
    return a, b, make_checkpoint(tmp_path_factory.mktemp("c") / "c", 2)


def run(recipe: dict, tmp_path: Path) -> Path:
    recipe = {**recipe, "output": str(tmp_path / "run")}
    manager = Manager()
    run_recipe(validate(recipe, manager, base_dir=tmp_path), manager, quiet=True)
    return tmp_path / "run" / "00-fuse-{}".format(recipe["steps"][0]["fuse"]["plugin"]) / "model"


def test_ties_config_translates_every_parameter(trio, tmp_path):
    a, b, c = map(str, trio)
    config = {
        "merge_method": "ties", "base_model": a, "dtype": "float32", "tokenizer_source": "union",
        "models": [{"model": a}, {"model": b, "parameters": {"weight": [0.0, 0.5, 1.0], "density": 0.5}},
                   {"model": c, "parameters": {"weight": [{"filter": "mlp.up", "value": 0.7}, {"value": 1.0}], "density": 0.7}}],
        "parameters": {"int8_mask": True, "lambda": 0.8},
    }
    recipe, skipped = translate(config, tmp_path, "t")
    fuse = recipe["steps"][0]["fuse"]
    assert fuse["plugin"] == "ties" and fuse["convention"] == "mergekit" and fuse["normalize"] is True
    assert fuse["models"] == ["a", "b", "c"] and recipe["models"]["b"] == str(Path(b).resolve())
    assert fuse["weights"] == [[0.0, 0.5, 1.0], [{"value": 0.7, "filter": r"mlp\.up"}, {"value": 1.0}]]
    assert fuse["densities"] == [0.5, 0.7] and fuse["scale"] == 0.8
    assert len(skipped) == 2
    assert any(line.startswith("tokenizer_source") for line in skipped) and any("int8_mask" in line for line in skipped)
    validate({**recipe, "output": str(tmp_path / "r")}, Manager(), base_dir=tmp_path)


def test_slerp_with_filtered_gradients_runs_as_mergekit_reads_it(trio, tmp_path):
    a, b, _ = map(str, trio)
    config = {  # mergekit's README example: per-layer t for attention and MLP, 0.5 elsewhere
        "slices": [{"sources": [{"model": a, "layer_range": [0, 2]}, {"model": b, "layer_range": [0, 2]}]}],
        "merge_method": "slerp", "base_model": a,
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]},
        "dtype": "float32",
    }
    recipe, skipped = translate(config, tmp_path, "s")
    assert skipped == []
    merged = load_file(str(run(recipe, tmp_path) / "model.safetensors"))
    wa, wb = load_file(str(Path(a) / "model.safetensors")), load_file(str(Path(b) / "model.safetensors"))
    # 2 layers: t = 0 at layer 0 and 1 at layer 1 (gradient ends); outside the layers t = 0, so the
    # gradients' first values; elsewhere 0.5
    for name in wa:
        if "self_attn" in name:
            t = 0.0 if "layers.0." in name else 1.0
        elif "mlp" in name:
            t = 1.0 if "layers.0." in name else 0.0
        else:
            t = 0.5
        assert torch.allclose(merged[name], tm.slerp(t, wa[name], wb[name]), atol=1e-6), name


def test_passthrough_slices_stack_layers(trio, tmp_path):
    from transformers import AutoModelForCausalLM

    a, b, _ = map(str, trio)
    config = {"merge_method": "passthrough", "dtype": "float32",
              "slices": [{"sources": [{"model": a, "layer_range": [0, 2]}]}, {"sources": [{"model": b, "layer_range": [1, 2]}]}]}
    recipe, skipped = translate(config, tmp_path, "p")
    assert recipe["steps"][0]["fuse"]["slices"] == [{"model": "a", "layers": [0, 2]}, {"model": "b", "layers": [1, 2]}]
    model = AutoModelForCausalLM.from_pretrained(run(recipe, tmp_path))
    assert len(model.model.layers) == 3


@pytest.mark.parametrize("method,params,ours", [
    ("linear", {}, "linear"), ("task_arithmetic", {}, "dare-linear"), ("dare_ties", {"density": 0.5}, "dare-ties"),
    ("dare_linear", {"density": 0.5}, "dare-linear"), ("breadcrumbs", {"density": 0.9, "gamma": 0.05}, "breadcrumbs"),
    ("breadcrumbs_ties", {"density": 0.9}, "breadcrumbs-ties"), ("della", {"density": 0.5, "epsilon": 0.1}, "della"),
    ("della_linear", {"density": 0.5}, "della-linear"), ("nuslerp", {}, "nuslerp"), ("multislerp", {}, "multislerp"),
    ("karcher", {}, "karcher"), ("model_stock", {}, "model-stock"), ("sce", {}, "sce"),
])
def test_every_translatable_method_gives_a_valid_recipe(trio, tmp_path, method, params, ours):
    a, b, c = map(str, trio)
    base = None if method in ("linear", "karcher", "nuslerp") else a
    models = [{"model": m, "parameters": {"weight": 1.0, **params}} for m in ((b, c) if method == "nuslerp" else (a, b, c))]
    config = {"merge_method": method, "models": models, **({"base_model": base} if base else {})}
    recipe, skipped = translate(config, tmp_path, method)
    assert recipe["steps"][0]["fuse"]["plugin"] == ours
    validate({**recipe, "output": str(tmp_path / "r")}, Manager(), base_dir=tmp_path)


def test_cli_writes_the_recipe_and_names_each_untranslated_item(surgery_cli, trio, tmp_path):
    a, b, _ = map(str, trio)
    cfg = tmp_path / "cfg.yml"
    cfg.write_text(yaml.safe_dump({"merge_method": "dare_linear", "base_model": a, "chat_template": "chatml",
                                   "dtype": "bfloat16", "models": [{"model": b, "parameters": {"weight": 1.0}}]}))
    result = surgery_cli("import", "mergekit", cfg, "-o", tmp_path / "out.yaml")
    assert result.exit_code == 0, result
    lines = result.err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("not translated: ") for line in lines)
    assert {line.split(": ")[1] for line in lines} == {"chat_template", "dtype"}
    recipe = yaml.safe_load((tmp_path / "out.yaml").read_text())
    assert recipe["steps"][0]["fuse"] == {"models": ["a", "b"], "plugin": "dare-linear", "convention": "mergekit",
                                          "weights": [1.0], "normalize": False, "density": 1.0, "rescale": "l1"}
    cfg.write_text(yaml.safe_dump({"merge_method": "arcee_fusion", "base_model": a, "models": [{"model": b}]}))
    bad = surgery_cli("import", "mergekit", cfg)
    assert bad.exit_code == 2 and "arcee_fusion" in bad.err and len(bad.err.strip().splitlines()) == 1
