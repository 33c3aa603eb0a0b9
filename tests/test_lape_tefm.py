"""LAPE and LAPE-TEFM: path weights, sampling, encodings against per-path oracles, clustering, TOS
mapping, the projection split, and the whole recipe."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from plugin_registries import view
from safetensors.torch import load_file

from surgery.engines.paths import (
    PathBatch, PathReader, PathSettings, encode_model, left_pad, path_draws, path_weights, prompt_ids, top_p_pick,
    unit_write_directions
)
from surgery.engines.permute import match, permute_module_
from surgery.engines.statistics import gaussian_mi
from surgery.models.adapters import neuron_slices
from surgery.plugins.lape_tefm import (
    FuseOptions, flatness_factor, interference_mask, layer_update, neuron_features, neuron_matrix, set_neuron_matrix_,
    spectral_clustering, split_task_vector, tefm_terms, tos_matrix
)

SIZE = {"layers": 2, "hidden": 32, "heads": 4, "kv_heads": 2}
SETTINGS = PathSettings(paths=4, len_min=3, len_max=7, top_p=0.9, gamma=0.99)



def tiny(seed: int = 0, noise: float = 0.0, noise_seed: int = 1) -> torch.nn.Module:
    from surgery.models.zoo.architectures import build_model

    torch.manual_seed(seed)
    model = build_model("llama", SIZE).eval()
    generator = torch.Generator().manual_seed(noise_seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(noise * torch.randn(param.shape, generator=generator))
    return model


def tokenizer():
    from surgery.models.zoo.tokenizer import build_tokenizer

    return build_tokenizer()


def prompts(n: int = 5) -> list[list[int]]:
    from surgery.models.zoo.tasks import make_examples

    return prompt_ids(tokenizer(), make_examples("synthetic-mix", n, seed=3))


# --- path weights ------------------------------------------------------------------------------

def test_path_weights_stay_finite_for_256_token_paths_over_a_50k_vocabulary_where_the_seed_formula_underflows():
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=50_000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=512)
    model = tf.LlamaForCausalLM(config).eval()
    lengths = torch.tensor([256, 200, 231])
    generator = torch.Generator().manual_seed(1)
    ids, mask = left_pad([[1, 17, 4093]], 0)
    path_ids = torch.randint(3, 50_000, (3, 256), generator=generator)
    inside = (torch.arange(256)[None] < lengths[:, None]).long()
    batch = PathBatch(torch.cat([ids.repeat(3, 1), path_ids], 1), torch.cat([mask.repeat(3, 1), inside], 1),
                      torch.cat([torch.zeros(3, 3), inside.float()], 1), lengths, 3)
    logp, _, _ = PathReader(model, view(model).layers).read(batch)
    with torch.no_grad():  # oracle: each path alone, unpadded, log_softmax in float64
        for row in range(3):
            seq = torch.cat([ids[0], path_ids[row, :lengths[row]]])[None]
            logits = model(input_ids=seq).logits[0, 2:-1].double()
            expected = logits.log_softmax(-1).gather(-1, seq[0, 3:, None]).sum()
            assert abs(float(logp[row]) - float(expected)) < 1e-4 * abs(float(expected))
    assert bool((logp < -700).all())  # below float64's smallest exponent: exp() is 0
    omega = path_weights(logp, lengths, 0.99)
    assert bool(torch.isfinite(omega).all()) and abs(float(omega.sum()) - 1) < 1e-12
    seed_literal = torch.exp(logp.double()) * 0.99 ** (lengths.double() - 1)  # p(S|x) gamma^(len-1), as written
    assert bool((seed_literal == 0).all())
    assert not bool(torch.isfinite(seed_literal / seed_literal.sum()).any())  # normalising it gives NaN


def test_top_p_pick_samples_exactly_the_renormalised_nucleus():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.06, 0.04])
    logits = probs.log()[None].repeat(10_000, 1)
    uniforms = (torch.arange(10_000, dtype=torch.float64) + 0.5) / 10_000  # an even grid: exact shares
    picked = top_p_pick(logits, uniforms, top_p=0.85)
    nucleus = probs[:3] / probs[:3].sum()  # 0.5 + 0.25 < 0.85 <= 0.5 + 0.25 + 0.15
    shares = torch.bincount(picked, minlength=5).double() / 10_000
    assert torch.allclose(shares[:3], nucleus.double(), atol=2e-4) and shares[3:].sum() == 0
    assert torch.equal(top_p_pick(logits[:4], uniforms[:4], top_p=1e-9), torch.zeros(4, dtype=torch.long))  # greedy


def test_path_draws_are_seeded_per_input_and_path():
    lengths, uniforms = path_draws(7, 3, 5, 4, 9)
    again = path_draws(7, 3, 5, 4, 9)
    assert torch.equal(lengths, again[0]) and torch.equal(uniforms, again[1])
    assert lengths.min() >= 4 and lengths.max() <= 9 and uniforms.shape == (5, 9)
    assert not torch.equal(path_draws(7, 4, 5, 4, 9)[1], uniforms)


# --- encodings ---------------------------------------------------------------------------------

def test_streamed_encoding_does_not_depend_on_how_inputs_are_batched():
    model, probe = tiny(), prompts(5)
    one = encode_model(model, view(model), probe, SETTINGS, batch_size=1, seed=0)
    many = encode_model(model, view(model), probe, SETTINGS, batch_size=3, seed=0)
    assert one.keys() == many.keys()
    for key in one:
        assert torch.allclose(one[key], many[key], rtol=1e-4, atol=1e-6), key
    omega = one["paths/omega"].double()
    assert torch.allclose(omega.sum(-1), torch.ones(5, dtype=torch.float64), atol=1e-6)


def per_path_oracle(model, parent, prompt: list[int], path: list[int], layer) -> tuple[float, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(log p, mean a [I], mean y [D], parent's mean y) of one unpadded path, with plain hooks."""
    def run(module):
        seen = {}
        down = module.get_submodule(layer.mlp.down)
        hooks = [down.register_forward_pre_hook(lambda _m, args: seen.__setitem__("a", args[0])),
                 down.register_forward_hook(lambda _m, _a, out: seen.__setitem__("y", out))]
        with torch.no_grad():
            logits = module(input_ids=torch.tensor([prompt + path])).logits[0].double()
        for hook in hooks:
            hook.remove()
        return logits, seen["a"][0, len(prompt):].double().mean(0), seen["y"][0, len(prompt):].double().mean(0)

    logits, a, y = run(model)
    targets = torch.tensor(path)
    logp = float(logits[len(prompt) - 1:-1].log_softmax(-1).gather(-1, targets[:, None]).sum())
    return logp, a, y, (run(parent)[2] if parent is not None else None)


