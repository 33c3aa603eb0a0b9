"""Determinism: the same recipe and seed give bit-identical outputs on the CPU (every tensor,
model and metadata file of every step), for a FAM merge with capture and for an IG attribution;
another seed changes what the seed drives, so the comparison can fail."""
from __future__ import annotations

from pathlib import Path

import pytest
from merge_fixtures import build, perturbed, probe_file, save


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("determinism")
    return {
        "a": save(perturbed(build("llama", 0), 1), root / "a"),
        "b": save(perturbed(build("llama", 0), 2), root / "b"),
        "probe": probe_file(root / "probe.jsonl", n=12),
    }


RECIPES = {
    "fam-merge": [
        {"weight": {"plugin": "tlinp"}},
        {"capture": {"plugin": "fam", "models": ["a", "b"], "sketch_dim": 8}},
        {"score": {"plugin": "fam", "models": ["a", "b"]}},
        {"cluster": {"plugin": "fam", "models": ["a", "b"], "k": 4}},
        {"align": {"plugin": "hungarian", "models": ["a", "b"]}},
        {"fuse": {"plugin": "fam", "models": ["a", "b"], "as": "merged"}},
    ],
    "ig-attribution": [
        {"attribute": {"plugin": "ig", "models": ["a"], "baseline": "random", "steps": 4, "keep_per_sample": True}},
        {"prune": {"plugin": "random", "models": ["a"], "fraction": 0.25}},
    ],
}


def run(inputs: dict[str, Path], steps: list[dict], output: Path, seed: int) -> dict[str, bytes]:
    from surgery.runtime.manager import Manager
    from surgery.runtime.recipe import validate
    from surgery.runtime.runner import run_recipe

    raw = {"name": "determinism", "seed": seed, "models": {"a": str(inputs["a"]), "b": str(inputs["b"])},
           "data": {"probe": {"source": "jsonl", "path": str(inputs["probe"]), "max_tokens": 32, "batch_size": 4}},
           "steps": steps, "output": str(output)}
    manager = Manager()
    report = run_recipe(validate(raw, manager, base_dir=output.parent), manager, quiet=True)
    assert [step["status"] for step in report["steps"]] == ["ran"] * len(steps)
    skip = {"done.json", "report.json", "run.log"}
    return {p.relative_to(output).as_posix(): p.read_bytes() for p in sorted(output.rglob("*"))
            if p.is_file() and p.name not in skip}


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_same_seed_gives_identical_bytes(recipe, inputs, tmp_path):
    first = run(inputs, RECIPES[recipe], tmp_path / "first", seed=0)
    second = run(inputs, RECIPES[recipe], tmp_path / "second", seed=0)
    assert any(name.endswith("tensors.safetensors") for name in first)
    assert any(name.endswith("model.safetensors") for name in first)
    assert sorted(first) == sorted(second)
    assert [name for name in first if first[name] != second[name]] == []
    other = run(inputs, RECIPES[recipe], tmp_path / "other", seed=1)
    changed = [name for name in first if other.get(name) != first[name]]
    assert any(name.endswith(".safetensors") for name in changed)  # the seed reaches the outputs
