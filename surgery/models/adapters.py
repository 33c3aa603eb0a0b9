"""Architecture adapters: one canonical view of a model's layers, attention heads and MLP neurons.

Plugins never hard-code module paths. They ask for ``view(model, architectures)`` (in a step: ``loaded.view``) and read dotted paths (from the
loaded model's root) off the returned :class:`ModelView`::

    v = view(model, ctx.registries.architectures)   # part="language" by default
    layer = v.layers[3]
    o_proj = module_at(model, layer.attn.out_proj)   # heads are its input, [B, T, H * head_dim]
    down = module_at(model, layer.mlp.down)          # neurons are its input, [B, T, intermediate]

Conventions every adapter follows:

- ``AttentionSite.out_proj``'s input, viewed as ``[B, T, num_heads, head_dim]``, holds the heads'
  outputs; gating head h there equals zeroing its slice of the output projection's weight.
- ``MLPSite.down``'s input holds the neuron activations a_i; column i of the down projection (row i
  for Conv1D, whose weight is ``[in, out]``) is neuron i's write direction.
- ``MLPSite.gate`` is the projection whose output goes through the activation function, ``up`` the
  one that does not (Llama: ``down(act(gate(x)) * up(x))``; BERT/GPT-2/CLIP have ``up`` only).
  With ``fused_gate_up`` both name one module whose output rows are ``[gate rows; up rows]``
  (ModernBERT ``Wi``); :func:`neuron_slices` gives every slice a neuron permutation must touch.
- ``LayerView.path`` is the block; its output (``output[0]`` when it returns a tuple) is the
  residual stream after the layer.

Adapters are registered by plugins: a ``register_architectures(register)`` hook calls
``register(model_type, build_view)`` with ``build_view(model, part) -> ModelView``, where
``model_type`` is ``model.config.model_type``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch

from surgery.core.errors import ModelError
from surgery.core.registry import Registry

BuildView = Callable[[torch.nn.Module, str], "ModelView"]

@dataclass(frozen=True)
class AttentionSite:
    """One attention module. ``qkv_proj`` is set instead of q/k/v when they are fused."""

    out_proj: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q_proj: str | None = None
    k_proj: str | None = None
    v_proj: str | None = None
    qkv_proj: str | None = None  # GPT-2 c_attn, ModernBERT Wqkv
    conv1d: bool = False  # weights are [in, out] (GPT-2 Conv1D)


@dataclass(frozen=True)
class MLPSite:
    """One MLP. Neuron i is channel i of ``down``'s input."""

    down: str
    up: str | None
    gate: str | None
    intermediate_size: int
    conv1d: bool = False
    fused_gate_up: bool = False  # gate and up are one module; rows [0, I) gate, [I, 2I) up


@dataclass(frozen=True)
class LayerView:
    index: int
    path: str  # the block; its output (output[0] if a tuple) is the residual stream after it
    attn: AttentionSite
    mlp: MLPSite
    norms: tuple[str, ...]


@dataclass(frozen=True)
class ModelView:
    model_type: str
    part: str
    layers: tuple[LayerView, ...]
    embed: str
    final_norm: str | None
    lm_head: str | None
    causal: bool

    @property
    def num_layers(self) -> int:
        return len(self.layers)


class ParamSlice(NamedTuple):
    """Neuron i of an MLP lives at index ``offset + i`` along ``axis`` of parameter ``name``."""

    name: str
    axis: int
    offset: int


def view(model: torch.nn.Module, architectures: Registry[BuildView], part: str = "language") -> ModelView:
    """The canonical view of ``model`` (or of one ``part`` of it, e.g. LLaVA's ``"vision"``).

    ``architectures`` is the registry the ``register_architectures`` hooks filled
    (``ctx.registries.architectures`` in a step).
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type is None:
        raise ModelError(f"{type(model).__name__} has no config.model_type, so no architecture adapter applies")
    if model_type not in architectures:
        raise ModelError(
            f"no architecture adapter for model_type {model_type!r}; add one from a plugin's "
            f"register_architectures hook: register({model_type!r}, build_view)"
        )
    return architectures.get(model_type)(model, part)


def module_at(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """The submodule at dotted ``path`` (``""`` is the model itself)."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ModelError(f"{type(model).__name__} has no module {path!r}") from None


def envoy_at(nnsight_model: Any, path: str) -> Any:
    """The nnsight envoy of the module at ``path``.

    nnsight serves ``input``/``inputs``/``output`` on every envoy, so it moves a child module with
    one of those names to ``E_<name>`` (BERT's ``attention.output`` is ``attention.E_output``).
    """
    from nnsight.intervention.envoy import Envoy

    envoy = nnsight_model
    for name in path.split(".") if path else []:
        attribute = f"E_{name}" if inspect.isdatadescriptor(getattr(Envoy, name, None)) else name
        try:
            envoy = getattr(envoy, attribute)
        except AttributeError:
            raise ModelError(f"the traced model has no module {path!r}") from None
    return envoy


def path_of(model: torch.nn.Module, module: torch.nn.Module | None) -> str | None:
    """The dotted path of ``module`` inside ``model`` (None if absent)."""
    if module is None:
        return None
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    return None


def is_conv1d(module: torch.nn.Module) -> bool:
    """True for GPT-2 style Conv1D layers (weight ``[in, out]``)."""
    return type(module).__name__ == "Conv1D"


def in_features(module: torch.nn.Module) -> int:
    return module.weight.shape[0] if is_conv1d(module) else module.weight.shape[1]


def write_directions(model: torch.nn.Module, mlp: MLPSite) -> torch.Tensor:
    """The down projection's write directions as columns, ``[hidden, intermediate]`` (d_i = column i)."""
    weight = module_at(model, mlp.down).weight
    return weight.t() if mlp.conv1d else weight


def neuron_slices(model: torch.nn.Module, mlp: MLPSite) -> list[ParamSlice]:
    """Every parameter slice indexed by the MLP's neurons (gate/up rows and biases, down columns)."""
    slices: list[ParamSlice] = []
    size = mlp.intermediate_size
    if mlp.fused_gate_up:
        readers = [(mlp.gate, 0), (mlp.up, size)]
    else:
        readers = [(path, 0) for path in (mlp.gate, mlp.up) if path is not None]
    for path, offset in readers:
        module = module_at(model, path)
        slices.append(ParamSlice(f"{path}.weight", 1 if mlp.conv1d else 0, offset))
        if getattr(module, "bias", None) is not None:
            slices.append(ParamSlice(f"{path}.bias", 0, offset))
    slices.append(ParamSlice(f"{mlp.down}.weight", 0 if mlp.conv1d else 1, 0))
    return slices


def out_proj_head_axis(attn: AttentionSite) -> int:
    """The axis of the output projection's weight that runs over ``heads * head_dim`` inputs."""
    return 0 if attn.conv1d else 1
