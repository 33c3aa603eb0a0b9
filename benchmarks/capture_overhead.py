"""Overhead of streamed capture over the bare passes it rides on.

An 8-layer, hidden-256 Llama (random init from its config), batch 8 x seq 128. Each repeat runs,
back to back (so drifting machine load hits all of them alike):

- a bare forward of an unwrapped copy (``torch.no_grad``, no key/value cache, as the capture runs it);
- ``Capture.add`` reading every layer's MLP activations into streamed means and second moments;
- a bare forward+backward of the unwrapped copy: causal-LM loss, gradient down to the input
  embeddings, no weight gradients (``requires_grad`` off on every parameter): the passes FAM's
  Fisher term needs;
- the FAM capture as ``capture: fam`` runs it (:func:`surgery.plugins.fam.fam_streams` with the
  Fisher backward of the causal-LM objective and sketches of size 128, one ``Capture.add`` per batch).

It prints the median time of each and the medians of the per-repeat ratios capture / bare pass.
Goals: MLP means / bare forward <= 1.10; FAM capture / bare forward+backward <= 1.3.

    python benchmarks/capture_overhead.py [--repeats 15] [--threads N] [--device cuda] [--sketch-dim 128] [--smoke]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable

import torch
import transformers

from surgery.engines.capture import Capture, mlp_activations
from surgery.plugins.fam import fam_streams
from surgery.runtime.manager import Manager


def build_model(layers: int, hidden: int) -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=hidden * 4,
                                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 32),
                                      num_key_value_heads=max(1, hidden // 32))
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def once_ms(run: Callable[[], None], device: torch.device) -> float:
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--sketch-dim", type=int, default=128, help="FAM's default sketch size")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds: checks that the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.layers, args.hidden, args.batch, args.seq, args.repeats, args.sketch_dim = 2, 32, 2, 16, 1, 8
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    registries = Manager().registries
    objective = registries.objectives.get("causal-lm")
    model = build_model(args.layers, args.hidden).to(device)
    layers = registries.view(model).layers
    generator = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 1024, (args.batch, args.seq), generator=generator).to(device),
             "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long, device=device)}
    prepared = objective.prepare(batch, generator)

    unwrapped = copy.deepcopy(model)  # nnsight installs a forward wrapper on every module it wraps
    for parameter in unwrapped.parameters():
        parameter.requires_grad_(False)

    def bare_forward() -> None:
        with torch.no_grad():
            unwrapped(**batch, use_cache=False)

    def bare_forward_backward() -> None:
        embeds = unwrapped.get_input_embeddings()(batch["input_ids"]).requires_grad_(True)
        logits = unwrapped(inputs_embeds=embeds, attention_mask=batch["attention_mask"], use_cache=False).logits
        torch.autograd.grad(objective.loss(logits, prepared).sum(), embeds)

    plain = Capture(model, {str(l.index): [mlp_activations(l)] for l in layers})
    fam = Capture(model, {str(l.index): fam_streams(model, l, fisher=True) for l in layers},
                  objective=objective, sketch_dim=args.sketch_dim, seed=0)
    runs = {"bare forward": bare_forward, "capture MLP activations (mean, m2)": lambda: plain.add(batch),
            "bare forward+backward (no weight grads)": bare_forward_backward,
            "FAM capture (fisher, sketch, write proj.)": lambda: fam.add(batch)}
    for run in runs.values():  # warm-up (the first trace at a code site is parsed and cached)
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            times[name].append(once_ms(run, device))

    def ratio(num: str, den: str) -> float:
        return statistics.median(a / b for a, b in zip(times[num], times[den]))

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"model: llama {args.layers} layers, hidden {args.hidden}, intermediate {args.hidden * 4}; "
          f"batch {args.batch} x {args.seq}; {where}; {args.repeats} interleaved repeats")
    print(f"{'':<44}{'median ms':>10}   median ratio of pairs")
    rows = [("bare forward", None, ""),
            ("capture MLP activations (mean, m2)", "bare forward", "(goal <= 1.10)"),
            ("bare forward+backward (no weight grads)", "bare forward", ""),
            ("FAM capture (fisher, sketch, write proj.)", "bare forward+backward (no weight grads)", "(goal <= 1.30)")]
    for name, den, goal in rows:
        text = f"{name:<44}{statistics.median(times[name]):>10.1f}"
        if den:
            text += f"   {ratio(name, den):.2f}x {'forward' if den == 'bare forward' else 'fwd+bwd'} {goal}"
        print(text)


if __name__ == "__main__":
    main()
