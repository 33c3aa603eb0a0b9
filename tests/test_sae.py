"""Sparse autoencoders: activations, SAELens folder format, streamed metrics, the site, CE recovered."""
from __future__ import annotations

import json

import pytest
import torch
from fpo_fixtures import tiny_causal_lm
from plugin_registries import view

from surgery.engines.sae import (
    SAEConfig, SAEError, SAEStats, Site, SparseAutoencoder, TrainConfig, ce_loss_recovered, evaluate_sae, load_sae,
    save_sae, site_activations, site_path, train_sae
)


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm(0)


def _sae(architecture: str = "topk", d_in: int = 8, d_sae: int = 32, k: int = 4, seed: int = 0) -> SparseAutoencoder:
    torch.manual_seed(seed)
    sae = SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae, architecture=architecture, k=k, hook_name="model.layers.1", hook_layer=1))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return sae


def _identity_sae(d: int) -> SparseAutoencoder:
    """x = relu(x) - relu(-x): a ReLU SAE with 2d features that reconstructs exactly."""
    sae = SparseAutoencoder(SAEConfig(d_in=d, d_sae=2 * d, architecture="standard"))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def _batches(n: int = 3, width: int = 9, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 40, (4, width), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        mask[3, 4:] = 0
        out.append({"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask})
    return out


# --- activations -------------------------------------------------------------------------------

def test_topk_keeps_at_most_k_nonnegative_features_per_token():
    sae = _sae("topk", k=4)
    f = sae.encode(torch.randn(50, 8))
    assert ((f > 0).sum(-1) <= 4).all() and (f >= 0).all()
    pre = sae.pre_activations(torch.randn(5, 8))
    kept = sae.activate(pre)
    for row_pre, row_kept in zip(pre, kept):
        top = set(row_pre.topk(4).indices.tolist())
        assert set(row_kept.nonzero().flatten().tolist()) <= top


def test_standard_is_relu_of_the_pre_activations():
    sae = _sae("standard")
    x = torch.randn(6, 8)
    assert torch.equal(sae.encode(x), torch.relu(sae.pre_activations(x)))


# --- SAELens folder format -------------------------------------------------------------------------

@pytest.mark.parametrize("architecture", ["topk", "standard"])
def test_saelens_round_trip_reproduces_the_same_features(tmp_path, architecture):
    sae = _sae(architecture)
    save_sae(sae, tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == architecture and cfg["d_in"] == 8 and cfg["d_sae"] == 32
    assert cfg["meta"]["hook_name"] == "model.layers.1" and cfg["meta"]["hook_layer"] == 1
    loaded = load_sae(tmp_path / "sae")
    x = torch.randn(20, 8)
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert torch.equal(loaded(x), sae(x))


def test_older_flat_saelens_config_loads(tmp_path):
    sae = _sae("topk", k=3)
    save_sae(sae, tmp_path / "sae")
    flat = {"d_in": 8, "d_sae": 32, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3},
            "hook_name": "blocks.1.hook_resid_post", "hook_layer": 1, "model_name": "x", "dtype": "float32"}
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(flat))
    loaded = load_sae(tmp_path / "sae")
    assert loaded.cfg.architecture == "topk" and loaded.cfg.k == 3 and loaded.cfg.hook_layer == 1
    x = torch.randn(4, 8)
    assert torch.equal(loaded.encode(x), sae.encode(x))


def test_malformed_sae_folders_are_one_line_errors(tmp_path):
    sae = _sae()
    save_sae(sae, tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 16}))
    with pytest.raises(SAEError, match="shape"):
        load_sae(tmp_path / "sae")
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps({**cfg, "architecture": "jumprelu"}))
    with pytest.raises(SAEError, match="architecture"):
        load_sae(tmp_path / "sae")
    with pytest.raises(SAEError, match="cfg.json"):
        load_sae(tmp_path / "missing")


# --- metrics -----------------------------------------------------------------------------------

