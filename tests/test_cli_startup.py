"""The fast command line: plugins imported on demand, new commands and options, step folders,
output dtypes and the eval table's names."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

ROOT = Path(__file__).parent.parent


def modules_after(*args: str, cache: Path) -> set[str]:
    """The modules a whole `surgery ARGS` process imported (run in a child with a given cache)."""
    code = ("import sys; from surgery.cli import main; sys.argv = ['surgery', *sys.argv[1:]]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('MODULES', ' '.join(sorted(sys.modules)))")
    env = {**os.environ, "SURGERY_CACHE": str(cache), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, env=env)
    line = next(l for l in out.stdout.splitlines() if l.startswith("MODULES "))
    return set(line.split()[1:])


def test_listing_imports_no_torch_and_validating_imports_only_the_named_plugins(tmp_path):
    first = modules_after("plugins", cache=tmp_path)  # builds the index: every plugin once
    assert "surgery.plugins.ig" in first and "torch" in first
    for args in (("plugins",), ("--help",)):
        loaded = modules_after(*args, cache=tmp_path)
        assert "torch" not in loaded and "transformers" not in loaded, args
    # the merge plugins import torch at module level (tensor formulas, checkpoint dtypes): describe and
    # validate of a merge recipe load that one plugin, and no other
    described = modules_after("describe", "linear", cache=tmp_path)
    assert "surgery.plugins.merge_baselines" in described and "surgery.plugins.ig" not in described
    assert "surgery.plugins.ig" not in modules_after("plugins", cache=tmp_path)
    validated = modules_after("validate", "recipes/linear.yaml", cache=tmp_path)
    assert "surgery.plugins.merge_baselines" in validated and "surgery.plugins.fpo" not in validated


def test_index_follows_an_edited_plugin(tmp_path, monkeypatch):
    from surgery.runtime import plugin_index
    from surgery.runtime.manager import Manager

    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path))
    entry_points = list(Manager()._pending.values())
    key = plugin_index.key(entry_points)
    plugin = ROOT / "surgery" / "plugins" / "mean.py"
    stat = plugin.stat()
    try:
        os.utime(plugin, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        assert plugin_index.key(entry_points) != key
    finally:
        os.utime(plugin, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert plugin_index.key(entry_points) == key


def test_manager_knows_stages_without_importing_and_calls_load_them(tmp_path, monkeypatch):
    from surgery.runtime.manager import Manager

    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path))
    manager = Manager()
    assert manager.stages_of("fam") == ["capture", "score", "cluster", "fuse"]
    assert "ig" in manager.plugins_for("attribute") and "fam" in manager._pending
    assert manager.schema("fam", "cluster").model_fields["k"].default is not None  # imported on demand
    assert "fam" not in manager._pending
    assert "tiny-llama/base" in manager.registries.models and "synthetic" in manager.registries.data_sources


def test_version_and_init_list(surgery_cli):
    from surgery import __version__

    assert surgery_cli("--version").out.strip() == f"surgery {__version__}"
    listed = surgery_cli("init", "--list").out.splitlines()
    assert [line.split()[0] for line in listed] == ["attribute", "merge"]


def test_describe_prints_the_whole_description(surgery_cli):
    out = surgery_cli("describe", "data-sources").out
    assert out.startswith("data-sources: Built-in data sources")
    import inspect

    from surgery.plugins import data_sources

    assert inspect.cleandoc(data_sources.__doc__) in out  # the whole docstring, not its first line


def test_plugin_swap_lists_every_leftover_key_or_drops_them(tmp_path, surgery_cli):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("models: {a: builtin:tiny-llama/task-a, b: builtin:tiny-llama/task-b}\n"
                      "steps:\n  - fuse: {plugin: ties, density: 0.3, scale: 0.5, models: [a, b]}\n")
    swapped = surgery_cli("validate", recipe, "--set", "steps.0.plugin=linear")
    assert swapped.exit_code == 2 and "unknown keys density, scale" in swapped.err and "--set-plugin" in swapped.err
    dropped = surgery_cli("validate", recipe, "--set-plugin", "0=linear")
    assert dropped.exit_code == 0, dropped.err
    wrong = surgery_cli("validate", recipe, "--set-plugin", "0=ig")
    assert wrong.exit_code == 2 and "no fuse plugin named 'ig'" in wrong.err


def test_dtype_sets_the_output_and_reuse_keeps_the_time(tmp_path, tiny_checkpoints, surgery_cli):
    a, b = tiny_checkpoints
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"models: {{a: {a}, b: {b}}}\n"
                      "steps:\n  - fuse: {plugin: linear, name: half-half, dtype: bfloat16, as: m}\n"
                      "  - fuse: {plugin: linear, models: [a, b]}\n"
                      f"output: {tmp_path / 'run'}\n")
    first = surgery_cli("run", recipe)
    assert first.exit_code == 0, first.err
    for folder, dtype in (("00-fuse-linear", "torch.bfloat16"), ("01-fuse-linear", "torch.float32")):
        with safe_open(str(tmp_path / "run" / folder / "model" / "model.safetensors"), "pt") as handle:
            assert {str(handle.get_tensor(k).dtype) for k in handle.keys()} == {dtype}, folder
    config = json.loads((tmp_path / "run" / "00-fuse-linear" / "model" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    ran = json.loads((tmp_path / "run" / "report.json").read_text())["steps"][0]["seconds"]
    assert surgery_cli("run", recipe).exit_code == 0
    reused = json.loads((tmp_path / "run" / "report.json").read_text())["steps"][0]
    assert reused["status"] == "reused" and reused["seconds"] == ran  # the time it took when it ran
    bad = surgery_cli("validate", recipe, "--set", "steps.0.dtype=int8")
    assert bad.exit_code == 2 and "steps[0].fuse.dtype" in bad.err


def test_eval_keys_rows_by_the_names_given(tmp_path, surgery_cli):
    from surgery.models import zoo

    a, b = zoo.build("tiny-llama/task-a"), zoo.build("tiny-llama/task-b")
    twins = [tmp_path / "x" / "model", tmp_path / "y" / "model"]
    for source, target in zip((a, b), twins):
        target.parent.mkdir()
        target.symlink_to(source)
    same = surgery_cli("eval", str(twins[0]), str(twins[0]), "--n", "4", "--json")
    assert same.exit_code == 2 and "given twice" in same.err
    both = surgery_cli("eval", *map(str, twins), "--n", "4", "--tasks", "copy", "--json")
    assert {key.split("/copy")[0] for key in json.loads(both.out)} == {"x/model", "y/model"}  # both rows kept
    table = surgery_cli("eval", f"first={twins[0]}", f"second={twins[1]}", "--n", "4", "--tasks", "copy", "--json")
    assert table.exit_code == 0, table.err
    assert {key.split("/")[0] for key in json.loads(table.out)} == {"first", "second"}


def test_a_broken_installed_plugin_is_listed_and_fails_only_when_used(tmp_path, monkeypatch):
    import importlib.metadata

    from surgery.core.errors import PluginError
    from surgery.runtime.manager import Manager

    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path))
    (tmp_path / "surgery_broken_plugin.py").write_text("raise ImportError('needs a missing package')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    manager = Manager(load_entrypoints=False)
    manager._pending = {"broken": importlib.metadata.EntryPoint("broken", "surgery_broken_plugin", "surgery"),
                        "mean": importlib.metadata.EntryPoint("mean", "surgery.plugins.mean:mean", "surgery")}
    assert manager.stages_of("mean") == ["capture"]
    assert manager.summary("broken").startswith("(cannot be loaded")
    with pytest.raises(PluginError, match="needs a missing package"):
        manager.get("broken")
