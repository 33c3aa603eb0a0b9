"""Prune orders on hand-made scores, plans, and saved models that reload with the gated model's logits."""
from __future__ import annotations

import json

import pytest
import torch
from attribution_fixtures import run_steps, save_checkpoint, write_probe
from plugin_registries import manager, registries, view
from tiny_models import build, make_batch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from surgery.core.artifacts import Artifact
from surgery.core.errors import ModelError, SurgeryError
from surgery.engines.gates import head_sites, neuron_sites
from surgery.models.loading import ModelSpec, load_model
from surgery.models.pruned import PrunedLlamaForCausalLM, compact_model
from surgery.plugins.prune import (
    Units, compactable, depth_ratios, global_plan, magnitude_order, random_order, ranks_of, removed_params,
    restore_columns, sign_aware_order, zeroed_columns
)
from surgery.runtime.recipe import load_recipe
from surgery.runtime.runner import run_recipe

# --- orders on hand-made scores ---------------------------------------------------------------

SCORES = [0.5, -0.02, 0.01, -0.9, 0.3, 0.0, -0.3, 2.0]
#          0     1     2     3     4    5     6    7


def test_magnitude_prunes_smallest_absolute_score_first():
    assert magnitude_order(SCORES) == [5, 2, 1, 4, 6, 0, 3, 7]


def test_sign_aware_prunes_harmful_largest_first_then_smallest_magnitude_useful_last():
    order = sign_aware_order(SCORES)
    # harmful heads (score > 0), largest first
    assert order[:4] == [7, 0, 4, 2]
    # then the rest by smallest |score|: the near-zero heads, and the most useful head (-0.9) last
    assert order[4:] == [5, 1, 6, 3]
    # the seed's example code (importance = score, or |score| + 100 for useful heads, smallest first)
    # prunes the least harmful head first: the opposite of the description for harmful heads
    seed_importance = [s if s >= 0 else abs(s) + 100 for s in SCORES]
    seed_order = sorted(range(len(SCORES)), key=lambda i: seed_importance[i])
    assert seed_order[0] == 5 and seed_order.index(7) > seed_order.index(2)


def test_sign_aware_with_a_harmful_threshold_treats_small_positives_as_negligible():
    order = sign_aware_order(SCORES, harmful_min=0.4)
    assert order[:2] == [7, 0]  # clearly harmful, largest first
    assert order[2:] == [5, 2, 1, 4, 6, 3]  # then by |score|; -0.9 still last


def test_random_order_is_a_seeded_permutation():
    assert sorted(random_order(10, 3)) == list(range(10))
    assert random_order(10, 3) == random_order(10, 3) != random_order(10, 4)


def test_depth_ratios_follow_the_seed_boundaries_on_32_layers():
    ratios = depth_ratios(32, [0.2, 0.3, 0.15], [5 / 32, 20 / 32])
    assert ratios[:5] == [0.2] * 5 and ratios[5:20] == [0.3] * 15 and ratios[20:] == [0.15] * 12


# --- plans ------------------------------------------------------------------------------------

def _units(model, target="heads"):
    v = view(model)
    return Units(head_sites(v) if target == "heads" else neuron_sites(v), v, target)


def test_global_plan_prunes_the_first_fraction_of_the_order():
    units = _units(build("llama-gqa"))  # 2 layers x 4 heads
    mask = global_plan(units, [7, 0, 5, 1, 2, 3, 4, 6], 0.5)
    assert mask.nonzero().tolist() == [[0, 0], [0, 1], [1, 1], [1, 3]]


def test_compactable_keeps_equal_heads_per_kv_group_and_one_head_per_layer():
    units = _units(build("llama-gqa"))  # 4 query heads, 2 KV groups of 2
    order = [0, 1, 2, 4, 5, 6, 7, 3]
    mask = compactable(units, global_plan(units, order, 0.75), ranks_of(units, order))
    for layer in range(2):
        per_group = [int(mask[layer, 0:2].sum()), int(mask[layer, 2:4].sum())]
        assert per_group[0] == per_group[1] and per_group[0] < 2
    assert int(mask.sum()) == 4  # one slice per layer is all a 2-heads-per-group layer can lose
    # a layer that cannot take its share passes the rest on: 4 heads wanted, all in layer 1 first
    order = [4, 5, 6, 7, 0, 2, 1, 3]
    mask = compactable(units, global_plan(units, order, 0.5), ranks_of(units, order))
    assert mask.tolist() == [[True, False, True, False], [True, False, True, False]]
    mha = _units(build("llama"))
    everything = torch.ones(2, 4, dtype=torch.bool)
    kept = ~compactable(mha, everything, ranks_of(mha, list(range(8))))
    assert kept.sum(1).tolist() == [1, 1] and kept[0, 3] and kept[1, 3]  # the last in the order stays


