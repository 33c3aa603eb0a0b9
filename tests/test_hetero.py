"""Heterogeneous merges through declarative tensor maps: LLaVA + plain Llama, mPLUG-Owl2-style multiway."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from merge_fixtures import build, logits, perturbed, probe_file, run_steps, save
from safetensors.torch import load_file, save_file

from surgery.core.errors import ModelError, RecipeError
from surgery.models.hetero import checkpoint_names, load_map, parse_map, plan_merge
from surgery.models.zoo.tasks import IMAGE_TOKENS
from surgery.models.zoo.tokenizer import IMAGE, VOCAB


def test_rules_first_match_keep_and_candidates(tmp_path):
    tmap = parse_map({"rules": [
        {"base": r"vision\..*", "keep": True},
        {"base": r"lm\.(.*)", "donor": [r"missing.\1", r"model.\1"]},
    ]})
    assert tmap.donor_names("vision.w") is None
    assert tmap.donor_names("lm.layers.0.w") == ("missing.layers.0.w", "model.layers.0.w")
    assert tmap.donor_names("other.w") == ("other.w",)
    plan = plan_merge(["vision.w", "lm.a", "head"], lambda n: [2], {"d": (["model.a", "head", "extra"], lambda n: [2])}, tmap)
    assert plan.sources == {"vision.w": None, "lm.a": ["model.a"], "head": ["head"]}
    assert plan.unused == {"d": ["extra"]}
    (tmp_path / "m.yaml").write_text("name: mine\nrules:\n  - {base: 'a\\.(.*)', donor: 'b.\\1'}\n")
    assert load_map("m.yaml", tmp_path).donor_names("a.x") == ("b.x",)


def test_map_errors_are_one_line_and_name_the_tensor():
    with pytest.raises(RecipeError, match="did you mean 'llava-from-llama'"):
        load_map("llava-from-lama")
    with pytest.raises(RecipeError, match="exactly one of"):
        parse_map({"rules": [{"base": "a", "donor": "b", "keep": True}]})
    with pytest.raises(RecipeError, match="invalid regular expression"):
        parse_map({"rules": [{"base": "a(", "donor": "b"}]})
    tmap = load_map("llava-from-llama")
    with pytest.raises(ModelError, match="language_model.model.norm.weight -> model.norm.weight"):
        plan_merge(["language_model.model.norm.weight"], lambda n: [4], {"d": (["model.nrm.weight"], lambda n: [4])}, tmap)
    with pytest.raises(ModelError, match=r"\[4\] vs 'd' model.norm.weight \[5\]"):
        plan_merge(["language_model.model.norm.weight"], lambda n: [4], {"d": (["model.norm.weight"], lambda n: [5])}, tmap)


@pytest.fixture(scope="module")
def llava_pair(tmp_path_factory):
    """A tiny LLaVA and a plain Llama "fine-tune" of its language model, saved with the zoo tokenizer."""
    from surgery.models.zoo.architectures import language_model_state

    root = tmp_path_factory.mktemp("hetero")
    llava = build("llava", 0)
    llama = build("llama", 1)
    llama.load_state_dict(language_model_state(llava))
    perturbed(llama, seed=2, scale=0.005)
    return save(llava, root / "llava"), save(llama, root / "llama"), probe_file(root / "probe.jsonl"), root


def image_inputs() -> dict[str, torch.Tensor]:
    words = [IMAGE] * IMAGE_TOKENS + ["colour:", "="]
    ids = torch.tensor([[VOCAB.index("<bos>")] + [VOCAB.index(w) for w in words]])
    pixels = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "pixel_values": pixels}


def test_checkpoint_names_follow_the_saved_llava_layout(llava_pair):
    from transformers import LlavaForConditionalGeneration

    llava_dir = llava_pair[0]
    model = LlavaForConditionalGeneration.from_pretrained(llava_dir)
    saved = set(load_file(str(llava_dir / "model.safetensors")))
    names = checkpoint_names(model)
    assert set(names.values()) == saved
    assert names["model.language_model.layers.0.mlp.up_proj.weight"] == "language_model.model.layers.0.mlp.up_proj.weight"


def test_linear_llava_with_llama_keeps_the_vision_tower_and_accepts_images(tmp_path, llava_pair):
    from transformers import LlavaForConditionalGeneration

    llava_dir, llama_dir, _, _ = llava_pair
    run = run_steps(tmp_path, {"llava": llava_dir, "llama": llama_dir},
                    [{"fuse": {"plugin": "linear", "map": "llava-from-llama"}}])
    wv, wl = load_file(str(llava_dir / "model.safetensors")), load_file(str(llama_dir / "model.safetensors"))
    wm = load_file(str(run / "00-fuse-linear" / "model" / "model.safetensors"))
    assert set(wm) == set(wv)
    for name, tensor in wv.items():
        if name.startswith(("vision_tower.", "multi_modal_projector.")):
            assert torch.equal(wm[name], tensor), name
        else:
            donor = name.replace("language_model.model.", "model.").replace("language_model.lm_head", "lm_head")
            assert torch.equal(wm[name], tensor * 0.5 + wl[donor] * 0.5), name
    report = json.loads((run / "00-fuse-linear" / "meta.json").read_text())
    assert report["meta"]["map"] == "llava-from-llama"
    merged = LlavaForConditionalGeneration.from_pretrained(run / "00-fuse-linear" / "model").eval()
    out = logits(merged, **image_inputs())
    assert out.shape[-1] == len(VOCAB) and torch.isfinite(out).all()


def test_fam_llava_with_llama_from_a_recipe_accepts_images_and_text(tmp_path, llava_pair):
    from transformers import LlavaForConditionalGeneration

    llava_dir, llama_dir, probe, _ = llava_pair
    steps = [
        {"weight": {"plugin": "tlinp"}},
        {"capture": {"plugin": "fam", "sketch_dim": 32}},
        {"score": {"plugin": "fam"}},
        {"align": {"plugin": "hungarian"}},
        {"fuse": {"plugin": "fam", "map": "llava-from-llama"}},
    ]
    run = run_steps(tmp_path, {"llava": llava_dir, "llama": llama_dir}, steps, data=probe)
    merged_dir = run / "04-fuse-fam" / "model"
    wv, wm = load_file(str(llava_dir / "model.safetensors")), load_file(str(merged_dir / "model.safetensors"))
    for name, tensor in wv.items():
        if name.startswith(("vision_tower.", "multi_modal_projector.")):
            assert torch.equal(wm[name], tensor), name
    assert not torch.equal(wm["language_model.model.layers.0.mlp.up_proj.weight"], wv["language_model.model.layers.0.mlp.up_proj.weight"])
    merged = LlavaForConditionalGeneration.from_pretrained(merged_dir).eval()
    base = LlavaForConditionalGeneration.from_pretrained(llava_dir).eval()
    with_image = logits(merged, **image_inputs())
    text_only = logits(merged, image_inputs()["input_ids"][:, -2:])
    assert torch.isfinite(with_image).all() and torch.isfinite(text_only).all()
    # a donor 0.005 away from the base's language model: the merge stays close to the base
    assert (with_image - logits(base, **image_inputs())).abs().max() < 0.1


def multiway_checkpoint(source_dir, target_dir):
    """An mPLUG-Owl2-style layout made from a Llama checkpoint: k/v projections and layer norms get
    `multiway.0` (text) and `multiway.1` (vision) copies; a visual module is added."""
    weights = load_file(str(source_dir / "model.safetensors"))
    out = {}
    for name, tensor in weights.items():
        module, _, param = name.rpartition(".")
        if module.endswith(("k_proj", "v_proj", "input_layernorm", "post_attention_layernorm")):
            out[f"{module}.multiway.0.{param}"] = tensor.clone()
            out[f"{module}.multiway.1.{param}"] = tensor + 1.0
        else:
            out[name] = tensor
    out["model.vision_model.patch.weight"] = torch.ones(4, 4)
    target_dir.mkdir()
    save_file(out, str(target_dir / "model.safetensors"))
    shutil.copy(source_dir / "config.json", target_dir / "config.json")
    return target_dir


def test_multiway_copies_are_both_merged_with_the_single_donor_tensor(tmp_path, llava_pair):
    _, llama_dir, _, root = llava_pair
    base_llama = save(build("llama", 5), tmp_path / "plain")
    owl = multiway_checkpoint(base_llama, tmp_path / "owl")
    run = run_steps(tmp_path, {"owl": owl, "llama": llama_dir}, [{"fuse": {"plugin": "linear", "map": "multiway-from-llama"}}])
    wo, wl = load_file(str(owl / "model.safetensors")), load_file(str(llama_dir / "model.safetensors"))
    wm = load_file(str(run / "00-fuse-linear" / "model" / "model.safetensors"))
    name = "model.layers.1.self_attn.k_proj.multiway.{}.weight"
    for copy in (0, 1):
        assert torch.equal(wm[name.format(copy)], 0.5 * wo[name.format(copy)] + 0.5 * wl["model.layers.1.self_attn.k_proj.weight"])
    assert torch.equal(wm["model.vision_model.patch.weight"], wo["model.vision_model.patch.weight"])
    assert torch.equal(wm["model.layers.0.mlp.up_proj.weight"], 0.5 * wo["model.layers.0.mlp.up_proj.weight"] + 0.5 * wl["model.layers.0.mlp.up_proj.weight"])
    # and the other direction takes the text copy
    back = run_steps(tmp_path / "back", {"llama": llama_dir, "owl": owl}, [{"fuse": {"plugin": "linear", "map": "llama-from-multiway"}}])
    wb = load_file(str(back / "00-fuse-linear" / "model" / "model.safetensors"))
    assert torch.equal(wb["model.layers.1.self_attn.k_proj.weight"], 0.5 * wl["model.layers.1.self_attn.k_proj.weight"] + 0.5 * wo[name.format(0)])
