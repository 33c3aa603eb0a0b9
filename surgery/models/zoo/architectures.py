"""Build the zoo's tiny models from ``transformers`` config classes.

``arch`` names one of: ``llama`` (GQA when ``kv_heads < heads``), ``qwen2``, ``gpt2``, ``bert``
(masked LM), ``llada`` (a Llama made bidirectional, trained as a masked-diffusion model) and
``llava`` (a tiny CLIP-style vision tower + a Llama language model of the same ``size``).
"""
from __future__ import annotations

from typing import Any

import torch
from transformers import (
    BertConfig, BertForMaskedLM, CLIPVisionConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
    LlavaConfig, LlavaForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM
)

from surgery.models.zoo.tasks import IMAGE_SIZE
from surgery.models.zoo.tokenizer import BOS, EOS, IMAGE, PAD, VOCAB

ARCHITECTURES = ("llama", "qwen2", "gpt2", "bert", "llada", "llava")
MAX_POSITIONS = 64
PATCH_SIZE = 8


def build_model(arch: str, size: dict[str, int]) -> torch.nn.Module:
    """A freshly initialised model (random weights under the current torch seed)."""
    if arch == "llama":
        return LlamaForCausalLM(_llama_config(size))
    if arch == "llada":
        model = LlamaForCausalLM(_llama_config(size, is_causal=False))
        return make_bidirectional(model)
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**_decoder_kwargs(size)))
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(
            vocab_size=len(VOCAB), n_positions=MAX_POSITIONS, n_embd=size["hidden"], n_layer=size["layers"],
            n_head=size["heads"], n_inner=size["hidden"] * 4, tie_word_embeddings=False,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **_special_ids(),
        ))
    if arch == "bert":
        return BertForMaskedLM(BertConfig(
            vocab_size=len(VOCAB), hidden_size=size["hidden"], num_hidden_layers=size["layers"],
            num_attention_heads=size["heads"], intermediate_size=size["hidden"] * 4,
            max_position_embeddings=MAX_POSITIONS, type_vocab_size=1, tie_word_embeddings=False,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **_special_ids(),
        ))
    if arch == "llava":
        return LlavaForConditionalGeneration(_llava_config(size))
    raise ValueError(f"unknown zoo architecture {arch!r}")


def make_bidirectional(model: torch.nn.Module) -> torch.nn.Module:
    """Make a decoder attend in both directions (LLaDA-style); returns the same model.

    Two switches are needed: ``config.is_causal = False`` makes ``transformers`` build a
    bidirectional (padding-only) mask, and ``is_causal = False`` on every attention module stops
    SDPA from applying its own causal mask when no mask is passed. ``config.is_causal`` is saved in
    config.json, so after ``from_pretrained`` calling this function restores the model.
    """
    model.config.is_causal = False
    for config in _sub_configs(model.config):
        config.is_causal = False
    for module in model.modules():
        if hasattr(module, "is_causal"):
            module.is_causal = False
    return model


def prepare_for_inference(model: torch.nn.Module) -> torch.nn.Module:
    """Re-apply settings that ``from_pretrained`` does not restore (bidirectional attention)."""
    if getattr(model.config, "is_causal", True) is False:
        make_bidirectional(model)
    return model


def language_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A causal LM's (or a LLaVA's language model's) weights under plain ``LlamaForCausalLM`` names."""
    state = model.state_dict()
    if model.config.model_type != "llava":
        return state
    prefix = "model.language_model."
    lm_state = {"model." + key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    lm_state["lm_head.weight"] = state["lm_head.weight"]
    return lm_state


def load_language_model(model: torch.nn.Module, lm_state: dict[str, torch.Tensor]) -> None:
    """Copy plain ``LlamaForCausalLM`` weights into a LLaVA's language model (strict on names/shapes)."""
    renamed = {("lm_head.weight" if key == "lm_head.weight" else "model.language_model." + key[len("model."):]): value
               for key, value in lm_state.items()}
    missing, unexpected = model.load_state_dict(renamed, strict=False)
    lm_missing = [key for key in missing if not key.startswith(("model.vision_tower.", "model.multi_modal_projector."))]
    if lm_missing or unexpected:
        raise ValueError(f"language-model weights do not fit: missing {lm_missing}, unexpected {unexpected}")


def _special_ids() -> dict[str, int]:
    return {"pad_token_id": VOCAB.index(PAD), "bos_token_id": VOCAB.index(BOS), "eos_token_id": VOCAB.index(EOS)}


def _decoder_kwargs(size: dict[str, int]) -> dict[str, Any]:
    return dict(
        vocab_size=len(VOCAB), hidden_size=size["hidden"], intermediate_size=size["hidden"] * size.get("mlp_ratio", 4),
        num_hidden_layers=size["layers"], num_attention_heads=size["heads"],
        num_key_value_heads=size.get("kv_heads", size["heads"]), max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False, **_special_ids(),
    )


def _llama_config(size: dict[str, int], is_causal: bool = True) -> LlamaConfig:
    config = LlamaConfig(**_decoder_kwargs(size))
    if not is_causal:
        config.is_causal = False
    return config


def _llava_config(size: dict[str, int]) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=size["vision_hidden"], intermediate_size=size["vision_hidden"] * 2,
        num_hidden_layers=size["vision_layers"], num_attention_heads=2, image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE, projection_dim=size["vision_hidden"],
    )
    return LlavaConfig(
        vision_config=vision, text_config=_llama_config(size), image_token_index=VOCAB.index(IMAGE),
        vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )


def _sub_configs(config: Any) -> list[Any]:
    return [getattr(config, name) for name in ("text_config",) if getattr(config, name, None) is not None]
