"""Overhead of streamed capture over a bare forward pass.

An 8-layer, hidden-256 Llama (random init from its config), batch 8 x seq 128. Times, side by side,
the median of ``--repeats`` runs of:
- a bare forward of an unwrapped copy (``torch.no_grad``, no key/value cache, as the capture runs it),
- an nnsight trace of the same forward that reads nothing (the tracing cost alone),
- one ``Capture.add``: an nnsight trace reading every layer's MLP activations (down-projection
  input) and folding them into streamed statistics (weighted sum and sum of squares per neuron),
- the same with ``|a|`` sums, the write-direction projection and its cross term (FAM's forward-only
  statistics), for reference.
Goal: capture / bare <= 1.10.

    python benchmarks/capture_overhead.py [--repeats 15] [--threads N] [--device cuda]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable

import nnsight
import torch
import transformers
from nnsight import NNsight

from surgery.runtime.manager import Manager

REGISTRIES = Manager().registries
from surgery.engines.capture import Capture, mlp_activations, mlp_write_projection


def build_model(layers: int = 8, hidden: int = 256, vocab: int = 1024) -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def median_ms(run: Callable[[], None], repeats: int, device: torch.device) -> float:
    def synced() -> None:
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    synced()  # warm-up (first trace at a code site is parsed and cached)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        synced()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds: checks that the script runs")
    args = parser.parse_args()
    sizes = {"layers": 2, "hidden": 32, "vocab": 128} if args.smoke else {}
    rows, tokens = (2, 16) if args.smoke else (8, 128)
    if args.smoke:
        args.repeats = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_model(**sizes).to(device)
    layers = REGISTRIES.view(model).layers
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    batch = {"input_ids": torch.randint(0, vocab, (rows, tokens), generator=generator).to(device),
             "attention_mask": torch.ones(rows, tokens, dtype=torch.long, device=device)}

    unwrapped = copy.deepcopy(model)  # nnsight installs a forward wrapper on every module it wraps

    def bare() -> None:
        with torch.no_grad():
            unwrapped(**batch, use_cache=False)

    traced = NNsight(model)

    def empty_trace() -> None:
        with torch.no_grad(), traced.trace(**batch, use_cache=False):
            nnsight.save(traced.output)

    plain = Capture(model, {str(l.index): [mlp_activations(l)] for l in layers})
    fam = Capture(model, {str(l.index): [mlp_activations(l, absolute=True, cross=("write",)),
                                         mlp_write_projection(model, l)] for l in layers})
    # interleave the measurements so drifting machine load hits all of them alike
    runs = [bare, empty_trace, lambda: plain.add(batch), lambda: fam.add(batch)]
    rounds = [[median_ms(run, args.repeats, device) for run in runs] for _ in range(3)]
    bare_ms, empty_ms, plain_ms, fam_ms = (statistics.median(r[i] for r in rounds) for i in range(len(runs)))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    config = model.config
    print(f"model: llama {config.num_hidden_layers} layers, hidden {config.hidden_size}, intermediate "
          f"{config.intermediate_size}; batch {rows} x {tokens}; {where}")
    print(f"{'bare forward':<44}{bare_ms:9.1f} ms   1.00x")
    print(f"{'nnsight trace, nothing read':<44}{empty_ms:9.1f} ms   {empty_ms / bare_ms:.2f}x")
    print(f"{'capture MLP activations (mean, m2)':<44}{plain_ms:9.1f} ms   {plain_ms / bare_ms:.2f}x   (goal <= 1.10)")
    print(f"{'capture + |a|, write projection, cross':<44}{fam_ms:9.1f} ms   {fam_ms / bare_ms:.2f}x")


if __name__ == "__main__":
    main()
