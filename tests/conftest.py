"""Shared fixtures: tiny random checkpoints and an in-process CLI runner."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

TINY_LLAMA = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
)


def make_checkpoint(directory: Path, seed: int, **overrides) -> Path:
    """Save a randomly initialised tiny Llama (deterministic in ``seed``) to ``directory``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides})).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models run faster on one intra-op thread than on several that contend for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return make_checkpoint(root / "a", 0), make_checkpoint(root / "b", 1)


@dataclass
class Result:
    exit_code: int
    out: str
    err: str


@pytest.fixture
def surgery_cli(capsys, monkeypatch):
    """Run ``surgery ARGS`` in this process (so tests can monkeypatch) and capture its output."""
    from surgery.cli import main

    def invoke(*args: str) -> Result:
        monkeypatch.setattr(sys, "argv", ["surgery", *map(str, args)])
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return invoke
