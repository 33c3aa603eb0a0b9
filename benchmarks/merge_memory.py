"""Peak memory of a streamed linear merge, relative to one checkpoint's size on disk.

Builds two ~100M-parameter Llama checkpoints (random weights), then merges them in a fresh
process with the `linear` fuse plugin and prints

    (peak RSS during the merge - RSS after imports) / size of one checkpoint on disk

Goal: at most 1.5 (weights are streamed tensor by tensor; neither model is loaded whole).
Usage: python benchmarks/merge_memory.py [--hidden 768] [--layers 12] [--vocab 16000]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
from pathlib import Path
import torch, transformers, safetensors  # the imports a merge needs
from surgery.manager import get_manager
from surgery.recipe import load_recipe
from surgery.runner import run_recipe

def rss_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

manager = get_manager()
recipe = load_recipe(sys.argv[1], manager)
after_imports = rss_kib("VmRSS")
start = time.perf_counter()
run_recipe(recipe, manager, quiet=True)
print(json.dumps({"after_imports_kib": after_imports, "peak_kib": rss_kib("VmHWM"), "seconds": time.perf_counter() - start}))
"""


def make_checkpoints(root: Path, hidden: int, layers: int, vocab: int) -> list[Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64)
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        path = root / f"model-{seed}"
        model.save_pretrained(path)
        paths.append(path)
        del model
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--max-shard-mb", type=float, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        a, b = make_checkpoints(root, args.hidden, args.layers, args.vocab)
        size = (a / "model.safetensors").stat().st_size
        shard = f", max_shard_mb: {args.max_shard_mb}" if args.max_shard_mb else ""
        recipe = root / "merge.yaml"
        recipe.write_text(f"models: {{a: {a}, b: {b}}}\nsteps:\n  - fuse: {{plugin: linear{shard}}}\noutput: {root / 'run'}\n")
        out = subprocess.run([sys.executable, "-c", CHILD, str(recipe)], capture_output=True, text=True, check=True)
        stats = json.loads(out.stdout.strip().splitlines()[-1])
    params = size / 4
    extra = (stats["peak_kib"] - stats["after_imports_kib"]) * 1024
    print(f"checkpoint: {params / 1e6:.1f}M params, {size / 2**20:.1f} MiB on disk (x2 models)")
    print(f"RSS after imports: {stats['after_imports_kib'] / 1024:.1f} MiB; peak during merge: {stats['peak_kib'] / 1024:.1f} MiB")
    print(f"merge time: {stats['seconds']:.2f} s")
    print(f"(peak - after imports) / checkpoint size = {extra / size:.3f}  (goal <= 1.5)")


if __name__ == "__main__":
    main()
