"""Start-up time of the ``surgery`` command line, whole processes, side by side with Python itself.

Times, interleaved round by round so that load from other processes hits every row alike, the
wall-clock time of ``--repeats`` runs of:
- ``python -c pass`` (the interpreter alone) and ``python -c "import torch"`` (what any command
  that touches torch pays),
- ``surgery --help``, ``surgery plugins`` and ``surgery validate RECIPE`` (default: the shipped
  ``recipes/linear.yaml``, and ``recipes/ig.yaml``).
Prints the median and minimum of each and the ratio of each median to ``import torch``'s.
Goals on 2 cores: ``--help`` and ``plugins`` <= 0.5 s, ``validate`` <= 1.0 s.

The first command after installing or editing a plugin builds the plugin index (every plugin is
imported once, see :mod:`surgery.runtime.plugin_index`); that one run is timed and shown apart.

    python benchmarks/cli_startup.py [--repeats 7] [--recipe recipes/linear.yaml ...]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--recipe", action="append", default=None, help="recipe(s) to validate")
    args = parser.parse_args()
    recipes = args.recipe or ["recipes/linear.yaml", "recipes/ig.yaml"]
    surgery = str(Path(sys.executable).with_name("surgery"))
    python = sys.executable
    rows = {
        "python -c pass": [python, "-c", "pass"],
        "python -c 'import torch'": [python, "-c", "import torch"],
        "surgery --help": [surgery, "--help"],
        "surgery plugins": [surgery, "plugins"],
        **{f"surgery validate {r}": [surgery, "validate", r] for r in recipes},
    }
    cache = Path(tempfile.mkdtemp(prefix="surgery-startup-"))
    env = {**os.environ, "SURGERY_CACHE": str(cache)}  # a fresh plugin index (the zoo is not touched)
    try:
        first = timed([surgery, "plugins"], env)
        times: dict[str, list[float]] = {name: [] for name in rows}
        for _ in range(args.repeats):
            for name, command in rows.items():
                times[name].append(timed(command, env))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    torch_median = statistics.median(times["python -c 'import torch'"])
    print(f"{args.repeats} rounds, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'command':<44} {'median s':>9} {'min s':>7} {'/ import torch':>15}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<44} {median:>9.3f} {min(values):>7.3f} {median / torch_median:>15.2f}")
    print(f"{'first surgery plugins (builds the index)':<44} {first:>9.3f}")


if __name__ == "__main__":
    main()
