"""The capture engine and its streamed statistics.

Oracles: statistics streamed over batches equal the statistics of the concatenated real tokens
(uniform and non-uniform weights, with padding); ``merge`` equals the statistics of the union;
sketches do not depend on how rows are batched or padded, are identical across models on the same
rows, and their cosines approximate correlations; the Fisher diagonal equals one from PyTorch hooks
and ``backward``; the ``mean`` plugin run from a recipe equals a hand computation.
"""
from __future__ import annotations

import json

import pytest
import torch
from plugin_registries import view
from tiny_models import build, make_batch

from surgery.core.errors import NumericError
from surgery.core.io import read_tensors, write_tensors
from surgery.engines.capture import (
    Capture, Site, Stats, Stream, capture, fold, mlp_activations, mlp_write_projection, sketch_basis, sketch_correlation
)
from surgery.models.adapters import module_at
from surgery.plugins.objectives import CausalLM

A, B = Site("a"), Site("b")
STREAMS = (Stream("a", A, absolute=True, sketch=True, cross=("b",)), Stream("b", B, sketch=True),
           Stream("pb", B, project=torch.randn(4, 3, generator=torch.Generator().manual_seed(9))))


def synthetic_batches(seed: int, rows: int = 7, tokens: int = 6, per_batch: int = 3, left_pad: bool = False):
    """Random per-token values of two sites ``[B, T, 4]``, ragged rows padded per batch."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, tokens + 1, (rows,), generator=g).tolist()
    a_rows = [torch.randn(n, 4, generator=g) for n in lengths]
    b_rows = [a[:, :1] * 0.5 + torch.randn(len(a), 4, generator=g) for a in a_rows]
    w_rows = [torch.rand(n, generator=g) * 2 for n in lengths]
    batches = []
    for start in range(0, rows, per_batch):
        idx = range(start, min(start + per_batch, rows))
        width = max(lengths[i] for i in idx)
        mask = torch.zeros(len(idx), width, dtype=torch.long)
        a = torch.full((len(idx), width, 4), float("nan"))  # padding holds garbage: it must never count
        b = torch.full((len(idx), width, 4), float("nan"))
        w = torch.full((len(idx), width), 7.0)
        for r, i in enumerate(idx):
            span = slice(width - lengths[i], width) if left_pad else slice(0, lengths[i])
            mask[r, span], a[r, span], b[r, span], w[r, span] = 1, a_rows[i], b_rows[i], w_rows[i]
        batches.append({"values": {A: a, B: b}, "mask": mask, "w": w, "rows": list(idx)})
    return batches, torch.cat(a_rows).double(), torch.cat(b_rows).double(), torch.cat(w_rows).double()


def stream_stats(batches, uniform: bool, k: int = 8) -> Stats:
    stats = Stats()
    for batch in batches:
        w = batch["mask"].float() if uniform else batch["w"] * batch["mask"]
        fold(stats, STREAMS, batch["values"], w, batch["mask"], basis_btk=sketch_basis(batch["mask"], batch["rows"], k, seed=3))
    return stats


@pytest.mark.parametrize("uniform", [True, False], ids=["uniform", "weighted"])
def test_streamed_statistics_equal_those_of_the_concatenated_tokens(uniform):
    batches, a, b, w = synthetic_batches(0)
    w = torch.ones_like(w) if uniform else w
    stats = stream_stats(batches, uniform)
    total = w.sum()

    def wmean(x):
        return (w[:, None] * x).sum(0) / total

    assert stats.count == len(a) and stats.weight == pytest.approx(float(total))
    assert torch.allclose(stats.mean("a"), wmean(a)) and torch.allclose(stats.mean("b"), wmean(b))
    assert torch.allclose(stats.second_moment("a"), wmean(a * a))
    assert torch.allclose(stats.mean_abs("a"), wmean(a.abs()))
    assert torch.allclose(stats.cross_moment("a", "b"), wmean(a * b))
    projected = b @ STREAMS[2].project.double()
    assert torch.allclose(stats.mean("pb"), wmean(projected), atol=1e-6)
    cov = wmean(a * b) - wmean(a) * wmean(b)
    rho = cov / (wmean(a * a) - wmean(a) ** 2).sqrt() / (wmean(b * b) - wmean(b) ** 2).sqrt()
    assert torch.allclose(stats.correlation("a", "b"), rho, atol=1e-6)
    assert rho[0] > 0.2  # b's first feature was built from a's


def test_merge_equals_the_statistics_of_the_union_and_round_trips_through_safetensors(tmp_path):
    batches, *_ = synthetic_batches(1, rows=9)
    whole = stream_stats(batches, uniform=False)
    first, second = stream_stats(batches[:1], uniform=False), stream_stats(batches[1:], uniform=False)
    for merged in (first.merge(second), second + first):
        assert set(merged.sums) == set(whole.sums)
        for key in whole.sums:
            assert torch.allclose(merged.sums[key], whole.sums[key], atol=1e-10), key
    write_tensors(tmp_path / "s.safetensors", whole.tensors(prefix="m/0/"))
    loaded = Stats.from_tensors(read_tensors(tmp_path / "s.safetensors"), prefix="m/0/")
    assert all(torch.equal(loaded.sums[k], whole.sums[k]) for k in whole.sums)


def test_sketches_do_not_depend_on_batching_or_padding_side():
    reference = stream_stats(synthetic_batches(2, per_batch=3)[0], uniform=False)
    for batching in (dict(per_batch=2), dict(per_batch=7, left_pad=True), dict(per_batch=1)):
        other = stream_stats(synthetic_batches(2, **batching)[0], uniform=False)
        for key in ("a/sketch", "b/sketch", "sketch_basis"):
            assert torch.allclose(other.sums[key], reference.sums[key], atol=1e-5), (batching, key)


def test_centred_sketch_cosines_approximate_weighted_correlations():
    g = torch.Generator().manual_seed(4)
    rows, tokens, k = 40, 50, 1024
    base = torch.randn(rows, tokens, 3, generator=g)
    mix = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [-0.3, 0.0, 0.95]])
    values = base @ mix.T + 2.0  # three features with known correlations and a non-zero mean
    w = torch.rand(rows, tokens, generator=g)
    mask = torch.ones(rows, tokens, dtype=torch.long)
    stats = Stats()
    fold(stats, [Stream("v", A, sketch=True)], {A: values}, w, mask, basis_btk=sketch_basis(mask, range(rows), k, seed=0))
    x = values.reshape(-1, 3).double()
    wf = w.reshape(-1, 1).double()
    centred = (x - (wf * x).sum(0) / wf.sum()) * wf.sqrt()
    exact = (centred.T @ centred) / torch.outer(centred.norm(dim=0), centred.norm(dim=0))
    approx = sketch_correlation(stats.sketch("v"), stats.sketch("v"))
    assert (approx - exact).abs().max() < 0.12
    assert exact[0, 1] > 0.7 and exact[0, 2] < -0.2


def test_sketch_bases_are_shared_across_models_and_seeded():
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    one = sketch_basis(mask, [5, 6], k=4, seed=1)
    assert torch.equal(one, sketch_basis(mask, [5, 6], k=4, seed=1))
    assert torch.equal(one[1, 1:], sketch_basis(torch.tensor([[1, 1, 1]]), [6], k=4, seed=1)[0])  # left padding
    assert not torch.equal(one, sketch_basis(mask, [5, 6], k=4, seed=2))
    assert torch.all(one[mask == 0] == 0)


@pytest.fixture(scope="module")
def llama():
    model = build("llama")
    return model, view(model)


def fisher_by_hand(model, layer, batches, weighter=None):
    """Weighted sum of (dL/da)^2 at the down projection's input, with hooks and backward."""
    seen = []

    def keep_grad(_module, args):
        args[0].retain_grad()
        seen.append(args[0])

    hook = module_at(model, layer.mlp.down).register_forward_pre_hook(keep_grad)
    total = torch.zeros(layer.mlp.intermediate_size, dtype=torch.float64)
    for batch in batches:
        seen.clear()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        CausalLM().loss(logits, CausalLM().prepare(batch, None)).sum().backward()
        w = batch["attention_mask"].float() if weighter is None else weighter.weights(None, batch["input_ids"], batch["attention_mask"])
        total += (w[..., None] * seen[0].grad.square()).sum((0, 1)).double()
    hook.remove()
    model.zero_grad()
    return total


