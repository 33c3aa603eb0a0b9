"""Data parallelism over torch.distributed: shard the probe set, sum streamed statistics.

Launch with ``surgery run RECIPE --nproc N`` (or ``torchrun --nproc-per-node N -m surgery.cli run
RECIPE``). Every rank runs the whole recipe; plugins that support data parallelism take their
share of the examples with :func:`shard` and sum their statistics with :func:`all_reduce_sum`
before finishing. Only rank 0 writes the run directory; the other ranks wait at a barrier after
each step and read what rank 0 wrote. Statistics are sums and counts, so the reduction is exact up
to float rounding.
"""
from __future__ import annotations

import os
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


def init_from_env(device: str = "cpu") -> None:
    """Join the process group that torchrun describes in the environment (no-op when alone)."""
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def shard(items: Sequence[T]) -> list[tuple[int, T]]:
    """This rank's share of ``items`` as (global index, item) pairs, strided across ranks."""
    return [(i, item) for i, item in enumerate(items) if i % world_size() == rank()]


def all_reduce_sum(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum each tensor over ranks, in place, in a fixed key order; returns the same dict."""
    if world_size() > 1:
        for key in sorted(tensors):
            dist.all_reduce(tensors[key], op=dist.ReduceOp.SUM)
    return tensors


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
