"""Tiny checkpoints with a word-level tokenizer and a JSONL probe set, for attribution and prune tests."""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tiny_models import VOCAB, build
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<bos>", "<eos>", "<mask>")
WORDS = tuple(f"w{i}" for i in range(len(SPECIALS), VOCAB))


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<mask>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", 1), ("<eos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", mask_token="<mask>", padding_side="right")


def save_checkpoint(directory: Path, arch: str = "llama-gqa", seed: int = 0) -> Path:
    """A random tiny model of ``arch`` (see tests/tiny_models.py) with the word-level tokenizer."""
    model = build(arch, seed)
    model.save_pretrained(directory)
    tokenizer().save_pretrained(directory)
    return directory


def write_probe(path: Path, samples: int = 6, words: int = 10, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = [json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(words - rng.randrange(3)))})
             for _ in range(samples)]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_recipe(path: Path, model: Path, probe: Path, steps: list[dict], batch_size: int = 3) -> Path:
    """A recipe over one local model and the probe file (JSON is valid YAML)."""
    recipe = {"name": path.stem, "seed": 0, "models": {"base": str(model)},
              "data": {"probe": {"source": "jsonl", "path": str(probe), "batch_size": batch_size}},
              "steps": steps}
    path.write_text(json.dumps(recipe, indent=1))
    return path


def run_steps(root: Path, name: str, model: Path, probe: Path, steps: list[dict]) -> Path:
    """Write a recipe of ``steps`` under ``root``, run it, and return its run directory."""
    from plugin_registries import manager

    from surgery.runtime.recipe import load_recipe
    from surgery.runtime.runner import run_recipe

    recipe = write_recipe(root / f"{name}.yaml", model, probe, steps)
    parsed = load_recipe(recipe, manager(), [], str(root / f"run-{name}"))
    run_recipe(parsed, manager(), quiet=True)
    return parsed.output


def causal_loss(logits_btv: torch.Tensor, batch: dict) -> torch.Tensor:
    """Per-row next-token NLL (the causal-lm objective on unpadded rows)."""
    from plugin_registries import get_objective

    return get_objective("causal-lm").loss(logits_btv, batch)
