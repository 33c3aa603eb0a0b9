"""Stream tensors out of and into Hugging Face safetensors checkpoints, one tensor at a time.

Weight-space merges read each tensor from every input with plain file reads (no memory map, so
pages of the inputs never stay resident) and write the result shard by shard, so no whole model
is ever materialised.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from surgery.core import guards
from surgery.core.errors import ModelError
from surgery.core.io import atomic_path, write_json
from surgery.core.lazy import lazy

if TYPE_CHECKING:
    import torch
else:
    torch = lazy("torch")  # imported on first use: validating a recipe needs no torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# files copied from the reference checkpoint so the result loads with stock from_pretrained
SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "vocab.json", "merges.txt", "tokenizer.model",
    "chat_template.jinja", "preprocessor_config.json", "processor_config.json", "zoo.json",
)


class CheckpointReader:
    """Tensor names and lazy tensor access for a safetensors checkpoint directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._file_of = _tensor_files(self.directory)

    def names(self) -> list[str]:
        return list(self._file_of)

    def get(self, name: str) -> torch.Tensor:
        file = self._file_of.get(name)
        if file is None:
            raise ModelError(f"{self.directory}: no tensor named {name!r}")
        tensor = _read_tensor(self.directory / file, name)
        guards.check_tensor(f"checkpoint {self.directory}: tensor {name}{guards.layer_note(name)}", tensor)
        return tensor

    def shape(self, name: str) -> list[int]:
        file = self._file_of.get(name)
        if file is None:
            raise ModelError(f"{self.directory}: no tensor named {name!r}")
        return list(_header(self.directory / file, name)["shape"])


SAFETENSORS_DTYPES = {  # safetensors' dtype codes -> torch dtype names (``dtypes()`` maps them)
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}


def dtypes() -> dict[str, "torch.dtype"]:
    """safetensors dtype code -> torch dtype."""
    return {code: getattr(torch, name) for code, name in SAFETENSORS_DTYPES.items()}


def _header(path: Path, name: str) -> dict:
    """The safetensors header entry of ``name``, with ``data_offsets`` made absolute."""
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        entry = dict(header[name])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"{path}: cannot read tensor {name!r} ({_first_line(exc)})") from None
    begin, end = entry["data_offsets"]
    entry["data_offsets"] = (8 + size + begin, 8 + size + end)
    return entry


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file tensor by tensor from each tensor's own memory (no serialised copy)."""
    names = {dtype: code for code, dtype in dtypes().items()}
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": names[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for tensor in tensors.values():
            handle.write(memoryview(tensor.contiguous().view(-1).view(torch.uint8).numpy()))


def _read_tensor(path: Path, name: str) -> torch.Tensor:
    """Read one tensor with ``readinto`` straight into its own storage."""
    entry = _header(path, name)
    if entry["dtype"] not in SAFETENSORS_DTYPES:
        raise ModelError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
    tensor = torch.empty(entry["shape"], dtype=dtypes()[entry["dtype"]])
    begin, end = entry["data_offsets"]
    if tensor.numel() * tensor.element_size() != end - begin:
        raise ModelError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {entry['shape']}")
    with open(path, "rb") as handle:
        handle.seek(begin)
        read = handle.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy()))
    if read != end - begin:
        raise ModelError(f"{path}: truncated file (tensor {name!r} needs {end - begin} bytes, got {read})")
    return tensor


def _tensor_files(directory: Path) -> dict[str, str]:
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not a mapping")
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{index}: not a valid checkpoint index ({_first_line(exc)})") from None
        missing = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
        if missing:
            raise ModelError(f"{index}: names {missing[0]}, which is not in the directory")
        return dict(weight_map)
    single = directory / SINGLE_FILE
    if not single.is_file():
        raise ModelError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}")
    try:
        from safetensors import safe_open

        with safe_open(str(single), framework="pt") as handle:
            return {name: SINGLE_FILE for name in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for truncated files
        raise ModelError(f"{single}: not a valid safetensors file ({exc})") from None


class CheckpointWriter:
    """Collects tensors and writes them as size-capped safetensors shards plus an index."""

    def __init__(self, directory: Path, like: Path | None, max_shard_bytes: int | None = None,
                 dtype: str | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.like = Path(like) if like else None
        self.max_shard_bytes = max_shard_bytes
        self.dtype = dtype  # floating tensors are cast to it ("bfloat16" ...) and config.json says so
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[dict[str, torch.Tensor] | list[str]] = []
        self._weight_map: dict[str, str] = {}
        self._total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        guards.check_tensor(f"output tensor {name}{guards.layer_note(name)}", tensor)
        if self.dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(getattr(torch, self.dtype))
        size = tensor.numel() * tensor.element_size()
        if self.max_shard_bytes and self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().contiguous().cpu()
        self._pending_bytes += size
        self._total_bytes += size

    def _flush(self) -> None:
        if not self._pending:
            return
        file = f"model-{len(self._shards) + 1:05d}.safetensors"
        write_shard(self.directory / file, self._pending, metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._weight_map.update({name: file for name in self._pending})
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> Path:
        """Write the last shard, rename shards to the stock naming, write the index and side files."""
        self._flush()
        if len(self._shards) == 1:
            (self.directory / "model-00001.safetensors").replace(self.directory / SINGLE_FILE)
        else:
            total = len(self._shards)
            renames = {f"model-{i:05d}.safetensors": f"model-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)}
            for old, new in renames.items():
                (self.directory / old).replace(self.directory / new)
            weight_map = {name: renames[file] for name, file in self._weight_map.items()}
            write_json(self.directory / INDEX_FILE, {"metadata": {"total_size": self._total_bytes}, "weight_map": weight_map})
        if self.like:
            copy_side_files(self.like, self.directory)
        if self.dtype is not None:
            set_config_dtype(self.directory, self.dtype)
        return self.directory


def set_config_dtype(directory: Path, dtype: str) -> None:
    """Record ``dtype`` in ``config.json`` (the key ``from_pretrained(dtype="auto")`` reads)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    config["dtype"] = dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
    write_json(path, config)


def copy_side_files(source: Path, target: Path) -> None:
    """Copy config, tokenizer and similar small files from ``source`` to ``target`` atomically."""
    for name in SIDE_FILES:
        if (source / name).is_file():
            with atomic_path(target / name) as tmp:
                shutil.copyfile(source / name, tmp)


def iter_tensors(reader: CheckpointReader) -> Iterator[tuple[str, torch.Tensor]]:
    for name in reader.names():
        yield name, reader.get(name)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
