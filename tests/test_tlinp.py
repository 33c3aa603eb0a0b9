"""TLINP token weights against a direct implementation of seed 000's formula."""
from __future__ import annotations

import math

import pytest
import torch

from surgery.plugins.tlinp import TlinpWeighter, UniformWeighter, tlinp_weights, virtual_loss


def seed_formula(logits_tv: list[list[float]], next_ids: list[int], alpha: float) -> list[float]:
    """w_t = p_t * exp(-alpha * Lvirt_t / max_u Lvirt_u), Lvirt_t = -(1/|V|) sum_v log p_{t,v}, in plain Python."""
    probs = []
    for z in logits_tv:
        total = sum(math.exp(v) for v in z)
        probs.append([math.exp(v) / total for v in z])
    lvirt = [-sum(math.log(p) for p in row) / len(row) for row in probs]
    top = max(lvirt)
    return [row[nxt] * math.exp(-alpha * lv / top) for row, nxt, lv in zip(probs, next_ids, lvirt)]


def test_matches_seed_formula_on_hand_made_logits():
    logits = [[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 0.4], [-3.0, 4.0, 0.0, 1.0], [1.0, 1.0, 1.0, 5.0]]
    ids = [3, 2, 1, 0]  # token t+1 is ids[t+1]; the last token uses the greedy continuation
    next_ids = ids[1:] + [max(range(4), key=lambda v: logits[-1][v])]
    for alpha in (0.5, 1.0, 0.1):
        expected = seed_formula(logits, next_ids, alpha)
        got = tlinp_weights(torch.tensor([logits]), torch.tensor([ids]), torch.ones(1, 4), alpha)
        assert got.shape == (1, 4)
        assert torch.allclose(got[0].double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-7)


def test_padding_gets_zero_weight_and_no_part_in_the_max():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 11) * 3
    ids = torch.randint(0, 11, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    # huge logits on padded positions would dominate max_u Lvirt_u if padding took part
    logits[1, 3:] = torch.linspace(-500, 500, 11)
    w = tlinp_weights(logits, ids, mask)
    assert torch.all(w[1, 3:] == 0)
    short = tlinp_weights(logits[1:, :3], ids[1:, :3], mask[1:, :3])
    assert torch.allclose(w[1, :3], short[0], rtol=1e-6)
    # row 1's last real token (position 2) has no next token: weighted by its greedy probability
    expected = seed_formula(logits[1, :3].tolist(), [int(ids[1, 1]), int(ids[1, 2]), int(logits[1, 2].argmax())], 0.5)
    assert torch.allclose(w[1, :3].double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5)


def test_finite_for_50k_vocabulary_and_tiny_probabilities():
    vocab = 50_000
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 8, vocab, generator=generator) * 4
    ids = torch.randint(0, vocab, (2, 8), generator=generator)
    logits[0, 2, ids[0, 3]] = logits[0, 2].max() - 69.0  # p ~ 1e-30 for the actual next token
    logits[1, 4] = 0.0
    logits[1, 4, 7] = 300.0  # a near one-hot row: log p of everything else ~ -300
    mask = torch.ones(2, 8)
    mask[1, 6:] = 0
    w = tlinp_weights(logits, ids, mask)
    assert torch.isfinite(w).all()
    assert (w >= 0).all()
    assert 0 < w[0, 2] < 1e-28
    assert torch.isfinite(virtual_loss(logits)).all()
    # Lvirt is at least log|V| on any row (Jensen); equality for uniform logits
    assert virtual_loss(torch.zeros(1, 1, vocab)).item() == pytest.approx(math.log(vocab), rel=1e-6)
    assert (virtual_loss(logits) >= math.log(vocab) - 1e-3).all()


def test_weighters_share_the_capture_interface():
    logits = torch.randn(1, 3, 5)
    ids = torch.tensor([[1, 2, 0]])
    mask = torch.tensor([[1, 1, 0]])
    assert UniformWeighter().weights(logits, ids, mask).tolist() == [[1.0, 1.0, 0.0]]
    assert torch.equal(TlinpWeighter(0.5).weights(logits, ids, mask), tlinp_weights(logits, ids, mask, 0.5))


def test_shared_weighter_takes_every_capture_s_weights_from_its_reference_model():
    """With ``model:`` the weights are TLINP of the reference model's logits, whatever model is captured."""
    from merge_fixtures import build, perturbed, tokenizer
    from surgery.plugins.tlinp import SharedTlinpWeighter

    reference, other = build("llama", 0), perturbed(build("llama", 0), seed=1, scale=0.05)
    batch = tokenizer()(["copy: 3 1 4 = 3 1 4", "sort: 2 1 = 1 2"], return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        own_reference, own_other = reference(**batch).logits, other(**batch).logits
    shared = SharedTlinpWeighter(reference, alpha=0.5)
    expected = tlinp_weights(own_reference, ids, mask, 0.5)
    assert torch.allclose(shared.weights(own_other, ids, mask), expected, atol=1e-6)
    assert torch.allclose(shared.weights(None, ids, mask), expected, atol=1e-6)
    assert not torch.allclose(TlinpWeighter(0.5).weights(own_other, ids, mask), expected, atol=1e-4)
