"""Model specs, ``builtin:`` names, loading, and fingerprints.

A recipe model is a string (``builtin:NAME``, a local directory, or a hub id) or a mapping
``{path: ..., dtype: float32, device_map: auto, trust_remote_code: false}``.
"""
from __future__ import annotations

import hashlib
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field

from surgery.core.cache import cache_dir  # noqa: F401  (re-exported: the zoo and plugins use it from here)
from surgery.core.errors import ModelError
from surgery.core.places import DOWNLOAD_ENV, downloads_allowed
from surgery.core.registry import Registry
from surgery.core.lazy import lazy
from surgery.models.registries import Registries

if TYPE_CHECKING:
    import torch
else:
    torch = lazy("torch")  # reading a recipe's model specs needs no torch

BUILTIN = "builtin:"
DTYPE_NAMES = ("float32", "float16", "bfloat16")


def torch_dtype(name: str) -> "torch.dtype":
    """``"bfloat16"`` -> ``torch.bfloat16`` (one of :data:`DTYPE_NAMES`)."""
    return getattr(torch, name)


class ModelSpec(BaseModel):
    """Where a model comes from and how to place it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    path: str = Field(description="builtin:NAME, a local directory, or a hub id")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device_map: str | None = Field(None, description="accelerate placement, e.g. 'auto'")
    trust_remote_code: bool = False




def parse_model_spec(value: Any, base_dir: Path, models: Registry) -> ModelSpec:
    """Validate a recipe's model entry without loading it."""
    if isinstance(value, str):
        value = {"path": value}
    if not isinstance(value, dict):
        raise ModelError("expected a model path string or a mapping with 'path'")
    spec = ModelSpec.model_validate(value)
    if spec.path.startswith(BUILTIN):
        models.get(spec.path[len(BUILTIN):])
        return spec
    local = _local_path(spec.path, base_dir)
    if local is not None:
        if not (local / "config.json").is_file():
            raise ModelError(f"{spec.path}: no config.json in this directory")
        return spec.model_copy(update={"path": str(local)})
    if _looks_like_hub_id(spec.path):
        if not downloads_allowed():
            raise ModelError(f"{spec.path}: no such local directory, and downloading it from the hub is off "
                             f"(pass --allow-download or set {DOWNLOAD_ENV}=1 to allow it)")
        return spec
    raise ModelError(f"model directory not found: {spec.path}")


def _local_path(path: str, base_dir: Path) -> Path | None:
    candidate = Path(path) if Path(path).is_absolute() else base_dir / path
    if candidate.exists():
        return candidate.resolve()
    return None


def _looks_like_hub_id(path: str) -> bool:
    return path.count("/") == 1 and not path.startswith((".", "/", "~")) and "\\" not in path


def resolve_path(spec: ModelSpec, models: Registry) -> Path | str:
    """The directory to load from; builds ``builtin:`` models on first use."""
    if spec.path.startswith(BUILTIN):
        build = models.get(spec.path[len(BUILTIN):])
        return Path(build(cache_dir()))
    return Path(spec.path) if Path(spec.path).exists() else spec.path


def architecture_of(spec: ModelSpec, models: Registry) -> str | None:
    """The model class a spec loads, from its config or its builder alone (None: unknown offline)."""
    from surgery.models.embeddings import architecture_in

    if spec.path.startswith(BUILTIN):
        return getattr(models.get(spec.path[len(BUILTIN):]), "architecture", None)
    return architecture_in(Path(spec.path)) if Path(spec.path).is_dir() else None


@dataclass
class LoadedModel:
    name: str
    module: torch.nn.Module
    tokenizer: Any
    path: Path | None
    fingerprint: str
    architectures: Registry  # the adapters ``view`` is read with
    part: str = "language"

    @property
    def view(self):
        from surgery.models.adapters import view

        return view(self.module, self.architectures, part=self.part)


def load_model(name: str, spec: ModelSpec, registries: Registries, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model and its tokenizer with stock ``transformers`` classes, in eval mode.

    Fails with a one-line :class:`ModelError` when the checkpoint lacks a tensor the config asks for
    or holds one of another shape (``transformers`` alone would initialise it at random).
    """
    import transformers

    import surgery.models.pruned  # noqa: F401  registers the compact pruned classes with transformers

    path = resolve_path(spec, registries.models)
    kwargs: dict[str, Any] = {"dtype": torch_dtype(spec.dtype), "trust_remote_code": spec.trust_remote_code}
    offline = not downloads_allowed()
    if offline:
        kwargs["local_files_only"] = True
    if spec.device_map:
        kwargs["device_map"] = spec.device_map
    where = f"cannot load model {name!r} from {path}"
    try:
        with _quiet_transformers():
            config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=spec.trust_remote_code,
                                                             local_files_only=offline)
            model_class = _model_class(config)
            module, info = model_class.from_pretrained(path, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    except Exception as exc:  # transformers and safetensors raise many types for a bad checkpoint
        hint = "; set `trust_remote_code: true` on this model in the recipe only if you trust that code" \
            if "custom code" in str(exc) and not spec.trust_remote_code else ""
        raise ModelError(f"{where}: {_first_line(exc)}{hint}") from None
    _check_loading_info(info, where)
    if not spec.device_map:
        module.to(device)
    module.eval()
    _restore_attention_direction(module)
    tokenizer = _load_tokenizer(path, spec.trust_remote_code, offline)
    return LoadedModel(name, module, tokenizer, Path(path) if isinstance(path, Path) else None, fingerprint(path),
                       registries.architectures)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' loading reports: a bad checkpoint becomes one ModelError line instead."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_loading_info(info: dict[str, Any], where: str) -> None:
    mismatched = sorted(info.get("mismatched_keys") or [], key=str)
    if mismatched:
        key, *shapes = mismatched[0] if isinstance(mismatched[0], (tuple, list)) else (mismatched[0],)
        detail = f" (checkpoint {list(shapes[0])}, config {list(shapes[1])})" if len(shapes) == 2 else ""
        raise ModelError(f"{where}: tensor {key} does not have the shape the config implies{detail}")
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ModelError(f"{where}: the checkpoint lacks {len(missing)} tensor(s) the config asks for, e.g. {missing[0]}")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{text.splitlines()[0]}" if text else type(exc).__name__


def _restore_attention_direction(module: torch.nn.Module) -> None:
    """A Llama saved with ``is_causal: false`` (LLaDA-style) reloads causal; make it bidirectional."""
    from surgery.models.zoo.architectures import prepare_for_inference

    prepare_for_inference(module)


def _model_class(config: Any) -> Any:
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM


def _load_tokenizer(path: Path | str, trust_remote_code: bool = False, offline: bool = True) -> Any:
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                          local_files_only=offline)
    except (OSError, ValueError, TypeError):
        return None


def fingerprint(path: Path | str) -> str:
    """A cheap identity of a checkpoint: config plus names, sizes and mtimes of its weight files."""
    if not isinstance(path, Path) or not path.is_dir():
        return f"hub:{path}"
    h = hashlib.sha256()
    for file in sorted(path.iterdir()):
        if file.is_file():
            stat = file.stat()
            h.update(json.dumps([file.name, stat.st_size, stat.st_mtime_ns]).encode())
    return h.hexdigest()[:16]