@pytest.mark.parametrize("with_parent", [False, True])
def test_phi_matches_a_per_path_oracle(with_parent):
    model, probe = tiny(), prompts(3)
    parent = tiny(noise=0.01) if with_parent else None
    v = view(model)
    encoded = encode_model(model, v, probe, SETTINGS, batch_size=3, seed=5, parent=parent, parent_view=v)
    # regenerate the same paths (same draws) to read their tokens
    from surgery.engines.paths import sample_paths

    draws = [path_draws(5, x, SETTINGS.paths, SETTINGS.len_min, SETTINGS.len_max) for x in range(3)]
    batch = sample_paths(model, probe, torch.cat([d[0] for d in draws]), torch.cat([d[1] for d in draws]), top_p=SETTINGS.top_p)
    for layer in v.layers:
        units = unit_write_directions(model, layer).double()
        for x in range(3):
            rows = []
            for k in range(SETTINGS.paths):
                r = x * SETTINGS.paths + k
                length = int(batch.lengths_r[r])
                path = batch.ids_rt[r, batch.prompt_width:batch.prompt_width + length].tolist()
                rows.append((length, *per_path_oracle(model, parent, probe[x], path, layer)))
            lengths = torch.tensor([row[0] for row in rows], dtype=torch.float64)
            logp = torch.tensor([row[1] for row in rows], dtype=torch.float64)
            log_w = logp + (lengths - 1) * math.log(SETTINGS.gamma)
            omega = torch.exp(log_w - log_w.max()) / torch.exp(log_w - log_w.max()).sum()
            a = torch.stack([row[2] for row in rows])
            y = torch.stack([row[3] for row in rows])
            ref = torch.stack([row[4] for row in rows]) if with_parent else (omega[:, None] * y).sum(0)
            g = a * ((y - ref) @ units)
            expected = torch.stack([omega @ a, omega @ g, (omega * -logp / lengths).sum().expand(a.shape[1])], -1)
            got = encoded[f"{layer.index}/phi_x"][x].double()
            assert torch.allclose(got, expected, rtol=1e-3, atol=1e-6), (layer.index, x)
            plain = (lengths[:, None] * a).sum(0) / lengths.sum()
            assert torch.allclose(encoded[f"{layer.index}/plain_x"][x].double(), plain, rtol=1e-4, atol=1e-6)