class TokenParity:
    """A non-uniform weighter: odd token ids weigh 2, even ones 0.5."""

    def weights(self, logits_btv, input_ids_bt, mask_bt):
        return torch.where(input_ids_bt % 2 == 1, 2.0, 0.5) * mask_bt


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_fisher_equals_hooks_and_backward(llama, frozen):
    model, v = llama
    batches = [make_batch("llama", seed=5), make_batch("llama", rows=2, tokens=7, seed=6)]
    layer = v.layers[0]
    expected = fisher_by_hand(model, layer, batches, TokenParity())
    model.requires_grad_(not frozen)
    try:
        stats = capture(model, batches, {"0": [mlp_activations(layer, fisher=True)]}, objective=CausalLM(), weighter=TokenParity())["0"]
    finally:
        model.requires_grad_(True)
    assert torch.allclose(stats.sums["act/fisher"], expected, rtol=1e-4, atol=1e-12)
    assert float(expected.sum()) > 0
    w = torch.cat([TokenParity().weights(None, b["input_ids"], b["attention_mask"]).reshape(-1) for b in batches])
    assert stats.weight == pytest.approx(float(w.sum()))


def test_engine_statistics_do_not_depend_on_the_batching(llama):
    model, v = llama
    rows = make_batch("llama", rows=6, tokens=8, seed=7)
    rows["attention_mask"][1, 5:] = 0
    splits = [[slice(0, 6)], [slice(0, 2), slice(2, 5), slice(5, 6)]]
    plan = {str(l.index): [mlp_activations(l, sketch=True, cross=("write",)), mlp_write_projection(model, l)] for l in v.layers}
    results = []
    for split in splits:
        batches = []
        for part in split:
            batch = {k: t[part] for k, t in rows.items()}
            width = int(batch["attention_mask"].sum(1).max())  # trim padding columns: rows differ in width
            batches.append({k: t[:, :width] for k, t in batch.items()})
        results.append(capture(model, batches, plan, weighter=TokenParity(), sketch_dim=16, seed=3))
    for group in results[0]:
        for key, value in results[0][group].sums.items():
            assert torch.allclose(results[1][group].sums[key], value, atol=1e-5), key
    s = results[0]["1"]
    assert s.sketch("act").shape == (16, v.layers[1].mlp.intermediate_size)
    assert (s.correlation("act", "write").abs() <= 1).all()


