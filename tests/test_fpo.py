"""FPO / SeqKL / logit-MSE constraints, the preference losses, the tune loop and its resume."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from fpo_fixtures import perturbed, save_tiny, tiny_causal_lm

from surgery.engines import preference as po


@pytest.fixture(scope="module")
def reference():
    return tiny_causal_lm(0)


def _copy(model):
    import copy

    return copy.deepcopy(model)


def _batch(ids_rows: list[list[int]], answer_from: list[int], width: int | None = None) -> dict:
    """Right-padded batch with ``answer_mask`` on positions >= answer_from[row]."""
    width = width or max(len(r) for r in ids_rows)
    ids = torch.zeros(len(ids_rows), width, dtype=torch.long)
    attention = torch.zeros_like(ids)
    answer = torch.zeros_like(ids)
    for i, row in enumerate(ids_rows):
        ids[i, :len(row)] = torch.tensor(row)
        attention[i, :len(row)] = 1
        answer[i, answer_from[i]:len(row)] = 1
    return {"input_ids": ids, "attention_mask": attention, "answer_mask": answer}


# --- SeqKL: closed-form gradient and Hessian (seed 002) --------------------------------------------

def test_seqkl_gradient_is_p_theta_minus_p_ref():
    torch.manual_seed(0)
    batch = _batch([[1, 5, 6, 7, 8, 9], [1, 5, 6, 7]], answer_from=[3, 2], width=6)
    policy = torch.randn(2, 6, 11, dtype=torch.float64, requires_grad=True)
    reference = torch.randn(2, 6, 11, dtype=torch.float64)
    po.seqkl(policy, reference, batch).sum().backward()
    predicting = po.shifted_mask(batch["input_ids"], batch["attention_mask"], batch["answer_mask"])  # [B, T-1]
    expected = (policy.softmax(-1) - reference.softmax(-1)).detach()
    expected[:, :-1] *= predicting[..., None]
    expected[:, -1] = 0
    assert torch.allclose(policy.grad, expected, atol=1e-6)
    assert predicting.sum() == 4 + 1  # 3 answer tokens of row 0 (positions 3..5), 2 of row 1 -> shifted


def test_seqkl_hessian_at_the_reference_is_diag_p_minus_ppT():
    torch.manual_seed(1)
    z_ref = torch.randn(7, dtype=torch.float64)

    def kl(z: torch.Tensor) -> torch.Tensor:
        return po.kl_per_position(z[None], z_ref[None])[0]

    hessian = torch.autograd.functional.hessian(kl, z_ref.clone())
    p = z_ref.softmax(-1)
    assert torch.allclose(hessian, torch.diag(p) - torch.outer(p, p), atol=1e-10)
    assert float(kl(z_ref)) == pytest.approx(0.0, abs=1e-12)


def test_logit_mse_ignores_a_constant_shift_and_is_zero_at_the_reference():
    torch.manual_seed(2)
    batch = _batch([[1, 2, 3, 4, 5]], answer_from=[2])
    reference = torch.randn(1, 5, 9)
    assert torch.allclose(po.logit_mse(reference + 3.0, reference, batch), torch.zeros(1), atol=1e-6)
    assert float(po.logit_mse(reference + torch.randn(1, 5, 9), reference, batch)) > 0


# --- FPO constraint ---------------------------------------------------------------------------

def test_pool_features_divides_by_the_real_token_count():
    features = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    pooled = po.pool_features(features, mask)
    assert torch.allclose(pooled[0], features[0, :2].mean(0))
    assert torch.allclose(pooled[1], features[1, 1:].mean(0))


def test_fpo_constraint_uses_the_union_of_both_topk_sets():
    policy = torch.tensor([[5.0, 4.0, 0.0, 0.0, 1.0]])
    reference = torch.tensor([[5.0, 0.0, 3.0, 0.0, 2.0]])
    # top-2 policy {0, 1}, top-2 reference {0, 2}: union {0, 1, 2}
    expected = ((5 - 5) ** 2 + (4 - 0) ** 2 + (0 - 3) ** 2) / 3
    assert float(po.fpo_constraint(policy, reference, k=2)) == pytest.approx(expected)


def _fpo(reference_model, k=8, seed=0):
    from plugin_registries import view

    from surgery.engines.sae import SAEConfig, SparseAutoencoder, site_path
    from surgery.plugins.fpo import FeatureConstraint

    torch.manual_seed(seed)
    hidden = reference_model.config.hidden_size
    sae = SparseAutoencoder(SAEConfig(d_in=hidden, d_sae=4 * hidden, architecture="topk", k=8))
    return FeatureConstraint(reference_model, sae, site_path(view(reference_model), -1), k)


def test_fpo_is_zero_for_identical_models_and_grows_with_drift(reference):
    constraint = _fpo(reference)
    batch = _batch([[1, 9, 10, 11, 12, 13], [1, 14, 15, 16]], answer_from=[3, 2])
    assert torch.allclose(constraint.penalty(reference, batch), torch.zeros(2), atol=1e-10)
    drift = [float(constraint.penalty(perturbed(reference, s), batch).mean().detach()) for s in (0.05, 0.2, 0.8)]
    assert 0 < drift[0] < drift[1] < drift[2]


def test_fpo_ignores_padding(reference):
    policy = perturbed(reference, 0.3)
    constraint = _fpo(reference)
    alone = _batch([[1, 9, 10, 11, 12]], answer_from=[2])
    padded = _batch([[1, 9, 10, 11, 12], [1, 14, 15, 16, 17, 18, 19, 20, 21]], answer_from=[2, 3])
    value_alone = constraint.penalty(policy, alone)
    value_padded = constraint.penalty(policy, padded)
    assert float(value_alone[0].detach()) > 0
    assert torch.allclose(value_alone[0], value_padded[0], rtol=1e-5, atol=1e-7)


def test_fpo_caches_the_reference_features_per_batch_content(reference):
    constraint = _fpo(reference)
    batch = _batch([[1, 9, 10, 11]], answer_from=[2])
    calls = []
    original = constraint.reference_site.run
    constraint.reference_site.run = lambda b, edit=None: calls.append(1) or original(b, edit)
    for _ in range(3):
        constraint.penalty(reference, {k: v.clone() for k, v in batch.items()})
    assert len(calls) == 1


# --- losses ------------------------------------------------------------------------------------

def test_losses_at_zero_margin_equal_log_2():
    zero = torch.zeros(3)
    assert torch.allclose(po.dpo_loss(zero, zero, 0.1), torch.full((3,), math.log(2)))
    assert torch.allclose(po.fpo_loss(zero, zero, zero, zero, 0.1, 0.5), torch.full((3,), math.log(2)))
    assert torch.allclose(po.simpo_loss(zero, zero, 2.0, 0.0), torch.full((3,), math.log(2)))


def test_fpo_loss_formula_and_stop_gradient_on_the_chosen_constraint():
    dw, dl = torch.tensor([0.3], requires_grad=True), torch.tensor([-0.2], requires_grad=True)
    cw, cl = torch.tensor([0.4], requires_grad=True), torch.tensor([0.9], requires_grad=True)
    beta, alpha = 0.1, 0.5
    loss = po.fpo_loss(dw, dl, cw, cl, beta, alpha)
    z = beta * ((0.3 + 0.2) - alpha * (0.9 - 0.4))
    assert float(loss.detach()) == pytest.approx(-math.log(1 / (1 + math.exp(-z))))
    loss.sum().backward()
    assert cw.grad is None  # sg(C_w): no gradient reaches the chosen constraint
    assert float(cl.grad) == pytest.approx(beta * alpha * (1 / (1 + math.exp(z))))
    assert float(dw.grad) == pytest.approx(-beta * (1 / (1 + math.exp(z))))


def test_tdpo_variants():
    lw, ll = torch.tensor([1.0]), torch.tensor([0.5])
    kw, kl = torch.tensor([0.2], requires_grad=True), torch.tensor([0.7], requires_grad=True)
    beta, alpha = 0.1, 0.5
    tdpo1 = po.tdpo_loss(lw, ll, kw, kl, beta, alpha, 1)
    assert float(tdpo1.detach()) == pytest.approx(float(-F.logsigmoid(torch.tensor(beta * (0.5 - 0.5)))))
    tdpo2 = po.tdpo_loss(lw, ll, kw, kl, beta, alpha, 2)
    tdpo2.sum().backward()
    assert kw.grad is None
    assert float(kl.grad) > 0


# --- the zoo preference source ----------------------------------------------------------------------

def test_zoo_preference_pairs_are_correct_vs_near_miss():
    from surgery.models.data import DataSpec
    from surgery.models.zoo.tasks import check_answer
    from surgery.plugins.fpo import load_zoo_preference

    spec = DataSpec(source="zoo-preference", options={"tasks": "synthetic-mix", "samples": 40, "split": "train"})
    pairs = load_zoo_preference(spec, seed=3)
    assert len(pairs) == 40 and pairs == load_zoo_preference(spec, seed=3)
    for pair in pairs:
        assert check_answer({"prompt": pair["prompt"], "answer": pair["chosen"]})
        assert not check_answer({"prompt": pair["prompt"], "answer": pair["rejected"]})
        chosen, rejected = pair["chosen"].split(), pair["rejected"].split()
        assert len(chosen) == len(rejected) and sum(a != b for a, b in zip(chosen, rejected)) == 1


# --- the tune loop: learning, and exact resume ------------------------------------------------------

def _pairs(n: int = 12) -> list[dict]:
    from surgery.models.data import DataSpec
    from surgery.plugins.fpo import load_zoo_preference

    return load_zoo_preference(DataSpec(source="zoo-preference", options={"tasks": ["copy"], "samples": n, "split": "train"}), 0)


def _train(policy, reference, loss, store=None, progress=None, steps=6, constraint=None):
    from surgery.engines import tuning
    from surgery.models.zoo.tokenizer import build_tokenizer

    settings = tuning.TuneSettings(loss=loss, lr=1e-2, warmup_steps=2, epochs=2, max_steps=steps, batch_size=4,
                                   max_tokens=32, checkpoint_every=2, seed=0)
    progress = progress or (lambda it, *a, **k: it)
    return tuning.train(policy, reference, _pairs(), build_tokenizer(), settings, constraint, store, progress), settings


@pytest.mark.parametrize("loss", ["dpo", "simpo", "tdpo1", "tdpo2", "fpo"])
def test_every_loss_raises_the_preference_margin(loss, reference):
    from surgery.plugins.fpo import LogitConstraint

    policy = _copy(reference)
    constraint = {"tdpo1": LogitConstraint(reference, po.seqkl), "tdpo2": LogitConstraint(reference, po.seqkl),
                  "fpo": _fpo(reference)}.get(loss)
    history, _ = _train(policy, reference, loss, constraint=constraint, steps=8)
    assert history["margin"][-1] > history["margin"][0]
    assert all(math.isfinite(x) for x in history["loss"])


def _hand_fpo_terms(policy, reference, sae, part: dict, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(avg log-ratio [B], FPO constraint [B])`` of one side, computed without the tune code: log-probs
    of the answer tokens, and the SAE features of the last block's output (a forward hook) pooled
    over the answer tokens, compared on the union of both top-k sets."""
    def answer_logps(model) -> torch.Tensor:
        logp_btv = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits[:, :-1].log_softmax(-1)
        return logp_btv.gather(-1, part["input_ids"][:, 1:, None]).squeeze(-1)

    def pooled_features(model) -> torch.Tensor:
        seen = []
        handle = model.model.layers[-1].register_forward_hook(lambda m, i, out: seen.append(out[0] if isinstance(out, tuple) else out))
        try:
            model(input_ids=part["input_ids"], attention_mask=part["attention_mask"])
        finally:
            handle.remove()
        features_btf = sae.encode(seen[0])
        return (features_btf * answer_bt[..., None]).sum(1) / answer_bt.sum(1, keepdim=True)

    answer_bt = (part["attention_mask"] * part["answer_mask"]).float()
    mask_bt = answer_bt[:, 1:]
    with torch.no_grad():
        reference_logp = (answer_logps(reference) * mask_bt).sum(-1)
        reference_features = pooled_features(reference)
    avg_logratio = ((answer_logps(policy) * mask_bt).sum(-1) - reference_logp) / mask_bt.sum(-1)
    features = pooled_features(policy)
    union = torch.zeros_like(features, dtype=torch.bool)
    union.scatter_(-1, features.detach().topk(k, -1).indices, True)
    union.scatter_(-1, reference_features.topk(k, -1).indices, True)
    constraint = ((features - reference_features) ** 2 * union).sum(-1) / union.sum(-1)
    return avg_logratio, constraint


