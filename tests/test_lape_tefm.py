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


def hand_merged_neurons(w_a, w_b, w_c, phi_a, phi_b, hess_b, grad_b, labels_a, labels_b, ensemble_map,
                        beta, sigma, eps, lambda_proj, lambda_ortho):
    """DESIGN §2.3's fuse written out one base ensemble at a time with plain loops (no code under test)."""
    merged = w_a.clone()
    for k in range(int(labels_a.max()) + 1):
        p = int(ensemble_map[k])
        members_a = [i for i in range(len(labels_a)) if labels_a[i] == k]
        members_b = [j for j in range(len(labels_b)) if labels_b[j] == p]
        mean_w_b = sum(w_b[j] for j in members_b) / len(members_b)
        g_prime = sum(float(grad_b[j]) for j in members_b) / len(members_b)
        tau = sum(w_b[j] - w_c[j] for j in members_b) / len(members_b) + sigma * g_prime * mean_w_b / mean_w_b.norm()
        phi_b_p = sum(phi_b[j] for j in members_b) / len(members_b)
        phi_a_k = sum(phi_a[i] for i in members_a) / len(members_a)
        hess_b_p = sum(float(hess_b[j]) for j in members_b) / len(members_b)
        interference = float((phi_b_p - phi_a_k).norm()) / (hess_b_p + eps)
        mask = 1 - 1 / (1 + math.exp(-beta * interference))
        d = sum(float(phi_a[i, 0]) * w_a[i] for i in members_a) / sum(abs(float(phi_a[i, 0])) for i in members_a)
        tau_proj = mask * float(tau @ d) / (float(d @ d) + eps) * d
        tau_ortho = tau - tau_proj
        for i in members_a:
            merged[i] = w_a[i] + lambda_proj * tau_proj + lambda_ortho * tau_ortho
    return merged


@pytest.mark.parametrize("with_parent", [False, True])
def test_fuse_equals_a_hand_computed_merge_on_planted_ensembles(with_parent):
    """Every term of the fuse is live (tau != 0, sigma != 0, 0 < M < 1, lambda_proj != lambda_ortho,
    a non-identity ensemble map and neuron permutation), so a wrong formula for any of them shows."""
    from surgery.plugins.lape_tefm import MergedModel

    base, donor, parent = tiny(), tiny(noise=0.05, noise_seed=5), tiny(noise=0.05, noise_seed=6)
    base_view = view(base)
    layer = base_view.layers[1]
    size = layer.mlp.intermediate_size
    slices = neuron_slices(base, layer.mlp)
    params = [dict(m.named_parameters()) for m in (base, donor, parent)]
    generator = torch.Generator().manual_seed(0)
    phi_a, phi_b = (torch.randn(size, 3, generator=generator, dtype=torch.float64) for _ in range(2))
    hess_a, hess_b = phi_a[:, 2].abs() + 1, phi_b[:, 2].abs() + 1
    grad_b = torch.randn(size, generator=generator, dtype=torch.float64)
    labels_a = torch.arange(size) % 4  # interleaved ensembles in the base, contiguous blocks in the donor
    labels_b = torch.arange(size) * 4 // size
    ensemble_map = torch.tensor([2, 0, 3, 1])
    perm = torch.randperm(size, generator=generator)  # base neuron i <-> donor neuron perm[i]
    opts = FuseOptions(beta=1.5, sigma=0.7, blend=0.5)
    lambda_proj, lambda_ortho = 0.8, 0.3
    update = layer_update(layer, slices, params[0], params[1], params[2] if with_parent else None,
                          phi_a_i3=phi_a, phi_b_j3=phi_b, hess_a_i=hess_a, hess_b_j=hess_b, grad_b_j=grad_b,
                          labels_a=labels_a, labels_b=labels_b, ensemble_map=ensemble_map, perm=perm, opts=opts)
    assert ((update.mask_k > 0.1) & (update.mask_k < 0.9)).all() and update.mask_k.std() > 0.01
    merged = MergedModel(base, donor, parent if with_parent else None, opts, base_view)
    merged.updates.append(update)
    merged.apply(lambda_proj, lambda_ortho)

    w_a, w_b, w_p = (neuron_matrix(p, slices, size) for p in params)
    w_c = w_p if with_parent else w_a[torch.argsort(perm)]  # donor neuron j's counterpart: the base neuron matched to it
    expected = hand_merged_neurons(w_a, w_b, w_c, phi_a, phi_b, hess_b, grad_b, labels_a, labels_b, ensemble_map,
                                   opts.beta, opts.sigma, opts.eps, lambda_proj, lambda_ortho)
    got = neuron_matrix(merged.params, slices, size)
    assert (expected - w_a).abs().max() > 1e-2  # the merge moves the neurons well beyond float32 rounding
    assert torch.allclose(got, expected, rtol=0, atol=2e-6)
    # the other layer's neurons are the base's; every other tensor is W_A + blend (W_B - W_C)
    other = neuron_slices(base, base_view.layers[0].mlp)
    assert torch.equal(neuron_matrix(merged.params, other, size), neuron_matrix(params[0], other, size))
    neuron_names = {name for l in base_view.layers for name, _, _ in neuron_slices(base, l.mlp)}
    reference = params[2] if with_parent else params[0]
    for name, value in merged.params.items():
        if name not in neuron_names:
            blended = params[0][name].double() + 0.5 * (params[1][name].double() - reference[name].double())
            assert torch.allclose(value.double(), blended, rtol=0, atol=1e-6), name


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


