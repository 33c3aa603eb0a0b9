"""Data specs, the built-in sources (through the plugin manager) and batching."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from plugin_registries import manager, registries
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from surgery.core.errors import DataError
from surgery.models.data import DataSpec, batches, load_examples, parse_data_spec, split_preference

WORDS = "the cat sat on a mat dog ran far away q : = yes no red blue".split()


@pytest.fixture(scope="module", autouse=True)
def plugins():
    manager()  # registers the built-in sources exactly as installed plugins do
    assert {"jsonl", "preference", "stdlib-text", "image-text"} <= set(registries().data_sources)


def word_tokenizer(bos_eos: bool = False, pad: bool = True) -> PreTrainedTokenizerFast:
    """Whitespace WordLevel tokenizer; with ``bos_eos`` it wraps every text as ``<s> ... </s>``."""
    vocab = {tok: i for i, tok in enumerate(["[UNK]", "[PAD]", "<s>", "</s>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos_eos:
        core.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="[UNK]", eos_token="</s>", bos_token="<s>",
        pad_token="[PAD]" if pad else None,
    )


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def load(tmp_path: Path, seed: int = 0, **entry) -> list[dict]:
    return load_examples(parse_data_spec(entry, registries().data_sources, tmp_path), seed, registries().data_sources, tmp_path)


# --- specs ----------------------------------------------------------------------------------------

def test_spec_strips_builtin_and_validates_source_options(tmp_path):
    spec = parse_data_spec({"source": "builtin:stdlib-text", "words": 32, "max_samples": 5}, registries().data_sources, tmp_path)
    assert spec.source == "stdlib-text"
    assert spec.options == {"words": 32, "shuffle": True, "part": "all"}
    assert spec.max_samples == 5


@pytest.mark.parametrize("entry, needle", [
    ({"source": "stdlib-txt"}, "did you mean 'stdlib-text'"),
    ({"source": "stdlib-text", "word": 32}, "word"),
    ({"source": "stdlib-text", "words": 2}, "words"),
    ({"source": "jsonl", "path": "nope.jsonl"}, "nope.jsonl"),
    ({"source": "jsonl", "max_sample": 3}, "did you mean 'max_samples'"),
    ({"path": "x.jsonl"}, "source"),
])
def test_spec_errors_are_one_line_data_errors(tmp_path, entry, needle):
    with pytest.raises(DataError) as info:
        parse_data_spec(entry, registries().data_sources, tmp_path)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_spec_rejects_bad_common_values(tmp_path):
    with pytest.raises(Exception) as info:  # pydantic's error; the recipe layer names the key
        parse_data_spec({"source": "jsonl", "batch_size": 0}, registries().data_sources, tmp_path)
    assert "batch_size" in str(info.value)


def test_relative_path_resolves_against_base_dir(tmp_path):
    write_lines(tmp_path / "d.jsonl", [json.dumps({"text": "the cat"})])
    spec = parse_data_spec({"source": "jsonl", "path": "d.jsonl"}, registries().data_sources, tmp_path)
    assert Path(spec.path) == (tmp_path / "d.jsonl").resolve()
    assert load_examples(DataSpec(source="jsonl", path="d.jsonl"), 0, registries().data_sources, tmp_path) == [{"text": "the cat"}]


# --- jsonl errors name file and line -------------------------------------------------------------

@pytest.mark.parametrize("content, line, needle", [
    (b'{"text": "the cat"}\n{"text": "a dog"}\n{"text": "the ca', 3, "invalid JSON"),
    (b'{"text": "the cat"}\n\n{"txt": "a dog"}\n', 3, "'text'"),
    (b'{"prompt": "q"}\n', 1, "'answer'"),
    (b'{"text": 3}\n', 1, "string"),
    (b'["the cat"]\n', 1, "JSON object"),
    (b'{"text": "the cat"}\n{"text": "caf\xe9"}\n', 2, "UTF-8"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, content, line, needle):
    (tmp_path / "bad.jsonl").write_bytes(content)
    with pytest.raises(DataError) as info:
        load(tmp_path, source="jsonl", path="bad.jsonl")
    message = str(info.value)
    assert f"bad.jsonl:{line}:" in message and needle in message and "\n" not in message


def test_empty_file_is_named(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.jsonl: empty data file"):
        load(tmp_path, source="jsonl", path="empty.jsonl")


def test_preference_missing_field_names_line(tmp_path):
    write_lines(tmp_path / "p.jsonl", [json.dumps({"prompt": "q", "chosen": "yes", "rejected": "no"}),
                                       json.dumps({"prompt": "q", "chosen": "yes"})])
    with pytest.raises(DataError, match=r"p\.jsonl:2: missing field 'rejected'"):
        load(tmp_path, source="preference", path="p.jsonl")


def test_jsonl_prompt_answer_and_max_samples(tmp_path):
    lines = [json.dumps({"prompt": f"q {w} =", "answer": f" {w}"}) for w in ("red", "blue", "yes")]
    write_lines(tmp_path / "qa.jsonl", lines)
    examples = load(tmp_path, source="jsonl", path="qa.jsonl", max_samples=2)
    assert examples == [{"prompt": "q red =", "answer": " red", "text": "q red = red"},
                        {"prompt": "q blue =", "answer": " blue", "text": "q blue = blue"}]


# --- stdlib-text ----------------------------------------------------------------------------------

def test_stdlib_text_chunks_every_topic_in_order():
    from pydoc_data.topics import topics

    words = 50
    examples = load_examples(DataSpec(source="stdlib-text", options={"words": words, "shuffle": False}), 0, registries().data_sources)
    kept = []
    for key in sorted(topics):
        topic_words = topics[key].split()
        tail = len(topic_words) % words
        kept += topic_words[: len(topic_words) - tail] if 0 < tail < words / 2 else topic_words
    assert [w for ex in examples for w in ex["text"].split()] == kept
    lengths = [len(ex["text"].split()) for ex in examples]
    assert min(lengths) >= words / 2 and max(lengths) == words


def test_stdlib_text_shuffle_is_seeded():
    spec = DataSpec(source="stdlib-text", options={"words": 64})
    first, again, other = load_examples(spec, 1, registries().data_sources), load_examples(spec, 1, registries().data_sources), load_examples(spec, 2, registries().data_sources)
    assert first == again
    assert first != other and sorted(e["text"] for e in first) == sorted(e["text"] for e in other)
    pinned = DataSpec(source="stdlib-text", options={"words": 64}, seed=1)
    assert load_examples(pinned, 99, registries().data_sources) == first  # the spec's own seed wins


def test_stdlib_text_takes_no_path(tmp_path):
    write_lines(tmp_path / "x.jsonl", ["{}"])
    with pytest.raises(DataError, match="takes no 'path'"):
        load(tmp_path, source="stdlib-text", path="x.jsonl")


# --- batches --------------------------------------------------------------------------------------

TEXTS = ["the cat sat on a mat", "a dog ran", "the dog ran far far away", "yes"]


def test_text_batches_pad_label_and_keep_order():
    tok = word_tokenizer()
    examples = [{"text": t} for t in TEXTS]
    out = list(batches(examples, tok, batch_size=3, max_tokens=5))
    assert [b["input_ids"].shape[0] for b in out] == [3, 1]
    rows = [(b, r) for b in out for r in range(b["input_ids"].shape[0])]
    for text, (b, r) in zip(TEXTS, rows):
        expected = tok(text)["input_ids"][:5]
        n = len(expected)
        assert b["input_ids"][r, :n].tolist() == expected
        assert b["attention_mask"][r].tolist() == [1] * n + [0] * (b["input_ids"].shape[1] - n)
        assert (b["input_ids"][r, n:] == tok.pad_token_id).all()
        assert b["labels"][r, :n].tolist() == expected and (b["labels"][r, n:] == -100).all()
    assert out[0]["input_ids"].shape[1] == 5  # the longest row after truncation, not max_tokens
    again = list(batches(examples, tok, batch_size=3, max_tokens=5))
    assert all(torch.equal(x[k], y[k]) for x, y in zip(out, again) for k in x)


def test_missing_pad_token_becomes_eos():
    tok = word_tokenizer(pad=False)
    (batch,) = batches([{"text": "the cat"}, {"text": "yes"}], tok, batch_size=2, max_tokens=None)
    assert tok.pad_token == "</s>"
    assert batch["input_ids"][1, 1].item() == tok.eos_token_id and batch["labels"][1, 1].item() == -100


@pytest.mark.parametrize("bos_eos", [False, True])
def test_answer_mask_marks_exactly_the_answer(bos_eos):
    tok = word_tokenizer(bos_eos=bos_eos)
    examples = [{"prompt": "q red =", "answer": "red", "text": "q red = red"},
                {"prompt": "q : the cat sat =", "answer": "yes no", "text": "q : the cat sat = yes no"}]
    (batch,) = batches(examples, tok, batch_size=2, max_tokens=None)
    for row, ex in enumerate(examples):
        ids = tok(ex["text"])["input_ids"]
        n = len(ids)
        assert batch["input_ids"][row, :n].tolist() == ids  # the whole text, as a model saw it
        answer = batch["input_ids"][row][batch["answer_mask"][row] == 1].tolist()
        assert answer == tok(ex["answer"], add_special_tokens=False)["input_ids"]
        assert batch["labels"][row, :n].tolist() == ids  # labels cover prompt and answer


def test_answer_mask_survives_truncation():
    tok = word_tokenizer()
    (batch,) = batches([{"prompt": "the cat", "answer": "sat on a mat", "text": "the cat sat on a mat"}],
                       tok, batch_size=1, max_tokens=4)
    assert batch["answer_mask"].tolist() == [[0, 0, 1, 1]]


def test_preference_batches_split_into_chosen_and_rejected():
    tok = word_tokenizer()
    examples = [{"prompt": "q red = ", "chosen": "red", "rejected": "blue no", "text": "q red = red"}]
    (batch,) = batches(examples, tok, batch_size=1, max_tokens=None)
    chosen, rejected = split_preference(batch)
    assert set(chosen) == {"input_ids", "attention_mask", "labels", "answer_mask"} == set(rejected)
    assert chosen["input_ids"][0][chosen["answer_mask"][0] == 1].tolist() == tok("red")["input_ids"]
    assert rejected["input_ids"][0][rejected["answer_mask"][0] == 1].tolist() == tok("blue no")["input_ids"]


def test_mixed_kinds_are_refused():
    with pytest.raises(DataError, match="mix kinds"):
        list(batches([{"text": "yes"}, {"prompt": "q", "answer": "no"}], word_tokenizer(), 2, None))


def test_text_without_tokens_is_refused():
    with pytest.raises(DataError, match="example 1 gives no tokens"):
        list(batches([{"text": "yes"}, {"text": "   "}], word_tokenizer(), 2, None))


# --- image-text -----------------------------------------------------------------------------------

def test_image_text_reads_png_npy_safetensors(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    png_hwc = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    Image.fromarray(png_hwc).save(tmp_path / "a.png")
    arr_chw = rng.random((3, 6, 8), dtype=np.float32)
    np.save(tmp_path / "b.npy", arr_chw)
    save_file({"pixel_values": torch.from_numpy(arr_chw * 2)}, str(tmp_path / "c.safetensors"))
    write_lines(tmp_path / "img.jsonl", [json.dumps({"image": name, "text": "red"})
                                         for name in ("a.png", "b.npy", "c.safetensors")])
    examples = load(tmp_path, source="image-text", path="img.jsonl")
    expected = [torch.from_numpy(png_hwc.astype(np.float32) / 255).permute(2, 0, 1),
                torch.from_numpy(arr_chw), torch.from_numpy(arr_chw * 2)]
    for ex, want in zip(examples, expected):
        assert torch.allclose(ex["pixel_values"], want)
    (batch,) = batches(examples, word_tokenizer(), batch_size=3, max_tokens=None)
    assert batch["pixel_values"].shape == (3, 3, 6, 8)

    resized = load(tmp_path, source="image-text", path="img.jsonl", size=4)
    assert all(ex["pixel_values"].shape == (3, 4, 4) for ex in resized)


def test_image_text_refuses_pickled_npy_and_missing_image(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    write_lines(tmp_path / "img.jsonl", [json.dumps({"image": "obj.npy", "text": "red"})])
    with pytest.raises(DataError, match=r"img\.jsonl:1: cannot read obj\.npy"):
        load(tmp_path, source="image-text", path="img.jsonl")
    write_lines(tmp_path / "img.jsonl", [json.dumps({"image": "gone.png", "text": "red"})])
    with pytest.raises(DataError, match=r"img\.jsonl:1: image not found: gone\.png"):
        load(tmp_path, source="image-text", path="img.jsonl")


@pytest.mark.parametrize("task", ["synthetic-mix", "synthetic-image-mix"])
def test_batches_match_the_zoo_training_encoding(task):
    """The zoo trains on its own encoding; batches of its examples must reproduce it exactly."""
    from surgery.models.zoo.encode import encode
    from surgery.models.zoo.tasks import make_examples
    from surgery.models.zoo.tokenizer import build_tokenizer

    tok = build_tokenizer()
    examples = make_examples(task, 12, seed=3)
    reference = encode(examples, tok)
    (batch,) = batches(examples, tok, batch_size=12, max_tokens=None)
    assert torch.equal(batch["input_ids"], reference["input_ids"])
    assert torch.equal(batch["attention_mask"], reference["attention_mask"])
    assert torch.equal(batch["answer_mask"].bool(), reference["answer_mask"])
    if "pixel_values" in reference:
        assert torch.equal(batch["pixel_values"], reference["pixel_values"])


def test_stdlib_text_halves_are_disjoint_and_cover_every_passage(tmp_path):
    whole = {ex["text"] for ex in load(tmp_path, source="stdlib-text", words=32)}
    halves = [{ex["text"] for ex in load(tmp_path, source="stdlib-text", words=32, part=part)} for part in ("a", "b")]
    assert not halves[0] & halves[1] and halves[0] | halves[1] <= whole and all(halves)
    assert len(whole) - len(halves[0] | halves[1]) < 0.01 * len(whole)