def test_fpo_gradient_in_the_tune_loop_equals_autograd_of_the_formula_and_differs_from_dpo(reference):
    """The tune loop's FPO gradient equals autograd of ``-log sig(beta (m - alpha (C_l - sg(C_w))))``
    assembled by hand; on a drifted policy the penalty moves the gradient well away from the same loss
    without it, and so would a gradient through C_w: a loss that dropped, flipped or leaked the
    penalty fails here."""
    from surgery.engines import tuning
    from surgery.models.data import batches, split_preference
    from surgery.models.zoo.tokenizer import build_tokenizer

    policy = perturbed(reference, 0.3)
    constraint = _fpo(reference, k=8)
    with torch.no_grad():  # larger features: the penalty's share of the gradient is far above float32 noise
        for p in constraint.sae.parameters():
            p.mul_(5)
    pairs = _pairs(4)
    settings = tuning.TuneSettings(loss="fpo", alpha=10.0, batch_size=4, max_tokens=32)
    beta, alpha = settings.effective_beta, settings.alpha
    cache = tuning.reference_cache(reference, pairs, build_tokenizer(), settings, constraint, lambda it, *a, **k: it)
    batch = next(batches(pairs, build_tokenizer(), 4, 32))
    params = [p for p in policy.parameters() if p.requires_grad]

    loss_b, _ = tuning.PreferenceLoss(settings, policy, None, constraint)(batch, cache, torch.arange(4))
    tool = torch.autograd.grad(loss_b.mean(), params)

    chosen, rejected = split_preference(batch)
    m_w, c_w = _hand_fpo_terms(policy, reference, constraint.sae, chosen, 8)
    m_l, c_l = _hand_fpo_terms(policy, reference, constraint.sae, rejected, 8)
    assert float(c_l.detach().min()) > 0 and float(c_w.detach().min()) > 0  # the policy drifted: the penalty is live

    def grad_of(z_b: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.autograd.grad(-F.logsigmoid(z_b).mean(), params, retain_graph=True, allow_unused=True))

    oracle = grad_of(beta * ((m_w - m_l) - alpha * (c_l - c_w.detach())))
    no_penalty = grad_of(beta * (m_w - m_l))
    leaky = grad_of(beta * ((m_w - m_l) - alpha * (c_l - c_w)))

    def distance(a, b) -> float:
        return float(torch.sqrt(sum(((x if x is not None else 0) - (y if y is not None else 0)).double().square().sum()
                                    for x, y in zip(a, b))))

    norm = distance(tool, [torch.zeros_like(p) for p in params])
    assert distance(tool, oracle) < 1e-4 * norm
    assert distance(tool, no_penalty) > 0.05 * norm
    assert distance(tool, leaky) > 0.05 * norm


