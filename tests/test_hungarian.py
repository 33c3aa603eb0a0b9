"""Neuron matching and permutations: brute-force oracles, function preservation, planted permutations."""
from __future__ import annotations

import itertools

import pytest
import torch
from merge_fixtures import build, logits, probe_file, run_steps, save, tokenizer
from plugin_registries import view
from safetensors.torch import load_file

from surgery.engines.permute import ensemble_similarity, invert, is_permutation, match, match_ensembles, permute_module_
from surgery.models.adapters import neuron_slices


def test_match_maximises_total_similarity_like_brute_force():
    generator = torch.Generator().manual_seed(0)
    for n_a, n_b in ((5, 5), (4, 6)):
        sim = torch.randn(n_a, n_b, generator=generator)
        best = max(itertools.permutations(range(n_b), n_a), key=lambda p: sum(float(sim[i, j]) for i, j in enumerate(p)))
        assert match(sim).tolist() == list(best)


def test_match_recovers_a_planted_permutation():
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(1))
    sim = torch.rand(50, 50) * 0.5
    sim[torch.arange(50), perm] = 1.0
    assert torch.equal(match(sim), perm)
    assert torch.equal(invert(perm)[perm], torch.arange(50))


def test_ensemble_matching_on_hand_made_similarities():
    labels_a = torch.tensor([0, 0, 1, 1, 2])
    labels_b = torch.tensor([2, 2, 0, 1, 1])
    sim = torch.zeros(5, 5)
    sim[0:2, 0:2] = 1.0  # base ensemble 0 ~ donor ensemble 2
    sim[2:4, 3:5] = 0.8  # base 1 ~ donor 1
    sim[4, 2] = 0.9      # base 2 ~ donor 0
    scores = ensemble_similarity(sim, labels_a, labels_b)
    assert scores[0, 2] == pytest.approx(1.0) and scores[1, 1] == pytest.approx(0.8) and scores[2, 0] == pytest.approx(0.9)
    assert match_ensembles(sim, labels_a, labels_b).tolist() == [2, 1, 0]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_permuting_every_mlp_preserves_the_function(arch):
    model = build(arch, 0)
    ids = torch.randint(6, 40, (2, 11), generator=torch.Generator().manual_seed(0))
    before = logits(model, ids)
    generator = torch.Generator().manual_seed(3)
    for layer in view(model).layers:
        perm = torch.randperm(layer.mlp.intermediate_size, generator=generator)
        permute_module_(model, neuron_slices(model, layer.mlp), perm)
    after = logits(model, ids)
    assert not torch.equal(before, logits(build(arch, 1), ids))
    assert torch.allclose(before, after, atol=1e-5)


def test_hungarian_undoes_a_planted_permutation_and_keeps_the_donor_function(tmp_path):
    """The donor is the base with every MLP's neurons shuffled: align must find the shuffle back,
    and applying its permutation to the donor must leave the donor's outputs unchanged."""
    base = build("llama", 0)
    donor = build("llama", 0)
    generator = torch.Generator().manual_seed(5)
    planted = {}
    for layer in view(donor).layers:
        planted[str(layer.index)] = torch.randperm(layer.mlp.intermediate_size, generator=generator)
        permute_module_(donor, neuron_slices(donor, layer.mlp), planted[str(layer.index)])
    save(base, tmp_path / "base")
    save(donor, tmp_path / "donor")
    run = run_steps(tmp_path, {"base": tmp_path / "base", "donor": tmp_path / "donor"},
                    [{"capture": {"plugin": "fam", "sketch_dim": 64}}, {"align": {"plugin": "hungarian"}}],
                    data=probe_file(tmp_path / "probe.jsonl"))
    found = load_file(str(run / "01-align-hungarian" / "tensors.safetensors"))
    ids = tokenizer()(["copy: 3 1 4 = 3 1 4", "add: 17 9 = 3"], return_tensors="pt", padding=True)["input_ids"]
    before = logits(donor, ids)
    for layer in view(donor).layers:
        perm = found[f"donor/{layer.index}/perm"]
        assert is_permutation(perm, layer.mlp.intermediate_size)
        # base neuron i is donor neuron perm[i]; the planted shuffle put base neuron planted[j] at j
        assert torch.equal(planted[str(layer.index)][perm], torch.arange(perm.numel()))
        permute_module_(donor, neuron_slices(donor, layer.mlp), perm)
    assert torch.allclose(logits(donor, ids), before, atol=1e-5)
    for name, tensor in base.state_dict().items():  # aligned back, the donor is the base again
        assert torch.allclose(donor.state_dict()[name], tensor), name