# --- saved models -----------------------------------------------------------------------------

def _gated_logits(model, units_list, masks, batch):
    """Logits with pruned units gated to 0 (the reference every saved model must reproduce)."""
    from surgery.engines.gates import gated_losses

    captured = {}

    def keep_logits(logits_btv, batch):
        captured["logits"] = logits_btv
        return logits_btv.sum((1, 2))

    sites = [s for units in units_list for s in units.sites]
    rows = batch["input_ids"].shape[0]
    gates = [(~mask[l, :s.units]).float().expand(rows, -1) for units, mask in zip(units_list, masks)
             for l, s in enumerate(units.sites)]
    gated_losses(model, sites, batch, gates, keep_logits)
    return captured["logits"]


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("arch,target", [("llama-gqa", "heads"), ("llama-gqa", "neurons"), ("gpt2", "heads"),
                                         ("gpt2", "neurons"), ("bert", "heads")])
def test_masked_output_reloads_with_stock_class_and_gated_logits(tmp_path, arch, target):
    model = build(arch)
    units = _units(model, target)
    mask = global_plan(units, random_order(units.total, 0), 0.4)
    batch = make_batch(arch)
    expected = _gated_logits(model, [units], [mask], batch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saved = zeroed_columns(model, units, mask)
    model.save_pretrained(tmp_path)
    restore_columns(saved)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # restored exactly
    reloaded = type(model).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded, batch), expected, rtol=0, atol=1e-5)


def test_compact_uniform_heads_write_a_stock_config(tmp_path):
    model = build("llama-gqa")
    v = view(model)
    compact = compact_model(model, v, [[0, 1], [2, 3]], None)  # one KV group left per layer
    assert type(compact) is LlamaForCausalLM
    assert (compact.config.num_attention_heads, compact.config.num_key_value_heads) == (2, 1)
    compact.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["head_dim"] == 8
    batch = make_batch("llama-gqa")
    units = _units(model)
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded, batch), _gated_logits(model, [units], [mask], batch), rtol=0, atol=1e-5)


def test_compact_non_uniform_reloads_through_the_registered_class(tmp_path):
    model = build("llama-gqa")
    v = view(model)
    head_mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    neuron_mask = torch.zeros(2, 48, dtype=torch.bool)
    neuron_mask[0, ::3] = True
    neuron_mask[1, :40] = True
    keep_heads = [[h for h in range(4) if not head_mask[l, h]] for l in range(2)]
    keep_neurons = [[i for i in range(48) if not neuron_mask[l, i]] for l in range(2)]
    compact = compact_model(model, v, keep_heads, keep_neurons)
    assert type(compact) is PrunedLlamaForCausalLM
    assert compact.config.heads_per_layer == [2, 4] and compact.config.intermediate_per_layer == [32, 8]
    compact.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is PrunedLlamaForCausalLM
    batch = make_batch("llama-gqa")
    expected = _gated_logits(model, [_units(model), _units(model, "neurons")], [head_mask, neuron_mask], batch)
    torch.testing.assert_close(_logits(reloaded, batch), expected, rtol=0, atol=1e-5)
    # every removed parameter is accounted for
    removed = (removed_params(model, _units(model), head_mask)
               + removed_params(model, _units(model, "neurons"), neuron_mask))
    assert sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in reloaded.parameters()) == removed


def test_registered_class_checks_shapes_strictly(tmp_path):
    model = build("llama-gqa")
    compact = compact_model(model, view(model), [[0, 1], [0, 1, 2, 3]], None)
    compact.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["heads_per_layer"], config["kv_heads_per_layer"] = [4, 4], [2, 2]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="k_proj.weight' has shape"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ModelError, match="k_proj.weight' has shape"):  # never re-initialised at random
        AutoModelForCausalLM.from_pretrained(tmp_path, ignore_mismatched_sizes=True)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="safetensors"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_compact_refuses_unequal_kv_groups():
    model = build("llama-gqa")
    with pytest.raises(ModelError, match="KV groups"):
        compact_model(model, view(model), [[0, 1, 2], [0, 1, 2, 3]], None)