def test_resume_continues_exactly(tmp_path, reference):
    from surgery.engines import tuning

    straight = _copy(reference)
    _train(straight, reference, "fpo", constraint=_fpo(reference))

    class Crash(Exception):
        pass

    def crash_after(n):
        def progress(iterable, *args, **kwargs):
            for i, item in enumerate(iterable):
                if i == n:
                    raise Crash
                yield item
        return progress

    store = tuning.ResumeStore(tmp_path / "resume", key="k")
    interrupted = _copy(reference)
    with pytest.raises(Crash):
        _train(interrupted, reference, "fpo", store=store, progress=crash_after(5), constraint=_fpo(reference))
    assert store.load()["step"] == 4
    resumed = _copy(reference)
    history, _ = _train(resumed, reference, "fpo", store=store, constraint=_fpo(reference))
    assert len(history["loss"]) == 6
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert tuning.ResumeStore(tmp_path / "resume", key="other").load() is None


def test_optimizer_state_round_trips_without_pickle(reference):
    from surgery.engines import tuning

    model = _copy(reference)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    tensors = tuning.optimizer_tensors(model, optimizer)
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tuning.load_optimizer_tensors(model, fresh, tensors)
    for p in model.parameters():
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(optimizer.state[p][key]), torch.as_tensor(fresh.state[p][key]))


