"""A streamed linear merge against mergekit's, on the same checkpoints and the same output shard size.

Builds two Llama checkpoints with random weights (default ~232M parameters each, float32, one
safetensors file each) in a work directory, then runs, alternately, ``--repeats`` times each:

- ours: ``surgery run`` of a recipe with one ``fuse: linear`` step (``max_shard_mb``), in a fresh process;
- mergekit: ``mergekit-yaml`` with ``merge_method: linear`` and ``--out-shard-size`` set to the same
  number of bytes (mergekit compares bytes, despite its help text), ``--lazy-unpickle``.

It samples every 10 ms the merge process's resident memory (VmRSS) and its anonymous part (RssAnon:
heap and tensors; the rest is page cache of the inputs and libraries, which the kernel can drop),
summed over its child processes, and prints each run's wall time and peaks, then the medians of
the per-pair ratios ours / mergekit (the machine is shared: a pair runs back to back, in
alternating order). Both outputs are compared tensor by tensor (largest |difference|).

mergekit is not a project dependency; install it in its own virtual environment, CPU torch first
(an unpinned torch pulls the CUDA build), and pass its ``mergekit-yaml``::

    python -m venv /tmp/mk
    /tmp/mk/bin/pip install "torch==2.13.0+cpu"
    /tmp/mk/bin/pip install mergekit "torch==2.13.0+cpu"
    python benchmarks/merge_vs_mergekit.py --mergekit /tmp/mk/bin/mergekit-yaml [--repeats 3]

Without ``--mergekit`` (or when it is not found) only our merge runs. ``--device`` is passed to
mergekit's ``--device`` and our recipe's ``device`` (the streamed merge computes on the CPU).
Smaller models: ``--hidden 128 --layers 2 --vocab 1000``; ``--smoke``: tiny ones, one run.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MIB = 2**20


def make_checkpoints(root: Path, hidden: int, layers: int, vocab: int, dtype: str) -> tuple[list[Path], int]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                         num_key_value_heads=max(1, hidden // 64), tie_word_embeddings=False)
    paths, params = [], 0
    for seed in (0, 1):
        path = root / f"model-{seed}"
        if not (path / "model.safetensors").is_file():
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config).to(getattr(torch, dtype))
            model.save_pretrained(path, max_shard_size="100GB")
            del model
        paths.append(path)
    from safetensors import safe_open

    with safe_open(str(paths[0] / "model.safetensors"), framework="pt") as handle:
        params = sum(_numel(handle.get_slice(name).get_shape()) for name in handle.keys())
    return paths, params


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and RssAnon (KiB) of ``pid`` and its descendants."""
    total = {"VmRSS": 0, "RssAnon": 0}
    for process in _tree(pid):
        try:
            with open(f"/proc/{process}/status") as handle:
                for line in handle:
                    key = line.split(":", 1)[0]
                    if key in total:
                        total[key] += int(line.split()[1])
        except OSError:
            pass
    return total