def assert_saved_merge_follows_the_formula(run_dir: Path, root: Path, merged, lambda_proj: float, lambda_ortho: float):
    """Every fused layer's neurons in the saved model equal DESIGN's merge of the saved upstream
    artifacts (base a, donor b, parent), computed by :func:`hand_merged_neurons`."""
    from transformers import AutoModelForCausalLM

    tensors = {stage: load_file(str(run_dir / name / "tensors.safetensors")) for stage, name in
               (("capture", "00-capture-lape"), ("score", "01-score-lape-tefm"), ("cluster", "02-cluster-lape-tefm"),
                ("align", "03-align-lape-tefm"))}
    models = {name: AutoModelForCausalLM.from_pretrained(root / name) for name in ("a", "b", "parent")}
    opts = FuseOptions()
    layers = json.loads((run_dir / "04-fuse-lape-tefm" / "meta.json").read_text())["meta"]["layers"]
    assert layers
    for layer in layers:
        mlp = view(merged).layers[layer].mlp
        slices = neuron_slices(merged, mlp)
        w_a, w_b, w_c = (neuron_matrix(dict(models[n].named_parameters()), slices, mlp.intermediate_size)
                         for n in ("a", "b", "parent"))
        expected = hand_merged_neurons(
            w_a, w_b, w_c, tensors["capture"][f"a/{layer}/phi"].double(), tensors["capture"][f"b/{layer}/phi"].double(),
            tensors["score"][f"b/{layer}/hess"].double(), tensors["score"][f"b/{layer}/grad"].double(),
            tensors["cluster"][f"a/{layer}/labels"], tensors["cluster"][f"b/{layer}/labels"],
            tensors["align"][f"b/{layer}/ensemble_map"], opts.beta, opts.sigma, opts.eps, lambda_proj, lambda_ortho)
        got = neuron_matrix(dict(merged.named_parameters()), slices, mlp.intermediate_size)
        assert (expected - w_a).abs().max() > 1e-4, layer
        assert torch.allclose(got, expected, rtol=0, atol=1e-6), layer


def test_recipe_runs_reloads_and_the_flat_step_moves_the_weights_by_eta(zoo_like, tmp_path):
    from transformers import AutoModelForCausalLM

    fixed = {"search": "none", "lambda_proj": 0.7, "lambda_ortho": 0.4}
    report = run(zoo_like, tmp_path / "plain", pipeline(fixed))
    merged_dir = tmp_path / "plain" / "04-fuse-lape-tefm" / "model"
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert_saved_merge_follows_the_formula(tmp_path / "plain", zoo_like, merged, fixed["lambda_proj"], fixed["lambda_ortho"])
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