# --- TEFM: score, cluster, align --------------------------------------------------------------

def test_tefm_terms_follow_the_formulas():
    generator = torch.Generator().manual_seed(0)
    phi = torch.randn(12, 6, 3, generator=generator, dtype=torch.float64)
    phi[..., 2] = phi[:, :1, 2].abs() + 1  # L is one number per input, shared by every neuron
    terms = tefm_terms(phi, eps=1e-8)
    mean = phi.mean(0)
    hess = mean[:, 1] ** 2 + mean[:, 2] + 1e-8
    rho = torch.tensor([torch.corrcoef(torch.stack([phi[:, i, 0], phi[:, i, 2]]))[0, 1] for i in range(6)])
    assert torch.allclose(terms["hess"], hess)
    assert torch.allclose(terms["mi"], gaussian_mi(rho.double()))
    assert torch.allclose(terms["score"], mean[:, 1].abs() * gaussian_mi(rho.double()) / (hess + 1e-8))


def planted_phi(seed: int = 0, groups: int = 4, per_group: int = 10, inputs: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """phi_x [X, I, 3] whose neurons follow one of ``groups`` per-input patterns, and the true groups."""
    generator = torch.Generator().manual_seed(seed)
    patterns = torch.randn(groups, inputs, 2, generator=generator, dtype=torch.float64)
    truth = torch.arange(groups * per_group) % groups
    phi = torch.zeros(inputs, len(truth), 3, dtype=torch.float64)
    phi[..., :2] = (patterns[truth] + 0.1 * torch.randn(len(truth), inputs, 2, generator=generator, dtype=torch.float64)).transpose(0, 1)
    phi[..., 2] = torch.rand(inputs, 1, generator=generator, dtype=torch.float64) + 1
    return phi, truth


def test_spectral_clustering_recovers_planted_ensembles_and_is_deterministic_under_the_seed():
    phi, truth = planted_phi()
    features = neuron_features(phi)
    labels = spectral_clustering(features @ features.T, 4, torch.Generator().manual_seed(3))
    again = spectral_clustering(features @ features.T, 4, torch.Generator().manual_seed(3))
    assert torch.equal(labels, again)
    assert sorted(labels.unique().tolist()) == [0, 1, 2, 3]
    for group in range(4):
        assert labels[truth == group].unique().numel() == 1


def test_tos_mapping_recovers_a_shuffled_copy_and_is_deterministic():
    phi_a, truth = planted_phi(seed=1)
    shuffle = torch.randperm(phi_a.shape[1], generator=torch.Generator().manual_seed(4))
    phi_b = phi_a[:, shuffle]
    labels_a = truth
    relabel = torch.tensor([2, 0, 3, 1])
    labels_b = relabel[truth[shuffle]]
    hess_a = tefm_terms(phi_a)["hess"]
    hess_b = hess_a[shuffle]
    cos = neuron_features(phi_a) @ neuron_features(phi_b).T
    tos = tos_matrix(cos, labels_a, labels_b, hess_a, hess_b, beta=0.1)
    ensemble_map = match(tos)
    assert torch.equal(ensemble_map, relabel)  # base ensemble k <-> donor ensemble relabel[k]
    assert torch.equal(match(tos_matrix(cos, labels_a, labels_b, hess_a, hess_b, beta=0.1)), ensemble_map)
    # neurons: within a group every member looks alike, so only the group must be right
    perm = match(cos * flatness_factor(hess_a, hess_b, 0.1))
    assert torch.equal(truth[shuffle[perm]], truth)


# --- fuse formulas -----------------------------------------------------------------------------

def test_mask_split_sums_to_tau_for_the_masks_the_code_produces():
    """tau_proj + tau_ortho = tau for every M that interference_mask returns (0 < M <= 1/2), and
    tau_proj = M P with P the projection on d; the 'projection' split drops (1 - M) P instead."""
    generator = torch.Generator().manual_seed(0)
    phi_a, phi_b = (torch.randn(5, 3, generator=generator, dtype=torch.float64) for _ in range(2))
    hess = torch.rand(5, generator=generator, dtype=torch.float64) + 0.1
    mask = interference_mask(phi_a, phi_b, hess, beta=0.1)
    assert bool(((mask > 0) & (mask <= 0.5)).all()) and len(set(mask.tolist())) == 5
    tau = torch.randn(5, 40, generator=generator, dtype=torch.float64)
    d = torch.randn(5, 40, generator=generator, dtype=torch.float64)
    proj, ortho = split_task_vector(tau, d, mask, eps=0.0)
    assert torch.allclose(proj + ortho, tau, rtol=0, atol=1e-14)
    p = ((tau * d).sum(-1) / (d * d).sum(-1))[:, None] * d
    assert torch.allclose(proj, mask[:, None] * p)
    dropped, ortho_p = split_task_vector(tau, d, mask, eps=0.0, split="projection")
    assert torch.equal(dropped, proj) and torch.allclose(ortho_p, tau - p)
    assert torch.allclose(proj + ortho_p + (1 - mask[:, None]) * p, tau)


def test_mask_and_split_on_hand_computed_values():
    # Int = |phi_B - phi_A| / Hess: 0 -> M = 1/2; 5 / 2 = 2.5 -> M = 1 - sigmoid(0.25)
    mask = interference_mask(torch.zeros(2, 3), torch.tensor([[0.0, 0, 0], [3.0, 4.0, 0]]), torch.tensor([1.0, 2.0]), beta=0.1)
    m = 1 - 1 / (1 + math.exp(-0.25))
    assert torch.allclose(mask, torch.tensor([0.5, m], dtype=torch.float64))
    tau, d = torch.tensor([[2.0, 1.0], [0.0, 3.0]], dtype=torch.float64), torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    proj, ortho = split_task_vector(tau, d, mask, eps=0.0)  # P = [2, 0] and [0, 3]
    assert torch.allclose(proj, torch.tensor([[1.0, 0.0], [0.0, 3 * m]], dtype=torch.float64))
    assert torch.allclose(ortho, torch.tensor([[1.0, 1.0], [0.0, 3 - 3 * m]], dtype=torch.float64))
    _, ortho_p = split_task_vector(tau, d, mask, eps=0.0, split="projection")
    assert torch.allclose(ortho_p, torch.tensor([[0.0, 1.0], [0.0, 0.0]], dtype=torch.float64))


def test_tfi_weighted_ensemble_task_vectors_by_hand():
    from surgery.plugins.lape_tefm import ensemble_task_vectors

    w_c = torch.zeros(4, 2, dtype=torch.float64)
    w_b = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1])
    plain = ensemble_task_vectors(w_b, w_c, labels, torch.zeros(4), sigma=0.0)
    assert torch.allclose(plain, torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=torch.float64))
    tfi = torch.tensor([1.0, 3.0, 0.0, 0.0])  # ensemble 1 has no weight: its plain mean is kept
    weighted = ensemble_task_vectors(w_b, w_c, labels, torch.zeros(4), sigma=0.0, member_weights_j=tfi)
    assert torch.allclose(weighted, torch.tensor([[2.5, 0.0], [0.0, 3.0]], dtype=torch.float64))


