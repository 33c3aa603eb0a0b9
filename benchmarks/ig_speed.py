"""Integrated gradients: integration points batched in one trace vs a loop of one trace per point.

Prints, measured in one run on the same model and input:
- joint IG (all gates along one path), ``steps`` points: batched / loop wall time and their ratio
  (goal: batched >= 3x faster at batch 1 x seq 32 with 16 points);
- per-layer IG (``layers x steps`` points): the same ratio;
- the batched joint run (one trace of ``points x batch`` rows plus the endpoints) against a plain
  forward+backward of the same ``points x batch`` rows, no gates, no weight gradients (parameters
  frozen, gradient down to the input embeddings): what IG costs per integration point beyond the
  passes it cannot avoid;
- the largest difference between batched and looped attributions (they must agree to 1e-5).

With ``--profile`` it also prints torch.profiler tables (operators by self CPU time) of one batched
and one looped joint run, which show where the time of each goes.

    .venv/bin/python benchmarks/ig_speed.py                      # defaults: batch 1, seq 32, 16 points
    .venv/bin/python benchmarks/ig_speed.py --batch 4 --seq 128 --threads 1 --device cuda
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from surgery.runtime.manager import Manager

REGISTRIES = Manager().registries
from surgery.engines.gates import head_sites, repeat_rows
from surgery.plugins.ig import baseline_values, ig_joint, ig_per_layer, quadrature


def timed(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up: the first trace at a code site is parsed and cached
    times, result = [], None
    for _ in range(repeats):
        _sync()
        start = time.perf_counter()
        result = fn()
        _sync()
        times.append(time.perf_counter() - start)
    return min(times), result  # best of the repeats: the least disturbed by other processes


def paired(fast, slow, repeats: int) -> tuple[float, float, float, object, object]:
    """Best times of ``fast`` and ``slow`` run alternately, and the median of the per-pair ratios
    slow/fast (robust to load that changes during the run)."""
    fast(), slow()
    ratios, fast_times, slow_times = [], [], []
    for _ in range(repeats):
        t_fast, a = timed_once(fast)
        t_slow, b = timed_once(slow)
        fast_times.append(t_fast)
        slow_times.append(t_slow)
        ratios.append(t_slow / t_fast)
    return min(fast_times), min(slow_times), statistics.median(ratios), a, b


def timed_once(fn) -> tuple[float, object]:
    _sync()
    start = time.perf_counter()
    result = fn()
    _sync()
    return time.perf_counter() - start, result


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--points", type=int, default=16)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables of a batched and a looped run")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds: checks that the script runs")
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(seq=8, points=2, layers=2, hidden=32, heads=2, repeats=1)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=max(64, args.seq))
    model = LlamaForCausalLM(config).eval().to(args.device)
    sites = head_sites(REGISTRIES.view(model))
    ids = torch.randint(0, 1024, (args.batch, args.seq)).to(args.device)
    objective = REGISTRIES.objectives.get("causal-lm")
    batch = objective.prepare({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.Generator())
    loss_fn = objective.loss
    base = baseline_values("zero", sites)
    t, w = quadrature("gauss-legendre", args.points)
    everything = 10**6

    print(f"Llama {args.layers} layers x {args.heads} heads, hidden {args.hidden}; batch {args.batch} x seq {args.seq}; "
          f"{args.points} points; device {args.device}, torch threads {torch.get_num_threads()}")
    joint_batched, joint_loop, joint_ratio, a, b = paired(
        lambda: ig_joint(model, sites, batch, loss_fn, base, t, w, everything),
        lambda: ig_joint(model, sites, batch, loss_fn, base, t, w, 1), args.repeats)
    joint_diff = float((a.per_sample - b.per_sample).abs().max())
    layer_batched, layer_loop, layer_ratio, c, d = paired(
        lambda: ig_per_layer(model, sites, batch, loss_fn, base, t, w, everything),
        lambda: ig_per_layer(model, sites, batch, loss_fn, base, t, w, 1), args.repeats)
    layer_diff = float((c.per_sample - d.per_sample).abs().max())

    rows = repeat_rows(batch, args.points)
    frozen = [p.requires_grad_(False) for p in model.parameters()]

    def plain_step() -> None:  # the same rows as the batched trace, no gates, no weight gradients
        embeds = model.get_input_embeddings()(rows["input_ids"]).requires_grad_(True)
        logits = model(inputs_embeds=embeds, attention_mask=rows["attention_mask"], use_cache=False).logits
        torch.autograd.grad(loss_fn(logits, rows).sum(), embeds)

    plain_ratio = statistics.median(b / a for a, b in (
        (timed_once(plain_step)[0], timed_once(lambda: ig_joint(model, sites, batch, loss_fn, base, t, w, everything))[0])
        for _ in range(args.repeats)))
    plain, _ = timed(plain_step, args.repeats)
    for p in frozen:
        p.requires_grad_(True)
    print(f"{'':<28}{'batched':>10}{'loop':>10}{'loop/batched':>14}{'max |diff|':>12}   (best times; median ratio of pairs)")
    print(f"{'joint IG':<28}{joint_batched * 1e3:>8.1f}ms{joint_loop * 1e3:>8.1f}ms{joint_ratio:>13.2f}x{joint_diff:>12.1e}")
    print(f"{'per-layer IG':<28}{layer_batched * 1e3:>8.1f}ms{layer_loop * 1e3:>8.1f}ms{layer_ratio:>13.2f}x{layer_diff:>12.1e}")
    print(f"plain forward+backward of the {args.points} x {args.batch} rows, no weight gradients: {plain * 1e3:.1f}ms")
    print(f"batched joint IG ({args.points} points + 2 endpoints) / that plain pass: {plain_ratio:.2f}x "
          f"(median of pairs); per integration point {joint_batched / args.points * 1e3:.2f}ms vs "
          f"{plain / args.points * 1e3:.2f}ms per row of the plain pass")
    if args.profile:
        profile("batched", lambda: ig_joint(model, sites, batch, loss_fn, base, t, w, everything))
        profile("loop", lambda: ig_joint(model, sites, batch, loss_fn, base, t, w, 1))


def profile(label: str, fn) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    fn()
    with torch_profile(activities=activities) as prof:
        fn()
        _sync()
    print(f"\n--- joint IG, {label}: operators by self CPU time ---")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40))

if __name__ == "__main__":
    main()
