"""What a step produces: tensors (safetensors), metadata (JSON), figures for the run report."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from surgery.core.io import read_json, read_tensors, write_json, write_tensors

TENSORS_FILE = "tensors.safetensors"
META_FILE = "meta.json"


@dataclass
class Artifact:
    """A step's output. ``figures`` are short numbers that go into ``report.json``."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    model_dir: Path | None = None  # set when the step saved a model (fuse, prune, tune)

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        if self.tensors:
            write_tensors(directory / TENSORS_FILE, self.tensors)
        model_dir = str(self.model_dir.relative_to(directory)) if self.model_dir else None
        write_json(directory / META_FILE, {"meta": self.meta, "figures": self.figures, "model_dir": model_dir})

    @classmethod
    def load(cls, directory: Path) -> "Artifact":
        record = read_json(directory / META_FILE)
        tensors_path = directory / TENSORS_FILE
        tensors = read_tensors(tensors_path) if tensors_path.exists() else {}
        model_dir = directory / record["model_dir"] if record.get("model_dir") else None
        return cls(tensors=tensors, meta=record["meta"], figures=record["figures"], model_dir=model_dir)
