"""Head gates, integrated gradients and the baseline attributions, checked against exact oracles:
finite differences, weight zeroing, the completeness axiom, a loop of single-point traces,
exhaustive Shapley enumeration and Shapley efficiency."""
from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from attribution_fixtures import causal_loss, run_steps, save_checkpoint, write_probe, write_recipe
from plugin_registries import manager, registries, view
from tiny_models import build, make_batch

from surgery.core.artifacts import Artifact
from surgery.core.errors import RecipeError
from surgery.engines.attribution import completeness
from surgery.engines.gates import gate_gradients, gated_losses, head_sites, neuron_sites
from surgery.models.adapters import module_at
from surgery.plugins.attribution_baselines import ablation, gate_gradient_at_one, shapley
from surgery.plugins.ig import baseline_values, ig_joint, ig_per_layer, quadrature
from surgery.runtime.recipe import load_recipe
from surgery.runtime.runner import run_recipe


def _batch(arch: str = "llama-gqa", rows: int = 2, tokens: int = 9) -> dict:
    batch = make_batch(arch, rows=rows, tokens=tokens)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def _nll64(logits_btv, labels_bt):
    """Per-row mean NLL in the logits' own precision (the objectives compute in float32)."""
    counted = labels_bt != -100
    logp = logits_btv.log_softmax(-1).gather(-1, labels_bt.clamp_min(0)[..., None])[..., 0]
    return -(logp * counted).sum(1) / counted.sum(1)


def _causal64(logits_btv, batch):
    return _nll64(logits_btv[:, :-1], batch["labels"][:, 1:])


def _mlm64(logits_btv, batch):
    return _nll64(logits_btv, batch["labels"])


LOSSES = {"llama-gqa": _causal64, "gpt2": _causal64, "bert": _mlm64}


# --- quadrature -------------------------------------------------------------------------------

@pytest.mark.parametrize("rule,steps,degree", [
    ("gauss-legendre", 4, 7), ("gauss-legendre", 32, 20), ("trapezoid", 2, 1), ("riemann-middle", 1, 1),
])
def test_quadrature_is_exact_for_polynomials_up_to_its_degree(rule, steps, degree):
    t, w = quadrature(rule, steps)
    for power in range(degree + 1):
        assert float((w * t**power).sum()) == pytest.approx(1 / (power + 1), abs=1e-12)


@pytest.mark.parametrize("rule", ["riemann-left", "riemann-right", "riemann-middle", "trapezoid", "gauss-legendre"])
def test_every_quadrature_converges(rule):
    t, w = quadrature(rule, 400)
    assert float((w * torch.exp(t)).sum()) == pytest.approx(math.e - 1, rel=3e-3)


# --- gates ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["gpt2", "bert"])  # float64 end to end (Llama's RMSNorm computes in float32)
def test_gate_gradients_match_finite_differences(arch):
    model = build(arch).double()
    sites = head_sites(view(model)) + neuron_sites(view(model))
    batch = _batch(arch)
    generator = torch.Generator().manual_seed(1)
    gates = [torch.rand(2, s.units, generator=generator, dtype=torch.float64) + 0.5 for s in sites]
    result = gate_gradients(model, sites, batch, gates, LOSSES[arch])
    for s, u in ((0, 1), (1, 3), (2, 5), (3, 0)):
        up = [g.clone() for g in gates]
        down = [g.clone() for g in gates]
        up[s][0, u] += 1e-5
        down[s][0, u] -= 1e-5
        diff = gated_losses(model, sites, batch, up, LOSSES[arch]) - gated_losses(model, sites, batch, down, LOSSES[arch])
        assert float(result.grads[s][0, u]) == pytest.approx(float(diff[0]) / 2e-5, rel=1e-6, abs=1e-10)
        assert float(diff[1]) == 0.0  # rows are independent


