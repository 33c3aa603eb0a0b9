"""Hardening: bounded YAML, the run-directory lock (two processes), offline by default (no socket
is opened), plugin identity in step fingerprints, --force, output and device checks."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from surgery.core import safe_yaml
from surgery.core.errors import RecipeError, SurgeryError

PLUGIN = '''\
"""A cheap evaluate plugin: one figure, no model work."""
from surgery import hookimpl
from surgery.core.artifacts import Artifact

PLUGIN_NAME = "{name}"
VALUE = {value}


@hookimpl
def evaluate(ctx):
    return Artifact(figures={{"value": VALUE}})
'''


def write_recipe(directory: Path, checkpoint: Path, plugin_name: str, value: float = 1.0, steps: int = 2) -> Path:
    (directory / "cheap_plugin.py").write_text(PLUGIN.format(name=plugin_name, value=value))
    recipe = {
        "name": "cheap", "plugins": ["./cheap_plugin.py"], "models": {"a": str(checkpoint)},
        "steps": [{"evaluate": {"plugin": plugin_name, "name": f"e{i}"}} for i in range(steps)], "output": "run",
    }
    path = directory / "cheap.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def statuses(directory: Path) -> list[str]:
    return [step["status"] for step in json.loads((directory / "run" / "report.json").read_text())["steps"]]


# --- bounded YAML ----------------------------------------------------------------------------------

def test_bounded_yaml_equals_safe_load_on_ordinary_files():
    """Anchors used within the limits load exactly as yaml.safe_load reads them."""
    text = textwrap.dedent("""\
        base: &b {lr: 0.1, tasks: [copy, reverse]}
        one: *b
        two: {<<: *b, lr: 0.2}
        many: [*b, *b, *b]
        """)
    assert safe_yaml.load(text) == yaml.safe_load(text)


def test_billion_laughs_fails_fast():
    lines = ["l0: &l0 [a, a, a, a, a, a, a, a, a, a]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 12)]  # 10^12 nodes
    start = time.perf_counter()
    with pytest.raises(RecipeError, match="expands to more than"):
        safe_yaml.load("\n".join(lines))
    assert time.perf_counter() - start < 2.0


def test_shared_anchor_is_counted_with_its_expansion():
    """Just under and just over the node limit: the count is of the expanded document."""
    per_item = 1 + 10  # a list node and its ten scalars
    fits = safe_yaml.MAX_NODES // per_item - 2
    text = "x: &x [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\ny: [" + ", ".join(["*x"] * fits) + "]"
    assert len(safe_yaml.load(text)["y"]) == fits
    with pytest.raises(RecipeError, match="expands to more than"):
        safe_yaml.load(text.replace("]\ny: [", "]\ny: [" + "*x, " * 20))


@pytest.mark.parametrize("text", ["a: &a [*a]", "a: &a {b: *a}", "a: &a [1, [2, *a]]"])
def test_self_reference_is_refused(text):
    with pytest.raises(RecipeError, match="an alias refers to the node that contains it"):
        safe_yaml.load(text)


def test_depth_limit_is_exact():
    assert safe_yaml.load("[" * safe_yaml.MAX_DEPTH + "]" * safe_yaml.MAX_DEPTH) is not None
    with pytest.raises(RecipeError, match="nested deeper"):
        safe_yaml.load("[" * (safe_yaml.MAX_DEPTH + 1) + "]" * (safe_yaml.MAX_DEPTH + 1))


def test_size_limit_can_be_raised(tmp_path, monkeypatch, surgery_cli):
    monkeypatch.chdir(tmp_path)
    surgery_cli("init", "merge")
    size = (tmp_path / "merge.yaml").stat().st_size
    monkeypatch.setenv(safe_yaml.SIZE_ENV, str(size - 1))
    refused = surgery_cli("validate", "merge.yaml")
    assert refused.exit_code == 2 and f"more than the {size - 1}-byte limit" in refused.err
    monkeypatch.setenv(safe_yaml.SIZE_ENV, str(size))
    assert surgery_cli("validate", "merge.yaml").exit_code == 0


# --- nothing leaves the machine ----------------------------------------------------------------------

@pytest.fixture
def no_network(monkeypatch):
    """Every attempt to open a connection is recorded and fails."""
    attempts: list[object] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setenv("SURGERY_ALLOW_DOWNLOAD", "0")
    return attempts


def test_hub_id_is_refused_without_a_network_call(tmp_path, monkeypatch, surgery_cli, no_network):
    monkeypatch.chdir(tmp_path)
    surgery_cli("init", "merge")
    for command in (["run", "merge.yaml"], ["validate", "merge.yaml"]):
        result = surgery_cli(*command, "--set", "models.a=some-org/some-model")
        assert result.exit_code == 2 and "downloading it from the hub is off" in result.err
    result = surgery_cli("eval", "some-org/some-model", "--n", "2")
    assert result.exit_code == 2 and "--allow-download" in result.err
    assert no_network == []
    assert not (tmp_path / "runs").exists()


def test_allow_download_opts_in(tmp_path, monkeypatch, surgery_cli, no_network):
    """With the flag (or the variable) a hub id validates; validation still opens no connection."""
    monkeypatch.chdir(tmp_path)
    surgery_cli("init", "merge")
    result = surgery_cli("validate", "merge.yaml", "--allow-download", "--set", "models.a=some-org/some-model")
    assert result.exit_code == 0, result.err
    monkeypatch.setenv("SURGERY_ALLOW_DOWNLOAD", "1")
    assert surgery_cli("validate", "merge.yaml", "--set", "models.a=some-org/some-model").exit_code == 0
    assert no_network == []


# --- the run lock: two processes -------------------------------------------------------------------

HOLDER = """
import sys, time
from pathlib import Path
from surgery.core.runlock import RunLock
lock = RunLock(Path(sys.argv[1]))
lock.acquire()
print("locked", flush=True)
time.sleep(120)
"""


def start_holder(directory: Path) -> subprocess.Popen:
    directory.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_second_run_on_a_locked_directory_refuses(tmp_path, monkeypatch, surgery_cli, tiny_checkpoints):
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path, tiny_checkpoints[0], "cheap-lock")
    holder = start_holder(tmp_path / "run")
    try:
        result = surgery_cli("run", recipe)
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 2
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and f"another run is using this directory (pid {holder.pid}" in lines[0]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]  # nothing computed, no log written


def test_stale_lock_of_a_killed_run_is_taken_over(tmp_path, monkeypatch, surgery_cli, tiny_checkpoints):
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path, tiny_checkpoints[0], "cheap-stale")
    holder = start_holder(tmp_path / "run")
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    assert json.loads((tmp_path / "run" / ".lock").read_text())["pid"] == holder.pid  # left behind
    result = surgery_cli("run", recipe)
    assert result.exit_code == 0, result.err
    log = (tmp_path / "run" / "run.log").read_text()
    assert f"taking over a stale lock left by pid {holder.pid}" in log
    assert not (tmp_path / "run" / ".lock").exists()  # released at the end


def test_two_cli_runs_at_once(tmp_path, tiny_checkpoints):
    """Two `surgery run` processes on one directory: one runs, the other refuses in one line."""
    (tmp_path / "gate.py").write_text(textwrap.dedent('''
        """Holds its step until the file 'release' appears."""
        import time
        from pathlib import Path
        from surgery import hookimpl
        from surgery.core.artifacts import Artifact
        PLUGIN_NAME = "gate"

        @hookimpl
        def evaluate(ctx):
            Path("started").write_text("1")
            while not Path("release").exists():
                time.sleep(0.05)
            return Artifact(figures={"value": 1.0})
        '''))
    recipe = {"name": "gate", "plugins": ["./gate.py"], "models": {"a": str(tiny_checkpoints[0])},
              "steps": [{"evaluate": {"plugin": "gate"}}], "output": "run"}
    (tmp_path / "gate.yaml").write_text(yaml.safe_dump(recipe))
    command = [sys.executable, "-m", "surgery.cli", "run", "gate.yaml"]
    first = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (tmp_path / "started").exists():
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.1)
        second = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=240)
        (tmp_path / "release").write_text("1")
        out, err = first.communicate(timeout=240)
    finally:
        first.kill()
    assert first.returncode == 0, err
    assert second.returncode == 2
    assert len(second.stderr.strip().splitlines()) == 1 and "another run is using this directory" in second.stderr
    assert "Traceback" not in second.stderr
    log = (tmp_path / "run" / "run.log").read_text()
    assert log.count("run 'gate'") == 1  # the refused run wrote nothing into the log


# --- fingerprints and --force ---------------------------------------------------------------------

def test_editing_a_local_plugin_reruns_its_steps(tmp_path, monkeypatch, surgery_cli, tiny_checkpoints):
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path, tiny_checkpoints[0], "cheap-edit", value=1.0)
    assert surgery_cli("run", recipe).exit_code == 0
    assert surgery_cli("run", recipe).exit_code == 0
    assert statuses(tmp_path) == ["reused", "reused"]
    write_recipe(tmp_path, tiny_checkpoints[0], "cheap-edit", value=2.0)  # same name, new content
    assert surgery_cli("run", recipe).exit_code == 0
    assert statuses(tmp_path) == ["ran", "ran"]


def test_plugin_identity():
    from surgery.core.version import VERSION
    from surgery.runtime.manager import Manager

    assert Manager().identity("linear") == f"model-surgery {VERSION}"


def test_local_plugin_identity_is_its_content(tmp_path):
    from surgery.runtime.manager import Manager

    manager = Manager(load_entrypoints=False)
    (tmp_path / "ident_plugin.py").write_text(PLUGIN.format(name="ident", value=1.0))
    manager.add("ident_plugin.py", tmp_path)
    before = manager.identity("ident")
    assert before.startswith("sha256:")
    (tmp_path / "ident_plugin.py").write_text(PLUGIN.format(name="ident", value=1.5))
    assert manager.identity("ident") != before


def test_force(tmp_path, monkeypatch, surgery_cli, tiny_checkpoints):
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path, tiny_checkpoints[0], "cheap-force", steps=3)
    assert surgery_cli("run", recipe).exit_code == 0
    assert surgery_cli("run", recipe, "--force").exit_code == 0
    assert statuses(tmp_path) == ["ran", "ran", "ran"]
    assert surgery_cli("run", recipe, "--force", "e1").exit_code == 0
    assert statuses(tmp_path) == ["reused", "ran", "ran"]
    assert surgery_cli("run", recipe, "--force", "2").exit_code == 0
    assert statuses(tmp_path) == ["reused", "reused", "ran"]
    assert surgery_cli("run", recipe).exit_code == 0
    assert statuses(tmp_path) == ["reused", "reused", "reused"]


# --- where a run goes, and what validate says ------------------------------------------------------

def test_unwritable_output_is_refused_at_validation(tmp_path, monkeypatch, surgery_cli):
    monkeypatch.chdir(tmp_path)
    surgery_cli("init", "merge")
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == locked else real_access(path, mode))
    result = surgery_cli("validate", "merge.yaml", "--set", "output=locked/run")
    assert result.exit_code == 2 and f"{locked} is not writable" in result.err


def test_dotdot_output_says_where_it_resolves(tmp_path, monkeypatch, surgery_cli):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    surgery_cli("init", "merge")
    result = surgery_cli("validate", "merge.yaml", "--set", "output=../elsewhere/run")
    assert result.exit_code == 0, result.err
    assert f"(resolves to {tmp_path / 'elsewhere' / 'run'})" in result.out


def test_validate_names_the_plugin_code_it_imported(tmp_path, monkeypatch, surgery_cli, tiny_checkpoints):
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path, tiny_checkpoints[0], "cheap-validate")
    result = surgery_cli("validate", recipe)
    assert result.exit_code == 0, result.err
    assert f"imported plugin code: {tmp_path / 'cheap_plugin.py'}" in result.out


def test_a_log_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, surgery_cli, tiny_checkpoints):
    """The failure handler logs too; when that fails as well the first error is still one line."""
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path, tiny_checkpoints[0], "cheap-log")
    (tmp_path / "run" / "run.log").mkdir(parents=True)
    result = surgery_cli("run", recipe)
    assert result.exit_code == 2
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and "run.log: cannot write" in lines[0], result.err


def test_output_replaced_by_a_file_after_validation(tmp_path, tiny_checkpoints):
    """The run creates its directory itself and says so in one line when it cannot."""
    from surgery.runtime.manager import Manager
    from surgery.runtime.recipe import load_recipe
    from surgery.runtime.runner import run_recipe

    manager = Manager()
    recipe = load_recipe(write_recipe(tmp_path, tiny_checkpoints[0], "cheap-race"), manager, output=str(tmp_path / "later"))
    (tmp_path / "later").write_text("a file now")
    with pytest.raises(SurgeryError, match="exists and is not a directory"):
        run_recipe(recipe, manager)


# --- devices --------------------------------------------------------------------------------------

def test_devices_follow_what_torch_has(monkeypatch):
    import torch

    from surgery.core.places import check_device

    assert check_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SurgeryError, match="has no CUDA"):
        check_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1") == "cuda:1"
    with pytest.raises(SurgeryError, match=r"only 2 CUDA device\(s\) here \(cuda:0 to cuda:1\)"):
        check_device("cuda:2")
    for bad in ("banana", "cuda:-1", "gpu", "cuda:1:2", ""):
        with pytest.raises(SurgeryError, match="unknown device"):
            check_device(bad)


# --- models a step reads --------------------------------------------------------------------------

def test_evaluate_after_an_unsaved_prune_reads_the_saved_models(tmp_path):
    from surgery.runtime.manager import Manager
    from surgery.runtime.recipe import validate

    raw = {"models": {"a": "builtin:tiny-llama/base"},
           "data": {"probe": {"source": "synthetic", "tasks": ["copy"], "max_samples": 4}},
           "steps": [{"prune": {"plugin": "random", "fraction": 0.25, "save_model": False}},
                     {"prune": {"plugin": "random", "fraction": 0.25, "models": ["a"], "as": "kept"}},
                     {"evaluate": {"plugin": "tasks"}}]}
    recipe = validate(raw, Manager(), base_dir=tmp_path, output=str(tmp_path / "run"))
    assert recipe.steps[0].output_model is None
    assert recipe.steps[2].models == ["a", "kept"]
