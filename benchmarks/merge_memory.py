"""Peak memory of a streamed linear merge, relative to one checkpoint's size on disk.

Builds two ~100M-parameter Llama checkpoints (random weights), then merges them in a fresh
process with the `linear` fuse plugin and prints

    (peak RSS during the merge - RSS after imports) / size of one checkpoint on disk

Goal: at most 1.5 (weights are streamed tensor by tensor; neither model is loaded whole).
Usage: python benchmarks/merge_memory.py [--hidden 768] [--layers 12] [--vocab 16000]

With ``--sizes`` it instead merges multi-shard checkpoints (``save_pretrained(max_shard_size=...)``)
of two model sizes 4x apart (4x the layers, so the largest tensor stays the same) into small output shards, and prints for
each size the peak RSS above the post-import baseline next to the bound (models + 1) x the largest
input shard: memory follows the shard size, not the model size.
Usage: python benchmarks/merge_memory.py --sizes --hidden 256 --layers 16 --vocab 2000
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
from surgery.runtime.manager import Manager
from surgery.runtime.recipe import load_recipe
from surgery.runtime.runner import run_recipe

def rss_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

manager = Manager()
recipe = load_recipe(sys.argv[1], manager)
after_imports = rss_kib("VmRSS")
start = time.perf_counter()
run_recipe(recipe, manager, quiet=True)
print(json.dumps({"after_imports_kib": after_imports, "peak_kib": rss_kib("VmHWM"), "seconds": time.perf_counter() - start}))
"""


def make_checkpoints(root: Path, hidden: int, layers: int, vocab: int, max_shard_size: str | None = None) -> list[Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64)
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        path = root / f"model-{seed}"
        model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
        paths.append(path)
        del model
    return paths


def merge_peak(root: Path, models: list[Path], max_shard_mb: float | None) -> dict:
    """Run a linear fuse of ``models`` in a fresh process; its RSS after imports, peak and seconds."""
    names = {f"m{i}": path for i, path in enumerate(models)}
    shard = f", max_shard_mb: {max_shard_mb}" if max_shard_mb else ""
    recipe = root / "merge.yaml"
    listed = ", ".join(f"{k}: {v}" for k, v in names.items())
    recipe.write_text(f"models: {{{listed}}}\nsteps:\n  - fuse: {{plugin: linear{shard}}}\noutput: {root / 'run'}\n")
    out = subprocess.run([sys.executable, "-c", CHILD, str(recipe)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare_sizes(hidden: int, layers: int, vocab: int, input_shard_mb: int, max_shard_mb: float) -> None:
    """Two sizes 4x apart, multi-shard inputs, small output shards: peak vs (models + 1) x largest shard."""
    rows = []
    for scale in (1, 4):  # 4x the layers: 4x the parameters, the same largest tensor
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            models = make_checkpoints(root, hidden, layers * scale, vocab, f"{input_shard_mb}MB")
            shard_sizes = [p.stat().st_size for m in models for p in m.glob("*.safetensors")]
            out_dir = root / "run"
            stats = merge_peak(root, models, max_shard_mb)
            out_shards = len(list(out_dir.rglob("model*.safetensors")))
        extra = (stats["peak_kib"] - stats["after_imports_kib"]) * 1024
        bound = (len(models) + 1) * max(shard_sizes)
        rows.append((sum(shard_sizes) / len(models), len(shard_sizes) // len(models), max(shard_sizes), out_shards,
                     extra, bound, stats["seconds"]))
    print(f"inputs: save_pretrained(max_shard_size='{input_shard_mb}MB'); fuse: linear, max_shard_mb={max_shard_mb}; 2 models")
    print(f"{'model MiB':>10} {'in shards':>9} {'largest MiB':>11} {'out shards':>10} {'peak-base MiB':>13} "
          f"{'bound MiB':>9} {'peak/bound':>10} {'seconds':>7}")
    for size, shards, largest, out_shards, extra, bound, seconds in rows:
        print(f"{size / 2**20:>10.1f} {shards:>9d} {largest / 2**20:>11.1f} {out_shards:>10d} {extra / 2**20:>13.1f} "
              f"{bound / 2**20:>9.1f} {extra / bound:>10.3f} {seconds:>7.2f}")
    print(f"model size ratio {rows[1][0] / rows[0][0]:.2f}x; peak-above-baseline ratio {rows[1][4] / max(rows[0][4], 1):.2f}x"
          f"; both below bound: {all(r[4] < r[5] for r in rows)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--max-shard-mb", type=float, default=None)
    parser.add_argument("--sizes", action="store_true", help="compare two model sizes 4x apart (multi-shard inputs)")
    parser.add_argument("--input-shard-mb", type=int, default=40, help="--sizes: input checkpoint shard size")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds: checks that the script runs")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(hidden=64, layers=2, vocab=256)
    if args.sizes:
        compare_sizes(args.hidden, args.layers, args.vocab, args.input_shard_mb, args.max_shard_mb or 8.0)
        return
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
