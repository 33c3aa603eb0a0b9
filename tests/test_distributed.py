"""Data parallelism: a 2-process gloo run (capture: mean, fam; per-layer IG) gives the artifacts of a
1-process run over the same data."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from merge_fixtures import build, perturbed, probe_file, save
from safetensors.torch import load_file

CAPTURE_STEPS = [
    {"capture": {"plugin": "mean", "models": ["a", "b"]}},
    {"capture": {"plugin": "fam", "models": ["a", "b"], "sketch_dim": 32}},
    {"attribute": {"plugin": "ig", "models": ["a"], "mode": "per-layer", "steps": 4, "keep_per_sample": True}},
]


@pytest.fixture(scope="module")
def models_and_probe(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    base = save(build("llama", 0), root / "a")
    donor = save(perturbed(build("llama", 0), seed=1, scale=0.01), root / "b")
    return base, donor, probe_file(root / "probe.jsonl", n=24), root


def write_recipe(root: Path, models: dict[str, Path], probe: Path, steps: list[dict]) -> Path:
    raw = {"name": "dp", "seed": 0, "models": {k: str(v) for k, v in models.items()},
           "data": {"probe": {"source": "jsonl", "path": str(probe), "max_tokens": 32, "batch_size": 4}},
           "steps": steps, "output": str(root / "unused")}
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def surgery_run(recipe: Path, output: Path, nproc: int) -> Path:
    """``surgery run RECIPE --nproc N`` in a fresh process (torchrun, gloo on the CPU)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": ""}
    env.pop("MASTER_PORT")
    command = [sys.executable, "-m", "surgery.cli", "run", str(recipe), "--output", str(output), "--nproc", str(nproc)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return output


def step_dirs(run: Path) -> list[Path]:
    return sorted(p for p in run.iterdir() if p.is_dir() and (p / "tensors.safetensors").exists())


def assert_same_artifacts(one: Path, two: Path) -> None:
    dirs_one, dirs_two = step_dirs(one), step_dirs(two)
    assert [p.name for p in dirs_one] == [p.name for p in dirs_two] and dirs_one
    for a, b in zip(dirs_one, dirs_two):
        tensors_a, tensors_b = load_file(a / "tensors.safetensors"), load_file(b / "tensors.safetensors")
        assert tensors_a.keys() == tensors_b.keys() and tensors_a, a.name
        for key in tensors_a:
            x, y = tensors_a[key].double(), tensors_b[key].double()
            assert x.shape == y.shape, f"{a.name} {key}"
            scale = max(1.0, x.abs().max().item())
            assert torch.allclose(x, y, rtol=1e-5, atol=1e-5 * scale), f"{a.name} {key}: {(x - y).abs().max()}"
    figures = lambda run: {s["index"]: s["figures"] for s in json.loads((run / "report.json").read_text())["steps"]}
    assert_close_figures(figures(one), figures(two))


def assert_close_figures(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for step in a:
        for key, value in a[step].items():
            if isinstance(value, (int, float)):
                assert b[step][key] == pytest.approx(value, rel=1e-5, abs=1e-6), f"step {step} {key}"


def test_two_process_capture_and_ig_equal_one_process(models_and_probe):
    base, donor, probe, root = models_and_probe
    recipe = write_recipe(root, {"a": base, "b": donor}, probe, CAPTURE_STEPS)
    one = surgery_run(recipe, root / "one", nproc=1)
    two = surgery_run(recipe, root / "two", nproc=2)
    assert_same_artifacts(one, two)


def test_fuse_of_multi_shard_checkpoints_writes_shards_that_stock_transformers_loads(tmp_path):
    from merge_fixtures import run_steps, tokenizer
    from transformers import AutoModelForCausalLM

    models, inputs = {}, {}
    for name, seed in (("a", 0), ("b", 1)):
        model = build("llama", seed)
        model.save_pretrained(tmp_path / name, max_shard_size="20KB")
        tokenizer().save_pretrained(tmp_path / name)
        models[name], inputs[name] = tmp_path / name, model
        assert len(list((tmp_path / name).glob("*.safetensors"))) > 2  # the inputs really are multi-shard
    run = run_steps(tmp_path, models, [{"fuse": {"plugin": "linear", "max_shard_mb": 0.02, "as": "merged"}}])
    merged_dir = next(run.glob("*-fuse-linear")) / "model"
    shards = sorted(merged_dir.glob("*.safetensors"))
    assert len(shards) > 2 and (merged_dir / "model.safetensors.index.json").exists()
    assert max(p.stat().st_size for p in shards) < 2 * 0.02 * 2**20  # one tensor may overflow a cap, not more
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    state_a, state_b = inputs["a"].state_dict(), inputs["b"].state_dict()
    for name, tensor in merged.state_dict().items():
        assert torch.allclose(tensor, (state_a[name] + state_b[name]) / 2, atol=1e-7), name
