"""Our merges equal mergekit's, tensor by tensor, for every method ``surgery import mergekit`` translates.

For each method a mergekit configuration is written, merged by mergekit (``mergekit-yaml``, run from
its own environment), translated with ``surgery import mergekit`` and run here; every output tensor
is compared. Inputs: the zoo trio (``builtin:tiny-llama/{base,task-a,task-b}``) and SmolLM2-135M with
two perturbed copies (base + N(0, (0.01 std)^2) per tensor, seeded). DARE and DELLA draw random masks
from different generators here and in mergekit, so they are compared at density 1 (their weights,
sign election, normalisation and lambda); their masks are checked by the unit tests instead. A
control row runs TIES under the paper's rules (``convention: paper``) against mergekit's output:
it must differ, or the comparison would prove nothing.

mergekit is not a dependency; install it in a separate environment (CPU torch first)::

    python -m venv /tmp/mk
    /tmp/mk/bin/pip install "torch==2.13.0+cpu"
    /tmp/mk/bin/pip install mergekit "torch==2.13.0+cpu"

then::

    python benchmarks/mergekit_equality.py --mergekit /tmp/mk/bin/mergekit-yaml [--inputs zoo smollm2]

mergekit runs in one process of its own environment for all configurations (its ``run_merge`` API,
the code ``mergekit-yaml`` calls), so its start-up is paid once.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

# (mergekit method, global parameters, per-input parameters or None, uses a base model)
ATTN_MLP_T = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]}, {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
              {"value": 0.5}]
METHODS: list[tuple[str, dict, list[dict] | None, bool]] = [
    ("linear", {}, [{"weight": 0.2}, {"weight": 0.3}, {"weight": 0.5}], False),
    ("task_arithmetic", {"lambda": 0.9}, [{"weight": 0.7}, {"weight": [0.2, 0.6]}], True),
    ("ties", {"lambda": 1.1}, [{"weight": 0.6, "density": 0.4}, {"weight": 0.8, "density": 0.6}], True),
    ("ties", {"normalize": False}, [{"weight": [0.0, 1.0], "density": 0.3}, {"weight": 1.0, "density": [0.2, 0.8]}], True),
    ("breadcrumbs", {}, [{"weight": 0.7, "density": 0.8, "gamma": 0.05}, {"weight": 0.5, "density": 0.8, "gamma": 0.05}], True),
    ("breadcrumbs_ties", {}, [{"weight": 1.0, "density": 0.7, "gamma": 0.02}, {"weight": 1.0, "density": 0.9, "gamma": 0.02}], True),
    ("dare_ties", {}, [{"weight": 0.6, "density": 1.0}, {"weight": 0.9, "density": 1.0}], True),
    ("dare_linear", {}, [{"weight": 0.6, "density": 1.0}, {"weight": 0.4, "density": 1.0}], True),
    ("della", {"lambda": 0.8}, [{"weight": 0.5, "density": 1.0}, {"weight": 0.5, "density": 1.0}], True),
    ("della_linear", {}, [{"weight": 0.5, "density": 1.0}, {"weight": 0.5, "density": 1.0}], True),
    ("slerp", {"t": ATTN_MLP_T}, None, True),
    ("nuslerp", {"nuslerp_flatten": False}, [{"weight": 0.3}, {"weight": 0.7}], True),
    ("nuslerp", {"nuslerp_row_wise": True, "nuslerp_flatten": False}, [{"weight": 0.5}, {"weight": 0.5}], False),
    ("multislerp", {}, [{"weight": 0.4}, {"weight": 0.6}], True),
    ("karcher", {}, None, False),
    ("model_stock", {}, None, True),
    ("sce", {"select_topk": 0.5}, None, True),
    ("passthrough", {}, None, False),
]


def resolve_inputs(which: str, work: Path) -> list[Path]:
    """[base, donor 1, donor 2] as local checkpoint directories."""
    from surgery.models.loading import ModelSpec, resolve_path
    from surgery.runtime.manager import Manager

    models = Manager().registries.models
    if which == "zoo":
        return [Path(resolve_path(ModelSpec(path=f"builtin:tiny-llama/{n}"), models)) for n in ("base", "task-a", "task-b")]
    base = Path(resolve_path(ModelSpec(path="builtin:smollm2-135m"), models))
    return [base] + [perturbed_copy(base, work / f"smollm2-tuned-{seed}", seed) for seed in (1, 2)]


def perturbed_copy(base: Path, target: Path, seed: int, scale: float = 0.01) -> Path:
    """``base`` plus seeded Gaussian noise of ``scale`` times each tensor's std (a stand-in fine-tune)."""
    from safetensors.torch import load_file, save_file

    if (target / "model.safetensors").is_file():
        return target
    target.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (base / name).is_file():
            shutil.copyfile(base / name, target / name)
    generator = torch.Generator().manual_seed(seed)
    tensors = load_file(str(base / "model.safetensors"))
    out = {k: v + torch.randn(v.shape, generator=generator) * (scale * float(v.float().std())) if v.numel() > 1 else v.clone()
           for k, v in tensors.items()}
    save_file(out, str(target / "model.safetensors"), metadata={"format": "pt"})
    return target


