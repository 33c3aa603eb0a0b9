"""Tiny random models of every architecture with a built-in adapter, and padded batches for them."""
from __future__ import annotations

from typing import Callable

import torch
import transformers as tf

VOCAB = 64
IMAGE_TOKEN = VOCAB - 1
IMAGE_TOKENS = 4  # 16x16 image, 8x8 patches; LLaVA drops CLIP's CLS feature

_DECODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
_ENCODER = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=72, pad_token_id=0)


def _llava() -> torch.nn.Module:
    vision = tf.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                 image_size=16, patch_size=8)
    text = tf.LlamaConfig(**{**_DECODER, "num_key_value_heads": 2})
    return tf.LlavaForConditionalGeneration(tf.LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN))


BUILDERS: dict[str, Callable[[], torch.nn.Module]] = {
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**_DECODER)),
    "llama-gqa": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**{**_DECODER, "num_key_value_heads": 2})),
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**{**_DECODER, "num_key_value_heads": 2})),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**{**_DECODER, "num_key_value_heads": 2})),
    "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**{**_DECODER, "num_key_value_heads": 2, "head_dim": 16})),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                                      bos_token_id=1, eos_token_id=2, pad_token_id=0)),
    "bert": lambda: tf.BertForMaskedLM(tf.BertConfig(**_ENCODER)),
    "roberta": lambda: tf.RobertaForMaskedLM(tf.RobertaConfig(**{**_ENCODER, "pad_token_id": 1})),
    "modernbert": lambda: tf.ModernBertForMaskedLM(tf.ModernBertConfig(**_ENCODER, bos_token_id=1, eos_token_id=2,
                                                                       cls_token_id=1, sep_token_id=2)),
    "llava": _llava,
}

# (architecture, part) pairs with an adapter
CASES = [(arch, "language") for arch in BUILDERS] + [("llava", "vision")]


def build(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return BUILDERS[arch]().eval()


def make_batch(arch: str, part: str = "language", rows: int = 3, tokens: int = 9, seed: int = 0) -> dict:
    """Random tokens, the last row right-padded by 3; LLaVA's vision part gets image tokens and pixels."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB - 1, (rows, tokens), generator=generator)
    mask = torch.ones(rows, tokens, dtype=torch.long)
    if part == "vision":
        ids[:, :IMAGE_TOKENS] = IMAGE_TOKEN
        pixels = torch.randn(rows, 3, 16, 16, generator=generator)
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
    mask[-1, -3:] = 0
    ids = ids.masked_fill(mask == 0, 1 if arch == "roberta" else 0)
    return {"input_ids": ids, "attention_mask": mask}


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "pixel_values")}
