"""Tiny models with the zoo's tokenizer, built from configs (no training), for the FPO/SAE tests."""
from __future__ import annotations

from pathlib import Path

import torch


def tiny_causal_lm(seed: int = 0, layers: int = 2, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    from surgery.models.zoo.tokenizer import VOCAB

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def save_tiny(directory: Path, seed: int = 0, **kwargs) -> Path:
    """A tiny Llama plus the zoo tokenizer, saved so stock ``from_pretrained`` loads both."""
    from surgery.models.zoo.tokenizer import build_tokenizer

    tiny_causal_lm(seed, **kwargs).save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    return directory


def perturbed(model, scale: float, seed: int = 1):
    """A copy of ``model`` with Gaussian noise of relative size ``scale`` added to every weight."""
    import copy

    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=generator))
    return other
