"""Capture cost of LAPE: N_s sampled paths per input against one teacher-forced capture.

On the same probe inputs (zoo prompts, or ``--model`` any causal LM with ``--data stdlib-text``),
times the median of ``--repeats`` runs of:
- ``teacher-forced``: one streamed capture (:class:`surgery.engines.capture.Capture`) of every layer's MLP
  activations and outputs over the inputs' full texts, batch ``--batch-size``;
- ``lape N_s=1``: LAPE with one path per input (generation with the KV cache + one reading pass);
- ``lape N_s=8`` (``--paths``): the same with N_s paths per input, generated in one batch per
  ``--batch-size`` inputs (rows = inputs x N_s).
Goal (issue 6): lape(N_s) <= N_s x lape(1), i.e. no per-path loop beyond batched generation.

    python benchmarks/lape_cost.py [--model builtin:tiny-llama/base] [--inputs 32] [--paths 8] [--len-max 16]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from surgery.runtime.manager import Manager

REGISTRIES = Manager().registries
from surgery.engines.capture import Capture, mlp_activations, mlp_outputs
from surgery.engines.paths import PathSettings, encode_model, prompt_ids
from surgery.models.data import batches


def load(name: str, device: str):
    from surgery.models.loading import ModelSpec, load_model

    loaded = load_model("model", ModelSpec(path=name), REGISTRIES, device)
    return loaded.module, loaded.tokenizer


def probe_examples(data: str, inputs: int) -> list[dict]:
    if data == "synthetic":
        from surgery.models.zoo.tasks import make_examples

        return make_examples("synthetic-mix", inputs, seed=0, split="train")
    from surgery.models.data import DataSpec
    from surgery.plugins.data_sources import load_stdlib_text

    return load_stdlib_text(DataSpec(source="stdlib-text", options={"words": 24, "shuffle": True}), 0)[:inputs]


def median_s(run: Callable[[], None], repeats: int, device: str) -> float:
    def synced() -> None:
        run()
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    synced()  # warm-up: the first trace at a code site is parsed and cached
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        synced()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:tiny-llama/base")
    parser.add_argument("--data", default="synthetic", choices=["synthetic", "stdlib-text"])
    parser.add_argument("--inputs", type=int, default=32)
    parser.add_argument("--paths", type=int, default=8)
    parser.add_argument("--len-min", type=int, default=4)
    parser.add_argument("--len-max", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds: checks that the script runs")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(inputs=2, paths=2, len_min=2, len_max=4, batch_size=2, repeats=1)
    torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model, args.device)
    model_view = REGISTRIES.view(model)
    examples = probe_examples(args.data, args.inputs)
    prompts = prompt_ids(tokenizer, examples)
    plan = {str(layer.index): [mlp_activations(layer), mlp_outputs(layer)] for layer in model_view.layers}

    def teacher_forced() -> None:
        engine = Capture(model, plan)
        for batch in batches(examples, tokenizer, args.batch_size, None):
            engine.add(batch)
        engine.result()

    def lape(paths: int) -> Callable[[], None]:
        settings = PathSettings(paths=paths, len_min=args.len_min, len_max=args.len_max)
        return lambda: encode_model(model, model_view, prompts, settings, batch_size=args.batch_size)

    tf = median_s(teacher_forced, args.repeats, args.device)
    one = median_s(lape(1), args.repeats, args.device)
    many = median_s(lape(args.paths), args.repeats, args.device)
    print(f"model {args.model}, {args.inputs} inputs, paths of {args.len_min}..{args.len_max} tokens, "
          f"batch {args.batch_size} inputs, {args.threads} thread(s), {args.device}")
    print(f"{'teacher-forced capture':<26}{tf:9.3f} s   1.00x")
    print(f"{'lape N_s=1':<26}{one:9.3f} s {one / tf:6.2f}x")
    print(f"{f'lape N_s={args.paths}':<26}{many:9.3f} s {many / tf:6.2f}x   "
          f"= {many / one:.2f} x lape N_s=1 (goal <= {args.paths})")


if __name__ == "__main__":
    main()
