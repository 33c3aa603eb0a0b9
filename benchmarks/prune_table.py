"""The pruning table: IG, Wanda, Taylor, weight magnitude, random and layer-matched random, side by side.

Runs ``recipes/prune-table-smollm2.yaml`` and/or ``recipes/prune-table-minilm.yaml`` (or reads a
finished run directory: finished steps are reused) and prints, per method, the share of heads
pruned, the held-out objective after pruning (SmolLM2: next-token loss on held-out documentation
passages; MiniLM: embedding distortion, 1 - cosine to the unpruned embedding) and, for MiniLM, the
paragraph-retrieval recall@1 and MRR on held-out topics. Random rows are mean +- sd over 3 seeds.

    python benchmarks/prune_table.py --model minilm --output runs/prune-table-minilm
    python benchmarks/prune_table.py --model smollm2 --output runs/prune-table-smollm2
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

RECIPES = {"smollm2": "recipes/prune-table-smollm2.yaml", "minilm": "recipes/prune-table-minilm.yaml"}
SCORED = ("ig", "wanda", "taylor", "weight-magnitude")
CONTROLS = {"random": "prune-random-", "layer-matched random (IG's counts)": "prune-matched-"}


def run(model: str, output: Path) -> dict:
    """``{step name: {"meta": ..., "figures": ...}}`` of the recipe's run (run or reused)."""
    from surgery.runtime.manager import Manager
    from surgery.runtime.recipe import load_recipe
    from surgery.runtime.runner import run_recipe

    manager = Manager()
    recipe = load_recipe(RECIPES[model], manager, [], str(output))
    run_recipe(recipe, manager, quiet=False)
    steps = {}
    for step in recipe.steps:
        record = json.loads((recipe.output / step.dirname / "meta.json").read_text())
        steps[step.name] = record
    return steps


def cell(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} +- {statistics.stdev(values):.{digits}f}"


def table(model: str, steps: dict) -> list[str]:
    retrieval = steps.get("retrieval", {}).get("meta", {}).get("scores", {})
    first = steps["prune-ig"]["meta"]
    lines = [f"{model}: {first['objective']} before pruning {first['objective_before']:.4f}"
             + (f"; retrieval recall@1 {retrieval['base']['recall@1']:.3f}, MRR {retrieval['base']['mrr']:.3f}"
                if retrieval else "")]
    header = f"{'method':<36} {'pruned':>7} {'objective after':>18}"
    if retrieval:
        header += f" {'recall@1':>16} {'MRR':>16}"
    lines.append(header)
    rows = [(name, [f"prune-{name}"]) for name in SCORED]
    rows += [(label, [f"{prefix}{s}" for s in range(3)]) for label, prefix in CONTROLS.items()]
    for label, names in rows:
        metas = [steps[n]["meta"] for n in names if n in steps]
        if not metas:
            continue
        line = f"{label:<36} {cell([m['fraction_pruned'] for m in metas], 2):>7} {cell([m['objective_after'] for m in metas], 4):>18}"
        if retrieval:
            models = [n.replace("prune-", "by-" if label in SCORED else "") for n in names]
            scores = [retrieval[m] for m in models if m in retrieval]
            line += f" {cell([s['recall@1'] for s in scores]):>16} {cell([s['mrr'] for s in scores]):>16}"
        lines.append(line)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(RECIPES), action="append", required=True)
    parser.add_argument("--output", action="append", default=[], help="run directory per --model (default runs/prune-table-MODEL)")
    args = parser.parse_args()
    outputs = args.output + [f"runs/prune-table-{m}" for m in args.model[len(args.output):]]
    for model, output in zip(args.model, outputs):
        print("\n".join(table(model, run(model, Path(output)))))
        print()


if __name__ == "__main__":
    main()
