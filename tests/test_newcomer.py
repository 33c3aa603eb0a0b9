"""The newcomer path: every `surgery` command in the code blocks (fenced or indented) of README.md
and docs/**/*.md runs as written (in a fresh working directory holding the repository's recipes/), and `surgery init`,
an edit of one line that swaps the method, then `surgery run` works.

What is not run, and why:
- `./setup.sh` and `.venv/bin/python -m pytest` (README): they are not `surgery` commands; the
  first creates the environment this test runs in, the second is this test suite. Nor is
  `torchrun ... -m surgery.cli ...` (docs/scaling.md), which spells out what `--nproc` runs.
- the commands in SKIPPED below (matched exactly).
Commands in SLOW get a few options appended (later options win) so they take seconds, not minutes.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SURGERY = ("surgery", ".venv/bin/surgery")
SHELL_BLOCKS = ("", "bash", "sh", "shell", "console")

SKIPPED = {
    "surgery zoo build": "trains every zoo entry (minutes on an empty cache); `surgery zoo build tiny-llama/task-a -j 1` is run",
    "surgery suite build": "fine-tunes SmolLM2 four times (many minutes on 2 cores); tests/test_suite.py builds on a tiny model",
    "surgery suite build --seeds 0,1,2": "fine-tunes SmolLM2 twelve times; tests/test_suite.py builds on a tiny model",
    "surgery eval builtin:smollm2-135m builtin:smollm2-135m/add --evaluator suite --n 64":
        "fine-tunes SmolLM2 on an empty cache; tests/test_suite.py runs the suite evaluator in a recipe",
    "surgery run recipes/fam-parent-suite-grid.yaml": "fine-tunes SmolLM2 four times on an empty cache, then FAM captures "
                                                      "of 135M models (many minutes); the recipe fuzzer starts from it",
    "surgery run recipes/task-arithmetic-suite-grid.yaml": "fine-tunes SmolLM2 four times on an empty cache; "
                                                           "the recipe fuzzer starts from it",
    "surgery run recipes/fam.yaml --nproc 2": "starts two processes that each import torch; tests/test_distributed.py runs "
                                              "`surgery run --nproc 2` and checks it against one process",
}
SLOW = {  # command prefix -> options appended
    "surgery run recipes/ig.yaml": ["--set", "steps.0.steps=4", "--set", "data.probe.n=8", "--set", "data.heldout.n=16", "--set", "steps.2.n=16"],
    "surgery run recipes/ig-joint.yaml": ["--set", "steps.0.steps=4", "--set", "data.probe.n=8", "--set", "data.heldout.n=16", "--set", "steps.2.n=16"],
    "surgery run recipes/prune-random.yaml": ["--set", "data.heldout.n=16", "--set", "steps.3.n=16"],
    "surgery run recipes/linear.yaml": ["--set", "steps.1.n=32", "--set", "data.heldout.n=32"],
    "surgery run recipes/ties.yaml": ["--set", "steps.1.n=32", "--set", "data.heldout.n=32"],
    "surgery run merge.yaml": ["--set", "steps.1.n=32"],
    "surgery sae train builtin:tiny-llama/base --out sae_topk": ["--epochs", "1", "--max-samples", "64"],
    "surgery sae train builtin:tiny-llama/base --out sae_standard": ["--epochs", "1", "--max-samples", "64"],
}
NEEDS = {  # command prefix -> commands whose output it reads
    "surgery report runs/ig": ["surgery run recipes/ig.yaml"],
    "surgery compare runs/ig runs/ig-joint": ["surgery run recipes/ig.yaml", "surgery run recipes/ig-joint.yaml"],
}


def doc_commands(doc: Path) -> list[tuple[int, str]]:
    """``(line, command)`` for every `surgery` command in the shell code blocks of ``doc``: fenced
    blocks without a language or a shell one, and indented blocks (4 spaces after a blank line)."""
    found, block, pending, start, indented, previous = [], None, "", 0, False, ""
    for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
        fence = re.match(r"^\s*```(\w*)\s*$", line)
        if fence:
            block = None if block is not None else fence.group(1)
            continue
        if block is None:  # outside fences: an indented block starts after a blank line
            indented = line.startswith(("    ", "\t")) and (indented or not previous.strip())
            previous = line
            if not indented:
                continue
        elif block not in SHELL_BLOCKS:
            continue
        pending, start = (pending + " " + line.strip(), start) if pending else (line.strip(), number)
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        for part in pending.split("&&"):
            words = shlex.split(part, comments=True)
            if words and words[0] in SURGERY:
                found.append((start, shlex.join(["surgery", *words[1:]])))
        pending = ""
    return found


def matching(table: dict, command: str, exact: bool = False):
    return next((value for prefix, value in table.items()
                 if command == prefix or (not exact and command.startswith(prefix + " "))), None)


ALL = {doc: doc_commands(doc) for doc in DOCS}



def run_command(command: str, surgery_cli) -> None:
    args = shlex.split(command)[1:] + (matching(SLOW, command) or [])
    result = surgery_cli(*args)
    assert result.exit_code == 0, f"`{command}` exited {result.exit_code}: {result.err.strip()[-2000:]}"
    assert "Traceback" not in result.err, result.err


@pytest.mark.parametrize("doc", [d for d in DOCS if ALL[d]], ids=lambda d: str(d.relative_to(ROOT)))
def test_doc_commands_run(doc, tmp_path, monkeypatch, surgery_cli):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    done: set[str] = set()
    for line, command in ALL[doc]:
        if matching(SKIPPED, command, exact=True):
            continue
        for needed in matching(NEEDS, command) or []:
            if needed not in done:
                run_command(needed, surgery_cli)
                done.add(needed)
        try:
            run_command(command, surgery_cli)
        except AssertionError as exc:
            raise AssertionError(f"{doc.relative_to(ROOT)}:{line}: {exc}") from None
        done.add(command)


def test_extraction_finds_the_readme_commands():
    commands = [command for _, command in ALL[ROOT / "README.md"]]
    assert "surgery run recipes/quickstart.yaml" in commands  # from `./setup.sh && .venv/bin/surgery run ...`
    assert "surgery init merge" in commands and "surgery run merge.yaml --set steps.0.plugin=ties" in commands
    assert sum(len(found) for found in ALL.values()) >= 15


def test_every_exception_names_a_documented_command():
    documented = [command for found in ALL.values() for _, command in found]
    documented += [command for needed in NEEDS.values() for command in needed]
    for prefix in SKIPPED:
        assert prefix in documented, f"{prefix!r} is no longer documented"
    for table in (SLOW, NEEDS):
        for prefix in table:
            assert any(c == prefix or c.startswith(prefix + " ") for c in documented), f"{prefix!r} is no longer documented"


@pytest.mark.parametrize("template,old,new", [
    ("merge", "plugin: linear", "plugin: ties"),
    ("attribute", "plugin: ig", "plugin: grad-x-act"),
])
def test_init_edit_one_line_run(template, old, new, tmp_path, monkeypatch, surgery_cli):
    monkeypatch.chdir(tmp_path)
    assert surgery_cli("init", template).exit_code == 0
    recipe = tmp_path / f"{template}.yaml"
    lines = recipe.read_text().splitlines(keepends=True)
    edited = [line.replace(old, new) if old in line and not line.lstrip().startswith("#") else line for line in lines]
    assert sum(a != b for a, b in zip(lines, edited)) == 1  # one line swaps the method
    recipe.write_text("".join(edited))
    result = surgery_cli("run", recipe.name)
    assert result.exit_code == 0, result.err
    assert new.split(": ")[1] in result.out and "Traceback" not in result.err


def test_setup_script_is_valid_bash():
    """`./setup.sh` itself is not run (it installs into the environment this suite runs in)."""
    import subprocess

    script = ROOT / "setup.sh"
    assert script.stat().st_mode & 0o111, "setup.sh must be executable for `./setup.sh`"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
