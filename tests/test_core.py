"""The core end to end: plugins, recipes, the runner's reuse, and the streamed baselines."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from surgery.runtime.manager import Manager

RECIPE = """
name: core
models: {{a: {a}, b: {b}}}
steps:
  - fuse: {{plugin: {plugin}, weights: [0.5, 0.5]}}
  - fuse: {{plugin: task-arithmetic, models: [a, merged], scale: 0.5, as: again}}
output: {out}
"""

LOCAL_PLUGIN = '''
"""A third-party fuse method: keep the base model's tensors."""
from surgery import hookimpl
from surgery.core.artifacts import Artifact
from surgery.core.options import Options

PLUGIN_NAME = "keep-base"
CALLS = []


class KeepBaseOptions(Options):
    note: str = "none"


@hookimpl
def option_schema(stage):
    return KeepBaseOptions if stage == "fuse" else None


@hookimpl
def fuse(ctx):
    CALLS.append(ctx.name)
    writer = ctx.model_writer(like=ctx.models[0])
    from surgery.models.checkpoint import CheckpointReader
    reader = CheckpointReader(ctx.model_path(ctx.models[0]))
    for name in reader.names():
        writer.add(name, reader.get(name))
    return Artifact(figures={"note": ctx.options.note}, model_dir=writer.close())
