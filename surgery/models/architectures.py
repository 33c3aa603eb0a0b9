"""Views of the built-in architectures: Llama/Mistral/Qwen2/Qwen3, GPT-2, BERT/RoBERTa, ModernBERT, LLaVA.

Each adapter maps a model (with or without its task head, e.g. ``LlamaForCausalLM`` or
``LlamaModel``) onto :class:`surgery.models.adapters.ModelView`. Module paths as in transformers 5.x:

| model | attention output projection | MLP (gate / up / down) |
|---|---|---|
| Llama, Mistral, Qwen2, Qwen3 | ``model.layers.{i}.self_attn.o_proj`` | ``mlp.gate_proj`` / ``mlp.up_proj`` / ``mlp.down_proj`` |
| GPT-2 (Conv1D) | ``transformer.h.{i}.attn.c_proj`` | - / ``mlp.c_fc`` / ``mlp.c_proj`` |
| BERT, RoBERTa | ``bert.encoder.layer.{i}.attention.output.dense`` | - / ``intermediate.dense`` / ``output.dense`` |
| ModernBERT | ``model.layers.{i}.attn.Wo`` | ``mlp.Wi`` (fused gate+up) / ``mlp.Wo`` |
| LLaVA, part ``language`` | ``model.language_model.layers.{i}.self_attn.o_proj`` | as Llama |
| LLaVA, part ``vision`` | ``model.vision_tower.encoder.layers.{i}.self_attn.out_proj`` | - / ``mlp.fc1`` / ``mlp.fc2`` |
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from surgery.core.errors import ModelError
from surgery.models.adapters import (
    AttentionSite, LayerView, MLPSite, ModelView, in_features, is_conv1d, module_at, path_of
)

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")


# --- families ----------------------------------------------------------------------------------

def llama_view(model: torch.nn.Module, part: str = "language") -> ModelView:
    _check_part(model, part, ("language",))
    layers = _find(model, ("model.layers", "layers"))
    return _llama_family(model, part, layers, model.config)


def gpt2_view(model: torch.nn.Module, part: str = "language") -> ModelView:
    _check_part(model, part, ("language",))
    config = model.config
    heads = config.num_attention_heads
    layers_path = _find(model, ("transformer.h", "h"))

    def layer(i: int, p: str) -> LayerView:
        attn = AttentionSite(out_proj=f"{p}.attn.c_proj", num_heads=heads, num_kv_heads=heads,
                             head_dim=config.hidden_size // heads, qkv_proj=f"{p}.attn.c_attn", conv1d=True)
        return LayerView(i, p, attn, _mlp(model, down=f"{p}.mlp.c_proj", up=f"{p}.mlp.c_fc"), _norms(model, p))

    return _assemble(model, part, layers_path, layer, final_norm=_sibling(layers_path, "ln_f"), causal=True)


def bert_view(model: torch.nn.Module, part: str = "language") -> ModelView:
    _check_part(model, part, ("language",))
    config = model.config
    heads = config.num_attention_heads
    layers_path = _find(model, ("bert.encoder.layer", "roberta.encoder.layer", "encoder.layer"))

    def layer(i: int, p: str) -> LayerView:
        attn = AttentionSite(out_proj=f"{p}.attention.output.dense", num_heads=heads, num_kv_heads=heads,
                             head_dim=config.hidden_size // heads, q_proj=f"{p}.attention.self.query",
                             k_proj=f"{p}.attention.self.key", v_proj=f"{p}.attention.self.value")
        mlp = _mlp(model, down=f"{p}.output.dense", up=f"{p}.intermediate.dense")
        return LayerView(i, p, attn, mlp, _norms(model, p))

    # post-norm encoder: each block ends in its own LayerNorm, there is no final norm
    return _assemble(model, part, layers_path, layer, final_norm=None, causal=False)


def modernbert_view(model: torch.nn.Module, part: str = "language") -> ModelView:
    _check_part(model, part, ("language",))
    config = model.config
    heads = config.num_attention_heads
    layers_path = _find(model, ("model.layers", "layers"))

    def layer(i: int, p: str) -> LayerView:
        attn = AttentionSite(out_proj=f"{p}.attn.Wo", num_heads=heads, num_kv_heads=heads,
                             head_dim=config.hidden_size // heads, qkv_proj=f"{p}.attn.Wqkv")
        mlp = _mlp(model, down=f"{p}.mlp.Wo", up=f"{p}.mlp.Wi", gate=f"{p}.mlp.Wi", fused=True)
        return LayerView(i, p, attn, mlp, _norms(model, p))

    return _assemble(model, part, layers_path, layer, final_norm=_sibling(layers_path, "final_norm"), causal=False)


def llava_view(model: torch.nn.Module, part: str = "language") -> ModelView:
    _check_part(model, part, ("language", "vision"))
    if part == "language":
        text = model.config.text_config
        if text.model_type not in LLAMA_LIKE:
            raise ModelError(f"llava with a {text.model_type!r} language model has no adapter (supported: {', '.join(LLAMA_LIKE)})")
        layers = _find(model, ("model.language_model.layers", "language_model.layers"))
        return _llama_family(model, part, layers, text)
    return _clip_vision(model, part)


def _clip_vision(model: torch.nn.Module, part: str) -> ModelView:
    config = model.config.vision_config
    heads = config.num_attention_heads
    layers_path = _find(model, ("model.vision_tower.encoder.layers", "model.vision_tower.vision_model.encoder.layers",
                                "vision_tower.encoder.layers", "vision_tower.vision_model.encoder.layers"))

    def layer(i: int, p: str) -> LayerView:
        attn = AttentionSite(out_proj=f"{p}.self_attn.out_proj", num_heads=heads, num_kv_heads=heads,
                             head_dim=config.hidden_size // heads, q_proj=f"{p}.self_attn.q_proj",
                             k_proj=f"{p}.self_attn.k_proj", v_proj=f"{p}.self_attn.v_proj")
        return LayerView(i, p, attn, _mlp(model, down=f"{p}.mlp.fc2", up=f"{p}.mlp.fc1"), _norms(model, p))

    tower = layers_path[: layers_path.index("encoder.layers")]
    embed = _find(model, (f"{tower}embeddings.patch_embedding",))
    # CLIP's post_layernorm only touches the pooled token; LLaVA reads hidden states before it
    return ModelView(model.config.model_type, part, _layers(model, layers_path, layer), embed, None, None, causal=False)


def _llama_family(model: torch.nn.Module, part: str, layers_path: str, config: Any) -> ModelView:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads

    def layer(i: int, p: str) -> LayerView:
        attn = AttentionSite(out_proj=f"{p}.self_attn.o_proj", num_heads=heads, num_kv_heads=kv_heads,
                             head_dim=head_dim, q_proj=f"{p}.self_attn.q_proj", k_proj=f"{p}.self_attn.k_proj",
                             v_proj=f"{p}.self_attn.v_proj")
        mlp = _mlp(model, down=f"{p}.mlp.down_proj", up=f"{p}.mlp.up_proj", gate=f"{p}.mlp.gate_proj")
        return LayerView(i, p, attn, mlp, _norms(model, p))

    # a bidirectional (LLaDA-like) variant sets is_causal=False on every attention module
    blocks = module_at(model, layers_path)
    causal = all(getattr(block.self_attn, "is_causal", True) for block in blocks)
    return _assemble(model, part, layers_path, layer, final_norm=_sibling(layers_path, "norm"), causal=causal)


# --- helpers -----------------------------------------------------------------------------------

def _assemble(model: torch.nn.Module, part: str, layers_path: str, layer: Callable[[int, str], LayerView],
              final_norm: str | None, causal: bool) -> ModelView:
    embed = path_of(model, model.get_input_embeddings())
    if embed is None:
        raise ModelError(f"{type(model).__name__}: input embeddings not found")
    lm_head = path_of(model, model.get_output_embeddings()) if hasattr(model, "get_output_embeddings") else None
    if final_norm is not None and not _exists(model, final_norm):
        final_norm = None
    return ModelView(model.config.model_type, part, _layers(model, layers_path, layer), embed, final_norm, lm_head, causal)


def _layers(model: torch.nn.Module, layers_path: str, layer: Callable[[int, str], LayerView]) -> tuple[LayerView, ...]:
    return tuple(layer(i, f"{layers_path}.{i}") for i in range(len(module_at(model, layers_path))))


def _mlp(model: torch.nn.Module, down: str, up: str | None, gate: str | None = None, fused: bool = False) -> MLPSite:
    down_module = module_at(model, down)
    return MLPSite(down=down, up=up, gate=gate, intermediate_size=in_features(down_module),
                   conv1d=is_conv1d(down_module), fused_gate_up=fused)


def _norms(model: torch.nn.Module, layer_path: str) -> tuple[str, ...]:
    """Normalisation modules with parameters inside the block, in registration order."""
    block = module_at(model, layer_path)
    return tuple(f"{layer_path}.{name}" for name, module in block.named_modules()
                 if name and "Norm" in type(module).__name__ and any(True for _ in module.parameters(recurse=False)))


def _find(model: torch.nn.Module, candidates: tuple[str, ...]) -> str:
    for path in candidates:
        if _exists(model, path):
            return path
    raise ModelError(f"{type(model).__name__} ({model.config.model_type}): none of the expected modules {', '.join(candidates)}")


def _exists(model: torch.nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
    return True


def _sibling(layers_path: str, name: str) -> str:
    parent = layers_path.rpartition(".")[0]
    return f"{parent}.{name}" if parent else name


def _check_part(model: torch.nn.Module, part: str, parts: tuple[str, ...]) -> None:
    if part not in parts:
        raise ModelError(f"{model.config.model_type} has no part {part!r} (parts: {', '.join(parts)})")
