"""Cost of one preference-optimisation step: DPO vs TDPO's SeqKL vs FPO's SAE constraint.

Seed 002 claims the SAE constraint is far cheaper than a token-level KL over the vocabulary. This
script measures one training step (policy forward and backward on the chosen and rejected halves of
the same batch, the loss, AdamW) for each loss on the same model and batch, in one run:

- ``dpo``: sequence log-ratios against cached reference log-probabilities (no constraint);
- ``tdpo2``: plus SeqKL, which needs the reference's full next-token distribution at every
  response position, so the reference model runs every step (caching it would take T x V floats
  per example);
- ``fpo``: plus the SAE constraint on the policy's residual stream; the reference's pooled
  features (d_sae floats per example) are cached.

Each loss runs in a fresh process. Time: median over ``--steps`` steps after one warm-up step.
Peak memory: on CUDA, the peak allocated during the measured steps above what was allocated before
them; on the CPU, the process's peak RSS minus its RSS just before the first step (so it includes
AdamW's state, the same for every loss). Models are built from a config with
random weights: cost does not depend on what the weights are.

    python benchmarks/constraint_cost.py                          # CPU, vocabulary 32000
    python benchmarks/constraint_cost.py --device cuda --hidden 576 --layers 8 --vocab 49152 --batch 8 --seq 256
"""
from __future__ import annotations

import argparse
import copy
import multiprocessing
import resource
import statistics
import time

import torch

LOSSES = ("dpo", "tdpo2", "fpo")


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                         max_position_embeddings=max(64, args.seq), tie_word_embeddings=False)
    policy = LlamaForCausalLM(config).to(args.device)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(1)
    half = args.seq // 2
    batch = {}
    prompt = torch.randint(3, args.vocab, (args.batch, half), generator=generator)
    for side in ("chosen", "rejected"):
        response = torch.randint(3, args.vocab, (args.batch, args.seq - half), generator=generator)
        ids = torch.cat([prompt, response], dim=1)
        batch[f"{side}_input_ids"] = ids
        batch[f"{side}_attention_mask"] = torch.ones_like(ids)
        batch[f"{side}_answer_mask"] = torch.cat([torch.zeros_like(prompt), torch.ones_like(response)], dim=1)
    return policy, reference, batch


def constraint_for(loss: str, reference: torch.nn.Module, args: argparse.Namespace):
    from surgery.engines import preference as po
    from surgery.engines.sae import SAEConfig, SparseAutoencoder, site_path
    from surgery.plugins.fpo import FeatureConstraint, LogitConstraint
    from surgery.runtime.manager import Manager

    if loss == "tdpo2":
        return LogitConstraint(reference, po.seqkl)
    if loss == "fpo":
        sae = SparseAutoencoder(SAEConfig(d_in=args.hidden, d_sae=args.expansion * args.hidden, architecture="topk", k=args.k))
        return FeatureConstraint(reference, sae, site_path(Manager().registries.view(reference), -1), args.k)
    return None


def cache_for(loss: str, reference, constraint, batch: dict, args) -> dict[str, torch.Tensor]:
    """What the tune step caches per example, built the way ``surgery.engines.tuning.reference_cache`` does."""
    from surgery.engines.preference import sequence_logps
    from surgery.models.data import split_preference

    cache: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for side, part in zip(("chosen", "rejected"), split_preference(batch)):
            part = {k: v.to(args.device) for k, v in part.items()}
            logp, length = sequence_logps(reference(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits, part)
            cache[f"{side}/logp"], cache[f"{side}/length"] = logp, length
            if constraint is not None and constraint.cacheable:
                for key, value in constraint.reference(part).items():
                    cache[f"{side}/{key}"] = value
    return cache


def measure(loss: str, args: argparse.Namespace, queue=None) -> dict:
    from surgery.engines import tuning

    torch.set_num_threads(args.threads)
    policy, reference, batch = build(args)
    constraint = constraint_for(loss, reference, args)
    cache = cache_for(loss, reference, constraint, batch, args)
    cached_bytes = sum(v.numel() * v.element_size() for v in cache.values()) // args.batch
    settings = tuning.TuneSettings(loss=loss, batch_size=args.batch, max_tokens=args.seq)
    loss_fn = tuning.PreferenceLoss(settings, policy, reference if loss == "tdpo2" else None, constraint)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    index = torch.arange(args.batch)

    def step() -> None:
        loss_b, _ = loss_fn(batch, cache, index)
        optimizer.zero_grad(set_to_none=True)
        loss_b.mean().backward()
        optimizer.step()

    cuda = args.device.startswith("cuda")
    rss_before = _current_rss_mib()
    step()  # warm-up: allocates AdamW's state and caches the nnsight trace
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        allocated = torch.cuda.memory_allocated()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - allocated) / 2**20 if cuda else _peak_rss_mib() - rss_before
    result = {"loss": loss, "ms": 1000 * statistics.median(times), "peak_mib": peak, "cached_bytes": cached_bytes,
              "uncached_bytes": 2 * (args.seq - args.seq // 2) * args.vocab * 4 if loss == "tdpo2" else 0}
    if queue is not None:
        queue.put(result)
    return result


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _current_rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run_isolated(loss: str, args: argparse.Namespace) -> dict:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=measure, args=(loss, args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--expansion", type=int, default=16, help="SAE features per residual dimension")
    parser.add_argument("--k", type=int, default=32, help="SAE TopK and FPO's top-k")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds: checks that the script runs")
    args = parser.parse_args()
    if args.smoke:  # in this process: a fresh one per loss costs more than the tiny steps
        vars(args).update(vocab=256, hidden=64, layers=1, batch=2, seq=16, expansion=2, k=4, steps=1)
    results = [measure(loss, args) if args.smoke else run_isolated(loss, args) for loss in LOSSES]
    base = results[0]
    print(f"device {args.device}; vocab {args.vocab}, hidden {args.hidden}, layers {args.layers}, "
          f"batch {args.batch} x seq {args.seq} (half response), SAE {args.expansion * args.hidden} features, k {args.k}")
    print(f"{'loss':<7} {'step ms':>9} {'x dpo':>6} {'peak MiB':>9} {'x dpo':>6} {'cached B/ex':>12} {'ref dist B/ex':>14}")
    for r in results:
        print(f"{r['loss']:<7} {r['ms']:>9.1f} {r['ms'] / base['ms']:>6.2f} {r['peak_mib']:>9.1f} "
              f"{r['peak_mib'] / max(base['peak_mib'], 1e-9):>6.2f} {r['cached_bytes']:>12,} {r['uncached_bytes']:>14,}")
    print("ref dist B/ex: what caching TDPO's reference distributions would take per example (so it is recomputed each step)")


if __name__ == "__main__":
    main()
