"""Start-up time of the ``surgery`` command line, whole processes, side by side with Python itself.

Times, interleaved round by round so that load from other processes hits every row alike, the
wall-clock time of ``--repeats`` runs of:
- ``python -c pass`` (the interpreter alone) and ``python -c "import torch"`` (what any command
  that touches torch pays),
- ``surgery --help``, ``surgery plugins`` and ``surgery validate RECIPE`` (default: the shipped
  ``recipes/linear.yaml``; ``--recipe`` again for more).
Prints the median and minimum wall-clock time of each, the median CPU time (user + system: on a
machine shared with other jobs it moves far less than wall-clock time, and on a quiet one a
start-up is single-threaded, so wall ~ CPU) and the ratio of each median to ``import torch``'s.
Goals on 2 cores: ``--help`` and ``plugins`` <= 0.5 s, ``validate`` <= 1.0 s.

The first command after installing or editing a plugin builds the plugin index (every plugin is
imported once, see :mod:`surgery.runtime.plugin_index`); that one run is timed and shown apart.

    python benchmarks/cli_startup.py [--repeats 7] [--recipe recipes/linear.yaml ...]
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds user + system) of one whole process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--recipe", action="append", default=None, help="recipe(s) to validate")
    parser.add_argument("--smoke", action="store_true", help="one round (the figures mean nothing)")
    args = parser.parse_args()
    if args.smoke:
        args.repeats = 1
    recipes = args.recipe or ["recipes/linear.yaml"]
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
        load_before = os.getloadavg()[0]
        first, first_cpu = timed([surgery, "plugins"], env)
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in rows}
        for _ in range(args.repeats):
            for name, command in rows.items():
                times[name].append(timed(command, env))
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    torch_median = statistics.median(w for w, _ in times["python -c 'import torch'"])
    print(f"{args.repeats} rounds, {os.cpu_count()} CPUs, load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"{'command':<44} {'wall median s':>13} {'wall min s':>10} {'CPU median s':>12} {'wall / import torch':>20}")
    for name, values in times.items():
        walls, cpus = [w for w, _ in values], [c for _, c in values]
        median = statistics.median(walls)
        print(f"{name:<44} {median:>13.3f} {min(walls):>10.3f} {statistics.median(cpus):>12.3f} "
              f"{median / torch_median:>19.2f}x")
    print(f"{'first surgery plugins (builds the index)':<44} {first:>13.3f} {'':>10} {first_cpu:>12.3f}")


if __name__ == "__main__":
    main()