def test_identical_models_get_identical_sketches(llama):
    model, v = llama
    twin = build("llama")
    batches = [make_batch("llama", seed=8), make_batch("llama", seed=9)]
    plan = {"1": [mlp_activations(v.layers[1], sketch=True)]}
    one, two = capture(model, batches, plan, seed=11), capture(twin, batches, plan, seed=11)
    assert torch.equal(one["1"].sums["act/sketch"], two["1"].sums["act/sketch"])
    corr = sketch_correlation(one["1"].sketch("act"), two["1"].sketch("act"))
    assert torch.allclose(corr.diagonal(), torch.ones(corr.shape[0], dtype=corr.dtype), atol=1e-6)


def test_non_finite_statistics_and_bad_plans_are_reported(llama):
    model, v = llama

    class Broken:
        def weights(self, logits_btv, input_ids_bt, mask_bt):
            return torch.full(mask_bt.shape, float("nan"))

    engine = Capture(model, {"0": [mlp_activations(v.layers[0])]}, weighter=Broken())
    engine.add(make_batch("llama"))
    with pytest.raises(NumericError, match="non-finite 'weight' in group '0'"):
        engine.result()
    with pytest.raises(ValueError, match="no objective"):
        Capture(model, {"0": [mlp_activations(v.layers[0], fisher=True)]})
    with pytest.raises(ValueError, match="unknown stream 'write'"):
        Capture(model, {"0": [mlp_activations(v.layers[0], cross=("write",))]})


