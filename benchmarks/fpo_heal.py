"""Heal a pruned zoo model with FPO vs DPO: task accuracy and drift side by side, over prune seeds.

Runs ``recipes/fpo-heal.yaml`` and ``recipes/dpo-heal.yaml`` (random 50% MLP-neuron prune of
``tiny-llama/base``, compact; then preference optimisation on the zoo's correct-vs-near-miss pairs
with the unpruned model as reference) once per seed, and prints per run the mean exact-match
accuracy over the trained tasks of the unpruned, pruned and healed models, and the healed model's
drift from the reference on the chosen responses: token-level ``KL(p_ref || p)`` per answer token
(``drift_kl``) and the FPO feature constraint (``drift_fpo``).

    python benchmarks/fpo_heal.py --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

RECIPES = {"fpo": "recipes/fpo-heal.yaml", "dpo": "recipes/dpo-heal.yaml"}
TASKS = ("copy", "reverse", "sort", "inc")
SMOKE = ["data.probe.n=16", "data.probe.batch_size=16", "data.prefs.samples=8", "data.prefs.batch_size=4",
         "steps.0.epochs=1", "steps.0.expansion=1", "steps.2.epochs=1", "steps.3.n=4"]


def run(recipe: str, seed: int, output: Path, overrides: list[str]) -> dict:
    from surgery.runtime.manager import Manager
    from surgery.runtime.recipe import load_recipe
    from surgery.runtime.runner import run_recipe

    manager = Manager()
    report = run_recipe(load_recipe(recipe, manager, [f"seed={seed}", *overrides], str(output)), manager, quiet=True)
    steps = {step["stage"]: step["figures"] for step in report["steps"]}
    accuracy = steps["evaluate"]
    mean = {m: statistics.mean(accuracy[f"{m}/{t}"] for t in TASKS) for m in ("base", "pruned", "healed")}
    return {**mean, "drift_kl": steps["tune"]["drift_kl"], "drift_fpo": steps["tune"]["drift_fpo"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra recipe override for both")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds: checks that the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.seeds, args.overrides = [0], SMOKE + args.overrides
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and the figures do not depend on the core count
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for loss, recipe in RECIPES.items():
                rows.append((seed, loss, run(recipe, seed, Path(tmp) / f"{loss}-{seed}", args.overrides)))
    print(f"mean accuracy over {', '.join(TASKS)}; drift of the healed model from the unpruned reference")
    print(f"{'seed':>4} {'loss':<5} {'base':>6} {'pruned':>7} {'healed':>7} {'recovered':>9} {'drift_kl':>9} {'drift_fpo':>10}")
    for seed, loss, r in rows:
        gap = r["base"] - r["pruned"]
        recovered = (r["healed"] - r["pruned"]) / gap if gap > 0 else float("nan")
        print(f"{seed:>4} {loss:<5} {r['base']:>6.3f} {r['pruned']:>7.3f} {r['healed']:>7.3f} {recovered:>9.2f} "
              f"{r['drift_kl']:>9.4f} {r['drift_fpo']:>10.4f}")
    for loss in RECIPES:
        mine = [r for _, l, r in rows if l == loss]
        print(f"mean {loss:<5} healed {statistics.mean(r['healed'] for r in mine):.3f}  "
              f"drift_kl {statistics.mean(r['drift_kl'] for r in mine):.4f}  drift_fpo {statistics.mean(r['drift_fpo'] for r in mine):.4f}")


if __name__ == "__main__":
    main()
