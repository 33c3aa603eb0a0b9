"""What a model outputs, read from its config without loading weights, and how an embedding model
pools its token states into one vector.

- :func:`outputs_of` maps a ``config.architectures`` class name onto the output fields its forward
  returns: a head class (``...ForCausalLM``, ``...ForMaskedLM``, ``...LMHeadModel``,
  ``...ForConditionalGeneration``) returns ``logits``; a bare encoder or decoder (``BertModel``,
  ``LlamaModel``) returns ``last_hidden_state`` only. Objectives declare the field they read
  (``output``), so a recipe pairing e.g. ``causal-lm`` with a bare encoder fails validation.
- :func:`pooling_mode`: the pooling a checkpoint implies. A sentence-transformers folder names it
  (``modules.json`` -> its Pooling module's ``config.json``: mean, cls, max or last token);
  otherwise a causal model pools its last real token and an encoder takes the mean of its real
  tokens (sentence-transformers' default for a plain transformers encoder).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

LOGITS = "logits"
HIDDEN = "last_hidden_state"
HEAD_SUFFIXES = ("ForCausalLM", "ForMaskedLM", "LMHeadModel", "ForConditionalGeneration", "ForPreTraining")
POOLING_KEYS = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
                "pooling_mode_max_tokens": "max", "pooling_mode_lasttoken": "last"}
POOLINGS = ("mean", "cls", "max", "last")


def outputs_of(architecture: str) -> tuple[str, ...]:
    """The output fields a model class's forward returns (``logits`` or ``last_hidden_state``)."""
    if architecture.endswith(HEAD_SUFFIXES):
        return (LOGITS,)
    return (HIDDEN,)


def architecture_in(directory: Path) -> str | None:
    """``config.json``'s first ``architectures`` entry in a checkpoint directory (None if absent)."""
    try:
        names = json.loads((Path(directory) / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError):
        return None
    return names[0] if names else None


def pooling_mode(directory: Path | None, model: torch.nn.Module) -> str:
    """The pooling this checkpoint implies (see the module docstring)."""
    declared = _sentence_transformers_pooling(directory) if directory is not None else None
    if declared is not None:
        return declared
    config = getattr(model, "config", None)
    classes = [type(model).__name__, *(getattr(config, "architectures", None) or [])]
    causal = getattr(config, "is_decoder", False) or any(name.endswith("ForCausalLM") for name in classes)
    return "last" if causal else "mean"


def _sentence_transformers_pooling(directory: Path) -> str | None:
    try:
        modules = json.loads((Path(directory) / "modules.json").read_text())
    except (OSError, ValueError):
        return None
    for module in modules:
        if str(module.get("type", "")).endswith("Pooling"):
            try:
                config = json.loads((Path(directory) / module.get("path", "") / "config.json").read_text())
            except (OSError, ValueError):
                return None
            for key, mode in POOLING_KEYS.items():
                if config.get(key):
                    return mode
    return None


def pool(hidden_btd: torch.Tensor, mask_bt: torch.Tensor, mode: str) -> torch.Tensor:
    """One vector per row ``[B, D]`` from the real tokens' states (float32)."""
    hidden_btd = hidden_btd.float()
    mask_bt1 = mask_bt.to(hidden_btd.device)[..., None].float()
    if mode == "mean":
        return (hidden_btd * mask_bt1).sum(1) / mask_bt1.sum(1).clamp(min=1)
    if mode == "cls":
        return hidden_btd[:, 0]
    if mode == "max":
        return hidden_btd.masked_fill(mask_bt1 == 0, float("-inf")).amax(1)
    if mode == "last":
        last_b = (mask_bt.long().cumsum(1).argmax(1)).to(hidden_btd.device)  # last real position
        return hidden_btd[torch.arange(hidden_btd.shape[0], device=hidden_btd.device), last_b]
    raise ValueError(f"unknown pooling {mode!r}; choose from {', '.join(POOLINGS)}")
