"""FAM: streamed statistics, FAI against a per-token oracle, clustering, fusion and the whole recipe."""
from __future__ import annotations

import json

import pytest
import torch
from merge_fixtures import build, logits, perturbed, probe_file, run_steps, save, tokenizer
from plugin_registries import get_objective, view
from safetensors.torch import load_file

from surgery.engines.permute import permute_module_
from surgery.engines.statistics import gaussian_mi, kmeans
from surgery.models.adapters import neuron_slices, write_directions
from surgery.models.data import batches
from surgery.models.zoo.tasks import make_examples
from surgery.plugins.fam import FamFuser, FuseOptions, capture_model, fai, fuse_neurons, pooled, prepared_scores
from surgery.plugins.tlinp import TlinpWeighter, tlinp_weights


def probe_batches(n: int, batch_size: int, max_tokens: int = 32) -> list[dict]:
    examples = make_examples("synthetic-mix", n, seed=3)
    return list(batches(examples, tokenizer(), batch_size, max_tokens))


def run_capture(model, batch_list, weighter=None):
    return capture_model(model, view(model), batch_list, weighter=weighter, objective=get_objective("causal-lm"),
                         fisher=True, sketch_dim=16, seed=0)


def test_streamed_statistics_equal_those_of_the_concatenated_data():
    model = build("llama", 0)
    for weighter in (None, TlinpWeighter(0.5)):
        streamed = run_capture(model, probe_batches(12, 4), weighter)
        whole = run_capture(model, probe_batches(12, 12), weighter)
        for layer in streamed:
            assert set(streamed[layer].sums) == set(whole[layer].sums)
            for key, value in streamed[layer].sums.items():
                assert torch.allclose(value, whole[layer].sums[key], rtol=1e-5, atol=1e-8), (layer, key)
    merged = run_capture(model, probe_batches(12, 4)[:1])["0"].merge(run_capture(model, probe_batches(12, 4)[1:])["0"])
    assert merged.count == whole["0"].count


def per_token_terms(model, batch: dict, layer, alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """FAI's terms from per-token tensors, by plain hooks and autograd (an independent path)."""
    down = model.get_submodule(layer.mlp.down)
    seen = {}

    def keep_input(_module, args):
        args[0].retain_grad()
        seen["a"] = args[0]

    def keep_output(_module, _args, output):
        seen["y"] = output

    hooks = [down.register_forward_pre_hook(keep_input), down.register_forward_hook(keep_output)]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    for hook in hooks:
        hook.remove()
    get_objective("causal-lm").loss(out.logits, batch).sum().backward()
    real = batch["attention_mask"].bool()
    w = tlinp_weights(out.logits.detach(), batch["input_ids"], batch["attention_mask"], alpha)[real].double()
    a, g = seen["a"][real].detach().double(), seen["a"].grad[real].double()
    d = write_directions(model, layer.mlp).detach().double()
    s = seen["y"][real].detach().double() @ (d / d.norm(dim=0))
    mean = lambda v: (w[:, None] * v).sum(0) / w.sum()  # noqa: E731
    cov = mean(a * s) - mean(a) * mean(s)
    rho = cov / ((mean(a * a) - mean(a) ** 2) * (mean(s * s) - mean(s) ** 2)).sqrt()
    mi = -0.5 * torch.log(1 - rho.clamp(-1 + 1e-6, 1 - 1e-6) ** 2)
    return {"abs": mean(a.abs()), "mi": mi, "fisher": mean(g * g), "score": mean(a.abs()) * mi / (mean(g * g) + 1e-8)}


def test_fai_matches_a_per_token_oracle():
    model = build("llama", 0)
    batch = probe_batches(8, 8)[0]
    stats = run_capture(model, [batch], TlinpWeighter(0.5))
    for layer in view(model).layers:
        expected = per_token_terms(model, batch, layer)
        got = fai(stats[str(layer.index)])
        for key in ("abs", "mi", "fisher", "score"):
            assert torch.allclose(got[key].double(), expected[key], rtol=1e-4, atol=1e-10), (layer.index, key)
    assert gaussian_mi(torch.tensor([0.0, 1.0, -1.0])).isfinite().all()


def test_kmeans_finds_planted_groups_and_is_deterministic():
    generator = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(4, 16, generator=generator), dim=1)
    truth = torch.arange(40) % 4
    points = torch.nn.functional.normalize(centres[truth] + 0.05 * torch.randn(40, 16, generator=generator), dim=1)
    labels = kmeans(points.double(), 4, torch.Generator().manual_seed(1))
    again = kmeans(points.double(), 4, torch.Generator().manual_seed(1))
    assert torch.equal(labels, again)
    assert sorted(labels.unique().tolist()) == [0, 1, 2, 3]
    for group in range(4):  # every planted group lands in one cluster
        assert labels[truth == group].unique().numel() == 1


