"""The merge table on the SmolLM2 task suite: every method on pairs of fine-tunes and on all four.

Models: ``builtin:smollm2-135m`` (the parent) and its fine-tunes ``builtin:smollm2-135m/<task>[@s<seed>]``
(``surgery suite build --seeds 0,1,2`` builds them ahead). For each fine-tuning seed and each task
set (a pair of tasks, or ``all`` four), every method merges the set's fine-tunes; its coefficient is
chosen on the validation split from a grid of ``--grid`` values (every tuned method gets the same
number of candidates; linear and the recipes run as written have none to tune), and the chosen
candidate is scored on the test split. Scores: exact-match accuracy per task (``suite`` evaluator)
and normalized accuracy, the merged model's accuracy on a task divided by that task's fine-tune's,
averaged over the set's tasks. The printed table gives the mean and the standard error over
fine-tuning seeds. Wall time is the merge's own steps (capture ... fuse, not evaluation) for the
chosen candidate; peak memory is the maximum resident size of the worker process that ran the
method's candidates (model loading and evaluation included).

Every candidate's result is cached as JSON under ``--cache`` (default
``$SURGERY_CACHE/merge-suite``), so a re-run only computes what is missing and new methods add rows
cheaply. Methods are :class:`Method` entries in ``METHODS``: baselines are fuse steps written here;
FAM and LAPE-TEFM rows run a recipe file from ``recipes/`` with the pair in its roles (``a``/``b``
or ``base``/``donor``, and ``parent``), its ``probe`` data swapped for the suite's train split and
its evaluate steps replaced by the suite's. To add a variant, add a ``Method(..., recipe="x.yaml")``.

    python benchmarks/merge_suite.py --seeds 0,1,2 --sets all --methods linear,ties
    python benchmarks/merge_suite.py --seeds 0 --sets pairs          # all six pairs
    python benchmarks/merge_suite.py --list                          # method names
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
TASKS = ("add", "spell", "shift", "reverse")
PARENT = "builtin:smollm2-135m"
PROBE = {"source": "suite", "split": "train"}


@dataclass(frozen=True)
class Method:
    """One row. ``fuse``: the fuse plugin and its fixed options (baselines); ``tune``: the option
    searched on validation, its grid in units of ``1/N`` for sums over N task vectors (``per_model``)
    or absolute; ``recipe``: a recipe file instead (``model``: the name its fuse step saves)."""

    name: str
    fuse: str | None = None
    options: dict = field(default_factory=dict)
    tune: str | None = None
    grid: tuple[float, ...] = ()
    per_model: bool = False
    parent: bool = False
    recipe: str | None = None
    model: str = "merged"
    without: tuple[str, ...] = ()
    max_models: int | None = None
    baseline: bool = True


METHODS = [
    Method("linear", "linear"),
    Method("task-arithmetic", "task-arithmetic", tune="scale", grid=(1.0, 1.5, 2.0), per_model=True, parent=True),
    Method("ties", "ties", {"density": 0.2}, tune="scale", grid=(0.75, 1.0, 1.5), parent=True),
    Method("dare", "dare", {"density": 0.5}, tune="scale", grid=(1.0, 1.5, 2.0), per_model=True, parent=True),
    Method("fam", recipe="fam.yaml", max_models=2, baseline=False),
    Method("fam, no align", recipe="fam.yaml", without=("align",), max_models=2, baseline=False),
    Method("fam+tlinp", recipe="fam-tlinp.yaml", max_models=2, baseline=False),
    Method("fam+tlinp, no align", recipe="fam-tlinp.yaml", without=("align",), max_models=2, baseline=False),
    Method("lape-tefm+parent", recipe="lape-tefm-parent.yaml", model="lape_tefm", max_models=2, baseline=False),
    # FAM-weighted task arithmetic: the recipe's models are named after the suite's tasks, so it merges any
    # set; its scale is searched on the same grid as task arithmetic's (equal FAM weights = task arithmetic)
    Method("fam vs parent", recipe="fam-parent-suite.yaml", tune="scale", grid=(1.0, 1.5, 2.0), per_model=True,
           baseline=False),
    Method("fam vs parent, T=0.5", recipe="fam-parent-suite.yaml", options={"score_power": 0.5}, tune="scale",
           grid=(1.0, 1.5, 2.0), per_model=True, baseline=False),
]
BY_NAME = {method.name: method for method in METHODS}


def model_path(task: str, seed: int) -> str:
    return f"{PARENT}/{task}" + (f"@s{seed}" if seed else "")


# --- recipes -------------------------------------------------------------------------------------

def eval_steps(model: str, tasks: list[str], n_val: int, n_test: int | None) -> list[dict]:
    """Validation, then (unless ``n_test`` is None) test: accuracy of ``model`` on ``tasks``."""
    common = {"plugin": "suite", "models": [model], "tasks": tasks}
    steps = [{"evaluate": {**common, "split": "validation", "n": n_val, "seed": 0}}]
    if n_test is not None:
        steps.append({"evaluate": {**common, "split": "test", "n": n_test, "seed": 1}})
    return steps


def baseline_recipe(method: Method, tasks: list[str], seed: int, value: float | None) -> dict:
    models = {task: model_path(task, seed) for task in tasks}
    members = list(tasks)
    if method.parent:
        models["parent"] = PARENT
        members = ["parent", *members]
    options = dict(method.options)
    if method.tune:
        options[method.tune] = value / len(tasks) if method.per_model else value
    return {"name": method.name, "seed": 0, "models": models, "data": {},
            "steps": [{"fuse": {"plugin": method.fuse, "models": members, **options, "as": "merged"}}]}


def recipe_from_file(method: Method, tasks: list[str], seed: int, value: float | None = None) -> dict:
    """The method's recipe on ``tasks``: role models (a/b, base/donor) or, in a recipe whose models are
    named after the suite's tasks, the set's tasks (steps' ``models`` lists cut to them); ``options`` and the
    tuned value go to the fuse step that saves ``method.model``."""
    raw = copy.deepcopy(yaml.safe_load((RECIPES / method.recipe).read_text(encoding="utf-8")))
    roles = {"a": tasks[0], "b": tasks[1], "base": tasks[0], "donor": tasks[1], **{task: task for task in tasks}}
    raw["models"] = {key: PARENT if key == "parent" else model_path(roles[key], seed) for key in raw["models"]
                     if key == "parent" or key in roles}
    for step in raw["steps"]:
        options = next(iter(step.values()))
        if isinstance(options, dict) and isinstance(options.get("models"), list):
            options["models"] = [m for m in options["models"] if m in raw["models"] or m not in TASKS]
        if "fuse" in step and step["fuse"].get("as", "merged") == method.model:
            step["fuse"].update(method.options)
            if method.tune and value is not None:
                step["fuse"][method.tune] = value / len(tasks) if method.per_model else value
    data = {}
    for name, spec in raw.get("data", {}).items():
        if name == "probe":
            kept = {k: spec[k] for k in ("max_samples", "max_tokens", "batch_size") if k in spec}
            n = max(1, kept.get("max_samples", 32) // len(tasks))
            data[name] = {**PROBE, "tasks": list(tasks), "n": n, **kept}
    raw["data"] = data
    raw["steps"] = [step for step in raw["steps"] if not {"evaluate", *method.without} & set(step)]
    return raw


def candidate_recipe(method: Method, tasks: list[str], seed: int, value: float | None, n_val: int,
                     n_test: int | None) -> dict:
    raw = recipe_from_file(method, tasks, seed, value) if method.recipe else baseline_recipe(method, tasks, seed, value)
    raw["steps"] = raw["steps"] + eval_steps(method.model, list(tasks), n_val, n_test)
    return raw


def inputs_recipe(seed: int, n_val: int, n_test: int) -> dict:
    models = {"parent": PARENT, **{task: model_path(task, seed) for task in TASKS}}
    steps = []
    for name in models:
        steps += eval_steps(name, list(TASKS), n_val, n_test)
    return {"name": "inputs", "seed": 0, "models": models, "data": {}, "steps": steps}


# --- running -------------------------------------------------------------------------------------

def run_recipe_dict(raw: dict, output: Path) -> dict:
    from surgery.runtime.manager import Manager
    from surgery.runtime.recipe import validate
    from surgery.runtime.runner import run_recipe

    manager = Manager()
    recipe = validate(raw, manager, base_dir=RECIPES, source=raw["name"], output=str(output))
    return run_recipe(recipe, manager, quiet=True)


def split_figures(report: dict) -> dict[str, Any]:
    """``{"validation": {"<model>/<task>": acc, ...}, "test": {...}, "seconds": merge steps' time}``.

    The evaluate steps come in (validation, test) pairs, in that order (see ``eval_steps``); a lone
    last one is validation.
    """
    out: dict[str, Any] = {"validation": {}, "test": {}, "seconds": 0.0}
    evals = [step for step in report["steps"] if step["stage"] == "evaluate"]
    out["seconds"] = round(sum(step["seconds"] for step in report["steps"] if step["stage"] != "evaluate"), 2)
    for i, step in enumerate(evals):
        out["validation" if i % 2 == 0 else "test"].update(step["figures"])
    return out


def worker(job: dict) -> None:
    """Run one method's candidates (or the inputs) for one seed and task set; write the result JSON."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    work = Path(tempfile.mkdtemp(prefix="merge-suite-"))
    try:
        if job["kind"] == "inputs":
            report = run_recipe_dict(inputs_recipe(job["seed"], job["n_val"], job["n_test"]), work / "inputs")
            result: dict[str, Any] = split_figures(report)
        else:
            method = BY_NAME[job["method"]]
            result = {"candidates": []}
            for value in (method.grid if method.tune else (None,)):  # validation only, weights kept
                raw = candidate_recipe(method, job["tasks"], job["seed"], value, job["n_val"], None)
                started = time.perf_counter()
                figures = split_figures(run_recipe_dict(raw, work / f"c{len(result['candidates'])}"))
                figures.update(wall_seconds=round(time.perf_counter() - started, 2), value=value)
                result["candidates"].append(figures)
            best = max(range(len(result["candidates"])),
                       key=lambda i: val_score(result["candidates"][i], method.model, job["tasks"]))
            pick = result["candidates"][best]
            raw = candidate_recipe(method, job["tasks"], job["seed"], pick["value"], job["n_val"], job["n_test"])
            pick["test"] = split_figures(run_recipe_dict(raw, work / f"c{best}"))["test"]  # merge reused
            result["chosen"] = best
        Path(job["result"]).write_text(json.dumps(result, indent=1, sort_keys=True))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_job(job: dict, path: Path) -> dict:
    """The cached result of ``job``, computing it in a child process (for its own peak memory)."""
    if path.is_file():
        return json.loads(path.read_text())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".part")
    job = {**job, "result": str(tmp)}
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(job)])
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0 or not tmp.is_file():
        raise SystemExit(f"worker failed ({status}) for {job}")
    result = json.loads(tmp.read_text())
    result["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)
    result["job_seconds"] = round(time.perf_counter() - started, 1)
    path.write_text(json.dumps(result, indent=1, sort_keys=True))
    tmp.unlink()
    return result


def job_key(method: Method | None, tasks: list[str], seed: int) -> str:
    """A hash of what determines a result: the recipes run and the suite's fine-tuning recipe."""
    from dataclasses import asdict

    from surgery.models.suite.build import FORMAT, RECIPE

    if method is None:  # the validation size does not matter for the inputs' test scores
        recipes = [inputs_recipe(seed, 0, 0)]
    else:
        recipes = [candidate_recipe(method, tasks, seed, v, 0, 0) for v in (method.grid if method.tune else (None,))]
    text = json.dumps([recipes, FORMAT, asdict(RECIPE)], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


# --- aggregation -----------------------------------------------------------------------------------

def val_score(candidate: dict, model: str, tasks: list[str]) -> float:
    return sum(candidate["validation"].get(f"{model}/{task}", 0.0) for task in tasks) / len(tasks)


def chosen(result: dict) -> dict:
    """The candidate with the best mean validation accuracy over the set's tasks (first on ties)."""
    return result["candidates"][result["chosen"]]


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def fmt(values: list[float], digits: int = 3) -> str:
    if not values:
        return "-"
    mean, se = mean_se(values)
    return f"{mean:.{digits}f}" if math.isnan(se) else f"{mean:.{digits}f} ± {se:.{digits}f}"


def set_table(name: str, tasks: list[str], seeds: list[int], inputs: dict[int, dict], results: dict) -> list[str]:
    head = ["method", *(f"acc {t}" for t in tasks), "normalized acc", "coef", "merge s", "peak MB"]
    lines = [f"\n### {name} (seeds {','.join(map(str, seeds))}; mean ± s.e. over seeds)\n",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    own = {seed: {t: inputs[seed]["test"][f"{t}/{t}"] for t in TASKS} for seed in seeds}
    for label in ["parent", *(f"fine-tune {t}" for t in tasks)]:
        model = "parent" if label == "parent" else label.split()[-1]
        accs = [[inputs[s]["test"][f"{model}/{t}"] for s in seeds] for t in tasks]
        norm = [sum(inputs[s]["test"][f"{model}/{t}"] / max(own[s][t], 1e-9) for t in tasks) / len(tasks) for s in seeds]
        lines.append("| " + " | ".join([label, *(fmt(a) for a in accs), fmt(norm), "", "", ""]) + " |")
    for method in METHODS:
        per_seed = [results.get((method.name, s)) for s in seeds]
        if not all(per_seed):
            continue
        picks = [chosen(r) for r in per_seed]
        accs = [[p["test"][f"{method.model}/{t}"] for p in picks] for t in tasks]
        norm = [sum(p["test"][f"{method.model}/{t}"] / max(own[s][t], 1e-9) for t in tasks) / len(tasks)
                for p, s in zip(picks, seeds)]
        coefs = ",".join(sorted({_coef(p["value"], method, len(tasks)) for p in picks}))
        lines.append("| " + " | ".join([method.name, *(fmt(a) for a in accs), fmt(norm), coefs,
                                         fmt([p["seconds"] for p in picks], 0),
                                         fmt([r["peak_rss_mb"] for r in per_seed], 0)]) + " |")
    return lines


def _coef(value: float | None, method: Method, n: int) -> str:
    if value is None:
        return "-"
    return f"{value / n:.3g}" if method.per_model else f"{value:.3g}"


def task_sets(spec: str) -> list[tuple[str, ...]]:
    out = []
    for part in spec.split(","):
        part = part.strip()
        if part == "all":
            out.append(TASKS)
        elif part == "pairs":
            out.extend(itertools.combinations(TASKS, 2))
        else:
            pair = tuple(part.split("+"))
            if not set(pair) <= set(TASKS) or len(pair) < 2:
                raise SystemExit(f"unknown task set {part!r}: use all, pairs or task+task (tasks: {', '.join(TASKS)})")
            out.append(pair)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="fine-tuning seeds of the suite, e.g. 0,1,2")
    parser.add_argument("--sets", default="all", help="task sets: all, pairs, or task+task (comma-separated)")
    parser.add_argument("--methods", default=None, help="comma-separated method names (default: all)")
    parser.add_argument("--val-examples", type=int, default=16, help="validation examples per task")
    parser.add_argument("--test-examples", type=int, default=48, help="test examples per task")
    parser.add_argument("--cache", type=Path, default=None, help="result cache (default $SURGERY_CACHE/merge-suite)")
    parser.add_argument("--no-run", action="store_true", help="print the table from cached results only")
    parser.add_argument("--list", action="store_true", help="list the methods and exit")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    if args.list:
        for method in METHODS:
            print(f"{method.name:<24} {'recipe ' + method.recipe if method.recipe else 'fuse ' + method.fuse}"
                  + (f", tuned {method.tune} over {len(method.grid)} values" if method.tune else ""))
        return
    from surgery.models.loading import cache_dir

    cache = args.cache or cache_dir() / "merge-suite"
    seeds = [int(s) for s in args.seeds.split(",")]
    names = [m.strip() for m in args.methods.split(",")] if args.methods else [m.name for m in METHODS]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise SystemExit(f"unknown method {unknown[0]!r} (choose from: {', '.join(BY_NAME)})")
    tables = []
    for tasks in task_sets(args.sets):
        results = {}
        for method_name, seed in itertools.product(names, seeds):
            method = BY_NAME[method_name]
            if method.max_models and len(tasks) > method.max_models:
                continue
            stem = method_name.replace(" ", "_").replace(",", "")
            key = job_key(method, list(tasks), seed)
            path = cache / f"v{args.val_examples}-t{args.test_examples}" / f"s{seed}" / "+".join(tasks) / f"{stem}-{key}.json"
            if args.no_run and not path.is_file():
                continue
            job = {"kind": "method", "method": method_name, "seed": seed, "tasks": list(tasks),
                   "n_val": args.val_examples, "n_test": args.test_examples}
            results[(method_name, seed)] = run_job(job, path)
            print(f"done: {method_name} on {'+'.join(tasks)} seed {seed}", file=sys.stderr, flush=True)
        tables.append((tasks, results))
    inputs = {}  # after the merges: the fine-tunes' own scores normalise every row
    for seed in seeds:
        job = {"kind": "inputs", "seed": seed, "n_val": args.val_examples, "n_test": args.test_examples}
        path = cache / f"t{args.test_examples}" / f"s{seed}" / f"inputs-{job_key(None, list(TASKS), seed)}.json"
        if args.no_run and not path.is_file():
            raise SystemExit(f"no cached inputs for seed {seed}: run without --no-run")
        inputs[seed] = run_job(job, path)
    for tasks, results in tables:
        label = "all four tasks" if len(tasks) == len(TASKS) else " + ".join(tasks)
        print("\n".join(set_table(label, list(tasks), seeds, inputs, results)), flush=True)


if __name__ == "__main__":
    main()