def test_compact_gpt2_neurons_uniform(tmp_path):
    model = build("gpt2")
    units = _units(model, "neurons")
    mask = torch.zeros(2, units.counts[0], dtype=torch.bool)
    mask[:, 1::4] = True
    compact = compact_model(model, view(model), None, [[i for i in range(units.counts[0]) if not mask[l, i]] for l in range(2)])
    compact.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    batch = make_batch("gpt2")
    torch.testing.assert_close(_logits(reloaded, batch), _gated_logits(model, [units], [mask], batch), rtol=0, atol=1e-5)


# --- through recipes --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
    return save_checkpoint(root / "model"), write_probe(root / "probe.jsonl"), root


def test_prune_recipes_report_objective_params_curve_and_reload(workspace):
    model, probe, root = workspace
    out = run_steps(root, "strategies", model, probe, [
        {"attribute": {"plugin": "ig", "steps": 8}},
        {"prune": {"plugin": "magnitude", "fraction": 0.5, "as": "mag"}},
        {"prune": {"plugin": "sign-aware", "fraction": 0.5, "output": "compact", "as": "sa", "models": ["base"]}},
        {"prune": {"plugin": "random", "fraction": 0.5, "as": "rnd", "models": ["base"]}},
        {"prune": {"plugin": "layerwise", "ratios": [0.5, 0.25, 0.25], "bounds": [0.5, 1.0], "as": "lw", "models": ["base"]}},
        {"attribute": {"plugin": "ig", "steps": 8, "models": ["sa"], "name": "again"}},
    ])
    for step in ("01-prune-magnitude", "02-prune-sign-aware", "03-prune-random", "04-prune-layerwise"):
        artifact = Artifact.load(out / step)
        meta = artifact.meta
        assert meta["params_removed"] > 0 and meta["curve"][0] == [0.0, pytest.approx(meta["objective_before"])]
        assert meta["objective_after"] == pytest.approx(meta["objective_after_gated"], abs=1e-5)
        assert (out / step / "prune_curve.png").is_file()
        assert int(artifact.tensors["head_mask"].sum()) == round(meta["fraction_pruned"] * 8)
    layerwise = Artifact.load(out / "04-prune-layerwise")
    assert layerwise.tensors["head_mask"].sum(1).tolist() == [2.0, 1.0]
    compact = Artifact.load(out / "02-prune-sign-aware")
    reloaded = load_model("sa", ModelSpec(path=str(compact.model_dir)), registries())
    assert sum(p.numel() for p in reloaded.module.parameters()) == compact.meta["params_after"]
    assert compact.meta["params_before"] - compact.meta["params_after"] == compact.meta["params_removed"]
    again = Artifact.load(out / "05-attribute-ig")  # the pruned model is attributed again, per-layer sizes and all
    assert again.meta["units_per_layer"] == [4 - int(n) for n in compact.tensors["head_mask"].sum(1).tolist()]


def test_iterative_reattributes_until_the_limit(workspace):
    model, probe, root = workspace
    out = run_steps(root, "iterative", model, probe, [
        {"prune": {"plugin": "iterative", "step": 0.25, "max_fraction": 0.75, "max_increase": 10.0,
                   "attribute": {"plugin": "grad-x-act", "absolute": False}}},
    ])
    meta = Artifact.load(out / "00-prune-iterative").meta
    assert [round(f, 2) for f, _ in meta["curve"]] == [0.0, 0.25, 0.5, 0.75]
    assert meta["fraction_pruned"] == 0.75
    assert meta["stopped"] == "max_fraction"
    strict = run_steps(root, "iterative-strict", model, probe, [
        {"prune": {"plugin": "iterative", "step": 0.25, "max_fraction": 0.75, "max_increase": 0.0,
                   "attribute": {"plugin": "ig", "steps": 4}}},
    ])
    meta = Artifact.load(strict / "00-prune-iterative").meta
    before = meta["objective_before"]
    assert all(loss <= before * (1 + 1e-12) for _, loss in meta["curve"])  # every kept round within the limit
    if meta["stopped"] == "objective":
        assert meta["rejected"][1] > before and meta["rejected"][0] > meta["fraction_pruned"]
    else:
        assert meta["fraction_pruned"] == 0.75