def test_lambda_search_picks_the_grid_point_whose_saved_merge_drifts_least(zoo_like, tmp_path):
    """The drift of each grid point is measured here on the model the fuse saves at that point
    (search: none), with the probe inputs the search uses; the search must report those values and
    pick their minimum."""
    from transformers import AutoModelForCausalLM

    from plugin_registries import registries
    from surgery.engines.preference import logit_mse
    from surgery.models.data import DataSpec, batches, load_examples

    grid = [0.0, 2.0]
    spec = DataSpec(source="jsonl", path=str(zoo_like / "probe.jsonl"), batch_size=4, max_tokens=24)
    probe = list(batches(load_examples(spec, 0, registries().data_sources)[:4], tokenizer(), 8, 24))
    references = [AutoModelForCausalLM.from_pretrained(zoo_like / name).eval() for name in ("a", "b")]

    @torch.no_grad()
    def drift(model) -> float:
        inputs = [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]} for b in probe]
        return sum(float(logit_mse(model(**x).logits, ref(**x).logits, b).double().mean())
                   for ref in references for x, b in zip(inputs, probe)) / len(probe)

    measured = {}
    for lambda_proj in grid:
        for lambda_ortho in grid:
            fixed = {"search": "none", "lambda_proj": lambda_proj, "lambda_ortho": lambda_ortho}
            run(zoo_like, tmp_path / "fixed", pipeline(fixed))
            saved = AutoModelForCausalLM.from_pretrained(tmp_path / "fixed" / "04-fuse-lape-tefm" / "model").eval()
            measured[(lambda_proj, lambda_ortho)] = drift(saved)
    assert max(measured.values()) > 1.002 * min(measured.values())  # the grid points differ (by far more than rel)

    run(zoo_like, tmp_path / "search", pipeline({"search": "logit-mse", "grid": grid, "search_inputs": 4}))
    meta = json.loads((tmp_path / "search" / "04-fuse-lape-tefm" / "meta.json").read_text())
    table = {(row[0], row[1]): row[2] for row in meta["meta"]["criterion"]}
    assert table.keys() == measured.keys()
    for point, value in measured.items():
        assert table[point] == pytest.approx(value, rel=1e-4), point
    assert (meta["figures"]["lambda_proj"], meta["figures"]["lambda_ortho"]) == min(measured, key=measured.get)


def test_var_g_search_fills_its_grid(zoo_like, tmp_path):
    run(zoo_like, tmp_path / "var", pipeline({"grid": [0.5, 1.0], "search_paths": 2, "search_inputs": 3,
                                              "pair_neurons": "align"}, parent=None))
    var_meta = json.loads((tmp_path / "var" / "04-fuse-lape-tefm" / "meta.json").read_text())
    table = var_meta["meta"]["criterion"]
    assert var_meta["meta"]["search"] == "var-g" and len(table) == 4 and all(math.isfinite(row[2]) for row in table)


def test_unknown_constrain_plugin_and_missing_capture_are_one_line_errors(zoo_like, tmp_path):
    from surgery.core.errors import SurgeryError

    with pytest.raises(SurgeryError, match="lape"):
        run(zoo_like, tmp_path / "nocap", [{"capture": {"plugin": "mean", "models": ["a", "b"]}},
                                            {"score": {"plugin": "lape-tefm", "models": ["a", "b"]}}])
    with pytest.raises(SurgeryError, match="no-such-constraint"):
        run(zoo_like, tmp_path / "nocon", pipeline({"search": "no-such-constraint", "grid": [0.5]}))
    with pytest.raises(SurgeryError, match="len_min"):
        run(zoo_like, tmp_path / "bad", [{"capture": {"plugin": "lape", "len_min": 9, "len_max": 4}}])
