"""The SmolLM2 task suite on tiny stand-ins: tasks and splits, scoring oracles, deterministic builds."""
from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from surgery.models.suite import build as suite_build
from surgery.models.suite.tasks import SPLITS, TASKS, check_answer, make_examples, split_of
from surgery.models.suite.train import MAX_TOKENS, score_examples

VOCAB = 257  # 256 bytes + <pad>


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE without merges: every byte one token, so any prompt's tokens prefix its text's."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {char: i for i, char in enumerate(sorted(alphabet))}
    vocab["<pad>"] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<pad>")


def tiny_parent(directory: Path) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return directory


# --- tasks and splits ------------------------------------------------------------------------------

@pytest.mark.parametrize("task", TASKS)
def test_answers_follow_from_prompts(task):
    examples = make_examples(task, 200, seed=3, split="train")
    assert all(check_answer(example) for example in examples)
    assert all(example["text"] == example["prompt"] + example["answer"] for example in examples)


@pytest.mark.parametrize("task", TASKS)
def test_splits_are_disjoint_and_seeded(task):
    drawn = {split: make_examples(task, 150, seed=0, split=split) for split in SPLITS}
    texts = {split: {example["text"] for example in examples} for split, examples in drawn.items()}
    for i, first in enumerate(SPLITS):
        for second in SPLITS[i + 1:]:
            assert not texts[first] & texts[second], (first, second)
    assert make_examples(task, 50, seed=0, split="test") == drawn["test"][:50]
    assert make_examples(task, 50, seed=1, split="test") != drawn["test"][:50]


def test_split_shares_are_about_one_tenth():
    keys = [f"spell/{a} {b} {c}" for a in range(10) for b in range(10) for c in range(10)]
    shares = {split: sum(split_of(key) == split for key in keys) / len(keys) for split in SPLITS}
    assert 0.07 < shares["test"] < 0.13 and 0.07 < shares["validation"] < 0.13


def test_all_interleaves_the_tasks():
    examples = make_examples("all", 8, seed=0)
    assert [example["task"] for example in examples] == list(TASKS) * 2


def test_unknown_task_is_a_data_error():
    from surgery.core.errors import DataError

    with pytest.raises(DataError, match="did you mean 'spell'"):
        make_examples("spel", 1)


# --- scoring ---------------------------------------------------------------------------------------

