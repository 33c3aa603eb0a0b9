"""The model zoo: tokenizer, synthetic tasks, build/cache/reload, and the trained merge fixtures."""
from __future__ import annotations

import dataclasses
import time

import pytest
import torch
from plugin_registries import registries
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from surgery.core.errors import DataError, ModelError
from surgery.models import zoo
from surgery.models.zoo import catalog
from surgery.models.zoo.architectures import build_model, language_model_state, load_language_model
from surgery.models.zoo.build import EVAL_EXAMPLES, EVAL_SEED
from surgery.models.zoo.encode import answer_logits, encode, model_inputs
from surgery.models.zoo.tasks import (
    IMAGE_TASKS, IMAGE_TOKENS, TASKS, TEXT_TASKS, accuracy, check_answer, make_examples, resolve_tasks
)
from surgery.models.zoo.tokenizer import VOCAB, build_tokenizer
from surgery.models.zoo.train import one_thread, train

# --- tokenizer -------------------------------------------------------------------------------------


def test_tokenizer_round_trips_every_task_and_reloads(tmp_path):
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for task in TASKS:
        for example in make_examples(task, 5, seed=0):
            ids = tokenizer(example["text"])["input_ids"]
            assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
            assert tokenizer.unk_token_id not in ids  # every task word is in the vocabulary
            assert tokenizer.decode(ids[1:-1]) == example["text"]
            assert reloaded(example["text"])["input_ids"] == ids
    specials = ("pad_token_id", "bos_token_id", "eos_token_id", "mask_token_id", "unk_token_id")
    assert [getattr(reloaded, s) for s in specials] == [getattr(tokenizer, s) for s in specials]
    assert len(tokenizer) == len(VOCAB) and tokenizer.pad_token_id == 0


# --- tasks -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_examples_are_deterministic_and_correct(task):
    first, again = make_examples(task, 40, seed=3), make_examples(task, 40, seed=3)
    assert [e["text"] for e in first] == [e["text"] for e in again]
    assert [e["text"] for e in first] != [e["text"] for e in make_examples(task, 40, seed=4)]
    for example in first:
        assert example["text"] == example["prompt"] + " " + example["answer"]
        assert example["prompt"].endswith("=") and example["task"] == task
        assert check_answer(example)
    if task in IMAGE_TASKS:
        assert torch.equal(first[0]["pixel_values"], again[0]["pixel_values"])
        assert first[0]["pixel_values"].shape == (3, 16, 16)
        assert first[0]["prompt"].split().count("<image>") == IMAGE_TOKENS


def test_task_algebra():
    for example in make_examples("reverse", 50, seed=0):
        items = example["prompt"].split()[1:-1]
        assert example["answer"].split()[::-1] == items  # reversing the answer gives the input back
    for example in make_examples("sort", 50, seed=0):
        answer = [int(x) for x in example["answer"].split()]
        assert answer == sorted(answer) and sorted(example["prompt"].split()[1:-1]) == sorted(example["answer"].split())
    for example in make_examples("add", 50, seed=0):
        a, b = (int(x) for x in example["prompt"].split()[1:3])
        assert (int(example["answer"]) - a - b) % 23 == 0


@pytest.mark.parametrize("task", ["copy", "reverse", "sort", "inc", "shape"])
def test_train_and_test_splits_never_share_an_example(task):
    def content(example):
        return example["pixel_values"].numpy().tobytes() if "pixel_values" in example else example["text"]

    train = {content(e) for e in make_examples(task, 400, seed=0, split="train")}
    test = {content(e) for e in make_examples(task, 400, seed=0, split="test")}
    assert len(test) > 50 and not train & test


def test_mixes_and_unknown_tasks():
    assert resolve_tasks("synthetic-mix") == TEXT_TASKS
    assert [e["task"] for e in make_examples(["copy", "add"], 4, seed=0)] == ["copy", "add", "copy", "add"]
    with pytest.raises(DataError, match="did you mean 'reverse'"):
        make_examples("revers", 2, seed=0)


def test_teacher_forced_accuracy_equals_greedy_decoding():
    """Greedy decoding agrees with the teacher-forced argmax up to its first mistake, so the two
    exact-match accuracies are equal (the claim in ``accuracy``'s docstring)."""
    with one_thread():  # a busy machine makes several intra-op threads crawl
        _check_greedy_equals_forced()