@pytest.mark.parametrize("weighting", ["uniform", "tlinp"])
def test_mean_plugin_from_a_recipe_equals_a_hand_computation(tmp_path, weighting):
    from transformers import LlamaConfig, LlamaForCausalLM

    from surgery.core.artifacts import Artifact
    from surgery.models.data import batches as make_batches
    from surgery.models.zoo.tokenizer import VOCAB, build_tokenizer
    from surgery.plugins.tlinp import tlinp_weights
    from surgery.runtime.manager import Manager
    from surgery.runtime.recipe import validate
    from surgery.runtime.runner import run_recipe

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    tokenizer = build_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    texts = ["1 2 3 red", "copy: 4 5 6 7 8 = 4 5", "blue circle", "add: 3 4 = 7", "9 9 9 9 9 9"]
    (tmp_path / "probe.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    raw = {"name": "t", "seed": 0, "models": {"m": str(tmp_path / "m")},
           "data": {"probe": {"source": "jsonl", "path": str(tmp_path / "probe.jsonl"), "batch_size": 2}},
           "steps": [{"weight": {"plugin": weighting}}, {"capture": {"plugin": "mean", "layers": [1]}}],
           "output": str(tmp_path / "run")}
    manager = Manager()
    run_recipe(validate(raw, manager, base_dir=tmp_path), manager, quiet=True)
    artifact = Artifact.load(tmp_path / "run" / "01-capture-mean")
    assert sorted(artifact.tensors) == ["m/1/m2", "m/1/mean"]

    seen, weights, masks = [], [], []
    hook = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        for batch in make_batches([{"text": t} for t in texts], tokenizer, 2, 128):
            logits = model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            mask = batch["attention_mask"]
            w = tlinp_weights(logits, batch["input_ids"], mask) if weighting == "tlinp" else mask.float()
            weights.append(w.reshape(-1)[mask.reshape(-1).bool()])
            masks.append(mask.reshape(-1).bool())
    hook.remove()
    acts = torch.cat([a.reshape(-1, a.shape[-1]) for a in seen])[torch.cat(masks)].double()
    w = torch.cat(weights).double()[:, None]
    assert artifact.figures["m/tokens"] == len(acts)
    assert artifact.figures["m/weight"] == pytest.approx(float(w.sum()), rel=1e-6)
    assert torch.allclose(artifact.tensors["m/1/mean"].double(), (w * acts).sum(0) / w.sum(), atol=1e-6)
    assert torch.allclose(artifact.tensors["m/1/m2"].double(), (w * acts.square()).sum(0) / w.sum(), atol=1e-6)
    if weighting == "tlinp":
        assert not torch.allclose(artifact.tensors["m/1/mean"].double(), acts.mean(0), atol=1e-4)


def _sketch_basis_reference(mask_bt: torch.Tensor, rows_b, k: int, seed: int) -> torch.Tensor:
    """Token by token: real token j of row r gets row j of randn(real tokens of r, k) drawn from the
    generator seeded by (seed, r), scaled by 1/sqrt(k)."""
    from surgery.engines.capture import _row_seed

    basis = torch.zeros(*mask_bt.shape, k)
    for b, row in enumerate(rows_b):
        generator = torch.Generator().manual_seed(_row_seed(seed, int(row)))
        draws = torch.randn(int(mask_bt[b].sum()), k, generator=generator)
        j = 0
        for t in range(mask_bt.shape[1]):
            if mask_bt[b, t]:
                basis[b, t] = draws[j] / k ** 0.5
                j += 1
    return basis


def test_sketch_basis_equals_the_token_by_token_reference():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 0, 1, 1, 0]])
    rows = [7, 0, 3, 12]
    for k in (1, 4, 32):
        fast = sketch_basis(mask, rows, k, seed=5)
        assert torch.allclose(fast, _sketch_basis_reference(mask, rows, k, seed=5), rtol=0, atol=1e-7)
        assert bool((fast[mask == 0] == 0).all()) and bool((fast[mask == 1] != 0).all())