# --- through the plugin manager and a recipe -------------------------------------------------------

def test_recipe_sae_then_fpo_tune_runs_and_reloads(tmp_path):
    import yaml
    from plugin_registries import manager
    from transformers import AutoModelForCausalLM

    from surgery.models.zoo.tasks import make_examples
    from surgery.runtime.recipe import load_recipe
    from surgery.runtime.runner import run_recipe

    save_tiny(tmp_path / "base", seed=0)
    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(json.dumps({"text": ex["text"]}) + "\n" for ex in make_examples("copy", 16, seed=5)))
    recipe = {
        "name": "fpo-tiny", "seed": 0,
        "models": {"base": str(tmp_path / "base")},
        "data": {"probe": {"source": "jsonl", "path": str(probe), "max_tokens": 24, "batch_size": 8},
                 "prefs": {"source": "zoo-preference", "tasks": ["copy"], "samples": 12, "batch_size": 4, "max_tokens": 24}},
        "steps": [
            {"capture": {"plugin": "sae", "models": ["base"], "data": "probe", "epochs": 1, "expansion": 2, "k": 4}},
            {"tune": {"plugin": "preference", "loss": "fpo", "models": ["base"], "data": "prefs", "max_steps": 3, "lr": 1e-3}},
        ],
        "output": str(tmp_path / "run"),
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    report = run_recipe(load_recipe(path, manager()), manager(), quiet=True)
    tune = report["steps"][1]["figures"]
    assert tune["steps"] == 3 and math.isfinite(tune["drift_kl"])
    assert (tmp_path / "run" / "00-capture-sae" / "sae" / "cfg.json").is_file()
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "01-tune-preference" / "model")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), base.state_dict().values()))
    assert not list((tmp_path / "run").glob(".*resume"))