def test_sign_aware_refuses_unsigned_scores(workspace):
    model, probe, root = workspace
    with pytest.raises(SurgeryError, match="signed"):
        run_steps(root, "unsigned", model, probe, [
            {"attribute": {"plugin": "grad-x-act"}},
            {"prune": {"plugin": "sign-aware", "fraction": 0.25}},
        ])


def test_zoo_gqa_compact_prune_reloads_with_the_gated_logits(tmp_path):
    data = {"probe": {"source": "synthetic", "tasks": ["copy", "reverse"], "n": 8, "seed": 0, "batch_size": 8}}
    steps = [{"attribute": {"plugin": "ig", "steps": 4, "answer_only": True}},
             {"prune": {"plugin": "magnitude", "fraction": 0.5, "output": "compact", "curve": [0.5]}},
             {"prune": {"plugin": "magnitude", "fraction": 0.5, "output": "masked", "curve": [], "models": ["base"]}}]
    recipe = tmp_path / "zoo.yaml"
    recipe.write_text(json.dumps({"name": "zoo", "models": {"base": "builtin:tiny-llama-gqa/base"}, "data": data, "steps": steps}))
    parsed = load_recipe(recipe, manager(), [], str(tmp_path / "run"))
    run_recipe(parsed, manager(), quiet=True)
    compact, masked = Artifact.load(parsed.output / "01-prune-magnitude"), Artifact.load(parsed.output / "02-prune-magnitude")
    base = load_model("base", parsed.models["base"], registries())
    units = _units(base.module)
    batch = make_batch("llama-gqa")
    batch["input_ids"] = batch["input_ids"] % base.module.config.vocab_size
    for artifact in (compact, masked):
        mask = artifact.tensors["head_mask"].bool()
        kv_groups = mask.view(2, 2, 2).sum(-1)  # [layer, group]: pruned heads per KV group
        if artifact is compact:
            assert (kv_groups[:, 0] == kv_groups[:, 1]).all()
        reloaded = AutoModelForCausalLM.from_pretrained(artifact.model_dir).eval()
        torch.testing.assert_close(_logits(reloaded, batch), _gated_logits(base.module, [units], [mask], batch),
                                   rtol=0, atol=1e-5)


@pytest.mark.slow
def test_smollm2_compact_and_masked_prunes_reload_with_the_gated_logits(tmp_path):
    from surgery.models.data import batches

    # float64: with 30 layers, float32 sums over 6 instead of 9 heads differ from the gated sums by
    # ~4e-5 on logits of size ~20 (rounding order, not a slicing error)
    loaded = load_model("smollm2", ModelSpec(path="builtin:smollm2-135m"), registries())
    model, units = loaded.module.double(), _units(loaded.module)
    mask = units.empty_mask()  # 9 query heads in 3 KV groups of 3 per layer
    mask[0, [0, 3, 6]] = True  # one head of every group: 6 heads left
    mask[5, [1, 2, 4, 5, 7, 8]] = True  # two of every group: 3 heads left
    mask[29, [3, 4, 5]] = True  # a whole group: 6 heads, 2 KV groups
    batch = next(batches([{"text": "Pruned heads must not change what the gated model computes."}] * 2,
                         loaded.tokenizer, 2, 12))
    expected = _gated_logits(model, [units], [mask], batch)
    compact = compact_model(model, loaded.view, [[h for h in range(9) if not mask[l, h]] for l in range(30)], None)
    assert compact.config.heads_per_layer[:6] == [6, 9, 9, 9, 9, 3] and compact.config.kv_heads_per_layer[29] == 2
    compact.save_pretrained(tmp_path / "compact")
    del compact
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "compact", dtype=torch.float64).eval()
    assert type(reloaded) is PrunedLlamaForCausalLM
    torch.testing.assert_close(_logits(reloaded, batch), expected, rtol=0, atol=1e-5)
    removed = removed_params(model, units, mask)
    assert sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in reloaded.parameters()) == removed
    del reloaded
    saved = zeroed_columns(model, units, mask)
    try:
        model.save_pretrained(tmp_path / "masked")
    finally:
        restore_columns(saved)
    masked = LlamaForCausalLM.from_pretrained(tmp_path / "masked", dtype=torch.float64).eval()
    torch.testing.assert_close(_logits(masked, batch), expected, rtol=0, atol=1e-5)
