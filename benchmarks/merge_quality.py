"""The merge table: per-task accuracy and probe loss of every merge method on one pair of fine-tunes.

Runs each method's recipe (``recipes/<method>.yaml``) as written, except that its evaluate steps are
replaced by the same two for every row (``tasks`` accuracy on ``--examples`` held-out examples per
task, and ``probe-loss``: token-weighted answer NLL), so rows differ only in how they merge. Rows are
methods (an ablation row removes stages from a recipe, e.g. FAM without its align step); the two
fine-tunes (and their parent) are evaluated the same way for reference.

Pairs (``--pair``):
- ``zoo``: the zoo's fixture, ``tiny-llama/task-a`` (reverse) and ``task-b`` (sort), both fine-tuned
  from ``tiny-llama/base`` (which knows every task) with a small learning rate. The heterogeneous
  row merges ``tiny-llava/task-a``'s language model with ``tiny-llama/task-b`` (recipes/fam-llava.yaml).
- ``stress``: the same parent fine-tuned on reverse and on sort with a 10x learning rate (3e-3, 300
  steps): each fine-tune forgets the other task, so a merge has to reconcile two diverged models.
  Built here on first use and cached under ``$SURGERY_CACHE/merge-quality/``.

To add a method, append a :class:`Row` to ``ROWS`` naming its recipe, the model its fuse step saves
(``as:``) and which recipe model plays which role (``task-a``, ``task-b``, ``parent``), e.g.
``Row("lape-tefm", "lape-tefm.yaml", model="lape_tefm", roles={"base": "task-a", "donor": "task-b"})``.

    python benchmarks/merge_quality.py [--pair zoo|stress|both] [--examples 512] [--output DIR] [--rows NAME ...]
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
TASK_A, TASK_B = "reverse", "sort"
OTHER_TASKS = ("copy", "inc")
DEFAULT_ROLES = {"a": "task-a", "b": "task-b", "base": "parent"}
ZOO = {"task-a": "builtin:tiny-llama/task-a", "task-b": "builtin:tiny-llama/task-b", "parent": "builtin:tiny-llama/base"}
STRESS = {"lr": 3e-3, "steps": 300, "batch_size": 64}
LLAVA_ROLES = {"llama": "task-b", "parent": "parent"}  # the LLaVA itself stays tiny-llava/task-a
IMAGE_TASKS = ("colour", "shape")
LAPE_ROLES = {"base": "task-a", "donor": "task-b"}  # lape-tefm merges task-b into task-a
LAPE_PARENT_ROLES = {**LAPE_ROLES, "parent": "parent"}
PARENT_ROLES = {"a": "task-a", "b": "task-b", "parent": "parent"}
LLAVA = "builtin:tiny-llava/task-a"


@dataclass(frozen=True)
class Row:
    name: str
    recipe: str  # file name under recipes/
    model: str = "merged"  # the model the recipe's fuse step saves (its `as:` name)
    roles: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_ROLES))
    tasks: tuple[str, ...] = ()  # extra tasks (image tasks for a LLaVA)
    pairs: tuple[str, ...] = ("zoo", "stress")
    baseline: bool = True
    without: tuple[str, ...] = ()  # stages removed from the recipe (an ablation row)
    options: dict = field(default_factory=dict)  # {stage: {key: value}} set on the first step of that stage (a variant row)

    def directory(self) -> str:
        """Run directory name: rows of one recipe share it (and its merge steps) unless they set options."""
        stem = Path(self.recipe).stem
        if not self.options:
            return stem
        return f"{stem}-{hashlib.sha256(json.dumps(self.options, sort_keys=True).encode()).hexdigest()[:8]}"


ROWS = [
    Row("linear", "linear.yaml"),
    Row("task-arithmetic", "task-arithmetic.yaml"),
    Row("ties", "ties.yaml"),
    Row("dare", "dare.yaml"),
    Row("fam", "fam.yaml", baseline=False),
    Row("fam+tlinp", "fam-tlinp.yaml", baseline=False),
    Row("fam, no align", "fam.yaml", baseline=False, without=("align",)),
    # variants and ablations (docs/evidence/fam.md, "Variants")
    Row("fam, ensembles", "fam-ensembles.yaml", baseline=False),
    Row("fam, ensembles, no align", "fam-ensembles.yaml", baseline=False, without=("align",)),
    Row("fam, ensemble shares, no align", "fam-ensembles.yaml", baseline=False, without=("align",),
        options={"fuse": {"pool": "ensemble-share"}}),
    Row("fam, ensembles k=32, no align", "fam-ensembles.yaml", baseline=False, without=("align",),
        options={"cluster": {"k": 32}}),
    Row("fam, ensemble shares k=32, no align", "fam-ensembles.yaml", baseline=False, without=("align",),
        options={"fuse": {"pool": "ensemble-share"}, "cluster": {"k": 32}}),
    Row("fam, ensemble-constrained align", "fam-ensembles.yaml", baseline=False,
        options={"align": {"ensemble_bonus": 1.0}, "fuse": {"pool": "neuron"}}),
    Row("fam, identity prior 0.2", "fam.yaml", baseline=False, options={"align": {"identity_bonus": 0.2}}),
    Row("fam, no align, T=0.5", "fam.yaml", baseline=False, without=("align",), options={"fuse": {"score_power": 0.5}}),
    Row("fam, no align, per-layer normalised", "fam.yaml", baseline=False, without=("align",),
        options={"fuse": {"normalize": "layer"}}),
    Row("fam+tlinp, shared tokens", "fam-tlinp.yaml", baseline=False, options={"weight": {"model": "a"}}),
    Row("fam+tlinp, shared tokens, no align", "fam-tlinp.yaml", baseline=False, without=("align",),
        options={"weight": {"model": "a"}}),
    Row("fam vs parent, scale 0.5", "fam-parent.yaml", baseline=False, roles=PARENT_ROLES),
    Row("fam vs parent, scale 0.75", "fam-parent.yaml", baseline=False, roles=PARENT_ROLES, options={"fuse": {"scale": 0.75}}),
    Row("fam+tlinp llava<-llama", "fam-llava.yaml", roles=LLAVA_ROLES, tasks=IMAGE_TASKS, pairs=("zoo",), baseline=False),
    Row("linear llava<-llama", "fam-llava.yaml", model="linear", roles=LLAVA_ROLES, tasks=IMAGE_TASKS, pairs=("zoo",)),
    Row("task-arithmetic llava<-llama", "fam-llava.yaml", model="task_arithmetic", roles=LLAVA_ROLES,
        tasks=IMAGE_TASKS, pairs=("zoo",)),
    Row("lape-tefm", "lape-tefm.yaml", model="lape_tefm", roles=LAPE_ROLES, baseline=False),
    Row("lape-tefm (drift search)", "lape-tefm.yaml", model="lape_tefm_drift", roles=LAPE_ROLES, baseline=False),
    Row("lape-tefm+parent", "lape-tefm-parent.yaml", model="lape_tefm", roles=LAPE_PARENT_ROLES, baseline=False),
    Row("lape-tefm, split=projection", "lape-tefm.yaml", model="lape_tefm", roles=LAPE_ROLES, baseline=False,
        options={"fuse": {"split": "projection"}}),
    Row("lape-tefm, TFI-weighted tau", "lape-tefm.yaml", model="lape_tefm", roles=LAPE_ROLES, baseline=False,
        options={"fuse": {"member_weights": "tfi"}}),
    Row("lape-tefm+parent (drift search)", "lape-tefm-parent.yaml", model="lape_tefm_drift", roles=LAPE_PARENT_ROLES,
        baseline=False),
]


SMOKE_ROWS = ("linear", "fam")  # --smoke: one baseline and one FAM row (the verdict compares them)
SMOKE_SAMPLES = 8  # --smoke: every data entry of a recipe capped at this many examples


def smoke_data(raw: dict) -> dict:
    """``raw`` with every data entry capped at ``SMOKE_SAMPLES`` examples."""
    for spec in raw.get("data", {}).values():
        for key in ("n", "max_samples", "samples"):
            if key in spec:
                spec[key] = min(spec[key], SMOKE_SAMPLES)
    return raw


def evaluation_steps(model: str, tasks: list[str], examples: int) -> list[dict]:
    return [
        {"evaluate": {"plugin": "tasks", "models": [model], "tasks": tasks, "n": examples}},
        {"evaluate": {"plugin": "probe-loss", "models": [model], "data": "bench-heldout"}},
    ]


def heldout(examples: int) -> dict:
    return {"source": "synthetic", "tasks": [TASK_A, TASK_B, *OTHER_TASKS], "n": examples, "seed": 1, "batch_size": 128}


def prepared_recipe(row: Row, fixtures: dict[str, str], examples: int) -> dict:
    """The row's recipe with the pair's models in their roles and the common evaluation."""
    raw = yaml.safe_load((RECIPES / row.recipe).read_text(encoding="utf-8"))
    raw = copy.deepcopy(raw)
    for key, role in row.roles.items():
        if key in raw["models"]:
            raw["models"][key] = fixtures[role]
    raw["data"]["bench-heldout"] = heldout(examples)
    steps = [step for step in raw["steps"] if not {"evaluate", *row.without} & set(step)]
    for stage, options in row.options.items():
        first = next(step for step in steps if stage in step)
        first[stage] = {**first[stage], **options}
    raw["steps"] = steps + evaluation_steps(row.model, [TASK_A, TASK_B, *OTHER_TASKS, *row.tasks], examples)
    return raw


def run_raw(raw: dict, output: Path) -> dict:
    from surgery.runtime.manager import Manager
    from surgery.runtime.recipe import validate
    from surgery.runtime.runner import run_recipe

    manager = Manager()
    recipe = validate(raw, manager, base_dir=RECIPES, source=raw.get("name", "recipe"), output=str(output))
    return run_recipe(recipe, manager, quiet=True)


def figures_of(report: dict, model: str) -> dict[str, float]:
    """Accuracy per task and probe loss per task of ``model`` from a run report."""
    out = {}
    for step in report["steps"]:
        if step["stage"] != "evaluate":
            continue
        for key, value in step["figures"].items():
            name, _, rest = key.partition("/")
            if name == model:
                out[rest] = value
    return out


def evaluate_inputs(fixtures: dict[str, str], examples: int, output: Path, llava: str | None = None) -> dict[str, dict]:
    names = {"parent": "parent", "task-a": "a", "task-b": "b"}
    raw = {"name": "inputs", "models": {names[k]: v for k, v in fixtures.items()},
           "data": {"bench-heldout": heldout(examples)}, "steps": []}
    for model in names.values():
        raw["steps"] += evaluation_steps(model, [TASK_A, TASK_B, *OTHER_TASKS], examples)
    if llava:
        raw["models"]["llava"] = llava
        raw["steps"] += evaluation_steps("llava", [TASK_A, TASK_B, *OTHER_TASKS, *IMAGE_TASKS], examples)
        names["llava task-a"] = "llava"
    report = run_raw(raw, output)
    return {f"{role} (input)": figures_of(report, model) for role, model in names.items()}


def stress_fixtures() -> dict[str, str]:
    """The parent fine-tuned on each task with a 10x learning rate (built once, then cached)."""
    from surgery.models.loading import cache_dir
    from surgery.models.zoo.build import build, load
    from surgery.models.zoo.tasks import accuracy
    from surgery.models.zoo.train import single_thread, train

    parent_dir = build("tiny-llama/base")
    root = cache_dir() / "merge-quality"
    out = {"parent": str(parent_dir)}
    for role, task, seed in (("task-a", TASK_A, 11), ("task-b", TASK_B, 12)):
        key = hashlib.sha256(json.dumps([parent_dir.name, task, seed, STRESS], sort_keys=True).encode()).hexdigest()[:10]
        target = root / f"{role}-{task}-{key}"
        if not (target / "config.json").is_file():
            model, tokenizer = load(parent_dir)
            with single_thread(seed):
                train(model, tokenizer, (task,), STRESS["steps"], STRESS["lr"], STRESS["batch_size"], seed, "causal")
            root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=root))
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            (staging / "accuracy.json").write_text(json.dumps({t: accuracy(model, tokenizer, t) for t in (TASK_A, TASK_B)}))
            shutil.rmtree(target, ignore_errors=True)
            staging.replace(target)
        out[role] = str(target)
    return out


def table(rows: dict[str, dict], columns: list[str]) -> str:
    head = ["method", *(f"acc {c}" for c in columns), f"acc mean({TASK_A},{TASK_B})",
            f"loss {TASK_A}", f"loss {TASK_B}", "loss mean"]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for name, figs in rows.items():
        acc = [figs.get(c) for c in columns]
        losses = [figs.get(f"loss/{TASK_A}"), figs.get(f"loss/{TASK_B}")]
        cells = [name, *(_fmt(v) for v in acc), _fmt(_mean(figs.get(TASK_A), figs.get(TASK_B))),
                 *(_fmt(v, 4) for v in losses), _fmt(_mean(*losses), 4)]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def verdict(rows: dict[str, dict]) -> str:
    scores = {name: _mean(f.get(TASK_A), f.get(TASK_B)) for name, f in rows.items() if "(input)" not in name}
    methods = {row.name: row for row in ROWS}
    baselines = {n: s for n, s in scores.items() if n in methods and methods[n].baseline and "llava" not in n}
    fams = {n: s for n, s in scores.items() if n.startswith("fam") and "llava" not in n}
    if not baselines or not fams:
        return "(no baseline or no FAM row among the rows run)"
    best_base = max(baselines, key=baselines.get)
    best_fam = max(fams, key=fams.get)
    gap = fams[best_fam] - baselines[best_base]
    word = "at or above" if gap >= 0 else "below"
    return (f"best baseline: {best_base} {baselines[best_base]:.3f}; best FAM: {best_fam} {fams[best_fam]:.3f} "
            f"({word} it by {abs(gap):.3f} on the mean of {TASK_A} and {TASK_B})")


def _mean(*values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def run_pair(pair: str, examples: int, output: Path, only: list[str] | None = None, smoke: bool = False) -> None:
    fixtures = dict(ZOO) if pair == "zoo" else stress_fixtures()
    rows = evaluate_inputs(fixtures, examples, output / pair / "inputs", LLAVA if pair == "zoo" and not smoke else None)
    for row in ROWS:
        if pair not in row.pairs or (only and row.name not in only):
            continue
        # one directory per recipe: rows of the same recipe reuse its merge steps
        raw = prepared_recipe(row, fixtures, examples)
        report = run_raw(smoke_data(raw) if smoke else raw, output / pair / row.directory())
        rows[row.name] = figures_of(report, row.model)
    columns = [TASK_A, TASK_B, *OTHER_TASKS] + sorted({t for r in ROWS if pair in r.pairs and r.name in rows for t in r.tasks})
    print(f"\n## pair: {pair} ({examples} held-out examples per task)\n")
    print(table(rows, columns))
    print("\n" + verdict(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=["zoo", "stress", "both"], default="both")
    parser.add_argument("--examples", type=int, default=512, help="held-out examples per task")
    parser.add_argument("--output", type=Path, default=Path(tempfile.gettempdir()) / "merge-quality",
                        help="run directories (finished steps are reused on a re-run)")
    parser.add_argument("--rows", nargs="+", metavar="NAME", help="run only these rows (method names of ROWS)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds: checks that the script runs")
    args = parser.parse_args()
    if args.smoke:  # the zoo pair, two rows, a few examples, a fresh directory
        args.pair, args.examples, args.rows = "zoo", 4, args.rows or list(SMOKE_ROWS)
        args.output = Path(tempfile.mkdtemp(prefix="merge-quality-smoke-"))
    import transformers

    transformers.utils.logging.disable_progress_bar()
    for pair in (["zoo", "stress"] if args.pair == "both" else [args.pair]):
        run_pair(pair, args.examples, args.output, args.rows, args.smoke)
    if args.smoke:
        shutil.rmtree(args.output, ignore_errors=True)


if __name__ == "__main__":
    main()
