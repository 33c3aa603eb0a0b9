"""Streamed checkpoint IO: reserved (write-in-place) shards, memory-mapped reads, the finite-value guard."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from surgery.core import guards
from surgery.core.errors import ModelError
from surgery.models.checkpoint import CheckpointReader, CheckpointWriter


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(50, 16, generator=generator),
        "layers.0.norm.weight": torch.randn(16, generator=generator).to(torch.bfloat16),
        "layers.0.proj.weight": torch.randn(16, 16, generator=generator),
        "layers.0.count": torch.arange(7, dtype=torch.int64),
        "scalar": torch.tensor(3.5, dtype=torch.float16),
        "empty": torch.zeros(0, 4),
        "lm_head.weight": torch.randn(50, 16, generator=generator),
    }


def _write(directory, tensors, max_bytes, reserve: bool):
    writer = CheckpointWriter(directory, like=None, max_shard_bytes=max_bytes)
    if reserve:
        writer.reserve([(name, t.dtype, t.shape) for name, t in tensors.items()])
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    return writer.close()


@pytest.mark.parametrize("max_bytes", [None, 1500])
def test_reserved_shards_are_byte_identical_to_buffered_ones(tmp_path, max_bytes):
    tensors = _tensors()
    buffered = _write(tmp_path / "buffered", tensors, max_bytes, reserve=False)
    reserved = _write(tmp_path / "reserved", tensors, max_bytes, reserve=True)
    files = sorted(p.name for p in buffered.iterdir())
    assert files == sorted(p.name for p in reserved.iterdir())
    assert len([f for f in files if f.endswith(".safetensors")]) == (1 if max_bytes is None else 3)
    for name in files:
        assert (buffered / name).read_bytes() == (reserved / name).read_bytes(), name
    reader = CheckpointReader(reserved)
    for name, tensor in tensors.items():
        assert reader.dtype(name) == tensor.dtype and reader.shape(name) == list(tensor.shape)
        assert torch.equal(reader.get(name), tensor), name
    assert not list(reserved.glob(".*.tmp"))


def test_reserved_writer_refuses_a_tensor_unlike_its_reservation(tmp_path):
    writer = CheckpointWriter(tmp_path, like=None)
    writer.reserve([("a", torch.float32, (2, 3)), ("b", torch.float32, (4,))])
    with pytest.raises(ModelError, match="reserved as"):
        writer.add("a", torch.zeros(3, 2))
    with pytest.raises(ModelError, match="not reserved"):
        writer.add("c", torch.zeros(4))
    writer.add("a", torch.zeros(2, 3))
    with pytest.raises(ModelError, match="written already"):
        writer.add("a", torch.zeros(2, 3))
    with pytest.raises(ModelError, match="'b' was reserved but never written"):
        writer.close()
    assert list(tmp_path.iterdir()) == []  # the partial shard is removed


def test_reads_are_private_maps_of_the_file(tmp_path):
    original = {"w": torch.arange(12, dtype=torch.float32).view(3, 4), "h": torch.ones(5, dtype=torch.bfloat16)}
    save_file(original, str(tmp_path / "model.safetensors"))
    reader = CheckpointReader(tmp_path)
    w = reader.get("w")
    assert torch.equal(w, original["w"]) and w.dtype == torch.float32
    w.add_(100)  # copy-on-write: the process's copy changes, the file does not
    assert torch.equal(load_file(str(tmp_path / "model.safetensors"))["w"], original["w"])
    assert torch.equal(reader.get("w"), original["w"])
    assert torch.equal(reader.get("h"), original["h"])


def test_truncated_file_is_a_model_error(tmp_path):
    save_file({"w": torch.ones(1000)}, str(tmp_path / "model.safetensors"))
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ModelError, match="truncated"):
        CheckpointReader(tmp_path).get("w")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_finite_guard_counts_nan_and_inf_exactly(dtype):
    values = torch.zeros(1000, dtype=dtype)
    assert guards.describe(values) is None
    values[3] = float("nan")
    values[10] = float("inf")
    values[11] = float("-inf")  # +inf and -inf: the sum is NaN, not a cancellation
    assert guards.describe(values) == "1 NaN, 2 Inf of 1000 values"
    values = torch.zeros(10, dtype=dtype)
    values[0], values[1] = float("inf"), float("-inf")
    assert guards.describe(values) == "2 Inf of 10 values"


def test_finite_guard_passes_values_whose_sum_overflows():
    big = torch.full((8,), torch.finfo(torch.float32).max)
    assert not torch.isfinite(big.sum())
    assert guards.describe(big) is None
    half = torch.full((100,), 60000.0, dtype=torch.float16)  # the float16 sum overflows; float32 does not
    assert guards.describe(half) is None
