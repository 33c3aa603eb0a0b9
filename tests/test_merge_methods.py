"""Spherical, Model Stock, sparsified task-vector and passthrough merges against hand-computed values."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from surgery.engines import tensor_merge as tm
from surgery.engines.merge_params import TensorParams, evaluate, position
from conftest import make_checkpoint

R2 = math.sqrt(2) / 2


def close(a, b, tol: float = 1e-6) -> bool:
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol, rtol=0)


# --- spherical ----------------------------------------------------------------------------------

def test_slerp_of_orthogonal_vectors_follows_the_arc():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert close(tm.slerp(0.5, e1, e2), [R2, R2])
    assert close(tm.slerp(1 / 3, e1, e2), [math.sqrt(3) / 2, 0.5])  # 30 degrees from e1
    # norms are interpolated with the directions: sin(pi/4) * (v0 + v1) at the midpoint
    assert close(tm.slerp(0.5, 2 * e1, e2), [2 * R2, R2])
    assert close(tm.slerp(0.0, 2 * e1, e2), [2.0, 0.0]) and close(tm.slerp(1.0, 2 * e1, e2), [0.0, 1.0])


def test_slerp_falls_back_to_linear_for_near_parallel_vectors():
    v0, v1 = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.01])  # cos = 0.99995 > 0.9995
    assert torch.equal(tm.slerp(0.5, v0, v1), 0.5 * v0 + 0.5 * v1)
    anti = tm.slerp(0.25, v0, -v0)  # antiparallel: also linear, not a division by sin(pi) ~ 0
    assert close(anti, [0.5, 0.0])


def test_nuslerp_rows_columns_and_flattened():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    # each row: row 0 orthogonal (arc midpoint), row 1 identical (colinear -> linear)
    assert close(tm.nuslerp(0.5, a, b, row_wise=False, flatten=False), [[R2, R2], [1.0, 0.0]])
    # flattened: cos = 1/2, theta = pi/3, weights sin(pi/6)/sin(pi/3) = 1/sqrt(3)
    assert close(tm.nuslerp(0.5, a, b, flatten=True), (a + b) / math.sqrt(3))
    # columns: col 0 [1,1] vs [0,1] (theta = pi/4), col 1 [0,0] vs [1,0] (a zero vector: theta = pi/2)
    f = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    assert close(tm.nuslerp(0.5, a, b, row_wise=True, flatten=False), [[f, R2], [2 * f, 0.0]])


def test_multislerp_hand_values():
    e1, e2, e3 = torch.eye(3)
    # three orthonormal vectors, equal weights: the tangent vectors cancel, the result is the mean direction
    assert close(tm.multislerp([e1, e2, e3], [1, 1, 1]), torch.ones(3) / math.sqrt(3))
    # weights 3:1 on e1, e2: mean direction (3, 1)/sqrt(10), tangents .75*(.1, -.3) + .25*(-.3, .9) = 0
    assert close(tm.multislerp([e1[:2], e2[:2]], [3, 1]), torch.tensor([3.0, 1.0]) / math.sqrt(10))
    # norms 2 and 4 at equal weights: the direction of the midpoint times the mean norm 3
    assert close(tm.multislerp([2 * e1[:2], 4 * e2[:2]], [1, 1]), [3 * R2, 3 * R2], 1e-5)
    # around a base: the same on the task vectors
    base = torch.tensor([5.0, -1.0])
    assert close(tm.multislerp([base + e1[:2], base + e2[:2]], [1, 1], base=base), base + torch.tensor([R2, R2]))


def test_karcher_mean_on_the_circle_is_the_weighted_angle():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert close(tm.karcher([2 * e1, 4 * e2]), [3 * R2, 3 * R2], 1e-5)
    # weights 3:1: a quarter of the way along the arc, pi/8 from e1 (the log/exp maps are exact on a circle)
    out = tm.karcher([e1, e2], [0.75, 0.25])
    assert close(out, [math.cos(math.pi / 8), math.sin(math.pi / 8)], 1e-5)


def test_model_stock_hand_values():
    base = torch.zeros(2)
    # orthogonal offsets: cos = 0, t = 0, the result is the base
    assert close(tm.model_stock(base, [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])]), [0.0, 0.0])
    # offsets (1,0) and (1,1): cos = 1/sqrt(2), t = 2c/(1+c) = 0.828427, mean (1, 0.5)
    t = 2 * R2 / (1 + R2)
    out = tm.model_stock(base + 1, [torch.tensor([2.0, 1.0]), torch.tensor([2.0, 2.0])])
    assert close(out, [1 + t * 1.0, 1 + t * 0.5])
    # identical fine-tunes: cos = 1, t = 1, the fine-tune itself
    w = torch.tensor([3.0, -2.0])
    assert close(tm.model_stock(base, [w, w.clone(), w.clone()]), w)
    # opposite offsets of two fine-tunes: cos = -1, 1 + (N-1) cos = 0: the base
    assert close(tm.model_stock(base, [w, -w]), base)


# --- task vectors: the TIES / DARE conventions --------------------------------------------------

def test_magnitude_mask_rounding_and_ties_by_convention():
    tau = torch.tensor([1.0, -1.0, 1.0, 0.5, 0.1])
    # density 0.5 of 5: the paper keeps ceil(2.5) = 3 (all three tied at |1|); mergekit int(2.5) = 2 by sorting
    assert tm.magnitude_mask(tau, 0.5, "paper").tolist() == [1, 1, 1, 0, 0]
    kept = tm.magnitude_mask(tau, 0.5, "mergekit")
    assert kept.sum() == 2 and kept[3] == 0 and kept[4] == 0
    # density 0.4 of 5 with ties at the threshold: the paper's threshold keeps every tie
    assert tm.magnitude_mask(torch.tensor([2.0, 1.0, 1.0, 1.0, 0.0]), 0.4, "paper").tolist() == [1, 1, 1, 1, 0]
    assert tm.magnitude_mask(torch.tensor([2.0, 1.0, 1.0, 1.0, 0.0]), 0.4, "mergekit").sum() == 2


def test_sign_election_zero_sum_and_weights_by_convention():
    taus = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-1.0, -1.0, 1.0])]
    # entry 0 sums to 0: mergekit elects +, keeps donor 1 (mean 1); the paper elects no sign (0)
    assert close(tm.combine_deltas(taus, [1, 1], "sum", True, "mergekit"), [1.0, 2.0, 2.0])
    assert close(tm.combine_deltas(taus, [1, 1], "sum", True, "paper"), [0.0, 2.0, 2.0])
    # weights 1 and 3: mergekit elects on w_i tau_i = (1,2,3), (-3,-3,3): signs -, -, +;
    # the mean over agreeing donors is sum w tau / sum w: (-3/3, -3/3, (3+3)/4)
    assert close(tm.combine_deltas(taus, [1, 3], "sum", True, "mergekit"), [-1.0, -1.0, 1.5])
    # the paper elects on the unweighted (0, 1, 4): no sign, +, +: (0, 2*1/1, (3+3)/4)
    assert close(tm.combine_deltas(taus, [1, 3], "sum", True, "paper"), [0.0, 2.0, 1.5])
    # without normalize: the sum of the agreeing weighted entries
    assert close(tm.combine_deltas(taus, [1, 3], "sum", False, "mergekit"), [-3.0, -3.0, 6.0])
    # no consensus, normalize: the weighted mean; count consensus: majority of signs
    assert close(tm.combine_deltas(taus, [1, 3], None, True, "mergekit"), [-0.5, -0.25, 1.5])
    assert close(tm.combine_deltas([taus[0], taus[1], -taus[0]], [1, 1, 1], "count", True, "mergekit"), [-1.0, -1.5, 2.0])


def test_dare_rescale_restores_the_l1_norm_or_divides_by_the_density():
    tau = torch.tensor([1.0, 2.0, 3.0, 4.0])
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0])
    # kept |1| + |3| = 4 of 10: the L1 rescale multiplies by 2.5
    assert close(tm.rescale_masked(tau, mask, "l1", 0.5), [2.5, 0.0, 7.5, 0.0])
    assert close(tm.rescale_masked(tau, mask, "inverse-density", 0.5), [2.0, 0.0, 6.0, 0.0])
    assert close(tm.rescale_masked(tau, mask, "none", 0.5), [1.0, 0.0, 3.0, 0.0])


def test_breadcrumbs_drops_outliers_and_small_entries():
    tau = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2, 0.05, 1.0, -3.0, 0.4, 0.6])
    # density .5, gamma .1 of 10: keep 5, drop the largest 1 (|-5|) and the smallest 4
    assert tm.outlier_mask(tau, 0.5, 0.1).tolist() == [0, 0, 0, 1, 0, 0, 1, 1, 1, 1]
    # gamma .01 rounds to 0 outliers: the top 5
    assert tm.outlier_mask(tau, 0.5, 0.01).tolist() == [0, 1, 0, 1, 0, 0, 1, 1, 0, 1]
    # density .8 + gamma .3 > 1: keep 8, so only 2 outliers go (|-5|, |-3|), no small entry
    assert tm.outlier_mask(tau, 0.8, 0.3).tolist() == [1, 0, 1, 1, 1, 1, 1, 0, 1, 1]


def test_della_keep_probabilities_follow_the_magnitude_rank_per_row():
    tau = torch.tensor([[0.1, -0.4, 0.2], [3.0, 1.0, 2.0]])
    # ranks (0 = smallest) [0, 2, 1] and [2, 0, 1]: p = 0.4 + 0.2 * rank / 2
    assert close(tm.della_probabilities(tau, 0.5, 0.1), [[0.4, 0.6, 0.5], [0.6, 0.4, 0.5]])
    with pytest.raises(ValueError):
        tm.della_probabilities(tau, 0.1, 0.2)
    big = torch.randn(4, 5000, generator=torch.Generator().manual_seed(0))
    mask, probs = tm.della_mask(big, 0.5, 0.15, torch.Generator().manual_seed(1))
    assert abs(mask.mean().item() - 0.5) < 0.01
    # the largest-magnitude fifth of each row is kept ~0.62 of the time, the smallest ~0.38
    order = big.abs().argsort(dim=1)
    assert abs(mask.gather(1, order[:, -1000:]).mean().item() - 0.62) < 0.03
    assert abs(mask.gather(1, order[:, :1000]).mean().item() - 0.38) < 0.03


def test_sce_hand_values():
    base = torch.zeros(3)
    t1, t2 = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-1.0, 2.0, 0.0])
    # no selection: weights mean(t^2) = 14/3, 5/3 -> 14/19, 5/19; elected signs of the sum (0, 4, 3) -> +, +, +
    # entry 0: only donor 1 agrees -> 1; entry 1: both -> 2; entry 2: donor 2's 0 does not count -> 3
    assert close(tm.sce(base, [t1, t2], 1.0), [1.0, 2.0, 3.0])
    # top half by variance: var (1, 0, 2.25), 2 non-zero -> k = 1 -> entry 2 only
    assert close(tm.sce(base, [t1, t2], 0.5), [0.0, 0.0, 3.0])


# --- per-layer and per-tensor settings ----------------------------------------------------------

def test_gradients_interpolate_over_layers_and_filters_pick_tensors():
    assert position("model.layers.0.mlp.up_proj.weight", 4) == 0
    assert position("model.layers.3.mlp.up_proj.weight", 4) == 1
    assert position("model.embed_tokens.weight", 4) == 0  # outside the layers: t = 0, as mergekit
    assert evaluate([0.0, 0.5, 1.0], "x", 1 / 3) == pytest.approx(1 / 3)
    assert evaluate([0.0, 1.0, 0.0], "x", 0.75) == pytest.approx(0.5)
    params = TensorParams([f"model.layers.{i}.self_attn.q_proj.weight" for i in range(5)])
    assert params.value([0.0, 1.0], "model.layers.1.self_attn.q_proj.weight") == pytest.approx(0.25)
    from surgery.engines.merge_params import Conditional

    setting = [Conditional(filter=r"self_attn\.", value=[0.0, 1.0]), Conditional(filter="mlp", value=0.3)]
    assert params.value(setting, "model.layers.2.self_attn.q_proj.weight") == pytest.approx(0.5)
    assert params.value(setting, "model.layers.2.mlp.up_proj.weight") == pytest.approx(0.3)
    assert params.value(setting, "model.norm.weight", default=0.9) == 0.9


# --- plugins through recipes --------------------------------------------------------------------

from test_merge_baselines import run_steps, weights  # noqa: E402  (one recipe runner for the merge tests)


@pytest.fixture(scope="module")
def trio(tmp_path_factory, tiny_checkpoints) -> tuple[Path, Path, Path]:
    a, b = tiny_checkpoints
    return a, b, make_checkpoint(tmp_path_factory.mktemp("c") / "c", 2)


def test_slerp_recipe_with_a_layer_gradient_and_filters(tmp_path, trio):
    a, b, _ = trio
    run = run_steps(tmp_path, {"a": a, "b": b}, [
        {"fuse": {"plugin": "slerp", "t": [0.0, 1.0]}},
        {"fuse": {"plugin": "slerp", "models": ["a", "b"], "as": "f", "t": [{"filter": r"mlp\.", "value": 1.0}, {"value": 0.0}]}},
        {"fuse": {"plugin": "slerp", "models": ["a", "b"], "as": "h", "t": 0.5}},
    ])
    wa, wb = weights(a), weights(b)
    ramp, filtered, half = (weights(run / d / "model") for d in ("00-fuse-slerp", "01-fuse-slerp", "02-fuse-slerp"))
    for name in wa:
        expected = wb[name] if "layers.1." in name else wa[name]  # t = 0 outside the layers and at layer 0
        assert torch.allclose(ramp[name], expected, atol=1e-6), name
        assert torch.allclose(filtered[name], wb[name] if "mlp." in name else wa[name], atol=1e-6), name
        assert torch.allclose(half[name], tm.slerp(0.5, wa[name], wb[name]), atol=1e-6), name


@pytest.mark.parametrize("plugin,options,models", [
    ("nuslerp", {"weights": [1.0, 3.0]}, ["a", "b"]),
    ("nuslerp", {"weights": [1.0, 1.0], "use_base": True, "flatten": False}, ["a", "b", "c"]),
    ("multislerp", {"weights": [1.0, 2.0, 1.0]}, ["a", "b", "c"]),
    ("karcher", {}, ["a", "b", "c"]),
    ("model-stock", {}, ["a", "b", "c"]),
    ("sce", {"select_topk": 0.5}, ["a", "b", "c"]),
    ("breadcrumbs-ties", {"density": 0.5, "gamma": 0.1, "weights": [1.0, 0.5]}, ["a", "b", "c"]),
])
def test_streamed_plugins_equal_their_tensor_formula(tmp_path, trio, plugin, options, models):
    paths = dict(zip("abc", trio))
    run = run_steps(tmp_path, {m: paths[m] for m in models}, [{"fuse": {"plugin": plugin, **options}}])
    out = weights(run / f"00-fuse-{plugin}" / "model")
    ws = [weights(paths[m]) for m in models]
    for name in ws[0]:
        ts = [w[name] for w in ws]
        if plugin == "nuslerp" and not options.get("use_base"):
            expected = tm.nuslerp(0.75, ts[0], ts[1])
        elif plugin == "nuslerp":
            expected = ts[0] + tm.nuslerp(0.5, ts[1] - ts[0], ts[2] - ts[0], flatten=False)
        elif plugin == "multislerp":
            expected = tm.multislerp(ts, [1.0, 2.0, 1.0])
        elif plugin == "karcher":
            expected = tm.karcher(ts)
        elif plugin == "model-stock":
            expected = tm.model_stock(ts[0], ts[1:])
        elif plugin == "sce":
            expected = tm.sce(ts[0], ts[1:], 0.5)
        else:
            deltas = [tm.outlier_mask(t - ts[0], 0.5, 0.1) * (t - ts[0]) for t in ts[1:]]
            expected = ts[0] + tm.combine_deltas(deltas, [1.0, 0.5], "sum", False, "paper")
        assert torch.allclose(out[name], expected, atol=1e-6), name


def test_dare_linear_l1_keeps_each_tensors_norm_and_della_is_reproducible(tmp_path, trio):
    a, b, _ = trio
    run = run_steps(tmp_path, {"a": a, "b": b}, [
        {"fuse": {"plugin": "dare-linear", "density": 0.3, "rescale": "l1"}},
        {"fuse": {"plugin": "della", "models": ["a", "b"], "as": "d1", "density": 0.5, "epsilon": 0.2}},
        {"fuse": {"plugin": "della", "models": ["a", "b"], "as": "d2", "density": 0.5, "epsilon": 0.2}},
    ], seed=3)
    wa, wb = weights(a), weights(b)
    dare = weights(run / "00-fuse-dare-linear" / "model")
    d1, d2 = weights(run / "01-fuse-della" / "model"), weights(run / "02-fuse-della" / "model")
    name = "model.layers.0.mlp.up_proj.weight"
    kept = dare[name] - wa[name]
    assert 0.25 < (kept != 0).float().mean() < 0.35
    assert kept.abs().sum().item() == pytest.approx((wb[name] - wa[name]).abs().sum().item(), rel=1e-4)
    assert all(torch.equal(d1[n], d2[n]) for n in d1)


def test_bad_settings_are_refused_before_loading(tmp_path, trio):
    from surgery.core.errors import RecipeError

    a, b, _ = trio
    with pytest.raises(RecipeError, match="filter"):
        run_steps(tmp_path, {"a": a, "b": b}, [{"fuse": {"plugin": "slerp", "t": [{"filter": "mlp[", "value": 1.0}]}}])
    with pytest.raises(RecipeError, match="weights: expected 1 entries"):
        run_steps(tmp_path, {"a": a, "b": b}, [{"fuse": {"plugin": "dare-ties", "weights": [1.0, 1.0]}}])
    with pytest.raises(RecipeError, match="slerp merges 2 models"):
        run_steps(tmp_path, {"a": a, "b": b, "c": trio[2]}, [{"fuse": {"plugin": "slerp", "t": 0.5}}])


def test_passthrough_builds_deeper_and_shallower_models_that_reload(tmp_path, trio):
    from transformers import AutoModelForCausalLM

    a, b, _ = trio
    run = run_steps(tmp_path, {"a": a, "b": b}, [
        {"fuse": {"plugin": "passthrough", "slices": [{"model": "a", "layers": [0, 2]}, {"model": "b", "layers": [1, 2]}]}},
        {"fuse": {"plugin": "passthrough", "models": ["a"], "as": "short", "slices": [{"model": "a", "layers": [0, 1]}]}},
    ])
    wa, wb = weights(a), weights(b)
    deep_dir = run / "00-fuse-passthrough" / "model"
    deep = weights(deep_dir)
    assert deep["model.embed_tokens.weight"].equal(wa["model.embed_tokens.weight"])
    assert deep["model.norm.weight"].equal(wb["model.norm.weight"]) and deep["lm_head.weight"].equal(wb["lm_head.weight"])
    assert deep["model.layers.1.mlp.up_proj.weight"].equal(wa["model.layers.1.mlp.up_proj.weight"])
    assert deep["model.layers.2.self_attn.q_proj.weight"].equal(wb["model.layers.1.self_attn.q_proj.weight"])
    model = AutoModelForCausalLM.from_pretrained(deep_dir).eval()
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3

    # the 1-layer model computes what model a with its second layer removed computes
    short = AutoModelForCausalLM.from_pretrained(run / "01-fuse-passthrough" / "model").eval()
    truncated = AutoModelForCausalLM.from_pretrained(a).eval()
    truncated.model.layers = truncated.model.layers[:1]
    truncated.config.num_hidden_layers = 1
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(short(ids).logits, truncated(ids).logits)


def test_a_merged_model_carries_a_card_and_no_zoo_record(tmp_path):
    run = run_steps(tmp_path, {"a": "builtin:tiny-llama/task-a", "b": "builtin:tiny-llama/task-b"},
                    [{"fuse": {"plugin": "slerp", "t": 0.5, "as": "merged"}}])
    model_dir = run / "00-fuse-slerp" / "model"
    assert not (model_dir / "zoo.json").exists()  # the task-a entry's record is not this model's
    card = (model_dir / "README.md").read_text()
    assert card.startswith("---\n") and "builtin:tiny-llama/task-a" in card and "builtin:tiny-llama/task-b" in card
    assert "`fuse` with the `slerp` plugin" in card and "t: 0.5" in card


def test_merge_recipes_validate():
    from surgery.runtime.manager import Manager
    from surgery.runtime.recipe import load_recipe

    root = Path(__file__).resolve().parents[1] / "recipes"
    manager = Manager()
    for name in ("merge-methods", "passthrough", "captum"):
        load_recipe(root / f"{name}.yaml", manager, [])
