"""The captum attribute plugin: IntegratedGradients equals ``ig``; every method runs and keeps the artifact."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("captum")

from plugin_registries import manager  # noqa: E402

from surgery.core.artifacts import Artifact  # noqa: E402
from surgery.core.errors import RecipeError  # noqa: E402
from surgery.runtime.recipe import load_recipe  # noqa: E402
from surgery.runtime.runner import run_recipe  # noqa: E402

ZOO_DATA = {"probe": {"source": "synthetic", "tasks": ["copy", "reverse"], "n": 8, "seed": 0, "batch_size": 4}}


def zoo_run(root: Path, name: str, steps: list[dict], model: str = "builtin:tiny-llama/base", data: dict = ZOO_DATA) -> Path:
    recipe = root / f"{name}.yaml"
    recipe.write_text(json.dumps({"name": name, "seed": 0, "models": {"base": model}, "data": data, "steps": steps}))
    parsed = load_recipe(recipe, manager(), [], str(root / f"run-{name}"))
    run_recipe(parsed, manager(), quiet=True)
    return parsed.output


def test_captum_integrated_gradients_equals_ig_joint_on_the_zoo_model(tmp_path):
    common = {"answer_only": True, "keep_per_sample": True}
    out = zoo_run(tmp_path, "cmp", [
        {"attribute": {"plugin": "ig", "mode": "joint", "quadrature": "gauss-legendre", "steps": 16, **common}},
        {"attribute": {"plugin": "captum", "method": "IntegratedGradients", "args": {"n_steps": 16}, **common}},
        {"attribute": {"plugin": "captum", "method": "IntegratedGradients", "target": "neurons", "args": {"n_steps": 8}, "name": "neurons", **common}},
        {"attribute": {"plugin": "ig", "mode": "joint", "target": "neurons", "steps": 8, "name": "ig-neurons", **common}},
    ])
    ours, theirs = Artifact.load(out / "00-attribute-ig"), Artifact.load(out / "01-attribute-captum")
    a, b = ours.tensors["per_sample"].double(), theirs.tensors["per_sample"].double()
    assert (a - b).abs().max() / a.abs().max() < 1e-5
    assert (ours.tensors["scores"] - theirs.tensors["scores"]).abs().max() / ours.tensors["scores"].abs().max() < 1e-5
    # the same integral: the same completeness gap (16 points of a joint path)
    assert theirs.meta["completeness"]["sum_ig"] == pytest.approx(ours.meta["completeness"]["sum_ig"], rel=1e-5)
    assert theirs.meta["completeness"]["objective_diff"] == pytest.approx(ours.meta["completeness"]["objective_diff"], rel=1e-6)
    n_ours, n_theirs = Artifact.load(out / "03-attribute-ig"), Artifact.load(out / "02-attribute-captum")
    assert (n_ours.tensors["scores"] - n_theirs.tensors["scores"]).abs().max() / n_ours.tensors["scores"].abs().max() < 1e-5


def test_every_captum_method_runs_keeps_the_artifact_and_prunes(tmp_path):
    methods = {"GradientShap": {"n_samples": 3}, "Saliency": {"abs": False}, "InputXGradient": {},
               "FeatureAblation": {"perturbations_per_eval": 4}, "Occlusion": {"sliding_window_shapes": 2, "strides": 2},
               "KernelShap": {"n_samples": 16}, "ShapleyValueSampling": {"n_samples": 2}, "Lime": {"n_samples": 16}}
    steps = [{"attribute": {"plugin": "captum", "method": m, "args": a, "answer_only": True, "name": m}} for m, a in methods.items()]
    steps += [{"attribute": {"plugin": "ablation", "answer_only": True, "name": "ours-ablation"}},
              {"attribute": {"plugin": "grad-x-act", "absolute": False, "answer_only": True, "name": "ours-grad"}},
              {"prune": {"plugin": "magnitude", "fraction": 0.25, "inputs": {"attribute": "ShapleyValueSampling"}, "as": "pruned"}}]
    small = {"probe": {**ZOO_DATA["probe"], "n": 4}}
    out = zoo_run(tmp_path, "all", steps, data=small)
    arts = {m: Artifact.load(out / f"{i:02d}-attribute-captum") for i, m in enumerate(methods)}
    for method, art in arts.items():
        assert art.tensors["scores"].shape == (2, 4) and torch.isfinite(art.tensors["scores"]).all(), method
    ablation = Artifact.load(out / f"{len(methods):02d}-attribute-ablation").tensors["scores"]
    grad = Artifact.load(out / f"{len(methods) + 1:02d}-attribute-grad-x-act").tensors["scores"]
    # FeatureAblation with baseline 0 is one-unit ablation L(1) - L(off); Saliency (signed) and
    # InputXGradient at gates 1 are the gradient; Shapley sampling is efficient (sums to L(1) - L(0))
    assert torch.allclose(arts["FeatureAblation"].tensors["scores"], ablation, atol=1e-5)
    assert torch.allclose(arts["Saliency"].tensors["scores"], grad, atol=1e-5)
    assert torch.allclose(arts["InputXGradient"].tensors["scores"], grad, atol=1e-5)
    assert arts["ShapleyValueSampling"].meta["completeness"]["max_abs_error"] < 1e-4
    # one window of two heads: the ablation of both, shared by the two
    occ = arts["Occlusion"].tensors["scores"]
    assert torch.allclose(occ[:, 0], occ[:, 1], atol=1e-6)
    assert (out / f"{len(methods) + 2:02d}-prune-magnitude").is_dir()


def test_method_options_are_checked_before_loading(tmp_path):
    recipe = tmp_path / "bad.yaml"
    steps = [{"attribute": {"plugin": "captum", "method": "IntegratedGradients", "args": {"n_stepz": 4}}}]
    recipe.write_text(json.dumps({"name": "bad", "models": {"base": "builtin:tiny-llama/base"}, "data": ZOO_DATA, "steps": steps}))
    with pytest.raises(RecipeError, match="n_stepz"):
        load_recipe(recipe, manager(), [], str(tmp_path / "run"))
    steps[0]["attribute"]["method"] = "DeepLiftt"
    recipe.write_text(json.dumps({"name": "bad", "models": {"base": "builtin:tiny-llama/base"}, "data": ZOO_DATA, "steps": steps}))
    with pytest.raises(RecipeError, match="method"):
        load_recipe(recipe, manager(), [], str(tmp_path / "run"))


def test_a_missing_captum_is_named_with_its_install_command(monkeypatch):
    import sys

    from surgery.plugins.captum_methods import INSTALL_HINT, CaptumOptions

    monkeypatch.setitem(sys.modules, "captum", None)
    monkeypatch.setitem(sys.modules, "captum.attr", None)
    with pytest.raises(ValueError, match="pip install"):
        CaptumOptions.model_validate({"method": "Saliency"})
    assert "\n" not in INSTALL_HINT