def test_neuron_matrix_round_trips_and_follows_neuron_permutations():
    model = tiny()
    layer = view(model).layers[1]
    params = dict(model.named_parameters())
    slices = neuron_slices(model, layer.mlp)
    size = layer.mlp.intermediate_size
    matrix = neuron_matrix(params, slices, size)
    assert matrix.shape == (size, 3 * SIZE["hidden"])  # gate row, up row, down column
    perm = torch.randperm(size, generator=torch.Generator().manual_seed(0))
    shuffled = tiny()
    permute_module_(shuffled, slices, perm)
    assert torch.equal(neuron_matrix(dict(shuffled.named_parameters()), slices, size), matrix[perm].to(matrix.dtype))
    set_neuron_matrix_(params, slices, size, matrix[perm])
    for name, value in shuffled.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name


@pytest.mark.parametrize("with_parent", [False, True])
def test_singleton_ensembles_without_mask_or_gradient_term_reduce_to_a_closed_form_merge(with_parent):
    """beta = 0 gives M = 1/2 everywhere; with one neuron per ensemble, sigma = 0 and lambda_proj =
    lambda_ortho = 1/2: W* = W_A + (tau_proj + tau - tau_proj)/2 = W_A + (W_B - W_C)/2 for every neuron."""
    base, donor, parent = tiny(), tiny(noise=0.02, noise_seed=5), tiny(noise=0.02, noise_seed=6)
    layer = view(base).layers[1]
    size = layer.mlp.intermediate_size
    slices = neuron_slices(base, layer.mlp)
    params = [dict(m.named_parameters()) for m in (base, donor, parent)]
    generator = torch.Generator().manual_seed(0)
    phi = torch.randn(2, size, 3, generator=generator, dtype=torch.float64)
    hess = phi[..., 2].abs() + 1
    singletons = torch.arange(size)
    update = layer_update(layer, slices, params[0], params[1], params[2] if with_parent else None,
                          phi_a_i3=phi[0], phi_b_j3=phi[1], hess_a_i=hess[0], hess_b_j=hess[1], grad_b_j=phi[1, :, 1],
                          labels_a=singletons, labels_b=singletons, ensemble_map=singletons, perm=singletons,
                          opts=FuseOptions(beta=0.0, sigma=0.0))
    w_a, w_b, w_c = (neuron_matrix(p, slices, size) for p in params)
    expected = w_a + (w_b - (w_c if with_parent else w_a)) / 2
    assert torch.allclose(update.mask_k, torch.full((size,), 0.5, dtype=torch.float64))
    assert torch.allclose(update.base_if + 0.5 * update.proj_if + 0.5 * update.ortho_if, expected, atol=1e-12)


