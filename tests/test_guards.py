"""Numeric guards (surgery.core.guards) and the degenerate inputs plugins meet: NaN/Inf in weights,
activations and artifacts stop a step with the tensor named, or are reported under
``on_nonfinite: report``; zero-variance neurons, all-padding batches and empty clusters are handled."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from merge_fixtures import build, perturbed, probe_file, run_steps, save

from surgery import hookimpl
from surgery.core import guards
from surgery.core.artifacts import Artifact
from surgery.core.errors import NumericError

# --- the guard functions -------------------------------------------------------------------------

def test_describe_counts_nan_and_inf():
    assert guards.describe(torch.ones(3)) is None
    assert guards.describe(torch.tensor([1.0, float("nan"), float("inf"), -float("inf")])) == "1 NaN, 2 Inf of 4 values"
    assert guards.describe(torch.tensor([1, 2])) is None  # integers cannot be non-finite
    assert guards.describe(torch.empty(3, device="meta")) is None  # offloaded: nothing to check


def test_describe_in_chunks(monkeypatch):
    monkeypatch.setattr(guards, "CHUNK", 4)
    values = torch.zeros(2, 7)
    values[0, 1], values[1, 6], values[1, 0] = float("nan"), float("inf"), float("nan")
    assert guards.describe(values) == "2 NaN, 1 Inf of 14 values"
    assert guards.describe(torch.zeros(2, 7)) is None


@pytest.mark.parametrize("name,layer", [
    ("model.layers.3.mlp.down_proj.weight", 3), ("transformer.h.2.attn.c_proj.weight", 2),
    ("a/1/score", 1), ("encoder.layer.4.output.dense.weight", 4), ("lm_head.weight", None), ("a/act", None),
])
def test_layer_of_names(name, layer):
    assert guards.layer_of(name) == layer


def test_stop_raises_and_report_collects():
    bad = torch.tensor([0.0, float("nan")])
    with pytest.raises(NumericError, match=r"artifact tensor 'a/2/fai' \(layer 2\): 1 NaN of 2 values"):
        guards.check_tensors("artifact tensor", {"a/2/fai": bad})
    with guards.policy("report") as found:
        guards.check_tensors("artifact tensor", {"a/2/fai": bad, "a/2/ok": torch.zeros(2)})
    assert found.findings == ["non-finite values in artifact tensor 'a/2/fai' (layer 2): 1 NaN of 2 values"]
    assert guards.current().mode == "stop"  # the policy ends with its block


def test_check_module_names_parameter_and_layer():
    model = build("llama", 0)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[0, 0] = float("inf")
    with pytest.raises(NumericError, match=r"model 'm': parameter model\.layers\.1\.self_attn\.o_proj\.weight \(layer 1\): 1 Inf"):
        guards.check_module("m", model)


# --- through the runner -------------------------------------------------------------------------

class NanScores:
    """Scores with a NaN and an Inf in layer 1 (a stand-in for a plugin whose maths blew up)."""

    @hookimpl
    def score(self, ctx) -> Artifact:
        return Artifact(tensors={"a/0/score": torch.ones(4), "a/1/score": torch.tensor([1.0, float("nan"), float("inf"), 0.0])},
                        figures={"n": 4})


def run_nan_scores(tmp_path: Path, checkpoint: Path, mode: str | None):
    from surgery.runtime.manager import Manager
    from surgery.runtime.recipe import validate
    from surgery.runtime.runner import run_recipe

    manager = Manager()
    manager.register(NanScores(), "nan-scores")
    raw = {"name": "t", "models": {"a": str(checkpoint)}, "steps": [{"score": {"plugin": "nan-scores"}}],
           "output": str(tmp_path / "run")}
    if mode:
        raw["on_nonfinite"] = mode
    return run_recipe(validate(raw, manager, base_dir=tmp_path), manager, quiet=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save(build("llama", 0), tmp_path_factory.mktemp("guards") / "a")


def test_nonfinite_artifact_stops_the_step_naming_the_key(tmp_path, checkpoint):
    with pytest.raises(NumericError) as caught:
        run_nan_scores(tmp_path, checkpoint, None)
    assert str(caught.value).endswith(
        "step 0 (score: nan-scores): non-finite values in artifact tensor 'a/1/score' (layer 1): 1 NaN, 1 Inf of 4 values")
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "run").exists()


def test_report_mode_finishes_and_reports(tmp_path, checkpoint):
    report = run_nan_scores(tmp_path, checkpoint, "report")
    finding = "non-finite values in artifact tensor 'a/1/score' (layer 1): 1 NaN, 1 Inf of 4 values"
    assert report["steps"][0]["nonfinite"] == [finding]
    assert json.loads((tmp_path / "run" / "report.json").read_text())["steps"][0]["nonfinite"] == [finding]
    assert finding in (tmp_path / "run" / "run.log").read_text()
    again = run_nan_scores(tmp_path, checkpoint, "report")
    assert again["steps"][0]["status"] == "reused" and again["steps"][0]["nonfinite"] == [finding]
    with pytest.raises(NumericError):  # a step that went on past NaN is not reused under `stop`
        run_nan_scores(tmp_path, checkpoint, "stop")


def overflowing(seed: int) -> torch.nn.Module:
    """Finite weights whose layer-1 MLP activations overflow float32 to Inf."""
    model = build("llama", seed)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.mul_(1e30)
        model.model.layers[1].mlp.gate_proj.weight.mul_(1e30)
    return model


def test_capture_engine_overflow_stops_or_is_reported(tmp_path):
    model_dir = save(overflowing(0), tmp_path / "a")
    probe = probe_file(tmp_path / "probe.jsonl", n=8)
    with pytest.raises(NumericError, match=r"step 0 \(capture: mean\): capture: non-finite 'act/sum' in group '1'"):
        run_steps(tmp_path, {"a": model_dir}, [{"capture": {"plugin": "mean"}}], data=probe)
    assert not (tmp_path / "run").exists()
    from surgery.runtime.manager import Manager
    from surgery.runtime.recipe import validate
    from surgery.runtime.runner import run_recipe

    raw = {"models": {"a": str(model_dir)}, "on_nonfinite": "report", "output": str(tmp_path / "run"),
           "data": {"probe": {"source": "jsonl", "path": str(probe), "max_tokens": 32}},
           "steps": [{"capture": {"plugin": "mean"}}]}
    manager = Manager()
    findings = run_recipe(validate(raw, manager, base_dir=tmp_path), manager, quiet=True)["steps"][0]["nonfinite"]
    assert "capture: non-finite 'act/sum' in group '1'" in findings
    assert any(f.startswith("non-finite values in artifact tensor 'a/1/mean' (layer 1)") for f in findings)
    assert not any("'a/0/" in f for f in findings)  # layer 0 is fine


# --- degenerate inputs -------------------------------------------------------------------------

def with_dead_neurons(model: torch.nn.Module) -> torch.nn.Module:
    """Layer 0: every MLP neuron dead (identical all-zero activations, so k-means meets empty
    clusters); layer 1: neurons 0-7 dead (zero variance, zero Fisher)."""
    with torch.no_grad():
        for layer, rows in ((0, slice(None)), (1, slice(0, 8))):
            mlp = model.model.layers[layer].mlp
            mlp.gate_proj.weight[rows] = 0
            mlp.up_proj.weight[rows] = 0
    return model


def test_fam_on_dead_neurons_and_empty_clusters(tmp_path):
    base = with_dead_neurons(build("llama", 0))
    a = save(base, tmp_path / "a")
    b = save(with_dead_neurons(perturbed(build("llama", 0), 1)), tmp_path / "b")
    steps = [{"capture": {"plugin": "fam", "sketch_dim": 8}}, {"score": {"plugin": "fam"}},
             {"cluster": {"plugin": "fam", "k": 4}}, {"align": {"plugin": "hungarian"}}, {"fuse": {"plugin": "fam"}},
             {"capture": {"plugin": "mean", "models": ["a"], "name": "mean"}}]
    run = run_steps(tmp_path, {"a": a, "b": b}, steps, data=probe_file(tmp_path / "probe.jsonl", n=8))
    # every artifact tensor passed the guard (the run would have stopped); check the meaning too
    scores = Artifact.load(run / "01-score-fam").tensors
    assert torch.equal(scores["a/0/score"], torch.zeros_like(scores["a/0/score"]))
    assert torch.equal(scores["a/1/score"][:8], torch.zeros(8)) and bool((scores["a/1/score"][8:] > 0).any())
    labels = Artifact.load(run / "02-cluster-fam").tensors
    for name in ("a", "b"):
        for layer in ("0", "1"):
            assert sorted(labels[f"{name}/{layer}/labels"].unique().tolist()) == [0, 1, 2, 3]  # no cluster empty
    mean = Artifact.load(run / "05-capture-mean").tensors
    variance = mean["a/1/m2"] - mean["a/1/mean"] ** 2
    assert torch.equal(variance[:8], torch.zeros(8)) and torch.equal(mean["a/0/mean"], torch.zeros_like(mean["a/0/mean"]))
    from safetensors.torch import load_file

    merged = load_file(run / "04-fuse-fam" / "model" / "model.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in merged.values())


def padded_batches(tokenizer, texts: list[str]) -> tuple[dict, dict]:
    """A batch of ``texts`` and the same batch with an all-padding row and an all-padding twin."""
    from surgery.models.data import batches

    batch = next(batches([{"text": t} for t in texts], tokenizer, len(texts), 32))
    pad = torch.zeros_like(batch["input_ids"][:1]) + tokenizer.pad_token_id
    with_row = {key: torch.cat([batch[key], pad if key == "input_ids" else torch.zeros_like(batch[key][:1])
                                if key == "attention_mask" else torch.full_like(batch[key][:1], -100)])
                for key in ("input_ids", "attention_mask", "labels")}
    return batch, with_row


@pytest.mark.parametrize("weighting", ["uniform", "tlinp"])
def test_capture_ignores_all_padding_rows_and_batches(weighting):
    from merge_fixtures import tokenizer as zoo_tokenizer
    from plugin_registries import get_objective, view

    from surgery.engines.capture import Capture, mlp_activations
    from surgery.plugins.tlinp import TlinpWeighter

    model, tok = build("llama", 0), zoo_tokenizer()
    batch, with_row = padded_batches(tok, ["copy: 1 2 3 = 1 2 3", "sort: 3 1 2 = 1 2 3"])
    all_padding = {**batch, "attention_mask": torch.zeros_like(batch["attention_mask"]),
                   "labels": torch.full_like(batch["labels"], -100)}
    weighter = TlinpWeighter(0.5) if weighting == "tlinp" else None
    plan = {str(l.index): [mlp_activations(l, fisher=True, sketch=True, absolute=True)] for l in view(model).layers}

    def stats(*batches):
        engine = Capture(model, plan, weighter=weighter, objective=get_objective("causal-lm"), sketch_dim=4, seed=0)
        for b in batches:
            engine.add({**b, "row_index": torch.arange(b["input_ids"].shape[0])})
        return engine.result()

    alone, padded_twice, row_added = stats(batch), stats(batch, all_padding), stats(with_row)
    for group in alone:
        for key, value in alone[group].sums.items():
            assert torch.equal(padded_twice[group].sums[key], value), key  # an all-padding batch adds nothing
            torch.testing.assert_close(row_added[group].sums[key], value, rtol=1e-5, atol=1e-6)  # nor does a row
        assert row_added[group].count == alone[group].count


def test_preference_batches_carry_the_chosen_side_as_plain_sequences():
    """A capture or attribution step given preference data reads prompt + chosen (the examples'
    text), the same tensors as the ``chosen_`` keys the tune step uses."""
    from merge_fixtures import tokenizer as zoo_tokenizer

    from surgery.models.data import batches, split_preference

    examples = [{"prompt": "copy: 1 2 = ", "chosen": "1 2", "rejected": "2 1"},
                {"prompt": "sort: 3 1 = ", "chosen": "1 3", "rejected": "3 1 1"}]
    batch = next(batches(examples, zoo_tokenizer(), 2, 32))
    chosen, rejected = split_preference(batch)
    for key in ("input_ids", "attention_mask", "labels", "answer_mask"):
        assert torch.equal(batch[key], chosen[key])
    assert not torch.equal(rejected["attention_mask"].sum(1), chosen["attention_mask"].sum(1))
