"""Pruned models that keep their shape on disk: compacting, and classes for per-layer head/MLP sizes.

Transformers 5 has no ``prune_heads``: a pruned model is either *masked* (pruned heads' columns of
the output projection and pruned neurons' down-projection columns zeroed; any stock class loads
it) or *compact* (weights physically sliced, :func:`compact_model`).

A compact model whose layers all keep the same counts is written with a stock config
(``num_attention_heads``, ``num_key_value_heads``, an explicit ``head_dim``, ``intermediate_size``).
``LlamaConfig`` refuses a head count that does not divide ``hidden_size`` even with an explicit
``head_dim``; such models, and models whose counts differ between layers, use this module's
registered classes: ``surgery-pruned-llama``, ``surgery-pruned-qwen2`` and ``surgery-pruned-mistral``
configs carry ``heads_per_layer``, ``kv_heads_per_layer`` and ``intermediate_per_layer``, and their
``...ForCausalLM`` classes build every layer at its own size. They load from safetensors only and
check every tensor's shape against the config before loading. Importing this module registers them
with ``AutoConfig`` / ``AutoModelForCausalLM``; the ``prune`` plugins import it, so any process that
loaded surgery's plugins can ``AutoModelForCausalLM.from_pretrained`` a pruned directory.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from transformers import (
    AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
    Qwen2ForCausalLM
)
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP
from transformers.models.mistral.modeling_mistral import MistralAttention, MistralMLP
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention, Qwen2MLP

from surgery.core.errors import ModelError
from surgery.models.adapters import ModelView, neuron_slices

PER_LAYER_FIELDS = ("heads_per_layer", "kv_heads_per_layer", "intermediate_per_layer")


# --- registered config and model classes ------------------------------------------------------

def _check_per_layer(config: Any) -> None:
    layers = config.num_hidden_layers
    for name in PER_LAYER_FIELDS:
        values = getattr(config, name)
        if values is not None and (len(values) != layers or any(int(v) < 1 for v in values)):
            raise ValueError(f"{name} must list {layers} positive sizes, got {values}")
    heads, kv = config.heads_per_layer, config.kv_heads_per_layer
    if heads is not None and kv is not None and any(h % k for h, k in zip(heads, kv)):
        raise ValueError(f"heads_per_layer {heads} must be multiples of kv_heads_per_layer {kv}")


class PrunedLlamaConfig(LlamaConfig):
    model_type = "surgery-pruned-llama"
    heads_per_layer: list[int] | None = None
    kv_heads_per_layer: list[int] | None = None
    intermediate_per_layer: list[int] | None = None

    def validate_architecture(self) -> None:  # head_dim is explicit: heads need not divide hidden_size
        _check_per_layer(self)


class PrunedQwen2Config(Qwen2Config):
    model_type = "surgery-pruned-qwen2"
    heads_per_layer: list[int] | None = None
    kv_heads_per_layer: list[int] | None = None
    intermediate_per_layer: list[int] | None = None

    def validate_architecture(self) -> None:
        _check_per_layer(self)


class PrunedMistralConfig(MistralConfig):
    model_type = "surgery-pruned-mistral"
    heads_per_layer: list[int] | None = None
    kv_heads_per_layer: list[int] | None = None
    intermediate_per_layer: list[int] | None = None

    def validate_architecture(self) -> None:
        _check_per_layer(self)


def layer_config(config: Any, index: int) -> Any:
    """A copy of ``config`` with layer ``index``'s head, KV-head and MLP sizes."""
    layer = copy.deepcopy(config)
    for field, target in zip(PER_LAYER_FIELDS, ("num_attention_heads", "num_key_value_heads", "intermediate_size")):
        values = getattr(config, field, None)
        if values is not None:
            object.__setattr__(layer, target, int(values[index]))
    return layer


class _PerLayerSizes:
    """Builds every decoder layer's attention and MLP at its own size; loads safetensors, strictly."""

    attention_class: type
    mlp_class: type

    def _resize_layers(self) -> None:
        config = self.config
        for index, layer in enumerate(self.model.layers):
            sized = layer_config(config, index)
            layer.self_attn = self.attention_class(sized, index)
            layer.mlp = self.mlp_class(sized)
            layer.self_attn.config = config  # the shared config carries the attention implementation
            layer.mlp.config = config

    @classmethod
    def from_pretrained(cls, path: str | Path, *args: Any, **kwargs: Any):
        """Load from safetensors after checking every tensor's shape (so a mismatch never gets
        re-initialised, whatever ``ignore_mismatched_sizes`` says)."""
        kwargs["use_safetensors"] = True
        if Path(path).is_dir():
            config = kwargs.get("config") or AutoConfig.from_pretrained(path)
            check_shapes(Path(path), cls, config)
        elif kwargs.get("ignore_mismatched_sizes"):
            raise ModelError(f"{cls.__name__} loads only tensors of the exact shapes its config declares")
        return super().from_pretrained(path, *args, **kwargs)