def test_a_tune_step_killed_midway_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    import yaml
    from plugin_registries import manager
    from safetensors.torch import load_file

    from surgery.core.errors import PluginError
    from surgery.runtime.context import StepContext
    from surgery.runtime.recipe import load_recipe
    from surgery.runtime.runner import run_recipe

    save_tiny(tmp_path / "base", seed=0)
    recipe = {
        "name": "resume", "seed": 0, "models": {"base": str(tmp_path / "base")},
        "data": {"prefs": {"source": "zoo-preference", "tasks": ["copy"], "samples": 12, "batch_size": 4, "max_tokens": 24}},
        "steps": [{"tune": {"plugin": "preference", "loss": "dpo", "epochs": 2, "max_steps": 5, "checkpoint_every": 2, "lr": 1e-3}}],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))

    def run(output: str) -> None:
        run_recipe(load_recipe(path, manager(), output=str(tmp_path / output)), manager(), quiet=True)

    run("straight")
    original = StepContext.progress

    def crashing(self, iterable, desc, total=None):
        for i, item in enumerate(original(self, iterable, desc, total)):
            if desc == "preference steps" and i == 3:
                raise RuntimeError("killed")
            yield item

    monkeypatch.setattr(StepContext, "progress", crashing)
    with pytest.raises(PluginError, match="killed"):
        run("resumed")
    assert (tmp_path / "resumed" / ".00-tune-preference.resume" / "state.json").is_file()
    monkeypatch.setattr(StepContext, "progress", original)
    run("resumed")
    assert "resumed from step 2" in (tmp_path / "resumed" / "run.log").read_text()
    straight = load_file(tmp_path / "straight" / "00-tune-preference" / "model" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "00-tune-preference" / "model" / "model.safetensors")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert not (tmp_path / "resumed" / ".00-tune-preference.resume").exists()