@pytest.mark.parametrize("arch", ["llama-gqa", "gpt2", "bert"])
def test_gate_gradients_match_plain_pytorch_hooks(arch):
    """The nnsight path against an independent one: forward pre-hooks scaling the same slices."""
    model = build(arch)
    sites = head_sites(view(model)) + neuron_sites(view(model))
    batch = _batch(arch)
    generator = torch.Generator().manual_seed(2)
    gates = [torch.rand(2, s.units, generator=generator) + 0.5 for s in sites]
    result = gate_gradients(model, sites, batch, gates, LOSSES[arch])
    leaves = [g.clone().requires_grad_(True) for g in gates]
    handles = []
    for site, gate in zip(sites, leaves):
        def scale(module, args, site=site, gate=gate):
            x = args[0]
            rows, tokens = x.shape[:2]
            return ((x.view(rows, tokens, site.units, site.unit_dim) * gate.view(rows, 1, site.units, 1)).view(x.shape),)
        handles.append(module_at(model, site.path).register_forward_pre_hook(scale))
    try:
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
        loss = LOSSES[arch](model(**inputs).logits, batch)
        loss.sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(result.loss_r, loss.detach())
    for got, leaf in zip(result.grads, leaves):
        torch.testing.assert_close(got, leaf.grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("arch", ["llama-gqa", "gpt2", "bert"])
def test_gate_zero_equals_zeroed_weight_slice(arch):
    model = build(arch)
    v = view(model)
    sites = head_sites(v)
    batch = _batch(arch)
    gates = [torch.ones(2, s.units) for s in sites]
    gates[1][:, 2] = 0.0
    gated = gated_losses(model, sites, batch, gates, LOSSES[arch])
    weight = module_at(model, sites[1].path).weight
    d = sites[1].unit_dim
    with torch.no_grad():
        if arch == "gpt2":
            weight[2 * d:3 * d, :] = 0  # Conv1D: [in, out]
        else:
            weight[:, 2 * d:3 * d] = 0
    plain = gated_losses(model, sites, batch, [None] * len(sites), LOSSES[arch])
    torch.testing.assert_close(gated, plain, rtol=0, atol=1e-6)


# --- integrated gradients ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama():
    return build("llama-gqa")


@pytest.mark.parametrize("baseline", ["zero", "scalar", "random"])
def test_per_layer_completeness_gauss_legendre_32(llama, baseline):
    sites = head_sites(view(llama))
    base = baseline_values(baseline, sites, 0.3, seed=3)
    t, w = quadrature("gauss-legendre", 32)
    att = ig_per_layer(llama, sites, _batch(), causal_loss, base, t, w, points_per_chunk=64)
    check = completeness(att, per_layer=True)
    assert check["max_relative_error"] <= 0.01
    assert all(abs(d) > 1e-6 for d in check["objective_diff"])  # the check is not vacuous


@pytest.mark.parametrize("schedule", ["linear", "per-layer"])
def test_joint_completeness_gauss_legendre_32(llama, schedule):
    sites = head_sites(view(llama))
    t, w = quadrature("gauss-legendre", 32)
    att = ig_joint(llama, sites, _batch(), causal_loss, baseline_values("zero", sites), t, w, 64, schedule)
    check = completeness(att, per_layer=False)
    assert check["max_relative_error"] <= 0.01
    # per sample too: each row's attributions sum to its own loss difference
    per_row = att.per_sample.sum((1, 2))
    torch.testing.assert_close(per_row, att.loss_full - att.loss_base[:, 0], rtol=0.01, atol=1e-6)


def test_neuron_completeness(llama):
    sites = neuron_sites(view(llama))
    t, w = quadrature("gauss-legendre", 32)
    att = ig_per_layer(llama, sites, _batch(), causal_loss, baseline_values("zero", sites), t, w, 64)
    assert completeness(att, per_layer=True)["max_relative_error"] <= 0.01


@pytest.mark.parametrize("mode", ["per-layer", "joint"])
def test_batched_points_equal_a_loop_of_traces(llama, mode):
    sites = head_sites(view(llama))
    t, w = quadrature("riemann-middle", 6)
    base = baseline_values("scalar", sites, 0.2)
    run = ig_per_layer if mode == "per-layer" else ig_joint
    batched = run(llama, sites, _batch(), causal_loss, base, t, w, 1000)
    looped = run(llama, sites, _batch(), causal_loss, base, t, w, 1)
    torch.testing.assert_close(batched.per_sample, looped.per_sample, rtol=0, atol=1e-5)
    torch.testing.assert_close(batched.loss_base, looped.loss_base, rtol=0, atol=1e-5)


# --- baselines --------------------------------------------------------------------------------

def test_ablation_equals_one_head_off_at_a_time(llama):
    sites = head_sites(view(llama))
    batch = _batch()
    att = ablation(llama, sites, batch, causal_loss, 0.0, points_per_chunk=3)
    ones = [torch.ones(2, s.units) for s in sites]
    full = gated_losses(llama, sites, batch, ones, causal_loss)
    for l, u in itertools.product(range(len(sites)), range(sites[0].units)):
        gates = [g.clone() for g in ones]
        gates[l][:, u] = 0
        expected = full - gated_losses(llama, sites, batch, gates, causal_loss)
        torch.testing.assert_close(att.per_sample[:, l, u].float(), expected, rtol=0, atol=1e-6)


def test_grad_x_act_is_the_gradient_at_one(llama):
    sites = head_sites(view(llama))
    batch = _batch()
    att = gate_gradient_at_one(llama, sites, batch, causal_loss)
    result = gate_gradients(llama, sites, batch, [torch.ones(2, s.units) for s in sites], causal_loss)
    for l in range(len(sites)):
        torch.testing.assert_close(att.per_sample[:, l].float(), result.grads[l])


def test_shapley_with_every_order_equals_enumeration():
    model = build("llama-gqa")
    sites = head_sites(view(model))[:1]  # 4 heads of layer 0: 24 orders, 16 coalitions
    batch = _batch()
    n = sites[0].units
    coalition_loss = {}
    for members in itertools.product([0, 1], repeat=n):
        gates = [torch.tensor([members] * 2, dtype=torch.float32)]
        coalition_loss[members] = gated_losses(model, sites, batch, gates, causal_loss).double()
    exact = torch.zeros(2, n, dtype=torch.float64)
    for h in range(n):
        for members, loss in coalition_loss.items():
            if members[h]:
                continue
            size = sum(members)
            with_h = tuple(1 if i == h else m for i, m in enumerate(members))
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            exact[:, h] += weight * (coalition_loss[with_h] - loss)

    att = shapley(model, sites, batch, causal_loss, math.factorial(n), torch.Generator(), "all", 0.0, 64)
    torch.testing.assert_close(att.per_sample[:, 0], exact, rtol=0, atol=1e-6)


@pytest.mark.parametrize("scope", ["all", "per-layer"])
def test_shapley_efficiency_holds_for_sampled_orders(llama, scope):
    sites = head_sites(view(llama))
    att = shapley(llama, sites, _batch(), causal_loss, 3, torch.Generator().manual_seed(0), scope, 0.0, 64)
    assert completeness(att, per_layer=scope == "per-layer")["max_abs_error"] < 1e-6


# --- through recipes --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("ig")
    return save_checkpoint(root / "model"), write_probe(root / "probe.jsonl"), root


def test_ig_recipe_writes_scores_per_sample_check_and_heatmap(workspace):
    model, probe, root = workspace
    out = run_steps(root, "ig", model, probe, [
        {"attribute": {"plugin": "ig", "quadrature": "gauss-legendre", "steps": 32, "keep_per_sample": True}},
        {"attribute": {"plugin": "ig", "mode": "joint", "schedule": "per-layer", "steps": 32, "name": "joint",
                       "memory_mb": 0.05}},
    ])
    per_layer, joint = Artifact.load(out / "00-attribute-ig"), Artifact.load(out / "01-attribute-ig")
    assert per_layer.tensors["scores"].shape == (2, 4)
    assert per_layer.tensors["per_sample"].shape == (6, 2, 4)
    torch.testing.assert_close(per_layer.tensors["per_sample"].mean(0), per_layer.tensors["scores"])
    assert per_layer.meta["completeness"]["max_relative_error"] <= 0.01
    assert joint.meta["completeness"]["max_relative_error"] <= 0.01
    assert (out / "00-attribute-ig" / "heatmap.png").stat().st_size > 1000


def test_options_are_checked_before_loading(workspace):
    model, probe, root = workspace
    bad = [{"attribute": {"plugin": "ig", "objective": "causal-llm"}}]
    with pytest.raises(RecipeError, match="causal-lm"):
        load_recipe(write_recipe(root / "bad.yaml", model, probe, bad), manager())
    bad = [{"attribute": {"plugin": "ig", "schedule": "per-layer"}}]
    with pytest.raises(RecipeError, match="joint"):
        load_recipe(write_recipe(root / "bad2.yaml", model, probe, bad), manager())


# --- on a trained zoo model -------------------------------------------------------------------

ZOO_DATA = {"probe": {"source": "synthetic", "tasks": ["copy", "reverse", "sort", "inc"], "n": 32, "seed": 0,
                      "batch_size": 8}}


def _zoo_run(root, name, model, steps, data=ZOO_DATA):
    recipe = root / f"{name}.yaml"
    recipe.write_text(json.dumps({"name": name, "seed": 0, "models": {"base": model}, "data": data, "steps": steps}))
    parsed = load_recipe(recipe, manager(), [], str(root / f"run-{name}"))
    run_recipe(parsed, manager(), quiet=True)
    return parsed.output


def test_zoo_completeness_gauss_legendre_32_per_layer_and_joint(tmp_path):
    """The acceptance check: |sum IG - objective difference| <= 1% of the difference, per layer
    (per-layer mode) and in total (joint mode, with and without the per-layer schedule)."""
    ig = {"plugin": "ig", "quadrature": "gauss-legendre", "steps": 32, "answer_only": True}
    out = _zoo_run(tmp_path, "zoo-ig", "builtin:tiny-llama/base", [
        {"attribute": {**ig, "mode": "per-layer"}},
        {"attribute": {**ig, "mode": "joint", "name": "joint"}},
        {"attribute": {**ig, "mode": "joint", "schedule": "per-layer", "name": "scheduled"}},
    ])
    for step in ("00-attribute-ig", "01-attribute-ig", "02-attribute-ig"):
        check = Artifact.load(out / step).meta["completeness"]
        assert check["max_relative_error"] <= 0.01, (step, check)
        assert min(abs(d) for d in check["objective_diff"]) > 0.1  # heads matter: the check has teeth
    assert len(Artifact.load(out / "00-attribute-ig").meta["completeness"]["sum_ig"]) == 2  # one per layer


def test_zoo_masked_diffusion_and_baselines_run_on_the_bidirectional_model(tmp_path):
    out = _zoo_run(tmp_path, "zoo-llada", "builtin:tiny-llada/base", [
        {"attribute": {"plugin": "ig", "objective": "masked-diffusion", "steps": 8, "answer_only": True}},
        {"attribute": {"plugin": "shapley", "objective": "masked-diffusion", "permutations": 2, "answer_only": True}},
        {"attribute": {"plugin": "ablation", "objective": "masked-diffusion", "answer_only": True}},
    ])
    ig_art, shap, abl = (Artifact.load(out / d) for d in ("00-attribute-ig", "01-attribute-shapley", "02-attribute-ablation"))
    assert ig_art.meta["objective"] == "masked-diffusion" and torch.isfinite(ig_art.tensors["scores"]).all()
    assert shap.meta["completeness"]["max_abs_error"] < 1e-4  # Shapley efficiency, exact
    # the same seeded masks in every step: one objective value for all three
    assert ig_art.figures["objective"] == pytest.approx(abl.figures["objective"]) == pytest.approx(shap.figures["objective"])


def test_recipes_validate():
    from pathlib import Path

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    mine = ["ig", "ig-joint", "ig-grad-x-act", "attribution-baselines", "ig-diffusion", "prune-random",
            "prune-random-diffusion", "prune-compact", "prune-compact-random", "ig-smollm2",
            "prune-random-smollm2", "ig-smollm2-samples", "ig-samples"]
    for name in mine:
        recipe = load_recipe(recipes / f"{name}.yaml", manager())
        assert recipe.steps


# --- SmolLM2-135M (slow: converts once into $SURGERY_CACHE) -------------------------------------

@pytest.mark.slow
def test_smollm2_per_layer_completeness_on_deep_layers():
    from plugin_registries import get_objective

    from surgery.models.data import batches
    from surgery.models.loading import ModelSpec, load_model

    loaded = load_model("smollm2", ModelSpec(path="builtin:smollm2-135m"), registries())
    sites = head_sites(loaded.view)[-3:]  # 9 query heads over 3 KV groups each
    assert [s.units for s in sites] == [9, 9, 9]
    text = [{"text": "The capital of France is Paris, and the capital of Italy is Rome."}]
    objective = get_objective("causal-lm")
    batch = objective.prepare(next(batches(text, loaded.tokenizer, 1, 16)), torch.Generator())
    t, w = quadrature("gauss-legendre", 8)
    att = ig_per_layer(loaded.module, sites, batch, objective.loss, baseline_values("zero", sites), t, w, 8)
    check = completeness(att, per_layer=True)
    assert check["max_relative_error"] <= 0.01, check