def test_streamed_stats_equal_the_statistics_of_the_concatenated_data():
    sae = _sae()
    chunks = [torch.randn(n, 8) * 3 + 1 for n in (5, 11, 7)]
    merged = SAEStats(8, 32)
    for chunk in chunks:
        merged = merged.merge(evaluate_sae(sae, [chunk]))
    x = torch.cat(chunks).double()
    with torch.no_grad():
        f = sae.encode(x.float())
        x_hat = sae.decode(f).double()
    figures = merged.figures()
    expected_ev = 1 - (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert figures["explained_variance"] == pytest.approx(float(expected_ev), rel=1e-9)
    assert figures["l0"] == pytest.approx(float((f > 0).sum(-1).double().mean()))
    assert figures["dead_features"] == int(((f > 0).sum(0) == 0).sum())
    assert figures == evaluate_sae(sae, chunks).figures()


def test_a_feature_that_cannot_fire_is_dead():
    sae = _sae("standard")
    with torch.no_grad():
        sae.W_enc[:, 5] = 0
        sae.b_enc[5] = -1.0
    assert evaluate_sae(sae, [torch.randn(40, 8)]).fired[5] == 0


def test_training_on_a_low_rank_stream_explains_it_and_tracks_dead_features():
    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(4, 16, generator=generator)
    chunks = [torch.relu(torch.randn(64, 4, generator=generator)) @ basis for _ in range(4)]
    cfg = SAEConfig(d_in=16, d_sae=64, architecture="topk", k=4)
    sae, history = train_sae(cfg, lambda: chunks, TrainConfig(epochs=30, lr=1e-2, minibatch_tokens=64, dead_window_tokens=256))
    assert evaluate_sae(sae, chunks).figures()["explained_variance"] > 0.95
    assert len(history["dead"]) == 30 and all(0 <= d <= 64 for d in history["dead"])


# --- the site and CE-loss recovered ---------------------------------------------------------------

def test_the_site_is_the_residual_before_the_final_norm(model):
    batch = _batches(1)[0]
    _, resid = Site(model, site_path(view(model), -1)).run(batch)
    hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
    assert not torch.allclose(resid, hidden, atol=1e-3)
    assert torch.allclose(model.model.norm(resid), hidden, atol=1e-5)


def test_site_activations_keep_only_real_tokens(model):
    batches = _batches(2)
    stream = site_activations(Site(model, site_path(view(model), 0)), lambda: batches)
    sizes = [acts.shape for acts in stream()]
    assert sizes == [(int(b["attention_mask"].sum()), model.config.hidden_size) for b in batches]


def test_ce_loss_recovered_is_one_for_an_exact_sae_and_zero_for_a_zero_sae(model):
    site = Site(model, site_path(view(model), -1))
    hidden = model.config.hidden_size
    exact = ce_loss_recovered(site, _identity_sae(hidden), _batches(2))
    assert exact["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert exact["ce_loss_with_sae"] == pytest.approx(exact["ce_loss_clean"], abs=1e-5)
    zero = SparseAutoencoder(SAEConfig(d_in=hidden, d_sae=4, architecture="standard"))
    with torch.no_grad():
        zero.W_dec.zero_()
        zero.b_dec.zero_()
    assert ce_loss_recovered(site, zero, _batches(2))["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6)


# --- on a zoo model ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def zoo_base():
    from surgery.models import zoo

    return zoo.load(zoo.build("tiny-llama/base"))


def test_topk_sae_explains_a_zoo_models_residual_stream(zoo_base, tmp_path):
    from surgery.models.data import batches
    from surgery.models.zoo import make_examples
    from surgery.plugins.sae import SAEOptions, train_for_model

    model, tokenizer = zoo_base
    train = [{"text": e["text"]} for e in make_examples("synthetic-mix", 384, seed=0, split="train")]
    test = [{"prompt": e["prompt"], "answer": " " + e["answer"]} for e in make_examples("synthetic-mix", 96, seed=1, split="test")]
    options = SAEOptions(layer=-1, architecture="topk", expansion=8, k=16, epochs=6)
    sae, figures = train_for_model(model, view(model), "tiny-llama/base", options, 0, lambda: batches(train, tokenizer, 64, 32),
                                   lambda: batches(test, tokenizer, 64, 32))
    assert figures["explained_variance"] >= 0.9
    assert figures["l0"] <= 16
    assert figures["ce_loss_recovered"] > 0.9
    save_sae(sae, tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    _, resid = Site(model, loaded.cfg.hook_name).run(next(batches(test, tokenizer, 8, 32)))
    assert torch.equal(loaded.encode(resid), sae.encode(resid))


def test_train_command_writes_a_loadable_saelens_folder(tmp_path, surgery_cli):
    from fpo_fixtures import save_tiny

    from surgery.models.zoo import make_examples

    model_dir = save_tiny(tmp_path / "model", seed=0)
    data = tmp_path / "probe.jsonl"
    data.write_text("".join(json.dumps({"text": e["text"]}) + "\n" for e in make_examples("copy", 16, seed=2)))
    result = surgery_cli("sae", "train", model_dir, "--out", tmp_path / "sae", "--source", "jsonl", "--path", data,
                         "--layer", "0", "--expansion", "2", "--k", "4", "--epochs", "1")
    assert result.exit_code == 0, result.err
    assert "explained_variance" in result.out
    loaded = load_sae(tmp_path / "sae")
    assert loaded.cfg.hook_name == "model.layers.0" and loaded.cfg.d_sae == 64 and loaded.cfg.k == 4


def test_sae_sites_resolve_module_paths_and_transformerlens_resid_hooks(model):
    from surgery.engines.sae import check_site

    def with_hook(name: str, layer: int = -1) -> SparseAutoencoder:
        return SparseAutoencoder(SAEConfig(d_in=model.config.hidden_size, d_sae=8, hook_name=name, hook_layer=layer))

    assert check_site(with_hook("model.layers.0"), model, view(model)) == "model.layers.0"
    assert check_site(with_hook("blocks.1.hook_resid_post"), model, view(model)) == "model.layers.1"
    assert check_site(with_hook("", layer=-1), model, view(model)) == "model.layers.1"
    with pytest.raises(SAEError, match="hook_mlp_out"):
        check_site(with_hook("blocks.0.hook_mlp_out"), model, view(model))
    with pytest.raises(SAEError, match="dim"):
        check_site(SparseAutoencoder(SAEConfig(d_in=7, d_sae=8, hook_name="model.layers.0")), model, view(model))
