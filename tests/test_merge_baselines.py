"""Streamed merge baselines: linear, task arithmetic, TIES and DARE against hand-computed oracles."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_checkpoint
from safetensors.torch import load_file

from surgery.plugins.merge_baselines import dare_drop, elect_and_mean, ties_combine, trim
from surgery.runtime.manager import Manager
from surgery.runtime.recipe import validate
from surgery.runtime.runner import run_recipe


def run_steps(tmp_path: Path, models: dict[str, Path], steps: list[dict], seed: int = 0) -> Path:
    """Run a recipe given as data; return the run directory."""
    raw = {"name": "t", "seed": seed, "models": {k: str(v) for k, v in models.items()}, "steps": steps,
           "output": str(tmp_path / "run")}
    manager = Manager()
    run_recipe(validate(raw, manager, base_dir=tmp_path), manager, quiet=True)
    return tmp_path / "run"


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


@pytest.fixture(scope="module")
def three(tmp_path_factory, tiny_checkpoints) -> tuple[Path, Path, Path]:
    a, b = tiny_checkpoints
    return a, b, make_checkpoint(tmp_path_factory.mktemp("c") / "c", 2)


def test_linear_half_half_is_the_hand_computed_average_and_reloads(tmp_path, three):
    from transformers import AutoModelForCausalLM

    a, b, _ = three
    run = run_steps(tmp_path, {"a": a, "b": b}, [{"fuse": {"plugin": "linear", "weights": [0.5, 0.5]}}])
    merged_dir = run / "00-fuse-linear" / "model"
    wa, wb, wm = weights(a), weights(b), weights(merged_dir)
    assert set(wm) == set(wa)
    for name in wa:
        assert torch.equal(wm[name], wa[name] * 0.5 + wb[name] * 0.5), name
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    by_hand = AutoModelForCausalLM.from_pretrained(a).eval()
    by_hand.load_state_dict({k: wa[k] * 0.5 + wb[k] * 0.5 for k in wa}, strict=False)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(merged(ids).logits, by_hand(ids).logits)


def test_task_arithmetic_matches_the_formula(tmp_path, three):
    a, b, c = three
    run = run_steps(tmp_path, {"a": a, "b": b, "c": c},
                    [{"fuse": {"plugin": "task-arithmetic", "scale": [0.3, 0.7]}}])
    wa, wb, wc = weights(a), weights(b), weights(c)
    wm = weights(run / "00-fuse-task-arithmetic" / "model")
    for name in wa:
        expected = wa[name] + 0.3 * (wb[name] - wa[name]) + 0.7 * (wc[name] - wa[name])
        assert torch.allclose(wm[name], expected, atol=1e-6), name


def test_ties_on_hand_made_task_vectors():
    base = torch.tensor([1.0, 1.0, 1.0, 1.0])
    taus = [torch.tensor([3.0, -1.0, 0.5, -2.0]), torch.tensor([-1.0, -4.0, 2.0, 0.1]), torch.tensor([2.0, 1.0, -3.0, -0.2])]
    # density 0.5 keeps two entries of each: [3,0,0,-2], [0,-4,2,0], [2,0,-3,0]; sum [5,-4,-1,-2]
    assert torch.equal(trim(taus[0], 0.5), torch.tensor([3.0, 0.0, 0.0, -2.0]))
    merged = ties_combine([base] + [base + t for t in taus], density=0.5, scale=1.0)
    assert torch.allclose(merged, base + torch.tensor([2.5, -4.0, -3.0, -2.0]))
    # entries where every donor is trimmed to 0 stay at the base
    assert torch.equal(elect_and_mean([torch.zeros(3), torch.zeros(3)]), torch.zeros(3))


def test_trim_keeps_the_density_share_of_largest_entries():
    tau = torch.randn(40, 25, generator=torch.Generator().manual_seed(1))
    kept = trim(tau, 0.2)
    assert int((kept != 0).sum()) == 200
    assert kept.abs().max() == tau.abs().max()
    assert tau.abs()[kept == 0].max() <= kept.abs()[kept != 0].min()


def test_ties_recipe_density_one_single_donor_is_task_arithmetic(tmp_path, three):
    a, b, _ = three
    run = run_steps(tmp_path, {"a": a, "b": b}, [
        {"fuse": {"plugin": "ties", "density": 1.0, "scale": 0.8}},
        {"fuse": {"plugin": "task-arithmetic", "models": ["a", "b"], "scale": 0.8, "as": "ta"}},
    ])
    wt, wta = weights(run / "00-fuse-ties" / "model"), weights(run / "01-fuse-task-arithmetic" / "model")
    for name in wt:
        assert torch.allclose(wt[name], wta[name], atol=1e-6), name


def test_dare_is_unbiased_and_keeps_the_density_share():
    tau = torch.randn(200_000, generator=torch.Generator().manual_seed(2))
    dropped = dare_drop(tau, 0.3, torch.Generator().manual_seed(3))
    kept = dropped != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.005
    assert torch.allclose(dropped[kept], tau[kept] / 0.3)
    # E[dropped] = tau: the mean of tau * (keep / density - 1) is ~0 relative to |tau|
    assert abs((dropped - tau).mean().item()) < 0.01


def test_dare_recipe_is_reproducible_and_density_one_is_task_arithmetic(tmp_path, three):
    a, b, c = three
    run = run_steps(tmp_path, {"a": a, "b": b, "c": c}, [
        {"fuse": {"plugin": "dare", "density": 0.5, "scale": 0.5}},
        {"fuse": {"plugin": "dare", "models": ["a", "b", "c"], "density": 0.5, "scale": 0.5, "as": "again"}},
        {"fuse": {"plugin": "dare", "models": ["a", "b", "c"], "density": 1.0, "scale": 0.5, "as": "full"}},
    ], seed=7)
    first, second = weights(run / "00-fuse-dare" / "model"), weights(run / "01-fuse-dare" / "model")
    full = weights(run / "02-fuse-dare" / "model")
    wa, wb, wc = weights(a), weights(b), weights(c)
    for name in first:
        assert torch.equal(first[name], second[name]), name
        expected = wa[name] + 0.5 * (wb[name] - wa[name]) + 0.5 * (wc[name] - wa[name])
        assert torch.allclose(full[name], expected, atol=1e-6), name
    changed = first["model.layers.0.mlp.up_proj.weight"] - wa["model.layers.0.mlp.up_proj.weight"]
    assert 0 < (changed == 0).float().mean() < 1  # some entries of both donors dropped, not all


def test_probe_loss_is_the_token_weighted_answer_nll(tmp_path):
    import json

    from merge_fixtures import build, run_steps, save, tokenizer

    model = build("llama", 0)
    model_dir = save(model, tmp_path / "m")
    records = [{"prompt": "copy: 3 1 =", "answer": " 3 1", "task": "copy"},
               {"prompt": "reverse: 4 5 6 =", "answer": " 6 5 4", "task": "reverse"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({k: r[k] for k in ("prompt", "answer")}) for r in records) + "\n")
    run = run_steps(tmp_path, {"m": model_dir}, [{"evaluate": {"plugin": "probe-loss"}}], data=tmp_path / "d.jsonl")
    figures = json.loads((run / "report.json").read_text())["steps"][0]["figures"]
    total, count = 0.0, 0
    tok = tokenizer()
    for r in records:  # by hand: NLL of each answer token given everything before it
        ids = tok(r["prompt"] + r["answer"], return_tensors="pt")["input_ids"][0]
        n_prompt = len(tok(r["prompt"])["input_ids"]) - 1  # the prompt's tokens without the closing <eos>
        with torch.no_grad():
            log_p = torch.log_softmax(model(ids[None]).logits[0].double(), -1)
        for t in range(n_prompt, n_prompt + len(r["answer"].split())):
            total -= float(log_p[t - 1, ids[t]])
            count += 1
    assert figures["m/loss"] == pytest.approx(total / count, rel=1e-5)
