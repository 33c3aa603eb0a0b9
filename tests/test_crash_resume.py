"""Crash and resume: a run killed with SIGKILL in the middle of a step (capture, fuse, attribute,
tune) and run again ends with exactly the bytes of an uninterrupted run, reusing the steps that
finished; a file cut short by a crash is never read as valid.

Each run is a child forked from one server process (tests/crash_harness.py) that told it where to
kill itself, so the kills land at the same point every time.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
RECIPE = """\
name: crash
seed: 0
models: {{a: {a}, b: {b}}}
data:
  probe: {{source: jsonl, path: {probe}, max_tokens: 24, batch_size: 4}}
  prefs: {{source: preference, path: {prefs}, max_tokens: 24, batch_size: 2}}
steps:
  - capture:   {{plugin: fam, models: [a, b], sketch_dim: 8}}
  - score:     {{plugin: fam, models: [a, b]}}
  - cluster:   {{plugin: fam, models: [a, b], k: 4}}
  - align:     {{plugin: hungarian, models: [a, b]}}
  - fuse:      {{plugin: fam, models: [a, b], max_shard_mb: 0.05, as: merged}}
  - attribute: {{plugin: ig, models: [merged], steps: 4}}
  - tune:      {{plugin: preference, loss: dpo, models: [merged, a], data: prefs, max_steps: 6,
                 checkpoint_every: 2, warmup_steps: 1}}
