"""Wanda and Taylor scores against hand-written oracles (hooks, autograd by parameter), the
layer-matched random control, the embedding-distortion objective, and the model/objective check."""
from __future__ import annotations

import json

import pytest
import torch
import transformers as tf

from attribution_fixtures import run_steps, save_checkpoint, tokenizer, write_probe
from plugin_registries import get_objective, manager
from tiny_models import VOCAB, build

from surgery.core.artifacts import Artifact
from surgery.core.errors import RecipeError
from surgery.core.io import read_tensors
from surgery.models.embeddings import pool, pooling_mode
from surgery.models.objectives import with_reference
from surgery.plugins.prune import Units, layer_matched_mask, matched_counts
from surgery.plugins.retrieval import rank_scores
from surgery.runtime.recipe import load_recipe

HEAD_DIM = 8  # tiny models: hidden 32, 4 heads


def scores_of(run, prefix: str) -> torch.Tensor:
    """The scores of the run's step whose directory starts with ``prefix`` (its index)."""
    return read_tensors(next(run.glob(f"{prefix}*")) / "tensors.safetensors")["scores"].double()


def probe_batch(probe, rows: int = 6) -> dict:
    texts = [json.loads(line)["text"] for line in probe.read_text().splitlines()[:rows]]
    return dict(tokenizer()(texts, padding=True, return_tensors="pt"))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("baselines")
    return root, save_checkpoint(root / "llama", "llama"), write_probe(root / "probe.jsonl", samples=6)


def test_wanda_is_weight_magnitude_times_input_norm_per_head_and_neuron(llama):
    root, model_dir, probe = llama
    run = run_steps(root, "wanda", model_dir, probe, [
        {"attribute": {"plugin": "wanda", "name": "heads"}},
        {"attribute": {"plugin": "wanda", "target": "neurons", "name": "neurons"}}])
    model = tf.LlamaForCausalLM.from_pretrained(model_dir).eval()
    batch = probe_batch(probe)
    inputs = {}
    hooks = [module.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0]))
             for name, module in model.named_modules() if name.endswith(("o_proj", "down_proj"))]
    with torch.no_grad():
        model(**batch)
    for hook in hooks:
        hook.remove()
    mask = batch["attention_mask"].bool()
    for l, layer in enumerate(model.model.layers):
        x = inputs[f"model.layers.{l}.self_attn.o_proj"][mask].double()  # [tokens, 32]
        per_weight = layer.self_attn.o_proj.weight.double().abs() * x.norm(dim=0)[None, :]
        expected = per_weight.view(32, 4, HEAD_DIM).sum((0, 2))
        assert torch.allclose(scores_of(run, "00-")[l, :4], expected, rtol=1e-5)
        x = inputs[f"model.layers.{l}.mlp.down_proj"][mask].double()
        expected = (layer.mlp.down_proj.weight.double().abs() * x.norm(dim=0)[None, :]).sum(0)
        assert torch.allclose(scores_of(run, "01-")[l, :48], expected, rtol=1e-5)


def _grads(model, batch):
    model.zero_grad()
    loss = get_objective("causal-lm").loss(model(**batch).logits, {**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)})
    loss.sum().backward()
    return {name: (p.detach() * p.grad).abs().double() for name, p in model.named_parameters() if p.grad is not None}


def test_taylor_sums_weight_times_gradient_over_each_units_own_slices(llama):
    root, model_dir, probe = llama
    run = run_steps(root, "taylor", model_dir, probe, [
        {"attribute": {"plugin": "taylor", "name": "heads"}},
        {"attribute": {"plugin": "taylor", "target": "neurons", "name": "neurons"}}])
    model = tf.LlamaForCausalLM.from_pretrained(model_dir).eval()
    batch = probe_batch(probe)
    batch = {**batch, "input_ids": batch["input_ids"]}
    saliency = _grads(model, batch)
    for l in range(2):
        p = f"model.layers.{l}"
        for h in range(4):
            rows = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
            # no GQA here: q, k and v rows are the head's own, plus its output-projection columns
            expected = sum(float(saliency[f"{p}.self_attn.{q}.weight"][rows].sum()) for q in ("q_proj", "k_proj", "v_proj"))
            expected += float(saliency[f"{p}.self_attn.o_proj.weight"][:, rows].sum())
            assert scores_of(run, "00-")[l, h] == pytest.approx(expected, rel=1e-4)
        expected = (saliency[f"{p}.mlp.gate_proj.weight"].sum(1) + saliency[f"{p}.mlp.up_proj.weight"].sum(1)
                    + saliency[f"{p}.mlp.down_proj.weight"].sum(0))
        assert torch.allclose(scores_of(run, "01-")[l, :48], expected, rtol=1e-4)


