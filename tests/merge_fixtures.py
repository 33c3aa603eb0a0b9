"""Tiny checkpoints with a tokenizer, probe files and a recipe runner for the merge tests."""
from __future__ import annotations

import json
from pathlib import Path

import torch

SIZE = {"hidden": 32, "layers": 2, "heads": 4, "kv_heads": 2, "vision_hidden": 16, "vision_layers": 1}


def tokenizer():
    from surgery.models.zoo.tokenizer import build_tokenizer

    return build_tokenizer()


def build(arch: str, seed: int) -> torch.nn.Module:
    """A randomly initialised zoo-shaped model (deterministic in ``seed``), in eval mode."""
    from surgery.models.zoo.architectures import build_model

    torch.manual_seed(seed)
    return build_model(arch, SIZE).eval()


def save(model: torch.nn.Module, directory: Path) -> Path:
    model.save_pretrained(directory)
    tokenizer().save_pretrained(directory)
    return directory


def perturbed(model: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    """A "fine-tune": the same model plus small seeded noise on every float tensor."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return model


def probe_file(path: Path, n: int = 24, seed: int = 0) -> Path:
    from surgery.models.zoo.tasks import make_examples

    lines = [json.dumps({"text": ex["text"]}) for ex in make_examples("synthetic-mix", n, seed=seed)]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_steps(tmp_path: Path, models: dict[str, Path], steps: list[dict], data: Path | None = None,
              seed: int = 0, max_tokens: int = 32, batch_size: int = 8) -> Path:
    """Run a recipe given as data (probe set ``data`` as ``probe``); return the run directory."""
    from surgery.runtime.manager import Manager
    from surgery.runtime.recipe import validate
    from surgery.runtime.runner import run_recipe

    raw = {"name": "t", "seed": seed, "models": {k: str(v) for k, v in models.items()}, "steps": steps,
           "output": str(tmp_path / "run")}
    if data is not None:
        raw["data"] = {"probe": {"source": "jsonl", "path": str(data), "max_tokens": max_tokens, "batch_size": batch_size}}
    manager = Manager()
    run_recipe(validate(raw, manager, base_dir=tmp_path), manager, quiet=True)
    return tmp_path / "run"


def logits(model: torch.nn.Module, input_ids: torch.Tensor, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, **inputs).logits
