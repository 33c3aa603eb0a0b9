"""Length-agnosticism of LAPE: how much neuron profiles move when the longest path length changes.

Runs one recipe (printed) with three ``lape`` captures of the same model and probe inputs at
``len_max`` in {16, 32, 64} (``len_min`` fixed), and a second with the same captures at
``len_max`` 32 under seeds 0, 1, 2 (the sampling-noise floor). For every neuron i of every layer,
``v_i(s)`` is its profile under setting s, averaged over the probe inputs:
- LAPE:  ``phi_i[0] = mean_x sum_k omega_k a_i(S_k)``;
- plain: the plain token mean of a_i over all sampled path tokens (what averaging activations
  over generated text gives).
Printed per method: ``Var_s v_i(s)`` averaged over neurons and layers, the same divided by the
neurons' mean square (scale-free), and the ratio LAPE / plain. Also the paths' effective sample size
``1 / sum omega^2`` and their omega-weighted mean length per setting.

    python benchmarks/lape_length.py [--model builtin:tiny-llama/base] [--paths 50] [--inputs 32]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import yaml

from surgery.core.artifacts import Artifact

LEN_MAX = (16, 32, 64)
SEEDS = (0, 1, 2)


def recipe(args, seed: int, captures: list[dict], output: Path) -> dict:
    data = ({"source": "synthetic", "tasks": "synthetic-mix", "split": "train"} if args.data == "synthetic"
            else {"source": "stdlib-text", "words": 16})
    return {
        "name": "lape-length", "seed": seed, "models": {"model": args.model},
        "data": {"probe": {**data, "max_samples": args.inputs, "max_tokens": 32, "batch_size": args.batch_size}},
        "steps": [{"capture": {"plugin": "lape", "name": c["name"], "paths": args.paths, "len_min": args.len_min,
                               "len_max": c["len_max"]}} for c in captures],
        "output": str(output),
    }


def run(raw: dict) -> dict[str, Artifact]:
    from surgery.runtime.manager import Manager
    from surgery.runtime.recipe import validate
    from surgery.runtime.runner import run_recipe

    manager = Manager()
    recipe_ = validate(raw, manager, base_dir=Path.cwd())
    run_recipe(recipe_, manager, quiet=True)
    return {step.name: Artifact.load(recipe_.output / step.dirname) for step in recipe_.steps}


def profiles(artifact: Artifact) -> dict[str, torch.Tensor]:
    """Per method, the neurons' profiles of every layer concatenated: [neurons]."""
    layers = artifact.meta["layers"]["model"]
    lape = torch.cat([artifact.tensors[f"model/{l}/phi_x"][..., 0].double().mean(0) for l in layers])
    plain = torch.cat([artifact.tensors[f"model/{l}/plain_x"].double().mean(0) for l in layers])
    return {"lape": lape, "plain": plain}


def spread(artifacts: list[Artifact]) -> dict[str, tuple[float, float]]:
    """Per method: (mean over neurons of the variance across settings, the same / mean square)."""
    out = {}
    for method in ("lape", "plain"):
        values_sn = torch.stack([profiles(a)[method] for a in artifacts])
        variance = float(values_sn.var(0, unbiased=False).mean())
        out[method] = (variance, variance / float(values_sn.square().mean()))
    return out


def path_figures(artifact: Artifact) -> tuple[float, float]:
    omega = artifact.tensors["model/paths/omega"].double()
    lengths = artifact.tensors["model/paths/lengths"].double()
    return float((1 / omega.square().sum(-1)).mean()), float((omega * lengths).sum(-1).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:tiny-llama/base")
    parser.add_argument("--data", default="synthetic", choices=["synthetic", "stdlib-text"])
    parser.add_argument("--inputs", type=int, default=32)
    parser.add_argument("--paths", type=int, default=50)
    parser.add_argument("--len-min", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds: checks that the script runs")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(inputs=2, paths=2, len_min=2, batch_size=2)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        lengths_raw = recipe(args, 0, [{"name": f"len{n}", "len_max": n} for n in LEN_MAX], Path(scratch) / "len")
        print("# recipe (len_max)\n" + yaml.safe_dump(lengths_raw, sort_keys=False).replace(scratch, "<tmp>"))
        by_length = run(lengths_raw)
        by_seed = [run(recipe(args, seed, [{"name": "len32", "len_max": 32}], Path(scratch) / f"seed{seed}"))["len32"]
                   for seed in SEEDS]
    length_spread, seed_spread = spread(list(by_length.values())), spread(by_seed)
    print(f"model {args.model}, {args.inputs} inputs, {args.paths} paths, len_min {args.len_min}")
    for name, artifact in by_length.items():
        ess, weighted = path_figures(artifact)
        print(f"  {name:<6} ESS {ess:6.2f} of {args.paths}   omega-weighted length {weighted:6.2f}")
    print(f"{'':<8}{'Var over len_max':>18}{'relative':>12}{'Var over seeds':>18}{'relative':>12}")
    for method in ("lape", "plain"):
        (lv, lr), (sv, sr) = length_spread[method], seed_spread[method]
        print(f"{method:<8}{lv:18.3e}{lr:12.3e}{sv:18.3e}{sr:12.3e}")
    ratio = length_spread["lape"][0] / length_spread["plain"][0]
    print(f"LAPE / plain variance across len_max: {ratio:.3f}  "
          f"(across seeds: {seed_spread['lape'][0] / seed_spread['plain'][0]:.3f})")


if __name__ == "__main__":
    main()
