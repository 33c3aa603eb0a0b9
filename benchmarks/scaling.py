"""Strong scaling of data-parallel capture: 2 processes vs 1 process over the same probe set.

Saves a random 4-layer, hidden-256 Llama and a synthetic probe set, then runs the same one-step
recipe (``capture: mean``) three ways, each in fresh processes, and prints them side by side:
1 process x 1 thread, 1 process x ``--cores`` threads, and ``--cores`` processes x 1 thread
(``surgery run --nproc N``, torchrun, gloo on the CPU). Throughput is real probe tokens per second
of the capture step (``report.json`` step seconds: model loading and process start-up excluded).

    python benchmarks/scaling.py [--examples 256] [--cores 2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def make_inputs(root: Path, examples: int) -> tuple[Path, Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from surgery.models.zoo.tasks import make_examples

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    probe = root / "probe.jsonl"
    probe.write_text("".join(json.dumps({"text": ex["text"]}) + "\n" for ex in make_examples("synthetic-mix", examples, seed=0)))
    return root / "model", probe


def tokenizer_dir(model: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from merge_fixtures import tokenizer  # the zoo's character tokenizer (no download)

    tokenizer().save_pretrained(model)


def run(recipe: Path, output: Path, nproc: int, threads: int) -> tuple[float, int]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-m", "surgery.cli", "run", str(recipe), "--output", str(output), "--nproc", str(nproc)]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    step = json.loads((output / "report.json").read_text())["steps"][0]
    return step["seconds"], int(step["figures"]["m/tokens"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds: checks that the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.examples = 16  # two batches of 8: one per process
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, probe = make_inputs(root, args.examples)
        tokenizer_dir(model)
        recipe = root / "recipe.yaml"
        recipe.write_text(f"models: {{m: {model}}}\ndata:\n  probe: {{source: jsonl, path: {probe}, max_tokens: 128, batch_size: 8}}\n"
                          f"steps:\n  - capture: {{plugin: mean}}\noutput: {root / 'unused'}\n")
        rows = [(f"1 process x 1 thread", *run(recipe, root / "a", 1, 1))]
        if not args.smoke:  # the same code path as the row above: a smoke run skips it
            rows.append((f"1 process x {args.cores} threads", *run(recipe, root / "b", 1, args.cores)))
        rows.append((f"{args.cores} processes x 1 thread", *run(recipe, root / "c", args.cores, 1)))
    base = rows[0][2] / rows[0][1]
    print(f"capture: mean, 4-layer hidden-256 Llama, {args.examples} examples, batch 8, CPU ({os.cpu_count()} cores visible)")
    print(f"{'layout':<24} {'seconds':>8} {'tokens':>7} {'tokens/s':>9} {'speed-up':>8}")
    for layout, seconds, tokens in rows:
        print(f"{layout:<24} {seconds:>8.2f} {tokens:>7d} {tokens / seconds:>9.0f} {tokens / seconds / base:>8.2f}")


if __name__ == "__main__":
    main()
