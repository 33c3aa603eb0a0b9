"""Objectives: causal-lm against transformers' own loss, masking rules, and the masked-diffusion
weights (1/t over the row's token count: an unbiased estimate of the mean token NLL)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from plugin_registries import get_objective
from tiny_models import build, make_batch

from surgery.core.errors import DataError, PluginError
from surgery.models.objectives import IGNORE_INDEX, Objective, flat_nll, token_nll
from surgery.plugins.objectives import CausalLM, MaskedDiffusion, MaskedLM

MASK_ID = 5


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_registered_objectives_follow_the_protocol():
    for name in ("causal-lm", "masked-lm", "masked-diffusion"):
        objective = get_objective(name)
        assert isinstance(objective, Objective) and objective.name == name
    with pytest.raises(PluginError, match="did you mean 'masked-lm'"):
        get_objective("masked-llm")


def test_causal_lm_matches_the_models_own_loss_for_one_row():
    model = build("llama")
    ids = torch.randint(3, 60, (1, 11), generator=generator(3))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], labels=batch["input_ids"])
    objective = CausalLM()
    loss_b = objective.loss(out.logits, objective.prepare(batch, generator()))
    assert loss_b.shape == (1,)
    assert torch.allclose(loss_b[0], out.loss, atol=1e-6)


def test_causal_lm_ignores_padding_row_by_row():
    model = build("llama")
    batch = make_batch("llama", rows=3, tokens=9, seed=4)  # last row: 6 real tokens, 3 padding
    with torch.no_grad():
        padded = CausalLM().loss(model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits, batch)
        alone_ids = batch["input_ids"][2:, :6]
        alone = CausalLM().loss(model(input_ids=alone_ids).logits, {"input_ids": alone_ids, "attention_mask": torch.ones_like(alone_ids)})
    assert torch.allclose(padded[2], alone[0], atol=1e-5)


def masked_batch(rows: int = 6, tokens: int = 40) -> dict:
    g = generator(1)
    ids = torch.randint(10, 60, (rows, tokens), generator=g)
    mask = torch.ones(rows, tokens, dtype=torch.long)
    mask[0, 30:] = 0
    special = torch.zeros_like(mask)
    special[:, 0] = 1
    return {"input_ids": ids, "attention_mask": mask, "special_tokens_mask": special, "mask_token_id": MASK_ID}


def test_masked_lm_masks_real_non_special_tokens_reproducibly():
    batch = masked_batch(rows=200)
    objective = MaskedLM()
    one, two = objective.prepare(batch, generator(7)), objective.prepare(batch, generator(7))
    assert torch.equal(one["input_ids"], two["input_ids"])
    assert not torch.equal(one["input_ids"], objective.prepare(batch, generator(8))["input_ids"])
    masked = one["input_ids"] == MASK_ID
    assert torch.equal(masked, one["labels"] != IGNORE_INDEX)
    assert torch.equal(one["labels"][masked], batch["input_ids"][masked])
    assert not masked[batch["attention_mask"] == 0].any() and not masked[:, 0].any()
    maskable = int(batch["attention_mask"][:, 1:].sum())
    share = float(masked.sum()) / maskable
    assert abs(share - 0.15) < 4 * (0.15 * 0.85 / maskable) ** 0.5
    assert masked.any(1).all()
    assert torch.equal(batch["input_ids"], masked_batch(rows=200)["input_ids"])  # input untouched


def test_masked_lm_loss_is_the_mean_nll_of_the_masked_tokens():
    batch = MaskedLM().prepare(masked_batch(), generator(2))
    logits = torch.randn(*batch["input_ids"].shape, 64, generator=generator(3))
    loss_b = MaskedLM().loss(logits, batch)
    for row in range(len(loss_b)):
        where = batch["labels"][row] != IGNORE_INDEX
        expected = F.cross_entropy(logits[row][where], batch["labels"][row][where])
        assert torch.allclose(loss_b[row], expected, atol=1e-5)


def test_the_mask_token_comes_from_the_batch_or_the_objective():
    batch = masked_batch()
    del batch["mask_token_id"]
    with pytest.raises(DataError, match="mask_token_id"):
        MaskedLM().prepare(batch, generator())
    assert (MaskedLM(mask_token_id=7).prepare(batch, generator())["input_ids"] == 7).any()
    assert (MaskedDiffusion(mask_token_id=7).prepare({**batch, "mask_token_id": 9}, generator())["input_ids"] == 9).any()


def test_masked_diffusion_weights_each_masked_nll_by_one_over_t_and_the_row_length():
    batch = MaskedDiffusion().prepare(masked_batch(rows=8), generator(4))
    t_b, n_b = batch["mask_ratio"], batch["num_tokens"]
    assert ((t_b > 0) & (t_b <= 1)).all()
    assert torch.equal(n_b, (masked_batch(rows=8)["attention_mask"][:, 1:]).sum(1))
    logits = torch.randn(*batch["input_ids"].shape, 64, generator=generator(5))
    loss_b = MaskedDiffusion().loss(logits, batch)
    for row in range(8):
        where = batch["labels"][row] != IGNORE_INDEX
        nll = F.cross_entropy(logits[row][where], batch["labels"][row][where], reduction="sum")
        assert torch.allclose(loss_b[row], nll / (t_b[row] * n_b[row]), atol=1e-5)


def test_masked_diffusion_mask_share_follows_t_and_its_loss_is_unbiased():
    rows, tokens, vocab = 4000, 64, 8
    g = generator(6)
    ids = torch.randint(0, vocab, (rows, tokens), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mask_token_id": vocab}
    logits = torch.randn(rows, tokens, vocab + 1, generator=g)
    prepared = MaskedDiffusion().prepare(batch, generator(7))
    share_b = (prepared["labels"] != IGNORE_INDEX).float().mean(1)
    assert torch.corrcoef(torch.stack([share_b, prepared["mask_ratio"]]))[0, 1] > 0.98
    # E_{t, mask}[(1/t) sum_masked nll / n] = mean nll over all tokens when the logits are fixed
    full_nll = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none").mean()
    estimate = MaskedDiffusion().loss(logits, prepared).mean()
    assert abs(float(estimate / full_nll) - 1) < 0.05


def sampled_49k_batch() -> tuple[torch.Tensor, dict]:
    """A tiny Llama with SmolLM2's 49152-token vocabulary and logits of a real model's spread
    (std ~3), run on tokens sampled from itself so the losses are those of fluent text."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 3.0 / 8)
        ids = torch.randint(0, 49152, (4, 1), generator=generator(1))
        for _ in range(40):
            probs = torch.softmax(model(input_ids=ids).logits[:, -1].double(), -1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator(ids.shape[1]))], 1)
        logits = model(input_ids=ids).logits
    return logits, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_causal_lm_on_a_49k_vocabulary_matches_a_float64_oracle():
    logits, batch = sampled_49k_batch()
    objective = CausalLM()
    prepared = objective.prepare(batch, generator())
    oracle_bt = F.cross_entropy(logits[:, :-1].double().flatten(0, 1), batch["input_ids"][:, 1:].flatten(),
                                reduction="none").view(4, -1)
    nll_bt, _ = token_nll(logits[:, :-1], batch["input_ids"][:, 1:])
    assert ((nll_bt.double() - oracle_bt).abs() / oracle_bt).max() <= 1e-5
    loss_b = objective.loss(logits, prepared)
    assert ((loss_b.double() - oracle_bt.mean(1)).abs() / oracle_bt.mean(1)).max() <= 1e-6
    # the gradient w.r.t. the logits is softmax - onehot (the float64 value)
    leaf = logits[:1, :-1].clone().requires_grad_(True)
    token_nll(leaf, batch["input_ids"][:1, 1:])[0].sum().backward()
    expected = torch.softmax(leaf.detach().double(), -1) - F.one_hot(batch["input_ids"][:1, 1:], 49152)
    assert (leaf.grad.double() - expected).abs().max() <= 1e-6


def test_flat_nll_handles_a_vocabulary_that_is_not_a_multiple_of_the_block():
    logits = torch.randn(5, 1000, generator=generator(2)) * 4
    labels = torch.randint(0, 1000, (5,), generator=generator(3))
    oracle = F.cross_entropy(logits.double(), labels, reduction="none")
    assert torch.allclose(flat_nll(logits, labels).double(), oracle, rtol=1e-6)