class PrunedLlamaForCausalLM(_PerLayerSizes, LlamaForCausalLM):
    config_class = PrunedLlamaConfig
    attention_class = LlamaAttention
    mlp_class = LlamaMLP

    def __init__(self, config: PrunedLlamaConfig) -> None:
        super().__init__(config)
        self._resize_layers()


class PrunedQwen2ForCausalLM(_PerLayerSizes, Qwen2ForCausalLM):
    config_class = PrunedQwen2Config
    attention_class = Qwen2Attention
    mlp_class = Qwen2MLP

    def __init__(self, config: PrunedQwen2Config) -> None:
        super().__init__(config)
        self._resize_layers()


class PrunedMistralForCausalLM(_PerLayerSizes, MistralForCausalLM):
    config_class = PrunedMistralConfig
    attention_class = MistralAttention
    mlp_class = MistralMLP

    def __init__(self, config: PrunedMistralConfig) -> None:
        super().__init__(config)
        self._resize_layers()


# stock model_type -> (stock config class, registered config class, registered model class)
FAMILIES = {
    "llama": (LlamaConfig, PrunedLlamaConfig, PrunedLlamaForCausalLM),
    "qwen2": (Qwen2Config, PrunedQwen2Config, PrunedQwen2ForCausalLM),
    "mistral": (MistralConfig, PrunedMistralConfig, PrunedMistralForCausalLM),
}
PRUNED_TYPES = {entry[1].model_type: stock for stock, entry in FAMILIES.items()}

for _stock, (_, _config_class, _model_class) in FAMILIES.items():
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
    AutoModelForCausalLM.register(_config_class, _model_class, exist_ok=True)


