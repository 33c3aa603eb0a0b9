"""The complete plugin in docs/plugins.md runs as written."""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

DOC = Path(__file__).parent.parent / "docs" / "plugins.md"


def plugin_source(file: str = "nearest_merge.py") -> str:
    blocks = re.findall(rf"```python\n(# {re.escape(file)}\n.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 1
    return blocks[0]


PLUGIN_FILES = ("nearest_merge.py", "midpoint_attribution.py", "mean_abs_capture.py")


@pytest.mark.parametrize("file", PLUGIN_FILES)
def test_documented_plugins_import_only_public_names(file):
    import surgery

    tree = ast.parse(plugin_source(file))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert all(a.name.split(".")[0] != "surgery" for a in node.names), ast.unparse(node)
        elif isinstance(node, ast.ImportFrom) and node.module.split(".")[0] == "surgery":
            assert node.module == "surgery", f"{file}: {ast.unparse(node)} reaches into an internal module"
            assert all(a.name in surgery.__all__ for a in node.names), ast.unparse(node)


def run_plugin(tmp_path, file: str, step: dict, model: Path, probe: Path, extra_steps=()) -> Path:
    """Run ``step`` (plus ``extra_steps``) with the documented plugin ``file`` on ``model`` and ``probe``."""
    from surgery.runtime.manager import Manager
    from surgery.runtime.recipe import load_recipe
    from surgery.runtime.runner import run_recipe

    (tmp_path / file).write_text(plugin_source(file))
    recipe = {"name": "doc", "plugins": [f"./{file}"], "models": {"base": str(model)},
              "data": {"probe": {"source": "jsonl", "path": str(probe), "batch_size": 3}},
              "steps": [step, *extra_steps]}
    (tmp_path / "recipe.yaml").write_text(json.dumps(recipe))
    manager = Manager()
    parsed = load_recipe(tmp_path / "recipe.yaml", manager, [], str(tmp_path / "run"))
    run_recipe(parsed, manager, quiet=True)
    return parsed.output


def test_documented_attribute_plugin_equals_one_point_ig(tmp_path):
    from attribution_fixtures import run_steps, save_checkpoint, write_probe

    model, probe = save_checkpoint(tmp_path / "model"), write_probe(tmp_path / "probe.jsonl", samples=5)
    out = run_plugin(tmp_path, "midpoint_attribution.py", {"attribute": {"plugin": "midpoint"}}, model, probe,
                     [{"prune": {"plugin": "sign-aware", "fraction": 0.25, "save_model": False}}])
    ig = run_steps(tmp_path, "ig", model, probe, [{"attribute": {
        "plugin": "ig", "mode": "per-layer", "quadrature": "riemann-middle", "steps": 1}}])
    mine = load_file(str(out / "00-attribute-midpoint" / "tensors.safetensors"))
    theirs = load_file(str(ig / "00-attribute-ig" / "tensors.safetensors"))
    for key in ("scores", "loss_full", "loss_base"):
        torch.testing.assert_close(mine[key], theirs[key], rtol=1e-5, atol=1e-6)
    assert (out / "01-prune-sign-aware" / "tensors.safetensors").is_file()  # prune reads its scores


def test_documented_capture_plugin_matches_forward_hooks(tmp_path):
    from attribution_fixtures import save_checkpoint, tokenizer, write_probe
    from transformers import AutoModelForCausalLM

    model_dir, probe = save_checkpoint(tmp_path / "model"), write_probe(tmp_path / "probe.jsonl", samples=5)
    out = run_plugin(tmp_path, "mean_abs_capture.py", {"capture": {"plugin": "mean-abs"}}, model_dir, probe)
    captured = load_file(str(out / "00-capture-mean-abs" / "tensors.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    sums, count = {}, 0
    hooks = [layer.mlp.down_proj.register_forward_pre_hook(
        lambda module, args, l=l: sums.__setitem__(l, sums.get(l, 0) + (args[0].abs() * mask[..., None]).sum((0, 1))))
        for l, layer in enumerate(model.model.layers)]
    texts = [json.loads(line)["text"] for line in probe.read_text().splitlines()]
    for start in range(0, len(texts), 3):
        batch = tokenizer()(texts[start:start + 3], return_tensors="pt", padding=True)
        mask = batch["attention_mask"].double()
        with torch.no_grad():
            model(**batch)
        count += int(mask.sum())
    for hook in hooks:
        hook.remove()
    for l in sums:
        torch.testing.assert_close(captured[f"base/{l}/mean_abs"].double(), sums[l].double() / count, rtol=1e-4, atol=1e-6)


def test_documented_plugin_runs_from_a_recipe(tmp_path, tiny_checkpoints, surgery_cli):
    base, donor = tiny_checkpoints
    (tmp_path / "nearest_merge.py").write_text(plugin_source())
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "plugins: [./nearest_merge.py]\n"
        f"models: {{base: {base}, donor: {donor}}}\n"
        "steps:\n  - fuse: {plugin: nearest, radius: 0.02}\n"
        f"output: {tmp_path / 'run'}\n"
    )
    result = surgery_cli("run", recipe)
    assert result.exit_code == 0, result.err
    w_base, w_donor = load_file(str(base / "model.safetensors")), load_file(str(donor / "model.safetensors"))
    merged = load_file(str(tmp_path / "run" / "00-fuse-nearest" / "model" / "model.safetensors"))
    for name, tensor in merged.items():
        close = (w_donor[name] - w_base[name]).abs() <= 0.02
        assert torch.equal(tensor, torch.where(close, w_donor[name], w_base[name]))
    bad = surgery_cli("validate", recipe, "--set", "steps.0.radius=-1")
    assert bad.exit_code == 2 and "steps[0].fuse.radius" in bad.err
    described = surgery_cli("describe", "nearest", "--plugin", str(tmp_path / "nearest_merge.py"))
    assert "radius" in described.out


def test_documented_attribute_plugin_equals_ablation_at_one_half(tmp_path):
    """The GateAttribution subclass in docs/plugins.md, registered on a manager, gives the built-in
    ablation's scores at gate value 1/2 (the same quantity, L(1) - L(unit at 1/2))."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from attribution_fixtures import save_checkpoint, write_probe, write_recipe

    from surgery.core.artifacts import Artifact
    from surgery.runtime.manager import Manager
    from surgery.runtime.recipe import load_recipe
    from surgery.runtime.runner import run_recipe

    blocks = re.findall(r"```python\n(import torch\nfrom surgery.engines.attribution import .*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 1
    namespace: dict = {}
    exec(compile(blocks[0], "docs/plugins.md", "exec"), namespace)  # noqa: S102 - the documented example
    manager = Manager()
    manager.register(namespace["half_gate"], "half-gate")
    model, probe = save_checkpoint(tmp_path / "model"), write_probe(tmp_path / "probe.jsonl", samples=4)
    steps = [{"attribute": {"plugin": "half-gate"}}, {"attribute": {"plugin": "ablation", "value": 0.5}}]
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", model, probe, steps), manager, [], str(tmp_path / "run"))
    run_recipe(recipe, manager, quiet=True)
    ours = Artifact.load(tmp_path / "run" / "00-attribute-half-gate")
    builtin = Artifact.load(tmp_path / "run" / "01-attribute-ablation")
    assert ours.meta["method"] == "half-gate" and (tmp_path / "run" / "00-attribute-half-gate" / "heatmap.png").is_file()
    assert ours.tensors["scores"].abs().max() > 0
    assert torch.allclose(ours.tensors["scores"], builtin.tensors["scores"], rtol=1e-6, atol=1e-9)
