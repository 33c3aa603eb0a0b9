"""Turn synthetic examples into padded tensors for training and for answer-accuracy.

Causal models see ``<bos> prompt answer <eos>`` and are scored on the logits one position before
each answer token. Masked models (BERT-style, bidirectional Llama) see the answer replaced by
``<mask>`` tokens and are scored on the logits at the answer positions themselves.
"""
from __future__ import annotations

from typing import Any

import torch

MASKED_MODEL_TYPES = ("bert", "roberta", "distilbert", "modernbert")


def is_masked_model(model: torch.nn.Module) -> bool:
    """True for masked LMs: BERT-style encoders and decoders made bidirectional (``is_causal=False``)."""
    config = model.config
    return config.model_type in MASKED_MODEL_TYPES or getattr(config, "is_causal", True) is False


def encode(examples: list[dict[str, Any]], tokenizer: Any, mask_answer: bool = False) -> dict[str, torch.Tensor]:
    """Pad examples into a batch.

    Returns ``input_ids``/``attention_mask`` [B, T], ``answer_mask`` [B, T] (True on the answer
    tokens), ``targets`` [B, T] (the true token ids everywhere; the input holds ``<mask>`` on the
    answer when ``mask_answer``) and ``pixel_values`` [B, 3, H, W] when the examples carry images.
    """
    rows, answers = [], []
    for example in examples:
        prompt = tokenizer.convert_tokens_to_ids(example["prompt"].split())
        answer = tokenizer.convert_tokens_to_ids(example["answer"].split())
        rows.append([tokenizer.bos_token_id, *prompt, *answer, tokenizer.eos_token_id])
        answers.append((1 + len(prompt), len(answer)))
    width = max(len(row) for row in rows)
    targets_bt = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_bt = torch.zeros_like(targets_bt)
    answer_bt = torch.zeros_like(targets_bt, dtype=torch.bool)
    for i, (row, (start, length)) in enumerate(zip(rows, answers)):
        targets_bt[i, : len(row)] = torch.tensor(row)
        attention_bt[i, : len(row)] = 1
        answer_bt[i, start : start + length] = True
    input_bt = targets_bt.masked_fill(answer_bt, tokenizer.mask_token_id) if mask_answer else targets_bt.clone()
    batch = {"input_ids": input_bt, "attention_mask": attention_bt, "answer_mask": answer_bt, "targets": targets_bt}
    if "pixel_values" in examples[0]:
        batch["pixel_values"] = torch.stack([example["pixel_values"] for example in examples])
    return batch


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The keys a Hugging Face forward takes, moved to ``device``."""
    keys = ("input_ids", "attention_mask", "pixel_values")
    return {key: batch[key].to(device) for key in keys if key in batch}


def answer_logits(logits_btv: torch.Tensor, batch: dict[str, torch.Tensor], masked: bool) -> torch.Tensor:
    """Logits that predict each answer token, aligned with ``batch["answer_mask"]`` ([B, T, V]).

    Causal models predict token t from position t - 1; masked models predict it in place.
    """
    if masked:
        return logits_btv
    return torch.cat([logits_btv[:, :1] * 0, logits_btv[:, :-1]], dim=1)
