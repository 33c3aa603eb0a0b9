"""The complete plugin in docs/plugins.md runs as written."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file

DOC = Path(__file__).parent.parent / "docs" / "plugins.md"


def plugin_source() -> str:
    blocks = re.findall(r"```python\n(# nearest_merge.py\n.*?)```", DOC.read_text(), re.S)
    assert len(blocks) == 1
    return blocks[0]


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