output: run
"""
STEPS = ["00-capture-fam", "01-score-fam", "02-cluster-fam", "03-align-hungarian", "04-fuse-fam",
         "05-attribute-ig", "06-tune-preference"]
# where each interrupted run kills itself, in order: every run resumes the one before
KILLS = {
    "capture": {"stage": "capture", "at": "progress", "desc": "fam capture", "after": 2},
    "fuse": {"stage": "fuse", "at": "write", "after": 2},  # the 2nd shard, half written
    "attribute": {"stage": "attribute", "at": "progress", "desc": "ig", "after": 1},
    "tune": {"stage": "tune", "at": "progress", "desc": "preference steps", "after": 5},  # past a checkpoint
}
TIMEOUT_S = 240


class Server:
    """The fork server: ``run(argv, cwd, kill)`` -> (exit status or -signal, the child's output)."""

    def __init__(self) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
        self.process = subprocess.Popen([sys.executable, "-c", "import crash_harness; crash_harness.serve()"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.ready = False  # it imports the package while the caller builds its inputs

    def run(self, argv: list[str], cwd: Path, kill: dict | None = None) -> tuple[int, str]:
        if not self.ready:
            assert self._reply() == "ready"
            self.ready = True
        log = cwd / f"child-{len(list(cwd.glob('child-*.log')))}.log"
        request = {"argv": [str(a) for a in argv], "cwd": str(cwd), "log": str(log), "kill": kill}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return json.loads(self._reply())["status"], log.read_text()

    def _reply(self) -> str:
        ready, _, _ = select.select([self.process.stdout], [], [], TIMEOUT_S)
        if not ready:
            self.process.kill()
            pytest.fail(f"the crash server gave no answer in {TIMEOUT_S} s")
        return self.process.stdout.readline().strip()

    def close(self) -> None:
        try:
            self.process.stdin.close()
        except OSError:  # it was killed after a timeout
            pass
        self.process.wait(timeout=60)


@dataclass
class Snapshot:
    status: int
    log: str
    report: dict | None
    files: dict[str, int]  # relative path -> size, every file under the run directory
    dirs: set[str]


def snapshot(status: int, log: str, run: Path) -> Snapshot:
    report = json.loads((run / "report.json").read_text()) if (run / "report.json").is_file() else None
    paths = list(run.rglob("*")) if run.exists() else []
    files = {p.relative_to(run).as_posix(): p.stat().st_size for p in paths if p.is_file()}
    return Snapshot(status, log, report, files, {p.relative_to(run).as_posix() for p in paths if p.is_dir()})


def statuses(report: dict) -> list[str]:
    return [step["status"] for step in report["steps"]]


def outputs(run: Path) -> dict[str, bytes]:
    """Every file a step wrote (tensors, models, metadata), by path; bookkeeping files aside."""
    skip = {"done.json", "report.json", "run.log"}
    return {p.relative_to(run).as_posix(): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name not in skip and not p.relative_to(run).as_posix().startswith(".")}


@pytest.fixture(scope="module")
def crashes(tmp_path_factory):
    """An uninterrupted reference run, then one run killed in each stage, each resuming the last,
    then the run that finishes; snapshots of the run directory after each."""
    from merge_fixtures import build, perturbed, save

    from surgery.models.zoo.tasks import make_examples

    server = Server()
    try:
        root = tmp_path_factory.mktemp("crash")
        base = build("llama", 0)
        a = save(perturbed(build("llama", 0), 1), root / "a")
        b = save(perturbed(base, 2), root / "b")
        examples = make_examples("synthetic-mix", 12, seed=0)
        (root / "probe.jsonl").write_text("".join(json.dumps({"text": ex["text"]}) + "\n" for ex in examples))
        pairs = [{"prompt": ex["prompt"] + " ", "chosen": ex["answer"], "rejected": ex["answer"][::-1] + " 0"} for ex in examples]
        (root / "prefs.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
        recipe = root / "crash.yaml"
        recipe.write_text(RECIPE.format(a=a, b=b, probe=root / "probe.jsonl", prefs=root / "prefs.jsonl"))

        record = {"reference": snapshot(*server.run(["run", recipe, "--output", "reference"], root), root / "reference")}
        for stage, kill in KILLS.items():
            record[stage] = snapshot(*server.run(["run", recipe], root, kill), root / "run")
            if stage == "fuse":
                record["shards"] = readable_shards(root / "run" / f".{STEPS[4]}.tmp" / "model")
        state = root / "run" / f".{STEPS[6]}.resume" / "state.json"
        record["checkpoint"] = json.loads(state.read_text()) if state.is_file() else None
        record["finished"] = snapshot(*server.run(["run", recipe], root), root / "run")
        corrupt = root / "corrupt"
        shutil.copytree(root / "run", corrupt)
        record["cut"] = cut_files(corrupt)
        record["corrupt"] = snapshot(*server.run(["run", recipe, "--output", "corrupt"], root), corrupt)
    finally:
        server.close()
    record["root"] = root
    return record


def readable_shards(model_dir: Path) -> dict[str, bool]:
    """Each shard file by name: does safetensors read it?"""
    from safetensors.torch import load_file

    readable = {}
    for path in sorted(model_dir.glob("model-*.safetensors")):
        try:
            load_file(str(path))
            readable[path.name] = True
        except Exception:
            readable[path.name] = False
    return readable


def cut_files(run: Path) -> list[str]:
    """Cut two finished files to half their size, as a crash after an unsynced rename would."""
    shard = sorted((run / STEPS[4] / "model").glob("model-*.safetensors"))[0]
    cut = [run / STEPS[0] / "tensors.safetensors", shard]
    for path in cut:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return [p.relative_to(run).as_posix() for p in cut]


def test_reference_run_finishes(crashes):
    reference = crashes["reference"]
    assert reference.status == 0, reference.log
    assert statuses(reference.report) == ["ran"] * len(STEPS)


def test_kill_in_capture(crashes):
    killed = crashes["capture"]
    assert killed.status == -9, killed.log
    assert killed.report is None  # no step finished
    assert STEPS[0] not in killed.dirs and f".{STEPS[0]}.tmp" in killed.dirs


def test_kill_in_fuse_leaves_an_unfinished_step_with_only_complete_shards(crashes):
    killed = crashes["fuse"]
    assert killed.status == -9, killed.log
    assert statuses(killed.report) == ["ran"] * 4  # the capture killed before was run again
    assert STEPS[4] not in killed.dirs
    # shards are written in place into temporary files and get their names only when complete
    assert crashes["shards"] and all(crashes["shards"].values()), crashes["shards"]


def test_resume_after_fuse_kill_reuses_finished_steps(crashes):
    killed = crashes["attribute"]
    assert killed.status == -9, killed.log
    assert statuses(killed.report) == ["reused"] * 4 + ["ran"]
    assert STEPS[5] not in killed.dirs


def test_kill_in_tune_after_a_checkpoint(crashes):
    killed = crashes["tune"]
    assert killed.status == -9, killed.log
    assert statuses(killed.report) == ["reused"] * 5 + ["ran"]
    assert f".{STEPS[6]}.resume/state.json" in killed.files
    assert crashes["checkpoint"] is not None and crashes["checkpoint"]["step"] == 4


def test_resumed_run_equals_uninterrupted_run(crashes):
    finished = crashes["finished"]
    assert finished.status == 0, finished.log
    assert statuses(finished.report) == ["reused"] * 6 + ["ran"]
    assert "resumed from step 4" in (crashes["root"] / "run" / "run.log").read_text()
    assert finished.report["steps"][6]["figures"]["steps"] == 6
    reference, resumed = outputs(crashes["root"] / "reference"), outputs(crashes["root"] / "run")
    assert sorted(resumed) == sorted(reference)
    assert [path for path in reference if reference[path] != resumed[path]] == []
    assert not [path for path in finished.files if path.startswith(".")]  # no temporary left


def test_files_cut_short_are_never_read_as_valid(crashes):
    rerun = crashes["corrupt"]
    assert rerun.status == 0, rerun.log
    assert crashes["cut"][0].startswith(STEPS[0]) and crashes["cut"][1].startswith(STEPS[4])
    assert statuses(rerun.report) == ["ran", "reused", "reused", "reused", "ran", "reused", "reused"]
    reference, repaired = outputs(crashes["root"] / "reference"), outputs(crashes["root"] / "corrupt")
    assert [path for path in reference if reference[path] != repaired.get(path)] == []
