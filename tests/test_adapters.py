"""Architecture adapters on tiny models of every built-in architecture.

Oracles: gating a head at the output projection's input through nnsight equals zeroing that head's
slice of the projection weight; permuting MLP neurons along every slice ``neuron_slices`` names
leaves the function unchanged; capture through nnsight equals a capture through PyTorch hooks.
"""
from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace

import pytest
import torch
from plugin_registries import view
from tiny_models import CASES, build, make_batch, model_inputs

from surgery.core.errors import ModelError
from surgery.engines.capture import capture, head_outputs, mlp_activations, mlp_inputs, mlp_outputs, residual
from surgery.models.adapters import envoy_at, module_at, neuron_slices, out_proj_head_axis


def ids(case):
    return f"{case[0]}-{case[1]}"


@pytest.fixture(scope="module", params=CASES, ids=ids)
def case(request):
    arch, part = request.param
    model = build(arch)
    return SimpleNamespace(arch=arch, part=part, model=model, view=view(model, part), batch=make_batch(arch, part))


def logits_of(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**model_inputs(batch)).logits


def test_every_path_resolves_with_consistent_shapes(case):
    model, v = case.model, case.view
    assert v.part == case.part and v.num_layers == 2
    module_at(model, v.embed)
    for name in (v.final_norm, v.lm_head):
        if name is not None:
            module_at(model, name)
    for index, layer in enumerate(v.layers):
        assert layer.index == index
        attn, mlp = layer.attn, layer.mlp
        out_proj = module_at(model, attn.out_proj)
        head_inputs = out_proj.weight.shape[out_proj_head_axis(attn)]
        assert head_inputs == attn.num_heads * attn.head_dim
        assert attn.num_heads % attn.num_kv_heads == 0
        for path in (attn.q_proj, attn.k_proj, attn.v_proj, attn.qkv_proj, mlp.up, mlp.gate):
            if path is not None:
                module_at(model, path)
        assert (attn.qkv_proj is None) == (attn.q_proj is not None)
        assert module_at(model, mlp.down).weight.numel() == mlp.intermediate_size * out_proj.weight.shape[1 - out_proj_head_axis(attn)]
        assert layer.norms and all(any(True for _ in module_at(model, n).parameters()) for n in layer.norms)


def test_gating_a_head_equals_zeroing_its_output_projection_slice(case):
    from nnsight import NNsight

    model, v = case.model, case.view
    attn = v.layers[0].attn  # LLaVA reads the vision tower's second-to-last layer: gate layer 0
    head = attn.num_heads - 1
    zeroed = copy.deepcopy(model)
    weight = module_at(zeroed, attn.out_proj).weight
    with torch.no_grad():
        weight.narrow(out_proj_head_axis(attn), head * attn.head_dim, attn.head_dim).zero_()
    gate_h = torch.ones(attn.num_heads)
    gate_h[head] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = NNsight(model)
    with torch.no_grad(), traced.trace(**model_inputs(case.batch)):
        envoy = envoy_at(traced, attn.out_proj)
        x = envoy.input
        envoy.input = (x.view(*x.shape[:2], attn.num_heads, attn.head_dim) * gate_h.view(1, 1, -1, 1)).view(x.shape)
        gated = traced.output.logits.save()
    expected = logits_of(zeroed, case.batch)
    assert torch.allclose(gated, expected, atol=1e-5)
    assert not torch.allclose(gated, logits_of(model, case.batch), atol=1e-4)  # the gate did something