def _check_greedy_equals_forced() -> None:
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = build_model("llama", catalog.SMALL)
    train(model, tokenizer, ("copy",), steps=80, lr=3e-3, batch_size=32, seed=0, objective="causal")  # half-trained
    examples = make_examples("copy", 64, seed=1)
    batch = encode(examples, tokenizer)
    with torch.no_grad():
        forced_bt = answer_logits(model(**model_inputs(batch)).logits, batch, masked=False).argmax(-1)
    forced_right = greedy_right = partly_right = 0
    for length in {len(e["answer"].split()) for e in examples}:  # equal lengths: batches need no padding
        rows = [i for i, e in enumerate(examples) if len(e["answer"].split()) == length]
        prompt_ids = tokenizer([examples[i]["prompt"] for i in rows], return_tensors="pt")["input_ids"][:, :-1]
        out = model.generate(prompt_ids, max_new_tokens=length, do_sample=False, pad_token_id=0)
        for i, greedy in zip(rows, out[:, prompt_ids.shape[1]:].tolist()):
            truth = batch["targets"][i][batch["answer_mask"][i]].tolist()
            forced = forced_bt[i][batch["answer_mask"][i]].tolist()
            first_miss = next((k for k in range(length) if forced[k] != truth[k]), length - 1)
            assert greedy[: first_miss + 1] == forced[: first_miss + 1]
            forced_right += forced == truth
            greedy_right += greedy == truth
            partly_right += 0 < first_miss < length - 1
    assert forced_right == greedy_right and partly_right > 0
    assert accuracy(model, tokenizer, "copy", n=64, seed=1) == greedy_right / 64


def test_masked_accuracy_sees_no_answer_token():
    """A masked model scored with the answer visible would copy it; the scorer must mask it."""
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = build_model("bert", catalog.SMALL)
    assert accuracy(model, tokenizer, "copy", n=32, seed=0) < 0.2


# --- architectures ---------------------------------------------------------------------------------


def test_llada_is_bidirectional_and_reloads_so(tmp_path):
    torch.manual_seed(0)
    model = build_model("llada", catalog.SMALL).eval()
    ids = torch.tensor([[1, 10, 11, 12, 13]])
    changed = ids.clone()
    changed[0, -1] = 14
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits[0, 0], model(changed).logits[0, 0])  # sees the future
        model.save_pretrained(tmp_path)
        reloaded = zoo.prepare_for_inference(AutoModelForCausalLM.from_pretrained(tmp_path).eval())
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_llava_language_model_takes_llama_weights():
    torch.manual_seed(0)
    llama = build_model("llama", catalog.SMALL)
    llava = build_model("llava", catalog.LLAVA)
    load_language_model(llava, language_model_state(llama))
    for key, value in language_model_state(llava).items():
        assert torch.equal(value, llama.state_dict()[key]), key
    ids = torch.tensor([[1, 10, 11, 12]])
    with torch.no_grad():
        assert torch.allclose(llava(input_ids=ids).logits, llama(ids).logits, atol=1e-6)


# --- build and cache -------------------------------------------------------------------------------


@pytest.fixture
def quick_entry(monkeypatch):
    """A 30-step entry: exercises build, cache and reload in about a second."""
    entry = catalog.Entry("test-zoo/quick", "llama", catalog.SMALL, ("copy",), steps=30, lr=3e-3)
    child = dataclasses.replace(entry, name="test-zoo/child", steps=5, parent=entry.name)
    monkeypatch.setitem(catalog.ENTRIES, entry.name, entry)
    monkeypatch.setitem(catalog.ENTRIES, child.name, child)
    return entry


def test_build_caches_and_reloads(quick_entry, tmp_path):
    started = time.perf_counter()
    path = zoo.build("test-zoo/child", cache_dir=tmp_path)  # builds the parent first
    build_seconds = time.perf_counter() - started
    assert zoo.is_built("test-zoo/quick", tmp_path) and path.name.startswith("child-")
    assert {"config.json", "model.safetensors", "tokenizer.json", "zoo.json"} <= {p.name for p in path.iterdir()}
    record = zoo.info("test-zoo/child", tmp_path)
    assert record["built"] and record["entry"]["parent"] == "test-zoo/quick"
    assert set(record["accuracy"]) == {"copy"} and record["params"] > 0
    started = time.perf_counter()
    assert zoo.build("test-zoo/child", cache_dir=tmp_path) == path
    assert time.perf_counter() - started < min(0.5, build_seconds / 4)  # second use: no training
    model, tokenizer = zoo.load(path)  # the reloaded model scores exactly what was recorded at build time
    assert accuracy(model, tokenizer, "copy", n=EVAL_EXAMPLES, seed=EVAL_SEED) == record["accuracy"]["copy"]
    assert not list(path.parent.glob(".child-*"))  # no staging directory left behind


def test_build_is_bit_identical_under_the_seed(quick_entry, tmp_path):
    first = zoo.build("test-zoo/quick", cache_dir=tmp_path / "one")
    second = zoo.build("test-zoo/quick", cache_dir=tmp_path / "two")
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_changing_a_record_changes_the_cache_directory(quick_entry, monkeypatch, tmp_path):
    before = zoo.entry_dir("test-zoo/child", tmp_path)
    monkeypatch.setitem(catalog.ENTRIES, "test-zoo/quick", dataclasses.replace(quick_entry, steps=31))
    assert zoo.entry_dir("test-zoo/child", tmp_path) != before  # the parent's hash is part of the child's


