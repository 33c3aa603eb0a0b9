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


def hand_checkpoint(directory: Path, tensors: dict[str, list[float]]) -> Path:
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    save_file({k: torch.tensor(v) for k, v in tensors.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text("{}")
    return directory


def test_ties_mergekit_convention_on_hand_made_checkpoints(tmp_path):
    names = ("model.layers.0.a", "model.layers.0.t2", "model.layers.0.t3")
    base = hand_checkpoint(tmp_path / "base", dict(zip(names, ([0.0] * 4, [0.0, 0.0], [0.0] * 3))))
    d1 = hand_checkpoint(tmp_path / "d1", dict(zip(names, ([4.0, -1.0, 2.0, 0.5], [1.0, -2.0], [3.0, 2.0, 1.0]))))
    d2 = hand_checkpoint(tmp_path / "d2", dict(zip(names, ([-1.0, 3.0, -0.5, 1.5], [-1.0, 2.0], [0.0, 0.0, 0.0]))))
    density = [{"filter": "t2", "value": 1.0}, {"value": 0.5}]
    ties = {"plugin": "ties", "density": density, "weights": [1.0, 3.0], "scale": 0.5}
    run = run_steps(tmp_path, {"base": base, "d1": d1, "d2": d2}, [
        {"fuse": {**ties, "convention": "mergekit"}},
        {"fuse": {**ties, "models": ["base", "d1", "d2"], "as": "paper"}},
        {"fuse": {**ties, "convention": "mergekit", "normalize": False, "models": ["base", "d1", "d2"], "as": "sum"}},
    ])
    mk, paper, summed = (weights(run / f"{i:02d}-fuse-ties" / "model") for i in range(3))
    # a: k = int(.5 * 4) = 2 per donor: (4, 0, 2, 0) and (0, 3, 0, 1.5); weighted (4, 0, 2, 0), (0, 9, 0, 4.5);
    # all signs +; mean over agreeing weights (4/1, 9/3, 2/1, 4.5/3) = (4, 3, 2, 1.5); lambda .5 after
    assert mk["model.layers.0.a"].tolist() == [2.0, 1.5, 1.0, 0.75]
    assert summed["model.layers.0.a"].tolist() == [2.0, 4.5, 1.0, 2.25]
    # t2 (density 1 by filter): weighted sums (1 - 3, -2 + 6) = (-2, 4): -, +: (-3/3, 6/3) * .5
    assert mk["model.layers.0.t2"].tolist() == [-0.5, 1.0]
    # the paper elects on unweighted sums (0, 0): no sign, nothing kept
    assert paper["model.layers.0.t2"].tolist() == [0.0, 0.0]
    # t3: int(1.5) = 1 entry kept by mergekit, ceil(1.5) = 2 by the paper
    assert mk["model.layers.0.t3"].tolist() == [1.5, 0.0, 0.0]
    assert paper["model.layers.0.t3"].tolist() == [1.5, 1.0, 0.0]


def test_ties_zero_sign_sum_elects_plus_under_mergekit(tmp_path):
    base = hand_checkpoint(tmp_path / "base", {"w": [0.0, 0.0]})
    d1 = hand_checkpoint(tmp_path / "d1", {"w": [1.0, -2.0]})
    d2 = hand_checkpoint(tmp_path / "d2", {"w": [-1.0, 2.0]})
    run = run_steps(tmp_path, {"base": base, "d1": d1, "d2": d2}, [
        {"fuse": {"plugin": "ties", "density": 1.0, "convention": "mergekit"}}])
    # sums (0, 0) elect +: donor 1's +1 and donor 2's +2 survive alone
    assert weights(run / "00-fuse-ties" / "model")["w"].tolist() == [1.0, 2.0]


def test_dare_l1_rescale_restores_each_task_vectors_norm(tmp_path, three):
    a, b, _ = three
    run = run_steps(tmp_path, {"a": a, "b": b}, [
        {"fuse": {"plugin": "dare", "density": 0.4, "rescale": "l1"}},
        {"fuse": {"plugin": "dare", "models": ["a", "b"], "density": 0.4, "as": "inv"}},
    ], seed=5)
    wa, wb = weights(a), weights(b)
    l1, inv = weights(run / "00-fuse-dare" / "model"), weights(run / "01-fuse-dare" / "model")
    for name in ("model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.o_proj.weight"):
        tau, kept_l1, kept_inv = wb[name] - wa[name], l1[name] - wa[name], inv[name] - wa[name]
        assert kept_l1.abs().sum().item() == pytest.approx(tau.abs().sum().item(), rel=1e-4)
        # the same mask (same seed): the two rescalings differ by one factor per tensor
        mask = kept_inv != 0
        assert torch.equal(mask, kept_l1 != 0)
        factor = tau.abs().sum() / tau[mask].abs().sum()
        assert torch.allclose(kept_l1[mask], tau[mask] * factor, rtol=1e-4)
        assert torch.allclose(kept_inv[mask], tau[mask] / 0.4, rtol=1e-5)
