"""Attribution diagnostics: statistics against numpy, and the report/compare commands on real runs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from attribution_fixtures import save_checkpoint, write_probe, write_recipe
from plugin_registries import manager

from surgery.engines.diagnostics import compare_scores, cosine_matrix, pearson_matrix, sample_similarity, sign_stats
from surgery.runtime.recipe import load_recipe
from surgery.runtime.runner import run_recipe


def test_sign_stats_match_numpy():
    values = torch.tensor([0.3, -0.1, 0.0, 2.0, -0.5, 0.2])
    stats = sign_stats(values)
    v = values.double().numpy()
    assert stats["mean"] == pytest.approx(v.mean()) and stats["std"] == pytest.approx(v.std(ddof=1))
    assert stats["median"] in v and stats["min"] == -0.5 and stats["max"] == 2.0
    assert stats["share_positive"] == pytest.approx(3 / 6) and stats["share_negative"] == pytest.approx(2 / 6)


def test_similarity_matrices_and_variance_match_numpy():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(5, 12, generator=generator, dtype=torch.float64)
    np.testing.assert_allclose(pearson_matrix(x).numpy(), np.corrcoef(x.numpy()), atol=1e-12)
    norms = np.linalg.norm(x.numpy(), axis=1)
    np.testing.assert_allclose(cosine_matrix(x).numpy(), x.numpy() @ x.numpy().T / np.outer(norms, norms), atol=1e-12)
    sim = sample_similarity(x)
    off = np.corrcoef(x.numpy())[~np.eye(5, dtype=bool)]
    assert sim["pearson_mean"] == pytest.approx(off.mean()) and sim["pearson_min"] == pytest.approx(off.min())
    var = x.numpy().var(axis=0, ddof=1)
    assert sim["variance"]["mean"] == pytest.approx(var.mean()) and sim["variance"]["max"] == pytest.approx(var.max())
    assert sim["variance"]["top_units"][0] == int(var.argmax())


def test_compare_scores_is_invariant_to_scale_and_shift():
    a = torch.tensor([0.1, -0.4, 0.3, 0.7])
    cmp = compare_scores(a, 3 * a + 1, a[None], (3 * a + 1)[None])
    assert cmp["pearson"] == pytest.approx(1.0) and cmp["per_sample_pearson_mean"] == pytest.approx(1.0)
    assert compare_scores(a, -a)["cosine"] == pytest.approx(-1.0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("diagnostics")
    model, probe = save_checkpoint(root / "model"), write_probe(root / "probe.jsonl", samples=4)
    outputs = {}
    for name, mode in (("per-layer", "per-layer"), ("joint", "joint")):
        steps = [{"attribute": {"plugin": "ig", "mode": mode, "steps": 8, "keep_per_sample": True}},
                 {"prune": {"plugin": "magnitude", "fraction": 0.25, "save_model": False}}]
        recipe = write_recipe(root / f"{name}.yaml", model, probe, steps, batch_size=2)
        parsed = load_recipe(recipe, manager(), [], str(root / name))
        run_recipe(parsed, manager(), quiet=True)
        outputs[name] = parsed.output
    return outputs


def test_report_command(runs, surgery_cli):
    result = surgery_cli("report", runs["per-layer"])
    assert result.exit_code == 0, result.err
    assert "share_positive" in result.out and "completeness" in result.out and "Pearson matrix" in result.out
    assert "magnitude prune of heads" in result.out
    as_json = json.loads(surgery_cli("report", runs["per-layer"], "--json").out)
    entry = as_json["attribution"][0]
    assert entry["samples"] == 4 and len(entry["per_sample"]["pearson_matrix"]) == 4
    assert as_json["prune"][0]["objective_before"] > 0


def test_compare_command(runs, surgery_cli):
    same = json.loads(surgery_cli("compare", runs["joint"], runs["joint"], "--json").out)
    assert same["pearson"] == pytest.approx(1.0) and same["per_sample_pearson_mean"] == pytest.approx(1.0)
    result = surgery_cli("compare", runs["per-layer"], runs["joint"])
    assert result.exit_code == 0, result.err
    assert "Pearson" in result.out and "share_positive" in result.out
    missing = surgery_cli("compare", runs["per-layer"], runs["joint"], "--step-a", "nothing-like-this")
    assert missing.exit_code == 2 and "no attribution step" in missing.err