# --- the recipe --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def zoo_like(tmp_path_factory) -> Path:
    """A parent, two "fine-tunes" of it, and a prompt/answer probe file."""
    from surgery.models.zoo.tasks import make_examples

    root = tmp_path_factory.mktemp("lape")
    for name, noise, seed in (("parent", 0.0, 1), ("a", 0.004, 2), ("b", 0.004, 3)):
        model = tiny(noise=noise, noise_seed=seed)
        model.save_pretrained(root / name)
        tokenizer().save_pretrained(root / name)
    rows = [{"prompt": ex["prompt"], "answer": " " + ex["answer"]} for ex in make_examples("synthetic-mix", 8, seed=0)]
    (root / "probe.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def run(root: Path, out: Path, steps: list[dict]) -> dict:
    from surgery.runtime.manager import Manager
    from surgery.runtime.recipe import validate
    from surgery.runtime.runner import run_recipe

    raw = {"name": "lape", "seed": 0, "models": {m: str(root / m) for m in ("a", "b", "parent")},
           "data": {"probe": {"source": "jsonl", "path": str(root / "probe.jsonl"), "batch_size": 4, "max_tokens": 24}},
           "steps": steps, "output": str(out)}
    manager = Manager()
    return run_recipe(validate(raw, manager, base_dir=root), manager, quiet=True)


def pipeline(fuse: dict, parent: str | None = "parent") -> list[dict]:
    pair = ["a", "b"]
    return [
        {"capture": {"plugin": "lape", "models": pair, "paths": 3, "len_min": 3, "len_max": 6, "parent": parent}},
        {"score": {"plugin": "lape-tefm", "models": pair}},
        {"cluster": {"plugin": "lape-tefm", "models": pair, "k": 4}},
        {"align": {"plugin": "lape-tefm", "models": pair}},
        {"fuse": {"plugin": "lape-tefm", "models": pair, **fuse}},
    ]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def test_recipe_runs_reloads_and_the_flat_step_moves_the_weights_by_eta(zoo_like, tmp_path):
    from transformers import AutoModelForCausalLM

    fixed = {"search": "none", "lambda_proj": 0.7, "lambda_ortho": 0.4}
    report = run(zoo_like, tmp_path / "plain", pipeline(fixed))
    merged_dir = tmp_path / "plain" / "04-fuse-lape-tefm" / "model"
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert report["steps"][-1]["figures"]["lambda_proj"] == 0.7
    assert 0 < report["steps"][-1]["figures"]["mask_mean"] <= 0.5  # 1 - sigmoid(beta * Int), Int >= 0
    assert torch.isfinite(merged(input_ids=torch.tensor([prompts(1)[0]])).logits).all()
    labels = load_file(str(tmp_path / "plain" / "02-cluster-lape-tefm" / "tensors.safetensors"))
    assert sorted(labels["a/0/labels"].unique().tolist()) == [0, 1, 2, 3]
    eta = 1e-3
    run(zoo_like, tmp_path / "flat", pipeline({**fixed, "flat_step": True, "eta": eta}))
    before, after = weights(merged_dir), weights(tmp_path / "flat" / "04-fuse-lape-tefm" / "model")
    moved = math.sqrt(sum(float((after[n].double() - before[n].double()).square().sum()) for n in before))
    assert abs(moved - eta) < 1e-3 * eta
    again = run(zoo_like, tmp_path / "plain", pipeline(fixed))  # unchanged steps are reused
    assert [step["status"] for step in again["steps"]] == ["reused"] * 5


def test_merging_a_model_with_itself_against_itself_gives_the_model(zoo_like, tmp_path):
    """tau = W_B - W_C = 0 and sigma = 0: every neuron and tensor is the base's."""
    steps = [{"capture": {"plugin": "lape", "models": ["a"], "paths": 2, "len_min": 2, "len_max": 4}},
             {"score": {"plugin": "lape-tefm", "models": ["a"]}},
             {"cluster": {"plugin": "lape-tefm", "models": ["a"], "k": 3}},
             {"fuse": {"plugin": "lape-tefm", "models": ["a", "a"], "parent": "a", "sigma": 0.0, "search": "none"}}]
    run(zoo_like, tmp_path / "self", steps)
    base, merged = weights(zoo_like / "a"), weights(tmp_path / "self" / "03-fuse-lape-tefm" / "model")
    for name in base:
        assert torch.allclose(merged[name], base[name], atol=1e-7), name


def test_lambda_search_picks_the_grid_point_with_the_least_drift(zoo_like, tmp_path):
    fuse = {"search": "logit-mse", "grid": [0.0, 0.5, 1.0], "search_inputs": 4}
    run(zoo_like, tmp_path / "drift", pipeline(fuse))
    meta = json.loads((tmp_path / "drift" / "04-fuse-lape-tefm" / "meta.json").read_text())
    table = meta["meta"]["criterion"]
    assert len(table) == 9 and all(math.isfinite(row[2]) for row in table)
    best = min(table, key=lambda row: row[2])
    assert [meta["figures"]["lambda_proj"], meta["figures"]["lambda_ortho"]] == best[:2]
    run(zoo_like, tmp_path / "var", pipeline({"grid": [0.5, 1.0], "search_paths": 2, "search_inputs": 3,
                                              "pair_neurons": "align"}, parent=None))
    var_meta = json.loads((tmp_path / "var" / "04-fuse-lape-tefm" / "meta.json").read_text())
    assert var_meta["meta"]["search"] == "var-g" and len(var_meta["meta"]["criterion"]) == 4


def test_unknown_constrain_plugin_and_missing_capture_are_one_line_errors(zoo_like, tmp_path):
    from surgery.core.errors import SurgeryError

    with pytest.raises(SurgeryError, match="lape"):
        run(zoo_like, tmp_path / "nocap", [{"capture": {"plugin": "mean", "models": ["a", "b"]}},
                                            {"score": {"plugin": "lape-tefm", "models": ["a", "b"]}}])
    with pytest.raises(SurgeryError, match="no-such-constraint"):
        run(zoo_like, tmp_path / "nocon", pipeline({"search": "no-such-constraint", "grid": [0.5]}))
    with pytest.raises(SurgeryError, match="len_min"):
        run(zoo_like, tmp_path / "bad", [{"capture": {"plugin": "lape", "len_min": 9, "len_max": 4}}])
