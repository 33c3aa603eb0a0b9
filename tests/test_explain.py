"""Feature explanations: 0..10 scaling, seed 002's layout, top windows, pooled Pearson scoring, commands."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from surgery.engines import explain
from surgery.engines.explain import FeatureRecords, Record


def test_scaling_matches_the_formula_on_hand_made_activations():
    activations = [0.0, 0.5, 1.0, -0.3, 0.99, 0.25, 0.0999, 2.0]
    assert explain.scale(activations, 2.0) == [0, 2, 5, 0, 4, 1, 0, 10]
    assert explain.scale(activations, 1.0) == [0, 5, 10, 0, 9, 2, 0, 10]  # capped at 10
    assert explain.scale([0.0, -1.0], 0.0) == [0, 0]
    assert explain.scale([3.0], -1.0) == [0]


def test_prompt_layout_lists_every_token_then_the_nonzero_ones():
    feature = FeatureRecords(3, [Record(["the", "sense", "together", "ness", "town"], [0.0, 0.1, 3.2, 7.0, 1.4])])
    section = explain.feature_section(feature)
    assert section == (
        "Neuron 3\n\n"
        "Activations:\n<start>\nthe\t0\nsense\t0\ntogether\t4\nness\t10\ntown\t2\n<end>\n\n"
        "Activations (non-zero only):\n<start>\ntogether\t4\nness\t10\ntown\t2\n<end>"
    )
    prompt = explain.explain_prompt(feature)
    assert prompt.startswith(explain.EXPLAIN_HEADER)
    assert prompt.endswith("Explanation of neuron 3 behavior: the main thing this neuron does is find")
    simulate = explain.simulate_prompt(feature, "words about community")
    assert "<start>\nthe\tunknown\nsense\tunknown\n" in simulate and "words about community" in simulate


def test_tokens_with_tabs_and_newlines_stay_one_field():
    block = explain.activation_block(["a\tb", "c\nd"], [1, 2])
    assert block.splitlines()[1:3] == ["a\\tb\t1", "c\\nd\t2"]


def test_top_windows_keep_the_highest_peaks_in_order():
    collector = explain.TopWindows(features=[0, 1], top=2, window=3)
    acts = torch.tensor([
        [[0.0, 1.0], [5.0, 0.0], [1.0, 0.0], [0.0, 0.0]],
        [[2.0, 0.0], [0.0, 0.0], [0.0, 3.0], [9.0, 0.0]],  # last token is padding
        [[7.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]],
    ])
    tokens = [["a", "b", "c", "d"], ["e", "f", "g", "h"], ["i", "j", "k", "l"]]
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]])
    collector.add(acts, tokens, mask)
    first, second = collector.result()
    assert [r.peak() for r in first.records] == [7.0, 5.0]  # the padded 9.0 never counts
    assert first.records[1].tokens == ["a", "b", "c"] and first.records[1].activations == [0.0, 5.0, 1.0]
    assert [r.peak() for r in second.records] == [3.0, 1.0]
    assert first.max_activation == 7.0


def test_pooled_pearson_matches_numpy():
    rng = np.random.default_rng(0)
    records = [Record([f"t{i}" for i in range(n)], rng.normal(size=n).tolist()) for n in (5, 9, 3)]
    simulated = [(np.asarray(r.activations) * 0.7 + rng.normal(size=len(r.activations))).tolist() for r in records]
    score = explain.score_feature(FeatureRecords(0, records), simulated)
    true = np.concatenate([r.activations for r in records])
    expected = np.corrcoef(true, np.concatenate(simulated))[0, 1]
    assert score == pytest.approx(expected, rel=1e-12)
    per_record_mean = np.mean([np.corrcoef(r.activations, s)[0, 1] for r, s in zip(records, simulated)])
    assert score != pytest.approx(per_record_mean)  # pooled, not averaged per record


def test_constant_simulation_scores_nan_like_numpy():
    feature = FeatureRecords(0, [Record(["a", "b"], [1.0, 2.0])])
    assert np.isnan(explain.score_feature(feature, [[4.0, 4.0]]))


def test_simulation_file_parses_and_mismatches_are_errors():
    text = "Neuron 2\n<start>\nx\t1\ny\t0.5\n<end>\n<start>\nz\t3\n<end>\nNeuron 4\n<start>\nw\t0\n<end>\n"
    parsed = explain.parse_simulation(text, "sim.txt")
    assert parsed == {2: [[1.0, 0.5], [3.0]], 4: [[0.0]]}
    feature = FeatureRecords(2, [Record(["x", "y"], [1.0, 0.0]), Record(["z", "q"], [1.0, 2.0])])
    with pytest.raises(explain.ExplainError, match="record 1"):
        explain.score_feature(feature, parsed[2])
    with pytest.raises(explain.ExplainError, match="line 3"):
        explain.parse_simulation("Neuron 1\n<start>\nbad line\n<end>\n", "sim.txt")
    with pytest.raises(explain.ExplainError, match="no '<end>'"):
        explain.parse_simulation("Neuron 1\n<start>\nx\t1\n", "sim.txt")


def test_export_json_round_trips():
    features = [FeatureRecords(7, [Record(["a", "b"], [0.0, 2.5])])]
    data = explain.export_json(features)
    assert data["features"][0]["records"][0]["scaled"] == [0, 10]
    back = explain.features_from_json(json.loads(json.dumps(data)), "x.json")
    assert back[0].feature == 7 and back[0].records[0].activations == [0.0, 2.5]


# --- commands ----------------------------------------------------------------------------------

def test_explain_and_score_commands_end_to_end(tmp_path, surgery_cli):
    from fpo_fixtures import save_tiny

    from surgery.engines.sae import SAEConfig, SparseAutoencoder, save_sae
    from surgery.models.zoo import make_examples

    model_dir = save_tiny(tmp_path / "model", seed=0)
    torch.manual_seed(0)
    save_sae(SparseAutoencoder(SAEConfig(d_in=32, d_sae=64, architecture="topk", k=4, hook_name="model.layers.1", hook_layer=1)),
             tmp_path / "sae")
    data = tmp_path / "probe.jsonl"
    data.write_text("".join(json.dumps({"text": e["text"]}) + "\n" for e in make_examples("copy", 12, seed=2)))
    result = surgery_cli("sae", "explain", tmp_path / "sae", model_dir, "--out", tmp_path / "explained",
                         "--source", "jsonl", "--path", data, "--limit", "3", "--top", "2", "--window", "6")
    assert result.exit_code == 0, result.err
    export = json.loads((tmp_path / "explained" / "features.json").read_text())
    assert 1 <= len(export["features"]) <= 3
    first = export["features"][0]
    prompt = (tmp_path / "explained" / "prompts" / f"neuron_{first['feature']}.txt").read_text()
    assert prompt.startswith(explain.EXPLAIN_HEADER) and f"Neuron {first['feature']}" in prompt
    # a perfect simulation (the true activations) scores 1
    lines = [f"Neuron {first['feature']}"]
    for record in first["records"]:
        lines += ["<start>"] + [f"{t}\t{a}" for t, a in zip(record["tokens"], record["activations"])] + ["<end>"]
    (tmp_path / "sim.txt").write_text("\n".join(lines) + "\n")
    scored = surgery_cli("sae", "score-explanation", tmp_path / "explained" / "features.json", tmp_path / "sim.txt")
    assert scored.exit_code == 0, scored.err
    assert scored.out.strip() == f"neuron {first['feature']}\tr=1.0000"
    missing = surgery_cli("sae", "score-explanation", tmp_path / "nope.json", tmp_path / "sim.txt")
    assert missing.exit_code == 2 and "nope.json" in missing.err and "Traceback" not in missing.err
