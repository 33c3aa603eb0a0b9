"""TLINP vs the plain mean: how much neuron profiles move with the probe's max-token setting.

Runs recipes/tlinp-length.yaml twice, with TLINP weights (alpha from ``--alpha``) and with uniform
weights: the same passages captured at max_tokens 16, 32, 64 and 128. For every MLP neuron i and
profile p (weighted mean activation ``mean a_i``, weighted mean ``|a_i|``) it takes the variance
across the four lengths, ``Var_T p_i(T)``, and prints side by side, averaged over all neurons:

- ``var``: mean_i Var_T p_i(T) (raw; depends on the profile's scale),
- ``rel``: mean_i Var_T p_i(T) / Var_i(mean_T p_i(T)) (length variance relative to how much neurons
  differ from each other; scale-free, so the two weightings compare fairly),

and the ratio to uniform of ``rel`` (< 1: profiles depend less on the length).

A control row, ``uniform, first token dropped``, weighs every real token 1 except the first of each
row (0): the first position of a decoder carries outlier activations (an attention sink) whose share
of a plain mean is 1/T, so it alone makes plain-mean profiles length-dependent. The control says how
much of TLINP's effect is that one position.

    python benchmarks/tlinp_length.py [--model builtin:smollm2-135m] [--alpha 0.5] [--output DIR]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from surgery import hookimpl
from surgery.core.artifacts import Artifact

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tlinp-length.yaml"
LENGTHS = ("t16", "t32", "t64", "t128")


class SkipFirstWeighter(Artifact):
    """Uniform weights with each row's first real token at 0 (right-padded batches)."""

    def __init__(self) -> None:
        super().__init__(meta={"weighting": "skip-first"})

    def weights(self, logits_btv, input_ids_bt, mask_bt):
        w_bt = mask_bt.to(torch.float32).clone()
        w_bt[:, 0] = 0
        return w_bt


class SkipFirst:
    """Uniform token weights without each row's first token (a control for TLINP)."""

    @hookimpl
    def option_schema(self, stage):
        return None

    @hookimpl
    def weight(self, ctx):
        return SkipFirstWeighter()


def run(weighting: str, alpha: float, model: str, output: Path, passages: int | None = None) -> Path:
    """Run the recipe with the given weight step; finished steps are reused on a re-run."""
    import yaml

    from surgery.runtime.manager import Manager
    from surgery.runtime.recipe import validate
    from surgery.runtime.runner import run_recipe

    raw = yaml.safe_load(RECIPE.read_text(encoding="utf-8"))
    raw["models"]["lm"] = model
    for spec in raw["data"].values() if passages else ():
        spec["max_samples"] = passages
    raw["steps"][0] = {"weight": {"plugin": "tlinp", "alpha": alpha} if weighting == "tlinp" else {"plugin": weighting}}
    manager = Manager()
    manager.register(SkipFirst(), "skip-first")
    recipe = validate(raw, manager, base_dir=RECIPE.parent, source=str(RECIPE), output=str(output / weighting))
    run_recipe(recipe, manager, quiet=True)
    return output / weighting


def profiles(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{profile: {length: [neurons of every layer]}} from the run's capture steps."""
    from surgery.core.artifacts import Artifact
    from surgery.engines.capture import Stats

    out: dict[str, dict[str, torch.Tensor]] = {"mean a": {}, "mean |a|": {}}
    for index, length in enumerate(LENGTHS, start=1):
        artifact = Artifact.load(run_dir / f"{index:02d}-capture-fam")
        layers = artifact.meta["layers"]["lm"]
        stats = [Stats.from_tensors(artifact.tensors, f"lm/{layer}/") for layer in layers]
        out["mean a"][length] = torch.cat([s.mean("act") for s in stats])
        out["mean |a|"][length] = torch.cat([s.mean_abs("act") for s in stats])
    return out


def length_variance(by_length: dict[str, torch.Tensor]) -> tuple[float, float]:
    stacked_ti = torch.stack([by_length[t] for t in LENGTHS]).double()
    var_i = stacked_ti.var(dim=0, unbiased=False)
    spread = stacked_ti.mean(dim=0).var(unbiased=False)
    return float(var_i.mean()), float(var_i.mean() / spread)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--output", type=Path, default=Path(tempfile.gettempdir()) / "tlinp-length")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds: checks that the script runs")
    args = parser.parse_args()
    passages = 64
    if args.smoke:  # the zoo's tiny model, a few passages, a fresh directory
        args.model, passages = "builtin:tiny-llama/base", 4
        args.output = Path(tempfile.mkdtemp(prefix="tlinp-length-smoke-"))
    import transformers

    transformers.utils.logging.disable_progress_bar()
    labels = {"uniform": "uniform (plain mean)", "tlinp": f"tlinp (alpha {args.alpha})",
              "skip-first": "uniform, first token dropped"}
    results = {w: {name: length_variance(p)
                   for name, p in profiles(run(w, args.alpha, args.model, args.output, passages)).items()}
               for w in labels}
    print(f"model {args.model}, max_tokens {', '.join(t[1:] for t in LENGTHS)}, {passages} passages\n")
    print("weighting | profile | var | rel | rel / uniform rel")
    print("--- | --- | --- | --- | ---")
    for weighting, label in labels.items():
        for name, (var, rel) in results[weighting].items():
            print(f"{label} | {name} | {var:.3e} | {rel:.4f} | {rel / results['uniform'][name][1]:.3f}")


if __name__ == "__main__":
    main()