def test_fuse_neurons_is_the_importance_weighted_mean():
    w_a = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])  # 3 neurons along axis 0
    w_b = torch.tensor([[3.0, 0.0], [1.0, 0.0], [5.0, 2.0]])
    s_a, s_b = torch.tensor([1.0, 3.0, 0.0]), torch.tensor([1.0, 1.0, 0.0])
    fused = fuse_neurons([w_a, w_b], [s_a, s_b], axis=0, offset=0)
    expected = torch.tensor([[2.0, 1.0], [2.5, 3.0], [5.0, 4.0]])  # last row: both scores 0 -> plain mean
    assert torch.allclose(fused, expected)
    columns = fuse_neurons([w_a.T, w_b.T], [s_a, s_b], axis=1, offset=0)
    assert torch.allclose(columns, expected.T)


def test_fuse_neurons_with_a_parent_weights_task_vectors():
    """W_C + scale * M * sum_m c_m (W_m - W_C): equal scores and scale 1/2 give the plain average,
    scale 1 task arithmetic; uneven scores move each neuron towards the more important model."""
    w_c = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    w_a, w_b = w_c + torch.tensor([[2.0, 0.0], [0.0, 4.0]]), w_c + torch.tensor([[0.0, 2.0], [2.0, 0.0]])
    equal = [torch.ones(2), torch.ones(2)]
    assert torch.allclose(fuse_neurons([w_a, w_b], equal, 0, 0, parent=w_c, scale=0.5), (w_a + w_b) / 2)
    assert torch.allclose(fuse_neurons([w_a, w_b], equal, 0, 0, parent=w_c, scale=1.0), w_a + w_b - w_c)
    # neuron 0: c = (3/4, 1/4); neuron 1: c = (0, 1). scale 1/2, M = 2: W_C + c_a tau_a + c_b tau_b
    fused = fuse_neurons([w_a, w_b], [torch.tensor([3.0, 0.0]), torch.tensor([1.0, 5.0])], 0, 0, parent=w_c, scale=0.5)
    assert torch.allclose(fused, torch.tensor([[1 + 1.5, 1 + 0.5], [0 + 2.0, 2 + 0.0]]))