def mergekit_config(method: str, glob: dict, per_input: list[dict] | None, with_base: bool, paths: list[Path],
                    layers: int) -> dict:
    config: dict = {"merge_method": method, "dtype": "float32"}
    if method == "passthrough":
        half = layers // 2
        config["slices"] = [{"sources": [{"model": str(paths[0]), "layer_range": [0, layers]}]},
                            {"sources": [{"model": str(paths[1]), "layer_range": [half, layers]}]}]
        return config
    if method == "slerp":
        config["slices"] = [{"sources": [{"model": str(p), "layer_range": [0, layers]} for p in paths[:2]]}]
        config["base_model"] = str(paths[0])
        config["parameters"] = glob
        return config
    if with_base:
        config["base_model"] = str(paths[0])
    inputs = paths[1:] if with_base or method == "nuslerp" else paths
    params = per_input or [{} for _ in inputs]
    config["models"] = [{"model": str(p), **({"parameters": q} if q else {})} for p, q in zip(inputs, params)]
    if glob:
        config["parameters"] = glob
    return config


MERGEKIT_DRIVER = """
import sys, time, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
options = MergeOptions(lazy_unpickle=True, copy_tokenizer=False, write_model_card=False, quiet=True,
                       out_shard_size=10**12)
for cfg, out in zip(sys.argv[1::2], sys.argv[2::2]):
    started = time.perf_counter()
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(open(cfg))), out, options=options)
    print(out, time.perf_counter() - started, flush=True)
"""


def run_mergekit(python: str, jobs: list[tuple[dict, Path]], log) -> dict[Path, float]:
    """Run every (config, output directory) in one mergekit process; seconds per merge."""
    args = []
    for config, out in jobs:
        cfg = out.with_suffix(".yml")
        cfg.write_text(yaml.safe_dump(config, sort_keys=False))
        args += [str(cfg), str(out)]
    done = subprocess.run([python, "-c", MERGEKIT_DRIVER, *args], check=True, stdout=subprocess.PIPE, stderr=log, text=True)
    return {Path(line.rsplit(" ", 1)[0]): float(line.rsplit(" ", 1)[1]) for line in done.stdout.splitlines() if line.strip()}


def run_ours(config: dict, work: Path, name: str, override: dict | None = None) -> tuple[Path, float, list[str]]:
    from surgery.plugins.mergekit_import import translate
    from surgery.runtime.manager import Manager
    from surgery.runtime.recipe import validate
    from surgery.runtime.runner import run_recipe

    recipe, skipped = translate(config, work, name)
    recipe["steps"][0]["fuse"].update(override or {})
    recipe["output"] = str(work / f"run-{name}")
    manager = Manager()
    started = time.perf_counter()
    run_recipe(validate(recipe, manager, base_dir=work), manager, quiet=True)
    plugin = recipe["steps"][0]["fuse"]["plugin"]
    return work / f"run-{name}" / f"00-fuse-{plugin}" / "model", time.perf_counter() - started, skipped


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    from surgery.models.checkpoint import CheckpointReader

    reader = CheckpointReader(directory)
    return {name: reader.get(name) for name in reader.names()}


def compare(ours: Path, theirs: Path) -> dict:
    a, b = read_all(ours), read_all(theirs)
    missing = sorted(set(b) ^ set(a))
    max_abs = max_rel = 0.0
    for name in sorted(set(a) & set(b)):
        x, y = a[name].double(), b[name].double()
        if x.shape != y.shape:
            missing.append(f"{name} (shape)")
            continue
        diff = float((x - y).abs().max()) if x.numel() else 0.0
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / max(float(y.abs().max()), 1e-12))
    return {"tensors": len(set(a) & set(b)), "mismatched_names": missing, "max_abs": max_abs, "max_rel": max_rel}