def sketch_stats(sketch_kn: torch.Tensor):
    from surgery.engines.capture import Stats

    n = sketch_kn.shape[1]
    return Stats({"weight": torch.tensor(1.0), "act/sum": torch.zeros(n), "act/sketch": sketch_kn,
                  "sketch_basis": torch.zeros(sketch_kn.shape[0])})


def test_identity_bonus_moves_a_neuron_only_for_a_larger_gain():
    from surgery.plugins.hungarian import align_layer

    generator = torch.Generator().manual_seed(4)
    base = torch.randn(64, 30, generator=generator, dtype=torch.float64)
    planted = torch.randperm(30, generator=generator)
    donor = base[:, planted] + 0.05 * torch.randn(64, 30, generator=generator, dtype=torch.float64)
    perm, corr = align_layer(sketch_stats(base), sketch_stats(donor), identity_bonus=0.2)
    assert torch.equal(planted[perm], torch.arange(30))  # true matches gain ~1 > 0.2: still found
    # a donor that is the base plus noise: without a bonus noise may move neurons, with one it cannot
    noisy = base + 1.5 * torch.randn(64, 30, generator=generator, dtype=torch.float64)
    kept, corr = align_layer(sketch_stats(base), sketch_stats(noisy), identity_bonus=10.0)
    assert torch.equal(kept, torch.arange(30))
    free, _ = align_layer(sketch_stats(base), sketch_stats(noisy))
    assert corr[torch.arange(30), free].sum() >= corr.diagonal().sum()


def test_ensemble_bonus_matches_neurons_within_matched_ensembles():
    """Two pairs of neurons: the free optimum crosses ensembles; a bonus above the loss keeps each
    neuron in its matched ensemble, one below it does not, and one ensemble for all changes nothing."""
    from surgery.plugins.hungarian import align_layer, same_ensemble

    generator = torch.Generator().manual_seed(5)
    base = torch.randn(256, 4, generator=generator, dtype=torch.float64)
    donor = base[:, [1, 0, 3, 2]] + 0.3 * torch.randn(256, 4, generator=generator, dtype=torch.float64)
    labels_a, labels_b = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 0, 1])
    ensemble_map = torch.tensor([0, 1])  # base ensemble 0 (neurons 0, 1) <- donor ensemble 0 (neurons 0, 2)
    within = same_ensemble(labels_a, labels_b, ensemble_map)
    assert within.tolist() == [[1, 0, 1, 0], [1, 0, 1, 0], [0, 1, 0, 1], [0, 1, 0, 1]]
    free, corr = align_layer(sketch_stats(base), sketch_stats(donor))
    assert free.tolist() == [1, 0, 3, 2]  # crosses: base 0 -> donor 1, which is in the other ensemble
    ensembles = (labels_a, labels_b, ensemble_map)
    constrained, _ = align_layer(sketch_stats(base), sketch_stats(donor), ensembles=ensembles, ensemble_bonus=2.0)
    assert within[torch.arange(4), constrained].sum() == 4
    assert constrained.tolist() == match(corr + 2.0 * within).tolist()
    # a bonus smaller than any gain of the free optimum leaves it; a single ensemble adds a constant
    weak, _ = align_layer(sketch_stats(base), sketch_stats(donor), ensembles=ensembles, ensemble_bonus=1e-6)
    assert torch.equal(weak, free)
    one = (torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long), torch.tensor([0]))
    assert torch.equal(align_layer(sketch_stats(base), sketch_stats(donor), ensembles=one, ensemble_bonus=5.0)[0], free)