def test_taylor_on_gpt2_reads_each_heads_three_blocks_of_the_fused_projection(tmp_path):
    model_dir = save_checkpoint(tmp_path / "gpt2", "gpt2")
    probe = write_probe(tmp_path / "probe.jsonl", samples=6)
    run = run_steps(tmp_path, "taylor-gpt2", model_dir, probe, [{"attribute": {"plugin": "taylor", "name": "heads"}}])
    model = tf.GPT2LMHeadModel.from_pretrained(model_dir).eval()
    saliency = _grads(model, probe_batch(probe))
    for h in range(4):
        cols = [c for k in range(3) for c in range(k * 32 + h * HEAD_DIM, k * 32 + (h + 1) * HEAD_DIM)]
        expected = float(saliency["transformer.h.0.attn.c_attn.weight"][:, cols].sum())
        expected += float(saliency["transformer.h.0.attn.c_attn.bias"][cols].sum())
        expected += float(saliency["transformer.h.0.attn.c_proj.weight"][h * HEAD_DIM:(h + 1) * HEAD_DIM].sum())
        assert scores_of(run, "00-")[0, h] == pytest.approx(expected, rel=1e-4)


def test_a_magnitude_prune_reads_wanda_scores_and_the_layer_matched_control_copies_its_counts(llama):
    root, model_dir, probe = llama
    run = run_steps(root, "matched", model_dir, probe, [
        {"attribute": {"plugin": "wanda"}},
        {"prune": {"plugin": "magnitude", "fraction": 0.5, "save_model": False, "curve": [], "name": "wanda-prune"}},
        {"prune": {"plugin": "layer-matched-random", "seed": 1, "save_model": False, "models": ["base"],
                   "inputs": {"prune": "wanda-prune"}, "name": "matched"}}])
    wanda = scores_of(run, "00-attribute")
    chosen = read_tensors(run / "01-prune-magnitude" / "tensors.safetensors")["head_mask"].bool()
    flat = wanda[:, :4].flatten()
    assert set(flat[chosen.flatten()].tolist()) == set(flat.sort().values[:4].tolist())  # the 4 smallest
    matched = read_tensors(run / "02-prune-layer-matched-random" / "tensors.safetensors")["head_mask"].bool()
    assert matched.sum(1).tolist() == chosen.sum(1).tolist()


def test_layer_matched_masks_keep_counts_and_vary_with_the_seed():
    units = Units.__new__(Units)
    units.sites, units.target = [type("S", (), {"units": 20})() for _ in range(3)], "heads"
    masks = [layer_matched_mask(units, [5, 0, 12], seed) for seed in range(4)]
    assert all(m.sum(1).tolist() == [5, 0, 12] for m in masks)
    assert len({tuple(m.flatten().tolist()) for m in masks}) == 4
    artifact = Artifact(meta={"target": "neurons", "units_per_layer": [20, 20, 20], "pruned_per_layer": [1, 2, 3]})
    with pytest.raises(Exception, match="pruned neurons"):
        matched_counts(artifact, units, "steps[2].prune")


# --- embedding models -------------------------------------------------------------------------------