def check_shapes(path: Path, model_class: type, config: Any) -> None:
    """Raise ModelError unless the safetensors files in ``path`` hold exactly the model's tensors."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{path}: no safetensors files (pruned models load from safetensors only)")
    on_disk: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                on_disk[name] = tuple(handle.get_slice(name).get_shape())
    with torch.device("meta"):
        skeleton = model_class(config)
    expected = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}
    required = dict(skeleton.named_parameters())  # tied parameters appear once
    for name, shape in on_disk.items():
        if name not in expected:
            raise ModelError(f"{path}: tensor {name!r} is not part of {model_class.__name__}")
        if shape != expected[name]:
            raise ModelError(f"{path}: tensor {name!r} has shape {list(shape)}, the config declares {list(expected[name])}")
    missing = [name for name in required if name not in on_disk]
    if missing:
        raise ModelError(f"{path}: tensor {missing[0]!r} is missing")


# --- compacting -------------------------------------------------------------------------------

def base_model_type(config: Any) -> str:
    return PRUNED_TYPES.get(config.model_type, config.model_type)


def compact_model(model: torch.nn.Module, view: ModelView, head_keep: Sequence[Sequence[int]] | None = None,
                  neuron_keep: Sequence[Sequence[int]] | None = None) -> torch.nn.Module:
    """A new model holding only the kept heads (per layer, query-head indices) and neurons.

    Heads can be compacted in Llama, Mistral and Qwen2 models; within a GQA layer every kept KV
    group must keep the same number of query heads (see :func:`gqa_consistent`). Neurons can be
    compacted in those and, with the same count in every layer, in GPT-2 and BERT models.
    """
    family = base_model_type(model.config)
    if head_keep is not None and family not in FAMILIES:
        raise ModelError(f"compact head pruning supports {', '.join(FAMILIES)} models, not {family!r}; use output: masked")
    state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    heads, kv_heads, inter = [], [], []
    for layer in view.layers:
        attn, mlp = layer.attn, layer.mlp
        if head_keep is not None:
            keep = sorted(int(h) for h in head_keep[layer.index])
            kv_keep = gqa_consistent(keep, attn.num_heads, attn.num_kv_heads, layer.index)
            _slice_heads(state, attn, keep, kv_keep)
            heads.append(len(keep))
            kv_heads.append(len(kv_keep))
        else:
            heads.append(attn.num_heads)
            kv_heads.append(attn.num_kv_heads)
        if neuron_keep is not None:
            keep = sorted(int(i) for i in neuron_keep[layer.index])
            if not keep:
                raise ModelError(f"layer {layer.index}: a compact model keeps at least one MLP neuron per layer")
            index = torch.tensor(keep)
            for piece in neuron_slices(model, mlp):
                state[piece.name] = state[piece.name].index_select(piece.axis, index + piece.offset).contiguous()
            inter.append(len(keep))
        else:
            inter.append(mlp.intermediate_size)
    config = _compact_config(model, family, heads, kv_heads, inter)
    model_class = _compact_class(model, config)
    compact = model_class(config).to(dtype=next(model.parameters()).dtype)
    compact.load_state_dict(state, strict=True)
    compact.tie_weights()
    return compact.eval()


def gqa_consistent(keep: Sequence[int], heads: int, kv_heads: int, layer: int) -> list[int]:
    """The KV groups the kept query heads use; raises unless each kept group keeps equally many heads."""
    if not keep:
        raise ModelError(f"layer {layer}: a compact model keeps at least one attention head per layer")
    group = heads // kv_heads
    counts: dict[int, int] = {}
    for h in keep:
        counts[h // group] = counts.get(h // group, 0) + 1
    if len(set(counts.values())) != 1:
        raise ModelError(f"layer {layer}: kept query heads {list(keep)} leave KV groups with unequal head counts "
                         f"{dict(sorted(counts.items()))}; keep the same number per group or remove whole groups")
    return sorted(counts)


def _slice_heads(state: dict, attn: Any, keep: list[int], kv_keep: list[int]) -> None:
    d = attn.head_dim
    rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in keep])
    kv_rows = torch.cat([torch.arange(g * d, (g + 1) * d) for g in kv_keep])
    for path, index in ((attn.q_proj, rows), (attn.k_proj, kv_rows), (attn.v_proj, kv_rows)):
        for suffix in ("weight", "bias"):
            name = f"{path}.{suffix}"
            if name in state:
                state[name] = state[name].index_select(0, index).contiguous()
    name = f"{attn.out_proj}.weight"
    state[name] = state[name].index_select(1, rows).contiguous()


def _compact_config(model: torch.nn.Module, family: str, heads: list[int], kv: list[int], inter: list[int]) -> Any:
    source = model.config.to_dict()
    for key in (*PER_LAYER_FIELDS, "model_type", "transformers_version", "architectures"):
        source.pop(key, None)
    uniform = len(set(heads)) == 1 and len(set(kv)) == 1 and len(set(inter)) == 1
    if family in FAMILIES:
        stock_class, pruned_class, _ = FAMILIES[family]
        sizes = {"num_attention_heads": heads[0], "num_key_value_heads": kv[0], "intermediate_size": inter[0],
                 "head_dim": model.config.head_dim}
        if uniform:
            try:
                return stock_class(**{**source, **sizes})
            except Exception:  # noqa: BLE001 - e.g. LlamaConfig: heads must divide hidden_size
                pass
        return pruned_class(**{**source, **sizes, "num_attention_heads": max(heads), "num_key_value_heads": max(kv),
                               "intermediate_size": max(inter), "heads_per_layer": heads,
                               "kv_heads_per_layer": kv, "intermediate_per_layer": inter})
    if not uniform:
        raise ModelError(f"{family!r} models need the same MLP size in every layer when compacted "
                         f"(got {inter}); use output: masked")
    field = "n_inner" if family == "gpt2" else "intermediate_size"
    config = copy.deepcopy(model.config)
    setattr(config, field, inter[0])
    return config


def _compact_class(model: torch.nn.Module, config: Any) -> type:
    if config.model_type in PRUNED_TYPES:
        return FAMILIES[PRUNED_TYPES[config.model_type]][2]
    stock = type(model)
    if stock in {entry[2] for entry in FAMILIES.values()}:  # a pruned model compacted to uniform sizes
        return {PrunedLlamaForCausalLM: LlamaForCausalLM, PrunedQwen2ForCausalLM: Qwen2ForCausalLM,
                PrunedMistralForCausalLM: MistralForCausalLM}[stock]
    return stock


def pruned_view(base_view: ModelView, config: Any) -> ModelView:
    """``base_view`` with each layer's head, KV-head and MLP sizes taken from ``config``'s per-layer lists."""
    from dataclasses import replace

    layers = []
    for layer in base_view.layers:
        sized = layer_config(config, layer.index)
        attn = replace(layer.attn, num_heads=sized.num_attention_heads, num_kv_heads=sized.num_key_value_heads)
        mlp = replace(layer.mlp, intermediate_size=sized.intermediate_size)
        layers.append(replace(layer, attn=attn, mlp=mlp))
    return replace(base_view, model_type=config.model_type, layers=tuple(layers))
