"""Heal a pruned SmolLM2-135M with DPO, SimPO, TDPO2 and FPO; judge on held-out text with an SAE that
FPO never trained against.

1. Prune: 30% of SmolLM2's heads by smallest |per-layer IG| (the first ``ig`` step of a finished
   run, e.g. ``recipes/ig-smollm2.yaml`` or ``recipes/prune-table-smollm2.yaml``), compact output (the pruned weights are gone, so
   tuning cannot bring them back); every KV group of a layer loses the same number of query heads.
2. Pairs, generated here: prompts are the first ``--prompt-words`` words of documentation passages
   from the even half of the topics (``part: a``); chosen = the unpruned model's greedy
   continuation, rejected = the pruned model's (``--new-tokens`` tokens; identical pairs dropped).
3. SAEs (TopK, 4x expansion, k 16) trained on the unpruned model over other part-a passages: FPO's
   own SAE at the last layer, one per seed; the judge's SAE at layer ``--eval-layer`` with seed 100.
4. Tune the pruned model with each loss and seed (the unpruned model is the reference; the seed
   sets the data order and FPO's SAE), ``--steps`` AdamW steps of ``--batch`` pairs.
5. Judge on passages of the odd half of the topics (``part: b``, held out from everything above):
   next-token loss, token ``KL(p_ref || p)``, and feature drift = the FPO constraint (pooled
   features, MSE over topk U topk, k 32) between the model and the reference, measured with the
   judge's SAE and, for contrast, with FPO's own SAE of that seed.

    python benchmarks/heal_smollm2.py --table-run runs/prune-table-smollm2 --work runs/heal-smollm2
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

import torch
import yaml

LOSSES = ("dpo", "simpo", "tdpo2", "fpo")


def manager():
    from surgery.runtime.manager import Manager

    return Manager()


def run_recipe_dict(recipe: dict, path: Path, output: Path) -> dict:
    from surgery.runtime.recipe import load_recipe
    from surgery.runtime.runner import run_recipe

    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    m = manager()
    return run_recipe(load_recipe(path, m, [], str(output)), m, quiet=True)


def load(name: str, path: str):
    from surgery.models.loading import ModelSpec, load_model

    return load_model(name, ModelSpec(path=path), manager().registries)


def prune_by_ig(base, table_run: Path, fraction: float, target: Path) -> dict:
    """Compact-prune ``fraction`` of the heads by smallest |IG| and save the model with the tokenizer."""
    from surgery.core.io import read_tensors
    from surgery.engines.attribution import sites_for
    from surgery.models.pruned import compact_model
    from surgery.plugins.prune import Units, compactable, global_plan, kept_lists, magnitude_order, ranks_of

    step = sorted(p for p in table_run.glob("*-attribute-ig") if (p / "tensors.safetensors").is_file())[0]
    scores_lu = read_tensors(step / "tensors.safetensors")["scores"]
    units = Units(sites_for(base, "heads"), base.view, "heads")
    flat = torch.cat([scores_lu[l, :n] for l, n in enumerate(units.counts)]).double().tolist()
    order = magnitude_order(flat)
    mask = compactable(units, global_plan(units, order, fraction), ranks_of(units, order))
    pruned = compact_model(base.module, base.view, kept_lists(units, mask), None)
    pruned.save_pretrained(target)
    base.tokenizer.save_pretrained(target)
    return {"fraction_pruned": int(mask.sum()) / units.total, "pruned_per_layer": mask.sum(1).tolist()}


@torch.no_grad()
def greedy(model, tokenizer, prompts: list[str], new_tokens: int) -> list[str]:
    tokenizer.padding_side = "left"
    out = []
    for start in range(0, len(prompts), 8):
        enc = tokenizer(prompts[start:start + 8], return_tensors="pt", padding=True)
        ids = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    tokenizer.padding_side = "right"
    return out


def make_pairs(base, pruned, n: int, prompt_words: int, new_tokens: int) -> list[dict]:
    from surgery.models.stdlib_text import stdlib_passages

    passages = stdlib_passages(48, "a")
    random.Random(7).shuffle(passages)  # not the seed-0 shuffle the SAE data uses first
    prompts = [" ".join(p.split()[:prompt_words]) for p in passages[: 2 * n]]
    chosen = greedy(base.module, base.tokenizer, prompts, new_tokens)
    rejected = greedy(pruned.module, base.tokenizer, prompts, new_tokens)
    pairs = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in zip(prompts, chosen, rejected) if c.strip() != r.strip()]
    return pairs[:n]


def heldout_batches(tokenizer, n: int, tokens: int) -> list[dict]:
    from surgery.models.data import batches
    from surgery.models.stdlib_text import stdlib_passages

    passages = stdlib_passages(48, "b")
    random.Random(1).shuffle(passages)
    return list(batches([{"text": p} for p in passages[:n]], tokenizer, 8, tokens))


@torch.no_grad()
def judge(model, reference, batches: list[dict], saes: dict, objective) -> dict:
    """Held-out loss, token KL to the reference and feature drift with each SAE."""
    from surgery.engines.preference import fpo_constraint, pool_features
    from surgery.engines.sae import Site
    from surgery.engines.tuning import mean_token_kl

    figures = {"loss": 0.0, "kl": mean_token_kl(model, reference, batches)}
    rows = 0
    for batch in batches:
        figures["loss"] += float(objective.loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                                {**batch, "labels": batch["labels"]}).sum())
        rows += batch["input_ids"].shape[0]
    figures["loss"] /= rows
    for name, (sae, path_of) in saes.items():
        total = 0.0
        for batch in batches:
            feats = []
            for m in (model, reference):
                _, resid_btd = Site(m, path_of(m)).run(batch)
                feats.append(pool_features(sae.encode(resid_btd.float()), batch["attention_mask"]))
            total += float(fpo_constraint(feats[0], feats[1], 32).sum())
        figures[f"drift_{name}"] = total / rows
    return figures


def sae_recipe(model: str, layer: int, seed: int) -> dict:
    return {"name": f"sae-{layer}-{seed}", "seed": seed, "models": {"base": model},
            "data": {"train": {"source": "stdlib-text", "words": 48, "part": "a", "max_samples": 64, "max_tokens": 32,
                               "batch_size": 16, "seed": 0}},
            "steps": [{"capture": {"plugin": "sae", "layer": layer, "architecture": "topk", "k": 16, "expansion": 4,
                                   "epochs": 4}}]}


def tune_recipe(loss: str, seed: int, pruned: Path, prefs: Path, sae: Path | None, args) -> dict:
    tune = {"plugin": "preference", "loss": loss, "models": ["pruned", "base"], "data": "prefs", "lr": args.lr,
            "warmup_steps": 2, "max_steps": args.steps, "epochs": 100, "batch_size": args.batch, "as": "healed"}
    if loss == "fpo":
        tune["sae"] = str(sae)
    return {"name": f"heal-{loss}-{seed}", "seed": seed,
            "models": {"base": args.model, "pruned": str(pruned)},
            "data": {"prefs": {"source": "preference", "path": str(prefs), "batch_size": args.batch, "max_tokens": 48}},
            "steps": [{"tune": tune}]}


def cell(values: list[float]) -> str:
    return f"{statistics.mean(values):.4g}" + (f" +- {statistics.stdev(values):.2g}" if len(values) > 1 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table-run", type=Path, required=True, help="a run directory whose first `ig` attribute step (per-layer IG of heads) picks the pruned heads")
    parser.add_argument("--model", default="builtin:smollm2-135m", help="the model the table run attributed")
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--losses", nargs="+", default=list(LOSSES))
    parser.add_argument("--pairs", type=int, default=24)
    parser.add_argument("--prompt-words", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--eval-layer", type=int, default=20)
    parser.add_argument("--heldout", type=int, default=32, help="held-out passages")
    args = parser.parse_args()
    from surgery.engines.sae import load_sae, site_path

    args.work.mkdir(parents=True, exist_ok=True)
    base = load("base", args.model)
    pruned_dir = args.work / "pruned"
    if not (pruned_dir / "config.json").is_file():
        print("prune:", prune_by_ig(base, args.table_run, 0.3, pruned_dir))
    pruned = load("pruned", str(pruned_dir))
    prefs = args.work / "prefs.jsonl"
    if not prefs.is_file():
        pairs = make_pairs(base, pruned, args.pairs, args.prompt_words, args.new_tokens)
        prefs.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    print(f"{len(prefs.read_text().splitlines())} preference pairs, e.g. {prefs.read_text().splitlines()[0]}")
    def train_sae(layer: int, seed: int) -> Path:
        out = args.work / f"sae-{layer}-{seed}"
        run_recipe_dict(sae_recipe(args.model, layer, seed), args.work / f"sae-{layer}-{seed}.yaml", out)
        return next(out.glob("00-capture-sae")) / "sae"

    judge_sae = load_sae(train_sae(args.eval_layer, 100))
    objective = manager().registries.objectives.get("causal-lm")
    batches = heldout_batches(base.tokenizer, args.heldout, 32)
    results = {"none": [], **{loss: [] for loss in args.losses}}
    for seed in args.seeds:  # seed by seed, so an interrupted run has every loss for its first seeds
        own_dir = train_sae(-1, seed)
        own = load_sae(own_dir)
        saes = {"judge": (judge_sae, lambda m: site_path(manager().registries.view(m), args.eval_layer)),
                "own": (own, lambda m: site_path(manager().registries.view(m), -1))}
        if seed == args.seeds[0]:
            results["base"] = [judge(base.module, base.module, batches, saes, objective)]
        results["none"].append(judge(pruned.module, base.module, batches, saes, objective))
        for loss in args.losses:
            out = args.work / f"heal-{loss}-{seed}"
            report = run_recipe_dict(tune_recipe(loss, seed, pruned_dir, prefs, own_dir, args),
                                     args.work / f"heal-{loss}-{seed}.yaml", out)
            healed = load("healed", str(next(out.glob("00-tune-preference")) / "model"))
            figures = judge(healed.module, base.module, batches, saes, objective)
            figures["pref_accuracy_after"] = report["steps"][0]["figures"]["pref_accuracy_after"]
            results[loss].append(figures)
            print(loss, seed, json.dumps(figures), flush=True)
            (args.work / "results.json").write_text(json.dumps(results, indent=1))
            del healed
    (args.work / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nheld-out: {args.heldout} passages of the odd documentation topics, 32 tokens; "
          f"{args.steps} steps x {args.batch} pairs, lr {args.lr}; seeds {args.seeds}")
    print(f"{'model':<8} {'held-out loss':>20} {'token KL to ref':>22} {'drift (judge SAE)':>22} {'drift (FPO SAE)':>22}")
    for name, rows in results.items():
        print(f"{name:<8} {cell([r['loss'] for r in rows]):>20} {cell([r['kl'] for r in rows]):>22} "
              f"{cell([r['drift_judge'] for r in rows]):>22} {cell([r['drift_own'] for r in rows]):>22}")


if __name__ == "__main__":
    main()
