"""Stream tensors out of and into Hugging Face safetensors checkpoints, one tensor at a time.

Weight-space merges read each tensor from every input with plain file reads (no memory map, so
pages of the inputs never stay resident) and write the result shard by shard, so no whole model
is ever materialised.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from surgery.core import guards
from surgery.core.errors import ModelError
from surgery.core.io import atomic_path, write_json

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


DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


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
    names = {dtype: code for code, dtype in DTYPES.items()}
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
    if entry["dtype"] not in DTYPES:
        raise ModelError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
    tensor = torch.empty(entry["shape"], dtype=DTYPES[entry["dtype"]])
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
        with safe_open(str(single), framework="pt") as handle:
            return {name: SINGLE_FILE for name in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for truncated files
        raise ModelError(f"{single}: not a valid safetensors file ({exc})") from None


class CheckpointWriter:
    """Collects tensors and writes them as size-capped safetensors shards plus an index."""

    def __init__(self, directory: Path, like: Path | None, max_shard_bytes: int | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.like = Path(like) if like else None
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[dict[str, torch.Tensor] | list[str]] = []
        self._weight_map: dict[str, str] = {}
        self._total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        guards.check_tensor(f"output tensor {name}{guards.layer_note(name)}", tensor)
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
        return self.directory


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