def label(method: str, glob: dict, per_input: list[dict] | None, with_base: bool) -> str:
    bits = [f"{k}={v}" for k, v in glob.items() if k != "t"]
    if method == "slerp":
        bits.append("t: attn/mlp gradients")
    if per_input and any(isinstance(v, list) for q in per_input for v in q.values()):
        bits.append("per-layer gradients")
    if method in ("dare_ties", "dare_linear", "della", "della_linear"):
        bits.append("density 1")
    if method == "nuslerp":
        bits.append("base" if with_base else "no base")
    return method + (f" ({', '.join(bits)})" if bits else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit", default=shutil.which("mergekit-yaml") or "/tmp/mk/bin/mergekit-yaml",
                        help="the mergekit-yaml executable of mergekit's own environment")
    parser.add_argument("--inputs", nargs="+", default=["zoo", "smollm2"], choices=["zoo", "smollm2"])
    parser.add_argument("--methods", nargs="*", default=None, help="only these mergekit methods")
    parser.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--tolerance", type=float, default=1e-5, help="max |ours - mergekit| / max |mergekit| per tensor")
    args = parser.parse_args()
    if not Path(args.mergekit).exists() and not shutil.which(args.mergekit):
        sys.exit(f"mergekit-yaml not found at {args.mergekit}; install mergekit in its own venv (see this file's docstring)")
    work = Path(args.work or tempfile.mkdtemp(prefix="mergekit-equality-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    python = str(Path(args.mergekit).parent / "python")
    with open(work / "mergekit.log", "a") as log:
        for which in args.inputs:
            paths = resolve_inputs(which, work)
            layers = json.loads((paths[0] / "config.json").read_text())["num_hidden_layers"]
            jobs = []
            for i, (method, glob, per_input, with_base) in enumerate(METHODS):
                if args.methods and method not in args.methods:
                    continue
                name = f"{which}-{i:02d}-{method}"
                theirs_dir = work / f"mk-{name}"
                shutil.rmtree(theirs_dir, ignore_errors=True)
                jobs.append((name, label(method, glob, per_input, with_base),
                             mergekit_config(method, glob, per_input, with_base, paths, layers), theirs_dir))
            print(f"{which}: running mergekit on {len(jobs)} configurations", flush=True)
            seconds = run_mergekit(python, [(config, out) for _, _, config, out in jobs], log)
            for name, text, config, theirs_dir in jobs:
                ours_dir, t_ours, skipped = run_ours(config, work, name)
                result = compare(ours_dir, theirs_dir)
                equal = not result["mismatched_names"] and result["max_rel"] <= args.tolerance
                t_mk = seconds.get(theirs_dir, float("nan"))
                rows.append((which, text, result, equal, t_mk, t_ours, skipped))
                print(f"{which:8s} {text:60s} tensors={result['tensors']:4d} max_abs={result['max_abs']:.2e} "
                      f"max_rel={result['max_rel']:.2e} {'equal' if equal else 'DIFFERENT'} mergekit {t_mk:.1f}s ours {t_ours:.1f}s",
                      flush=True)
                shutil.rmtree(work / f"run-{name}")
                if text.startswith("ties (lambda"):  # a control: the paper's TIES rules must differ
                    control_dir, t_ours, _ = run_ours(config, work, name, {"convention": "paper"})
                    result = compare(control_dir, theirs_dir)
                    equal = not result["mismatched_names"] and result["max_rel"] <= args.tolerance
                    rows.append((which, "control: " + text + ", convention: paper", result, equal, t_mk, t_ours, []))
                    print(f"{which:8s} {rows[-1][1]:60s} max_rel={result['max_rel']:.2e} {'equal' if equal else 'DIFFERENT'}", flush=True)
                    shutil.rmtree(work / f"run-{name}")
                shutil.rmtree(theirs_dir)
    print()
    print("| inputs | method (settings) | tensors | max abs diff | max rel diff | equal | mergekit s | ours s |")
    print("|---|---|---|---|---|---|---|---|")
    for which, name, result, equal, t_mk, t_ours, skipped in rows:
        print(f"| {which} | {name} | {result['tensors']} | {result['max_abs']:.1e} | {result['max_rel']:.1e} | "
              f"{'yes' if equal else 'NO'} | {t_mk:.1f} | {t_ours:.1f} |")
    for which, name, result, _, _, _, skipped in rows:  # noqa: B007
        for line in skipped + result["mismatched_names"]:
            print(f"note: {which} {name}: {line}")


if __name__ == "__main__":
    main()
