"""Every benchmark runs in ``--smoke`` mode (tiny sizes, seconds) and prints its figures, so a
benchmark that breaks fails the suite. The scripts are discovered: a new ``benchmarks/*.py`` must
take ``--smoke`` too. The figures of a smoke run mean nothing; only that they are printed is checked.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))
NUMBER = r"[-+]?(\d+\.\d*|\.\d+|\d+|nan|inf)(e[-+]?\d+)?"

# the lines that carry each script's result (a ratio, or the table row it is read from)
RESULT_LINES = {
    "capture_overhead.py": [rf"capture MLP activations.*{NUMBER}x", rf"FAM capture .*{NUMBER}x fwd\+bwd"],
    "constraint_cost.py": [rf"^fpo\s+{NUMBER}\s+{NUMBER}", rf"^tdpo2\s+{NUMBER}\s+{NUMBER}"],
    "fpo_heal.py": [rf"^mean fpo .*healed {NUMBER}", rf"^mean dpo .*healed {NUMBER}"],
    "ig_speed.py": [rf"^joint IG .*{NUMBER}x", rf"^per-layer IG .*{NUMBER}x", rf"/ that plain pass: {NUMBER}x"],
    "lape_cost.py": [rf"= {NUMBER} x lape N_s=1"],
    "lape_length.py": [rf"LAPE / plain variance across len_max: {NUMBER}"],
    "merge_memory.py": [rf"/ checkpoint size = {NUMBER}"],
    "merge_vs_mergekit.py": [rf"ours / mergekit, wall time .* {NUMBER}x|ours, median wall: {NUMBER}"],
    "merge_quality.py": [rf"best baseline: .* {NUMBER}; best FAM: .* {NUMBER}"],
    "scaling.py": [rf"processes x 1 thread .* {NUMBER}$"],
    "tlinp_length.py": [rf"^tlinp .* \| {NUMBER}$"],
}
# a script not listed above must print at least one ratio: "1.23x", "a / b = 1.23" or "ratio ... 1.23"
ANY_RATIO = rf"{NUMBER}x\b|/.*[=:]\s*{NUMBER}|\bratio\b.*{NUMBER}"
# scripts that landed before this test and have no --smoke mode yet, and mergekit_equality.py, which
# compares against mergekit installed in an environment of its own (absent in CI): expected to fail
# (strictly, so the entry must go when the script gains one); no other script may be added here
NO_SMOKE_YET = {"heal_smollm2.py", "merge_suite.py", "prune_table.py", "mergekit_equality.py"}


def _cases() -> list:
    return [pytest.param(p, marks=pytest.mark.xfail(strict=True, reason="no --smoke mode yet"))
            if p.name in NO_SMOKE_YET else p for p in SCRIPTS]


def test_benchmarks_are_found():
    assert {"ig_speed.py", "capture_overhead.py", "merge_memory.py"} <= {p.name for p in SCRIPTS}


@pytest.mark.parametrize("script", _cases(), ids=lambda p: p.name)
def test_benchmark_runs_in_smoke_mode_and_prints_its_figures(script):
    assert "--smoke" in script.read_text(encoding="utf-8"), f"{script.name} has no --smoke mode"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, str(script), "--smoke"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"{script.name} --smoke exited {result.returncode}:\n{result.stderr[-3000:]}"
    lines = result.stdout.splitlines()
    for pattern in RESULT_LINES.get(script.name, [ANY_RATIO]):
        assert any(re.search(pattern, line) for line in lines), \
            f"{script.name} --smoke printed no line matching {pattern!r}:\n{result.stdout[-3000:]}"
