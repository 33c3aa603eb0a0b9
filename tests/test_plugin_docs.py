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