def test_unknown_entry_names_the_closest():
    with pytest.raises(ModelError, match="did you mean 'tiny-llama/base'"):
        zoo.build("tiny-lama/base")


def test_cache_respects_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path))
    assert zoo.entry_dir("tiny-llama/base").parent.parent == tmp_path / "zoo"


# --- the plugin: data sources, evaluate step, commands -------------------------------------------


def test_synthetic_sources_through_the_data_registry():
    from surgery.models.data import load_examples, parse_data_spec

    spec = parse_data_spec({"source": "builtin:synthetic-mix", "max_samples": 10}, registries().data_sources)
    examples = load_examples(spec, 5, registries().data_sources)
    assert [e["text"] for e in examples] == [e["text"] for e in make_examples("synthetic-mix", 10, seed=5)]
    images = load_examples(parse_data_spec({"source": "synthetic", "tasks": ["shape"], "n": 3}, registries().data_sources), 0, registries().data_sources)
    assert len(images) == 3 and images[0]["pixel_values"].shape == (3, 16, 16)
    with pytest.raises(DataError, match="split"):
        parse_data_spec({"source": "synthetic", "split": "dev"}, registries().data_sources)
    with pytest.raises(DataError, match="did you mean 'reverse'"):
        parse_data_spec({"source": "synthetic", "tasks": ["copy", "revers"]}, registries().data_sources)


def test_evaluate_tasks_step_reports_each_models_accuracy(quick_entry, tmp_path):
    from surgery.runtime.manager import Manager
    from surgery.runtime.recipe import validate
    from surgery.runtime.runner import run_recipe

    path = zoo.build("test-zoo/quick", cache_dir=tmp_path / "cache")
    raw = {"name": "t", "seed": 0, "models": {"quick": str(path)}, "output": str(tmp_path / "run"),
           "steps": [{"evaluate": {"plugin": "tasks", "tasks": ["copy", "reverse"], "n": 64}}]}
    manager = Manager()
    report = run_recipe(validate(raw, manager, base_dir=tmp_path), manager, quiet=True)
    figures = report["steps"][0]["figures"]
    model, tokenizer = zoo.load(path)
    assert figures == {f"quick/{task}": accuracy(model, tokenizer, task, n=64, seed=1) for task in ("copy", "reverse")}


def test_evaluate_tasks_rejects_unknown_tasks_before_loading(tmp_path):
    from surgery.core.errors import SurgeryError
    from surgery.runtime.manager import Manager
    from surgery.runtime.recipe import validate

    raw = {"name": "t", "models": {"m": "builtin:tiny-llama/base"}, "output": str(tmp_path / "run"),
           "steps": [{"evaluate": {"plugin": "tasks", "tasks": ["sortt"]}}]}
    with pytest.raises(SurgeryError, match="did you mean 'sort'"):
        validate(raw, Manager(), base_dir=tmp_path)  # validation loads no model


def test_zoo_list_json_names_every_entry(surgery_cli, monkeypatch, tmp_path):
    import json

    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path))
    result = surgery_cli("zoo", "list", "--json")
    assert result.exit_code == 0
    rows = json.loads(result.out)
    assert [row["name"] for row in rows] == list(zoo.entries()) and not any(row["built"] for row in rows)


# --- the merge fixtures (trained once per session, cached in $SURGERY_CACHE) ------------------------


@pytest.fixture(scope="session")
def llama_fixtures():
    names = ("tiny-llama/base", "tiny-llama/task-a", "tiny-llama/task-b")
    return {name: zoo.load(zoo.build(name)) for name in names}


@pytest.mark.parametrize("name, task", [("tiny-llama/task-a", catalog.TASK_A), ("tiny-llama/task-b", catalog.TASK_B)])
def test_fine_tunes_master_their_task(llama_fixtures, name, task):
    model, tokenizer = llama_fixtures[name]
    assert accuracy(model, tokenizer, task, n=512, seed=7) >= 0.99  # fresh held-out draw, not zoo.json's


def test_task_arithmetic_of_the_fine_tunes_keeps_both_skills(llama_fixtures):
    (base, tokenizer), (model_a, _), (model_b, _) = (llama_fixtures[n] for n in
                                                    ("tiny-llama/base", "tiny-llama/task-a", "tiny-llama/task-b"))
    theta_0, theta_a, theta_b = base.state_dict(), model_a.state_dict(), model_b.state_dict()
    merged = build_model("llama", catalog.SMALL)
    merged.load_state_dict({k: theta_0[k] + (theta_a[k] - theta_0[k]) + (theta_b[k] - theta_0[k]) for k in theta_0})
    for task in (catalog.TASK_A, catalog.TASK_B):
        assert accuracy(merged, tokenizer, task, n=256, seed=7) >= 0.98