def save_encoder(directory, pooling: str | None = "mean"):
    torch.manual_seed(0)
    model = tf.BertModel(tf.BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=72, pad_token_id=0)).eval()
    model.save_pretrained(directory)
    tokenizer().save_pretrained(directory)
    if pooling is not None:
        (directory / "modules.json").write_text(json.dumps([{"idx": 1, "name": "1", "path": "1_Pooling",
                                                             "type": "sentence_transformers.models.Pooling"}]))
        (directory / "1_Pooling").mkdir()
        (directory / "1_Pooling" / "config.json").write_text(json.dumps({f"pooling_mode_{k}": k == pooling for k in
                                                                         ("cls_token", "mean_tokens", "max_tokens")}
                                                                        | {"pooling_mode_mean_tokens": pooling == "mean",
                                                                           "pooling_mode_cls_token": pooling == "cls"}))
    return model


def test_pooling_follows_the_sentence_transformers_config_else_the_architecture(tmp_path):
    (tmp_path / "cls").mkdir()
    model = save_encoder(tmp_path / "cls", "cls")
    assert pooling_mode(tmp_path / "cls", model) == "cls"
    assert pooling_mode(tmp_path, model) == "mean"
    assert pooling_mode(None, build("llama")) == "last"
    hidden = torch.arange(24.0).view(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(pool(hidden, mask, "mean")[0], hidden[0, :2].mean(0))
    assert torch.equal(pool(hidden, mask, "last")[0], hidden[0, 1])
    assert torch.equal(pool(hidden, mask, "max")[0], hidden[0, 1])


def test_embedding_distortion_is_zero_unmodified_and_one_minus_cosine_otherwise(tmp_path):
    model = save_encoder(tmp_path, "mean")
    batch = dict(tokenizer()(["w5 w6 w7 w8", "w9 w10"], padding=True, return_tensors="pt"))
    objective = get_objective("embedding-distortion")
    prepared = with_reference(objective, model, objective.prepare(batch, torch.Generator()), tmp_path)
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
        assert objective.loss(hidden, prepared).abs().max() < 1e-6
        other = hidden + torch.randn(hidden.shape, generator=torch.Generator().manual_seed(0))
    m = batch["attention_mask"][..., None].float()
    e, ref = (other * m).sum(1) / m.sum(1), (hidden * m).sum(1) / m.sum(1)
    expected = 1 - (e * ref).sum(-1) / (e.norm(dim=-1) * ref.norm(dim=-1))
    assert torch.allclose(objective.loss(other, prepared), expected, atol=1e-6)


def test_ig_of_the_embedding_distortion_on_an_encoder_is_complete_per_layer(tmp_path):
    save_encoder(tmp_path / "enc", "mean")
    probe = write_probe(tmp_path / "probe.jsonl", samples=4)
    run = run_steps(tmp_path, "ig-enc", tmp_path / "enc", probe, [
        {"attribute": {"plugin": "ig", "objective": "embedding-distortion", "steps": 64, "name": "ig"}},
        {"prune": {"plugin": "magnitude", "objective": "embedding-distortion", "fraction": 0.25, "curve": [], "as": "pruned"}}])
    meta = json.loads((run / "00-attribute-ig" / "meta.json").read_text())["meta"]
    assert meta["completeness"]["max_relative_error"] < 0.01
    prune = json.loads((run / "01-prune-magnitude" / "meta.json").read_text())["meta"]
    assert prune["objective_before"] == pytest.approx(0.0, abs=1e-6)
    assert prune["objective_after"] == pytest.approx(prune["objective_after_gated"], rel=1e-4) and prune["objective_after"] > 0


def test_validate_rejects_an_objective_the_model_cannot_serve_in_one_line(tmp_path):
    save_encoder(tmp_path / "enc", None)
    probe = write_probe(tmp_path / "probe.jsonl")
    recipe = {"name": "x", "models": {"base": str(tmp_path / "enc")},
              "data": {"probe": {"source": "jsonl", "path": str(probe)}},
              "steps": [{"prune": {"plugin": "random", "as": "pruned"}},
                        {"attribute": {"plugin": "ig", "models": ["pruned"]}}]}
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    with pytest.raises(RecipeError) as error:
        load_recipe(tmp_path / "r.yaml", manager())
    message = str(error.value)
    assert "\n" not in message and "steps[0].prune.objective: 'causal-lm'" in message and "BertModel" in message
    recipe["steps"] = [{"attribute": {"plugin": "ig", "objective": "embedding-distortion"}},
                       {"prune": {"plugin": "random", "objective": "embedding-distortion", "as": "pruned"}},
                       {"attribute": {"plugin": "taylor", "models": ["pruned"]}}]
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    with pytest.raises(RecipeError, match=r"steps\[2\].attribute.objective: 'causal-lm'.*model 'pruned'"):
        load_recipe(tmp_path / "r.yaml", manager())  # a derived model is checked as its origin
    recipe["steps"] = recipe["steps"][:2]
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    load_recipe(tmp_path / "r.yaml", manager())


def test_masked_lm_validates_on_a_checkpoint_with_an_mlm_head_and_not_on_an_lm_for_embeddings(tmp_path):
    save_checkpoint(tmp_path / "bert", "bert")
    probe = write_probe(tmp_path / "probe.jsonl")
    recipe = {"name": "x", "models": {"base": str(tmp_path / "bert")},
              "data": {"probe": {"source": "jsonl", "path": str(probe)}},
              "steps": [{"attribute": {"plugin": "ig", "objective": "masked-lm"}}]}
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    load_recipe(tmp_path / "r.yaml", manager())
    recipe["steps"][0]["attribute"]["objective"] = "embedding-distortion"
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    with pytest.raises(RecipeError, match="BertForMaskedLM"):
        load_recipe(tmp_path / "r.yaml", manager())


def test_retrieval_ranks_by_cosine():
    queries = torch.eye(4)
    assert rank_scores(queries, queries * 3) == {"recall@1": 1.0, "recall@5": 1.0, "mrr": 1.0}
    swapped = queries[[1, 0, 2, 3]]
    scores = rank_scores(queries, swapped)
    assert scores["recall@1"] == 0.5 and scores["mrr"] == pytest.approx((0.5 + 0.5 + 1 + 1) / 4)


def test_weight_magnitude_is_the_l1_norm_of_each_units_input_columns(llama):
    root, model_dir, probe = llama
    run = run_steps(root, "weight-magnitude", model_dir, probe, [{"attribute": {"plugin": "weight-magnitude"}}])
    model = tf.LlamaForCausalLM.from_pretrained(model_dir)
    for l, layer in enumerate(model.model.layers):
        expected = layer.self_attn.o_proj.weight.double().abs().view(32, 4, HEAD_DIM).sum((0, 2))
        assert torch.allclose(scores_of(run, "00-")[l, :4], expected, rtol=1e-5)


def test_embedding_contrastive_is_symmetric_in_batch_infonce_within_each_copy(tmp_path):
    from surgery.engines.gates import repeat_rows

    objective = get_objective("embedding-contrastive")
    hidden = torch.randn(6, 5, 8, generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": torch.zeros(6, 5, dtype=torch.long), "attention_mask": torch.ones(6, 5, dtype=torch.long)}
    batch["attention_mask"][3, 3:] = 0
    prepared = {**objective.prepare(batch, torch.Generator()), "pooling": "mean"}
    loss = objective.loss(hidden, prepared)
    e = torch.nn.functional.normalize(pool(hidden, batch["attention_mask"], "mean"), dim=-1)
    q, d = e[0::2], e[1::2]
    for k in range(3):
        scores_q = torch.stack([q[k] @ d[j] for j in range(3)]) / 0.05
        scores_d = torch.stack([q[j] @ d[k] for j in range(3)]) / 0.05
        assert loss[2 * k] == pytest.approx(float(-scores_q.log_softmax(0)[k]), rel=1e-5)
        assert loss[2 * k + 1] == pytest.approx(float(-scores_d.log_softmax(0)[k]), rel=1e-5)
    # three copies of the batch (as gate points are laid out) are contrasted within their copy
    repeated = repeat_rows(prepared, 3)
    assert torch.allclose(objective.loss(hidden.repeat(3, 1, 1), repeated), loss.repeat(3), atol=1e-6)
    with pytest.raises(Exception, match="row pairs"):
        objective.prepare({k: v[:5] for k, v in batch.items()}, torch.Generator())