def test_scores_are_tempered_normalised_and_pooled_by_hand():
    s = torch.tensor([1.0, 3.0, 4.0, 0.0, -2.0])
    assert torch.allclose(prepared_scores(s, "none", 0.5), torch.tensor([1.0, 3 ** 0.5, 2.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.allclose(prepared_scores(s, "layer", 1.0), torch.tensor([0.625, 1.875, 2.5, 0.0, 0.0], dtype=torch.float64))
    labels = torch.tensor([1, 0, 1, 0, 2])
    assert torch.allclose(pooled(s, labels), torch.tensor([2.5, 1.5, 2.5, 1.5, -2.0], dtype=torch.float64))
    assert torch.allclose(pooled(s, torch.arange(5)), s.double())  # one neuron per ensemble: unchanged


def fuser_case(pool: str, labels: torch.Tensor | None):
    """A one-layer FamFuser over a [4, 3] up-projection (neurons on axis 0) of two models."""
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(4, 3, generator=generator) for _ in range(2)]
    scores = [{"0": torch.tensor([1.0, 4.0, 2.0, 0.5])}, {"0": torch.tensor([3.0, 1.0, 1.0, 2.0])}]
    opts = FuseOptions(pool=pool)
    fuser = FamFuser({"up": "mlp"}, {"up": [("0", 0, 0)]}, scores, [{}], opts, {"0": labels} if labels is not None else None)
    return fuser("up", tensors), tensors, scores


def test_cluster_labels_shape_a_fam_merge():
    """With pool: ensemble a neuron's weights are its ensemble's mean scores: different labels give a
    different merge, renamed labels (the same partition) the same, one ensemble per neuron the plain
    FAM merge, and one ensemble for all the hand-computed layer-mean weights."""
    per_neuron, tensors, scores = fuser_case("neuron", None)
    a = fuser_case("ensemble", torch.tensor([0, 0, 1, 1]))[0]
    b = fuser_case("ensemble", torch.tensor([0, 1, 0, 1]))[0]
    renamed = fuser_case("ensemble", torch.tensor([1, 1, 0, 0]))[0]
    assert not torch.allclose(a, b)
    assert torch.equal(a, renamed)
    assert torch.equal(fuser_case("ensemble", torch.arange(4))[0], per_neuron)
    whole = fuser_case("ensemble", torch.zeros(4, dtype=torch.long))[0]
    share_a = 7.5 / (7.5 + 7.0)  # mean scores 1.875 and 1.75
    assert torch.allclose(whole, share_a * tensors[0] + (1 - share_a) * tensors[1], atol=1e-6)
    # labels [0, 0, 1, 1]: ensemble 0 means (2.5, 2.0), ensemble 1 means (1.25, 1.5)
    share = torch.tensor([2.5 / 4.5, 2.5 / 4.5, 1.25 / 2.75, 1.25 / 2.75])[:, None]
    assert torch.allclose(a, share * tensors[0] + (1 - share) * tensors[1], atol=1e-6)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A base, a "fine-tune" of it with its MLP neurons shuffled, and a probe file."""
    root = tmp_path_factory.mktemp("fam")
    base = build("llama", 0)
    donor = perturbed(build("llama", 0), seed=1, scale=0.002)  # weights are ~N(0, 0.02^2)
    generator = torch.Generator().manual_seed(2)
    for layer in view(donor).layers:
        permute_module_(donor, neuron_slices(donor, layer.mlp), torch.randperm(layer.mlp.intermediate_size, generator=generator))
    return save(base, root / "base"), save(donor, root / "donor"), probe_file(root / "probe.jsonl"), root


FAM_STEPS = [
    {"weight": {"plugin": "tlinp", "alpha": 0.5}},
    {"capture": {"plugin": "fam", "sketch_dim": 64}},
    {"score": {"plugin": "fam"}},
    {"cluster": {"plugin": "fam", "k": 4}},
    {"align": {"plugin": "hungarian"}},
    {"fuse": {"plugin": "fam", "keep": ["embeddings"]}},
]


def test_fam_recipe_merges_a_model_with_its_shuffled_fine_tune(tmp_path, pair):
    from transformers import AutoModelForCausalLM

    base_dir, donor_dir, probe, _ = pair
    run = run_steps(tmp_path, {"base": base_dir, "donor": donor_dir}, FAM_STEPS, data=probe)
    merged_dir = run / "05-fuse-fam" / "model"
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    wb, wm = load_file(str(base_dir / "model.safetensors")), load_file(str(merged_dir / "model.safetensors"))
    assert torch.equal(wm["model.embed_tokens.weight"], wb["model.embed_tokens.weight"])  # kept
    # aligned, every merged neuron is close to its base neuron (the donor differs by 0.002 noise);
    # without alignment the MLP rows would be averages of unrelated neurons (differences ~0.05)
    for name in wb:
        assert (wm[name] - wb[name]).abs().max() < 0.01, name
    captured = json.loads((run / "01-capture-fam" / "meta.json").read_text())
    assert captured["meta"]["weighting"] == "tlinp"  # the recipe's weight step reached the capture
    assert 0 < captured["figures"]["base/weight"] < captured["figures"]["base/tokens"]
    labels = load_file(str(run / "03-cluster-fam" / "tensors.safetensors"))
    assert sorted(labels["base/0/labels"].unique().tolist()) == [0, 1, 2, 3]
    ids = tokenizer()(["copy: 3 1 4 = 3 1 4"], return_tensors="pt")["input_ids"]
    assert (logits(merged, ids) - logits(base, ids)).abs().max() < 0.1
    # the same recipe again reuses every step and gives the same files
    again = run_steps(tmp_path, {"base": base_dir, "donor": donor_dir}, FAM_STEPS, data=probe)
    assert torch.equal(load_file(str(again / "05-fuse-fam" / "model" / "model.safetensors"))["lm_head.weight"], wm["lm_head.weight"])


def test_fam_of_a_model_and_its_exact_shuffle_is_the_model(tmp_path, pair):
    """Scores of aligned neurons are equal, so each fused neuron is the base neuron itself."""
    base_dir, _, probe, root = pair
    shuffled = build("llama", 0)
    generator = torch.Generator().manual_seed(9)
    for layer in view(shuffled).layers:
        permute_module_(shuffled, neuron_slices(shuffled, layer.mlp), torch.randperm(layer.mlp.intermediate_size, generator=generator))
    save(shuffled, root / "shuffled")
    run = run_steps(tmp_path, {"base": base_dir, "donor": root / "shuffled"}, FAM_STEPS, data=probe)
    wb, wm = load_file(str(base_dir / "model.safetensors")), load_file(str(run / "05-fuse-fam" / "model" / "model.safetensors"))
    for name in wb:
        assert torch.allclose(wm[name], wb[name], atol=1e-6), name


def test_the_cluster_step_changes_a_fam_recipe_with_ensemble_pooling(tmp_path, pair):
    """End to end: k = 2 and k = 4 ensembles give different merges; rerunning k = 4 the same one."""
    base_dir, donor_dir, probe, _ = pair
    models = {"base": base_dir, "donor": donor_dir}

    def merged(k: int, directory: str) -> dict[str, torch.Tensor]:
        steps = [dict(step) for step in FAM_STEPS[1:]]
        steps[2] = {"cluster": {"plugin": "fam", "k": k}}
        steps[4] = {"fuse": {"plugin": "fam", "pool": "ensemble"}}
        run = run_steps(tmp_path / directory, models, steps, data=probe)
        return load_file(str(run / "04-fuse-fam" / "model" / "model.safetensors"))

    two, four, again = merged(2, "k2"), merged(4, "k4"), merged(4, "k4-again")
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.allclose(two[name], four[name])
    assert all(torch.equal(four[key], again[key]) for key in four)
