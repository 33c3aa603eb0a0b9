"""Stream tensors out of and into Hugging Face safetensors checkpoints, one tensor at a time.

Weight-space merges read each tensor from every input through a private memory map of just that
tensor (file pages the kernel can drop, unmapped when the tensor is freed, so the inputs never stay
resident) and, once the output layout is reserved (:meth:`CheckpointWriter.reserve`), write each
result straight to its place in its shard file, so no whole model and no whole shard is ever held
in memory.
"""
from __future__ import annotations

import json
import mmap
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

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
    "chat_template.jinja", "preprocessor_config.json", "processor_config.json",
)  # not zoo.json: a zoo entry's record describes that entry, not a model derived from it


class CheckpointReader:
    """Tensor names and lazy tensor access for a safetensors checkpoint directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._file_of = _tensor_files(self.directory)
        self._headers: dict[str, dict] = {}

    def names(self) -> list[str]:
        return list(self._file_of)

    def get(self, name: str) -> torch.Tensor:
        file = self._file_of.get(name)
        if file is None:
            raise ModelError(f"{self.directory}: no tensor named {name!r}")
        tensor = _read_tensor(self.directory / file, name, self._entry(name))
        guards.check_tensor(f"checkpoint {self.directory}: tensor {name}{guards.layer_note(name)}", tensor)
        return tensor

    def shape(self, name: str) -> list[int]:
        return list(self._entry(name)["shape"])

    def dtype(self, name: str) -> torch.dtype:
        code = self._entry(name)["dtype"]
        if code not in DTYPES:
            raise ModelError(f"{self.directory}: tensor {name!r} has unsupported dtype {code}")
        return DTYPES[code]

    def _entry(self, name: str) -> dict:
        """The header entry of ``name`` (each file's header is parsed once)."""
        file = self._file_of.get(name)
        if file is None:
            raise ModelError(f"{self.directory}: no tensor named {name!r}")
        if file not in self._headers:
            self._headers[file] = _headers(self.directory / file)
        entry = self._headers[file].get(name)
        if entry is None:
            raise ModelError(f"{self.directory / file}: cannot read tensor {name!r} (not in the file's header)")
        return entry


DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _headers(path: Path) -> dict[str, dict]:
    """Every tensor's safetensors header entry, with ``data_offsets`` made absolute."""
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        entries = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            entries[name] = {**entry, "data_offsets": (8 + size + begin, 8 + size + end)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelError(f"{path}: not a valid safetensors header ({_first_line(exc)})") from None
    return entries


def _encoded_header(entries: Sequence[tuple[str, torch.dtype, Sequence[int]]], metadata: dict[str, str]) -> tuple[bytes, list[int]]:
    """The safetensors header of tensors laid out back to back in ``entries`` order (padded so the
    data starts 8-byte aligned) and each tensor's offset in the file."""
    codes = {dtype: code for code, dtype in DTYPES.items()}
    header: dict = {"__metadata__": metadata}
    offsets, offset = [], 0
    for name, dtype, shape in entries:
        size = _numel(shape) * _itemsize(dtype)
        header[name] = {"dtype": codes[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offsets.append(offset)
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    prefix = len(encoded).to_bytes(8, "little") + encoded
    return prefix, [len(prefix) + o for o in offsets]


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file tensor by tensor from each tensor's own memory (no serialised copy)."""
    prefix, _ = _encoded_header([(n, t.dtype, t.shape) for n, t in tensors.items()], metadata)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(prefix)
        for tensor in tensors.values():
            handle.write(_bytes(tensor))


def _bytes(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy())


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for size in shape:
        n *= int(size)
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _read_tensor(path: Path, name: str, entry: dict) -> torch.Tensor:
    """One tensor backed by a private (copy-on-write) memory map of its bytes: file pages, not heap,
    until written to; the map goes when the tensor is freed."""
    if entry["dtype"] not in DTYPES:
        raise ModelError(f"{path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
    dtype = DTYPES[entry["dtype"]]
    begin, end = entry["data_offsets"]
    if _numel(entry["shape"]) * _itemsize(dtype) != end - begin:
        raise ModelError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {entry['shape']}")
    if end == begin:
        return torch.empty(entry["shape"], dtype=dtype)
    start = begin - begin % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as handle:
        if os.fstat(handle.fileno()).st_size < end:
            raise ModelError(f"{path}: truncated file (tensor {name!r} needs bytes up to {end})")
        # no MAP_POPULATE: on a private writable map it copies every page (write faults), which
        # makes the file heap; read-ahead instead, and a page is copied only if a caller writes it
        mapped = mmap.mmap(handle.fileno(), end - start, flags=mmap.MAP_PRIVATE,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
    if hasattr(mapped, "madvise"):
        mapped.madvise(mmap.MADV_WILLNEED)
    flat = torch.frombuffer(mapped, dtype=torch.uint8, count=end - begin, offset=begin - start)
    if (begin - start) % _itemsize(dtype):  # a misaligned tensor cannot be viewed in place
        flat = flat.clone()
    return flat.view(dtype).view(entry["shape"])


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
    """Writes tensors as size-capped safetensors shards plus an index.

    By default tensors are collected and each shard is written when full. After :meth:`reserve`
    (every tensor's name, dtype and shape, in order) the shard files and headers are laid out up
    front and :meth:`add` writes each tensor straight to its place, so nothing is held back.
    """

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
        self._reserved: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}  # name -> (fd, offset, dtype, shape)
        self._files: list[tuple[int, Path, list[str]]] = []  # (fd, temporary path, names)
        self._written: set[str] = set()

    def reserve(self, entries: Sequence[tuple[str, torch.dtype, Sequence[int]]]) -> None:
        """Lay out every tensor to come (grouped into shards as :meth:`add` would) and create the
        shard files with their headers; ``add`` then writes each tensor in place."""
        if self._pending or self._shards or self._files:
            raise RuntimeError("reserve() must come before any add()")
        if not entries:
            return
        groups: list[list[tuple[str, torch.dtype, Sequence[int]]]] = [[]]
        group_bytes = 0
        for name, dtype, shape in entries:
            size = _numel(shape) * _itemsize(dtype)
            if self.max_shard_bytes and groups[-1] and group_bytes + size > self.max_shard_bytes:
                groups.append([])
                group_bytes = 0
            groups[-1].append((name, dtype, tuple(int(s) for s in shape)))
            group_bytes += size
            self._total_bytes += size
        try:
            for group in groups:
                prefix, offsets = _encoded_header(group, {"format": "pt"})
                fd, tmp = tempfile.mkstemp(prefix=".model.", suffix=".safetensors.tmp", dir=self.directory)
                self._files.append((fd, Path(tmp), [name for name, _, _ in group]))
                os.fchmod(fd, 0o666 & ~_umask())
                os.pwrite(fd, prefix, 0)
                os.ftruncate(fd, offsets[-1] + _numel(group[-1][2]) * _itemsize(group[-1][1]))
                for (name, dtype, shape), offset in zip(group, offsets):
                    self._reserved[name] = (fd, offset, dtype, shape)
        except BaseException:
            self.abort()
            raise

    def add(self, name: str, tensor: torch.Tensor) -> None:
        guards.check_tensor(f"output tensor {name}{guards.layer_note(name)}", tensor)
        if self._files:
            self._write_reserved(name, tensor)
            return
        size = tensor.numel() * tensor.element_size()
        if self.max_shard_bytes and self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.detach().contiguous().cpu()
        self._pending_bytes += size
        self._total_bytes += size

    def _write_reserved(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._reserved or name in self._written:
            raise ModelError(f"output tensor {name!r} was {'written already' if name in self._written else 'not reserved'}")
        fd, offset, dtype, shape = self._reserved[name]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ModelError(f"output tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}, "
                             f"reserved as {dtype} {shape}")
        data = _bytes(tensor.cpu())
        while data:
            written = os.pwrite(fd, data, offset)
            data, offset = data[written:], offset + written
        self._written.add(name)

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
        if self._files:
            missing = [name for name in self._reserved if name not in self._written]
            if missing:
                self.abort()
                raise ModelError(f"output tensor {missing[0]!r} was reserved but never written ({len(missing)} missing)")
            for index, (fd, tmp, names) in enumerate(self._files, start=1):
                os.close(fd)
                final = f"model-{index:05d}.safetensors"
                tmp.replace(self.directory / final)
                self._shards.append(names)
                self._weight_map.update({name: final for name in names})
            self._files = []
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

    def abort(self) -> None:
        """Remove the reserved shard files (after a failed merge)."""
        for fd, tmp, _ in self._files:
            try:
                os.close(fd)
            except OSError:
                pass
            tmp.unlink(missing_ok=True)
        self._files = []


def copy_side_files(source: Path, target: Path) -> None:
    """Copy config, tokenizer and similar small files from ``source`` to ``target`` atomically."""
    for name in SIDE_FILES:
        if (source / name).is_file():
            with atomic_path(target / name) as tmp:
                shutil.copyfile(source / name, tmp)


def iter_tensors(reader: CheckpointReader) -> Iterator[tuple[str, torch.Tensor]]:
    for name in reader.names():
        yield name, reader.get(name)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