'''


def write_recipe(tmp_path: Path, a: Path, b: Path, plugin: str = "linear", extra: str = "") -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(extra + RECIPE.format(a=a, b=b, plugin=plugin, out=tmp_path / "run"))
    return recipe


def load_weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def test_linear_is_the_exact_average_and_reloads(tmp_path, tiny_checkpoints, surgery_cli):
    from transformers import AutoModelForCausalLM

    a, b = tiny_checkpoints
    result = surgery_cli("run", write_recipe(tmp_path, a, b))
    assert result.exit_code == 0, result.err
    merged_dir = tmp_path / "run" / "00-fuse-linear" / "model"
    wa, wb, wm = load_weights(a), load_weights(b), load_weights(merged_dir)
    for name in wa:
        expected = (wa[name].float() * 0.5 + wb[name].float() * 0.5).to(wa[name].dtype)
        assert torch.equal(wm[name], expected), name
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    by_hand = AutoModelForCausalLM.from_pretrained(a).eval()
    by_hand.load_state_dict({k: (wa[k] + wb[k]) * 0.5 for k in wa}, strict=False)
    ids = torch.arange(12).view(2, 6)
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, by_hand(ids).logits, atol=1e-6)


def test_task_arithmetic_matches_formula(tmp_path, tiny_checkpoints, surgery_cli):
    a, b = tiny_checkpoints
    assert surgery_cli("run", write_recipe(tmp_path, a, b)).exit_code == 0
    wa = load_weights(a)
    wm = load_weights(tmp_path / "run" / "00-fuse-linear" / "model")
    again = load_weights(tmp_path / "run" / "01-fuse-task-arithmetic" / "model")
    for name in wa:
        assert torch.allclose(again[name], wa[name] + 0.5 * (wm[name] - wa[name]), atol=1e-7)


def test_rerun_reuses_finished_steps_and_is_identical(tmp_path, tiny_checkpoints, surgery_cli):
    a, b = tiny_checkpoints
    recipe = write_recipe(tmp_path, a, b)
    assert surgery_cli("run", recipe).exit_code == 0
    final = tmp_path / "run" / "01-fuse-task-arithmetic" / "model" / "model.safetensors"
    first = final.read_bytes()
    # simulate a kill after step 0: the second step never finished
    (tmp_path / "run" / "01-fuse-task-arithmetic" / "done.json").unlink()
    result = surgery_cli("run", recipe)
    assert result.exit_code == 0, result.err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [s["status"] for s in report["steps"]] == ["reused", "ran"]
    assert final.read_bytes() == first
    # a changed option invalidates that step and everything after it
    result = surgery_cli("run", recipe, "--set", "steps.0.weights=[0.3, 0.7]")
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [s["status"] for s in report["steps"]] == ["ran", "ran"]


def test_half_written_step_is_never_read(tmp_path, tiny_checkpoints, surgery_cli):
    a, b = tiny_checkpoints
    recipe = write_recipe(tmp_path, a, b)
    run = tmp_path / "run"
    # leftovers of a crash: a temporary directory and a step directory without done.json
    (run / ".00-fuse-linear.tmp").mkdir(parents=True)
    (run / "00-fuse-linear").mkdir()
    (run / "00-fuse-linear" / "meta.json").write_text("{truncated")
    assert surgery_cli("run", recipe).exit_code == 0
    assert not (run / ".00-fuse-linear.tmp").exists()
    leftovers = [p for p in run.rglob("*") if p.name.endswith(".tmp") or p.name.endswith(".old")]
    assert leftovers == []


def test_local_plugin_file_named_in_recipe(tmp_path, tiny_checkpoints, surgery_cli):
    a, b = tiny_checkpoints
    (tmp_path / "keep_base.py").write_text(LOCAL_PLUGIN)
    recipe = write_recipe(tmp_path, a, b, plugin="keep-base", extra="plugins: [./keep_base.py]\n")
    recipe.write_text(recipe.read_text().replace("plugin: keep-base, weights: [0.5, 0.5]", "plugin: keep-base, note: hi"))
    result = surgery_cli("run", recipe)
    assert result.exit_code == 0, result.err
    assert "note=hi" in result.out
    merged = load_weights(tmp_path / "run" / "00-fuse-keep-base" / "model")
    assert all(torch.equal(t, load_weights(a)[k]) for k, t in merged.items())


def test_only_the_named_plugin_runs(tmp_path):
    import types

    calls = []

    def make(name):
        module = types.ModuleType(name)
        exec(LOCAL_PLUGIN.replace('PLUGIN_NAME = "keep-base"', f'PLUGIN_NAME = "{name}"'), module.__dict__)
        module.CALLS = calls
        module.fuse.__globals__["CALLS"] = calls
        return module

    manager = Manager()
    manager.register(make("first"), "first")
    manager.register(make("second"), "second")
    assert {"first", "second", "linear"} <= set(manager.plugins_for("fuse"))

    class Ctx:
        name = "probe"

    with pytest.raises(Exception):
        manager.call_stage("second", "fuse", ctx=Ctx())
    assert calls == ["probe"]  # only `second` was called, once


def test_plugin_that_raises_is_named(tmp_path, tiny_checkpoints, surgery_cli):
    a, b = tiny_checkpoints
    (tmp_path / "broken.py").write_text(textwrap.dedent('''
        from surgery import hookimpl
        PLUGIN_NAME = "broken"
        @hookimpl
        def fuse(ctx):
            raise ZeroDivisionError("boom")
    '''))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"plugins: [./broken.py]\nmodels: {{a: {a}, b: {b}}}\nsteps:\n  - fuse: {{plugin: broken}}\noutput: {tmp_path / 'run'}\n")
    result = surgery_cli("run", recipe)
    assert result.exit_code == 2
    assert result.err.strip() == f"error: {recipe}: step 0 (fuse: broken): plugin raised ZeroDivisionError: boom"
    assert not (tmp_path / "run").exists()  # a run that finished no step leaves nothing behind


def test_entry_point_plugin_is_discovered(tmp_path, tiny_checkpoints):
    """A plugin installed as a distribution with a `surgery` entry point needs no package change."""
    site = tmp_path / "site"
    (site / "keep_base_pkg").mkdir(parents=True)
    (site / "keep_base_pkg" / "__init__.py").write_text(LOCAL_PLUGIN)
    dist = site / "keep_base_pkg-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: keep-base-pkg\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[surgery]\nkeep-base = keep_base_pkg\n")
    a, b = tiny_checkpoints
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"models: {{a: {a}, b: {b}}}\nsteps:\n  - fuse: {{plugin: keep-base}}\noutput: {tmp_path / 'run'}\n")
    env = {**os.environ, "PYTHONPATH": str(site)}
    listed = subprocess.run([sys.executable, "-m", "surgery.cli", "plugins", "--json"], env=env, capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    assert "keep-base" in [row["name"] for row in json.loads(listed.stdout)]
    ran = subprocess.run([sys.executable, "-m", "surgery.cli", "run", str(recipe)], env=env, capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    assert (tmp_path / "run" / "00-fuse-keep-base" / "model" / "model.safetensors").is_file()


def test_plugins_and_describe_commands(surgery_cli):
    listed = surgery_cli("plugins")
    assert listed.exit_code == 0 and "linear" in listed.out and "fuse" in listed.out
    described = surgery_cli("describe", "linear")
    assert described.exit_code == 0
    assert "weights" in described.out and "normalize" in described.out
    unknown = surgery_cli("describe", "lineer")
    assert unknown.exit_code == 2 and "did you mean 'linear'" in unknown.err


def test_sharded_output_reloads(tmp_path, tiny_checkpoints, surgery_cli):
    from transformers import AutoModelForCausalLM

    a, b = tiny_checkpoints
    recipe = write_recipe(tmp_path, a, b)
    assert surgery_cli("run", recipe, "--set", "steps.0.max_shard_mb=0.01").exit_code == 0
    model_dir = tmp_path / "run" / "00-fuse-linear" / "model"
    assert len(list(model_dir.glob("model-*-of-*.safetensors"))) > 1
    assert (model_dir / "model.safetensors.index.json").is_file()
    AutoModelForCausalLM.from_pretrained(model_dir)


def test_mismatched_models_are_refused(tmp_path, tiny_checkpoints, surgery_cli):
    from conftest import make_checkpoint

    a, _ = tiny_checkpoints
    wide = make_checkpoint(tmp_path / "wide", 3, intermediate_size=96)
    recipe = write_recipe(tmp_path, a, wide)
    result = surgery_cli("run", recipe)
    assert result.exit_code == 2
    assert "[32, 96]" in result.err and "Traceback" not in result.err
