"""docs/api.md runs as written, and every name the docs take from `surgery` is exported."""
from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
API_DOC = ROOT / "docs" / "api.md"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def python_blocks(doc: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", doc.read_text(encoding="utf-8"), re.S)


def test_api_example_runs(tmp_path, monkeypatch):
    import surgery

    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in python_blocks(API_DOC):
        exec(compile(block, str(API_DOC), "exec"), namespace)  # noqa: S102 - the documented session
    result, scores = namespace["result"], namespace["scores"]
    assert [s.name for s in result.steps] == ["00-attribute-ig", "01-prune-sign-aware", "02-evaluate-tasks"]
    layers, heads = len(result.model("base").view.layers), result.model("base").view.layers[0].attn.num_heads
    assert tuple(scores.shape) == (layers, heads) and tuple(namespace["gxa"].shape) == (layers, heads)
    assert namespace["plan"].tensors["head_mask"].sum() == round(0.25 * layers * heads)
    # the run directory is the command line's: a second run reuses every step
    again = surgery.run("recipes/ig.yaml", output="runs/ig-api", quiet=True,
                        overrides=["steps.0.steps=4", "data.probe.n=8", "data.heldout.n=16", "steps.2.n=16"])
    assert {e["status"] for e in again.report["steps"]} == {"reused"}
    from safetensors import safe_open

    with safe_open(str(namespace["merged"].model_dir("merged") / "model.safetensors"), "pt") as handle:
        assert {str(handle.get_tensor(k).dtype) for k in handle.keys()} == {"torch.bfloat16"}


def test_import_surgery_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, surgery; surgery.load_recipe; surgery.Options; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "False"


def documented_names() -> set[str]:
    """Every name a python block of the docs imports from `surgery` or reads as `surgery.NAME`."""
    names: set[str] = set()
    for doc in DOCS:
        for block in python_blocks(doc):
            tree = ast.parse(block)
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.module == "surgery":
                    names |= {a.name for a in node.names}
                elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                      and node.value.id == "surgery"):
                    names.add(node.attr)
    return names


def test_every_name_the_docs_use_is_exported():
    import surgery

    names = documented_names()
    assert {"run", "load_recipe", "call", "hookimpl", "Artifact", "evaluate_points"} <= names
    for name in sorted(names):
        assert name in surgery.__all__, name
        assert getattr(surgery, name) is not None


@pytest.mark.parametrize("name", __import__("surgery").__all__)
def test_every_exported_name_imports(name):
    import surgery

    assert getattr(surgery, name) is not None