def _tree(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    todo.extend(int(c) for c in handle.read().split())
        except OSError:
            pass
    return found


def run_sampled(command: list[str], log: Path) -> dict[str, float]:
    """Run ``command``; wall seconds and peak VmRSS / RssAnon (MiB) sampled every 10 ms."""
    peaks = {"VmRSS": 0, "RssAnon": 0}
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                for key, value in _memory_kib(process.pid).items():
                    peaks[key] = max(peaks[key], value)
                done.wait(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = process.wait()
        wall = time.perf_counter() - start
        done.set()
        sampler.join()
    if code != 0:
        raise SystemExit(f"{command[0]} failed with exit code {code}; see {log}:\n{log.read_text()[-3000:]}")
    return {"wall": wall, "rss": peaks["VmRSS"] / 1024, "anon": peaks["RssAnon"] / 1024}


def ours_command(root: Path, models: list[Path], shard_mb: float, device: str) -> tuple[list[str], Path]:
    out = root / "ours"
    recipe = root / "linear.yaml"
    recipe.write_text(f"name: linear-bench\ndevice: {device}\nmodels: {{a: {models[0]}, b: {models[1]}}}\n"
                      f"steps:\n  - fuse: {{plugin: linear, max_shard_mb: {shard_mb}, as: merged}}\noutput: {out}\n")
    return [sys.executable, "-m", "surgery.cli", "run", str(recipe)], out


def mergekit_command(mergekit: str, root: Path, models: list[Path], shard_mb: float, dtype: str,
                     device: str) -> tuple[list[str], Path]:
    out = root / "mergekit"
    config = root / "mergekit.yaml"
    config.write_text(f"merge_method: linear\ndtype: {dtype}\nmodels:\n"
                      f"  - model: {models[0]}\n    parameters: {{weight: 0.5}}\n"
                      f"  - model: {models[1]}\n    parameters: {{weight: 0.5}}\n")
    command = [mergekit, str(config), str(out), "--lazy-unpickle", "--out-shard-size", str(int(shard_mb * MIB)),
               "--no-copy-tokenizer", "--no-write-model-card", "--quiet", "--device", device]
    return command, out


def _merged_dir(out: Path) -> Path:
    found = sorted({p.parent for p in out.rglob("*.safetensors")})
    if len(found) != 1:
        raise SystemExit(f"{out}: expected one directory of safetensors files, found {found}")
    return found[0]


def largest_difference(a: Path, b: Path) -> float:
    """Largest |a - b| over every tensor of two (sharded) safetensors directories."""
    from safetensors import safe_open

    def tensors(directory: Path) -> dict[str, Path]:
        names = {}
        for file in directory.glob("*.safetensors"):
            with safe_open(str(file), framework="pt") as handle:
                names.update({name: file for name in handle.keys()})
        return names

    left, right = tensors(a), tensors(b)
    if set(left) != set(right):
        raise SystemExit(f"the merges hold different tensors: {sorted(set(left) ^ set(right))[:5]}")
    worst = 0.0
    for name, file in left.items():
        with safe_open(str(file), framework="pt") as ha, safe_open(str(right[name]), framework="pt") as hb:
            worst = max(worst, float((ha.get_tensor(name).double() - hb.get_tensor(name).double()).abs().max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit", default=None, help="path of mergekit-yaml (in its own venv)")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=13)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--shard-mb", type=float, default=256.0, help="output shard cap (MiB), both tools")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", default=None, help="keep the checkpoints here between runs (default: a temp dir)")
    parser.add_argument("--smoke", action="store_true", help="tiny checkpoints, one run: checks that the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.hidden, args.layers, args.vocab, args.repeats, args.shard_mb = 64, 2, 256, 1, 0.1

    mergekit = args.mergekit and shutil.which(args.mergekit)
    if args.mergekit and not mergekit:
        print(f"mergekit-yaml not found at {args.mergekit}: running ours only")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="merge-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        models, params = make_checkpoints(workdir, args.hidden, args.layers, args.vocab, args.dtype)
        size = (models[0] / "model.safetensors").stat().st_size
        print(f"two Llama checkpoints: {params / 1e6:.1f}M parameters, {size / MIB:.0f} MiB each ({args.dtype}); "
              f"linear merge, output shards <= {args.shard_mb:g} MiB; device {args.device}")
        tools = {"ours": ours_command(workdir, models, args.shard_mb, args.device)}
        if mergekit:
            tools["mergekit"] = mergekit_command(mergekit, workdir, models, args.shard_mb, args.dtype, args.device)
        results: dict[str, list[dict[str, float]]] = {name: [] for name in tools}
        print(f"{'run':<5}{'tool':<10}{'wall s':>8}{'peak RSS MiB':>14}{'peak anon MiB':>15}")
        for repeat in range(args.repeats):
            order = list(tools) if repeat % 2 == 0 else list(reversed(tools))
            for name in order:
                command, out = tools[name]
                shutil.rmtree(out, ignore_errors=True)
                figures = run_sampled(command, workdir / f"{name}.log")
                results[name].append(figures)
                print(f"{repeat:<5}{name:<10}{figures['wall']:>8.2f}{figures['rss']:>14.0f}{figures['anon']:>15.0f}", flush=True)
        if mergekit:
            diff = largest_difference(_merged_dir(tools["ours"][1]), _merged_dir(tools["mergekit"][1]))
            pairs = list(zip(results["ours"], results["mergekit"]))
            for key, label in (("wall", "wall time"), ("rss", "peak RSS"), ("anon", "peak anonymous memory")):
                ratios = [o[key] / m[key] for o, m in pairs]
                print(f"ours / mergekit, {label:<22} median {statistics.median(ratios):.2f}x "
                      f"(pairs: {', '.join(f'{r:.2f}' for r in ratios)})")
            print(f"largest |ours - mergekit| over all tensors: {diff:.1e}")
        else:
            for key in ("wall", "rss", "anon"):
                print(f"ours, median {key}: {statistics.median(r[key] for r in results['ours']):.2f}")
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