def test_permuting_neurons_along_neuron_slices_preserves_the_function(case):
    model, v = case.model, case.view
    permuted = copy.deepcopy(model)
    params = dict(permuted.named_parameters())
    for layer in v.layers:
        size = layer.mlp.intermediate_size
        perm = torch.randperm(size, generator=torch.Generator().manual_seed(layer.index))
        with torch.no_grad():
            for name, axis, offset in neuron_slices(permuted, layer.mlp):
                block = params[name].narrow(axis, offset, size)
                block.copy_(block.index_select(axis, perm))
    before, after = logits_of(model, case.batch), logits_of(permuted, case.batch)
    assert torch.allclose(before, after, atol=1e-5)
    assert not torch.equal(dict(model.named_parameters())[neuron_slices(model, v.layers[0].mlp)[0].name],
                           params[neuron_slices(model, v.layers[0].mlp)[0].name])


def hook_capture(model: torch.nn.Module, batches: list[dict], sites: dict[str, tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Reference: every site's tensor at every real token, through plain PyTorch hooks."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in sites}
    handles = []
    for name, (path, port) in sites.items():
        module = module_at(model, path)
        if port == "input":
            def pre(_m, args, kwargs, name=name):
                seen[name].append(args[0] if args else next(iter(kwargs.values())))
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        else:
            def post(_m, _args, out, name=name):
                seen[name].append(out[0] if isinstance(out, tuple) else out)
            handles.append(module.register_forward_hook(post))
    real = []
    for batch in batches:
        logits_of(model, batch)
        real.append(batch["attention_mask"].reshape(-1).bool())
    for handle in handles:
        handle.remove()
    keep = torch.cat(real)
    return {name: torch.cat([t.reshape(-1, t.shape[-1]) for t in values])[keep].double() for name, values in seen.items()}


@pytest.mark.parametrize("case", [c for c in CASES if c[1] == "language"], ids=ids, indirect=True)
def test_capture_through_nnsight_equals_capture_through_hooks(case):
    model, v = case.model, case.view
    batches = [make_batch(case.arch, rows=3, seed=1), make_batch(case.arch, rows=2, tokens=6, seed=2)]
    builders = {"act": mlp_activations, "x": mlp_inputs, "y": mlp_outputs, "heads": head_outputs, "resid": residual}
    plan = {str(l.index): [build_stream(l, absolute=True) for build_stream in builders.values()] for l in v.layers}
    stats = capture(model, batches, plan)
    for layer in v.layers:
        streams = {s.name: s for s in plan[str(layer.index)]}
        reference = hook_capture(model, batches, {n: (s.site.path, s.site.port) for n, s in streams.items()})
        got = stats[str(layer.index)]
        assert got.count == sum(int(b["attention_mask"].sum()) for b in batches)
        for name, values in reference.items():
            assert torch.allclose(got.mean(name), values.mean(0), atol=1e-5), name
            assert torch.allclose(got.second_moment(name), values.square().mean(0), atol=1e-5), name
            assert torch.allclose(got.mean_abs(name), values.abs().mean(0), atol=1e-5), name


def test_envoy_at_finds_modules_named_output():
    from nnsight import NNsight

    model = build("bert")
    path = view(model).layers[1].attn.out_proj
    assert ".output." in path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = NNsight(model)
    assert envoy_at(traced, path)._module is module_at(model, path)


def test_causal_flag_follows_the_attention_modules():
    model = build("llama")
    assert view(model).causal
    for layer in model.model.layers:
        layer.self_attn.is_causal = False
    assert not view(model).causal


def test_bare_base_models_have_views_without_a_head():
    model = build("bert").bert
    v = view(model)
    assert v.lm_head is None and v.layers[0].attn.out_proj == "encoder.layer.0.attention.output.dense"


def test_unknown_model_type_and_part_are_one_line_model_errors():
    model = torch.nn.Linear(2, 2)
    model.config = SimpleNamespace(model_type="frobnicator")
    with pytest.raises(ModelError, match=r"frobnicator.*register_architectures") as err:
        view(model)
    assert "\n" not in str(err.value)
    with pytest.raises(ModelError, match="no part 'vision'"):
        view(build("gpt2"), part="vision")
    with pytest.raises(ModelError, match="no module 'model.nope'"):
        module_at(build("llama"), "model.nope")