class Peek(torch.nn.Module):
    """Predicts the next input token with logit ``scale`` (others 0), except at the position that
    predicts the last real token of odd rows, where it predicts that token + 1: odd rows are wrong."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    @property
    def base_model(self):
        return self._hidden

    def get_output_embeddings(self):
        return torch.nn.Identity()

    def _hidden(self, input_ids, attention_mask):
        next_bt = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1).clone()
        last_b = attention_mask.sum(dim=1) - 2  # the position that predicts the last real token
        for row in range(1, input_ids.shape[0], 2):
            next_bt[row, last_b[row]] = (next_bt[row, last_b[row]] + 1) % VOCAB
        return SimpleNamespace(last_hidden_state=self.scale * torch.nn.functional.one_hot(next_bt, VOCAB).float())


def test_scores_match_hand_counts():
    tokenizer, scale = byte_tokenizer(), 3.0
    examples = [ex for ex in make_examples("all", 32, seed=0, split="validation") if len(ex["text"]) < MAX_TOKENS]
    scores = score_examples(Peek(scale), tokenizer, examples, batch_size=len(examples))
    right_nll = math.log(math.exp(scale) + VOCAB - 1) - scale  # true token has logit `scale`
    wrong_nll = math.log(math.exp(scale) + VOCAB - 1)  # true token has logit 0
    for task in TASKS:
        rows = [i for i, example in enumerate(examples) if example["task"] == task]
        answer_tokens = [len(tokenizer(examples[i]["answer"])["input_ids"]) for i in rows]
        odd = [i % 2 == 1 for i in rows]
        expected_nll = sum(n * right_nll + (wrong_nll - right_nll) * bad for n, bad in zip(answer_tokens, odd))
        assert scores[task]["accuracy"] == pytest.approx(1 - sum(odd) / len(rows))
        assert scores[task]["nll"] == pytest.approx(expected_nll / sum(answer_tokens), rel=1e-5)
        assert scores[task]["n"] == len(rows)


# --- builds ----------------------------------------------------------------------------------------

TINY_RECIPE = suite_build.Recipe(steps=3, batch_size=4, lr=1e-3, warmup=1)


def test_fine_tunes_are_deterministic_in_the_seed(tmp_path):
    parent = tiny_parent(tmp_path / "parent")
    outs = {}
    for label, seed in (("first", 1), ("again", 1), ("other", 2)):
        info = suite_build.train_into("reverse", seed, parent, tmp_path / label, TINY_RECIPE, progress=False)
        outs[label] = load_file(tmp_path / label / "model.safetensors")
        assert len(info["losses"]) == TINY_RECIPE.steps
    assert (tmp_path / "first" / "model.safetensors").read_bytes() == (tmp_path / "again" / "model.safetensors").read_bytes()
    different = [name for name in outs["first"] if not torch.equal(outs["first"][name], outs["other"][name])]
    assert different
    parent_weights = load_file(parent / "model.safetensors")
    assert any(not torch.equal(parent_weights[name], outs["first"][name]) for name in parent_weights)


def test_build_caches_under_the_record_hash(tmp_path, monkeypatch):
    parent = tiny_parent(tmp_path / "parent")
    path = suite_build.build("add", 0, parent, tmp_path / "cache", progress=False, recipe=TINY_RECIPE)
    assert suite_build.info(path)["name"] == "smollm2-135m/add"
    monkeypatch.setattr(suite_build, "train_into", lambda *a, **k: pytest.fail("rebuilt a cached fine-tune"))
    assert suite_build.build("add", 0, parent, tmp_path / "cache", progress=False, recipe=TINY_RECIPE) == path
    other = suite_build.entry_dir("add", 1, parent, tmp_path / "cache", TINY_RECIPE)
    assert other != path and other.parent == path.parent


def test_names_round_trip():
    for task in TASKS:
        for seed in suite_build.SEEDS:
            assert suite_build.parse_name(suite_build.model_name(task, seed)) == (task, seed)
    assert suite_build.model_name("add", 0) == "smollm2-135m/add"
    assert suite_build.model_name("add", 2) == "smollm2-135m/add@s2"


def test_recipe_scores_suite_data_through_the_evaluator(tmp_path):
    from plugin_registries import manager as shared_manager
    from surgery.runtime.recipe import validate
    from surgery.runtime.runner import run_recipe

    parent = tiny_parent(tmp_path / "parent")
    raw = {"name": "suite", "models": {"m": str(parent)},
           "data": {"val": {"source": "suite", "tasks": ["add", "shift"], "split": "validation", "n": 4}},
           "steps": [{"evaluate": {"plugin": "suite", "models": ["m"], "n": 4}},
                     {"evaluate": {"plugin": "suite", "models": ["m"], "data": "val", "from_data": True}}],
           "output": str(tmp_path / "run")}
    manager = shared_manager()
    report = run_recipe(validate(raw, manager, base_dir=tmp_path, source="suite"), manager, quiet=True)
    generated, given = (step["figures"] for step in report["steps"])
    assert set(generated) >= {f"m/{task}" for task in TASKS} | {f"m/nll/{task}" for task in TASKS}
    assert set(given) == {"m/add", "m/shift", "m/nll/add", "m/nll/shift", "m/accuracy"}
    assert all(value > 0 for key, value in given.items() if "/nll/" in key)


def test_suite_names_are_registered_builtins():
    from plugin_registries import registries

    models = registries().models
    assert "smollm2-135m/shift@s2" in models and "smollm2-135m/reverse" in models


def test_merge_table_recipes_validate(monkeypatch):
    """Every row of benchmarks/merge_suite.py is a valid recipe on the suite (nothing is loaded)."""
    import importlib.util

    from plugin_registries import manager as shared_manager
    from surgery.runtime.recipe import validate

    path = Path(__file__).parent.parent / "benchmarks" / "merge_suite.py"
    spec = importlib.util.spec_from_file_location("merge_suite", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "merge_suite", bench)  # dataclasses look their module up
    spec.loader.exec_module(bench)
    for method in bench.METHODS:
        sets = [["add", "spell"]] + ([list(TASKS)] if not method.max_models else [])
        for tasks in sets:
            for value in method.grid or (None,):
                raw = bench.candidate_recipe(method, tasks, 1, value, 4, 8)
                recipe = validate(raw, shared_manager(), base_dir=bench.RECIPES, source=method.name, output="unused")
                assert [step.stage for step in recipe.steps][-2:] == ["evaluate", "evaluate"]
    assert bench.split_figures({"steps": [
        {"stage": "fuse", "seconds": 2.0, "figures": {}},
        {"stage": "evaluate", "seconds": 1.0, "figures": {"m/add": 0.5}},
        {"stage": "evaluate", "seconds": 1.0, "figures": {"m/add": 0.25}}]}) == {
        "validation": {"m/add": 0.5}, "test": {"m/add": 0.25}, "seconds": 2.0}
