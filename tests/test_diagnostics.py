"""Attribution diagnostics: statistics against numpy, and the report/compare commands on real runs."""
from __future__ import annotations

import json
from pathlib import Path

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
    assert missing.exit_code == 2 and "no step 'nothing-like-this'" in missing.err
    assert "00-attribute-ig" in missing.err  # the names to choose from


def test_report_names_prune_steps_their_source_and_curve(runs, surgery_cli):
    result = surgery_cli("report", runs["per-layer"])
    line = next(l for l in result.out.splitlines() if "magnitude prune of heads" in l)
    assert line.startswith("01-prune-magnitude") and "from attribution step 00-attribute-ig" in line
    curve = json.loads(surgery_cli("report", runs["per-layer"], "--json").out)["prune"][0]["curve"]
    shown = f"{curve[1][0]:.3f} -> {curve[1][1]:.6g}"
    assert shown in result.out  # the text output carries the curve


def test_report_step_filters_every_kind_and_rejects_unknown_names(runs, surgery_cli):
    prune_only = json.loads(surgery_cli("report", runs["per-layer"], "--step", "01-prune-magnitude", "--json").out)
    assert prune_only["attribution"] == [] and [p["name"] for p in prune_only["prune"]] == ["01-prune-magnitude"]
    attribution_only = json.loads(surgery_cli("report", runs["per-layer"], "--step", "00-attribute-ig", "--json").out)
    assert attribution_only["prune"] == [] and len(attribution_only["attribution"]) == 1
    unknown = surgery_cli("report", runs["per-layer"], "--step", "no-such-step")
    assert unknown.exit_code == 2 and "no step 'no-such-step'" in unknown.err


def test_plots_are_written_and_named(runs, surgery_cli, tmp_path):
    from PIL import Image

    report = surgery_cli("report", runs["per-layer"], "--plots", tmp_path / "r")
    written = [line.split(" ", 1)[1] for line in report.out.splitlines() if line.startswith("wrote ")]
    assert sorted(Path(p).name for p in written) == ["per-layer-heads-heatmap.png", "per-layer-prune-curves.png"]
    compare = surgery_cli("compare", runs["per-layer"], runs["joint"], "--plots", tmp_path / "c")
    names = sorted(Path(line.split(" ", 1)[1]).name for line in compare.out.splitlines() if line.startswith("wrote "))
    assert names == ["per-layer-vs-joint-heatmaps.png", "per-layer-vs-joint-prune-curves.png",
                     "per-layer-vs-joint-scatter.png"]
    for path in [*written, *(tmp_path / "c").iterdir()]:
        width, height = Image.open(path).size
        assert 300 <= width <= 2000 and 250 <= height <= 1200


def test_neuron_heatmaps_are_binned_to_readable_width():
    from surgery.engines.diagnostics import MAX_COLUMNS, binned

    values = torch.arange(2 * 1536, dtype=torch.float64).view(2, 1536)
    out, width = binned(values.numpy())
    assert width == 24 and out.shape == (2, MAX_COLUMNS)
    assert out[1, 3] == pytest.approx(values[1, 72:96].mean().item())  # a column is the mean of its neurons


def test_spearman_is_rank_correlation():
    from surgery.engines.diagnostics import spearman

    a = torch.tensor([0.1, 0.5, 0.2, 3.0])
    assert spearman(a, a ** 3) == pytest.approx(1.0) and spearman(a, -a) == pytest.approx(-1.0)
