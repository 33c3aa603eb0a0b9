"""Build the suite's fine-tunes on first use and cache them as ordinary Hugging Face directories.

Cache layout: ``$SURGERY_CACHE/suite/smollm2-135m/<task>-s<seed>-<hash>/`` with ``config.json``,
``model.safetensors``, the tokenizer files and ``suite.json`` (the record, the loss curve, the
validation accuracy on the model's own task, the training time). The hash covers everything that
determines the weights (the recipe below, the task generator's format, the parent's weights file
size and name), so changing any of it builds under a new name. A fine-tune is trained in a
temporary directory and renamed into place under a lock, as the zoo does.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from surgery.core.errors import ModelError
from surgery.core.io import read_json, write_json
from surgery.models.suite.tasks import TASKS, make_examples
from surgery.models.suite.train import finetune, score_examples
from surgery.models.zoo.build import _locked, _move_into_place, _quiet_transformers, cache_root
from surgery.models.zoo.train import one_thread

FORMAT = 1  # bump when the tasks or the training loop change what a record produces
PARENT = "smollm2-135m"
SEEDS = tuple(range(5))  # fine-tuning seeds that have built-in names
SUITE_FILE = "suite.json"
VALIDATION_EXAMPLES = 32


@dataclass(frozen=True)
class Recipe:
    """How every fine-tune of the suite is trained (one recipe for all tasks and seeds)."""

    steps: int = 16
    batch_size: int = 8
    lr: float = 2e-4
    warmup: int = 2


RECIPE = Recipe()


def model_name(task: str, seed: int = 0) -> str:
    """The built-in name of a fine-tune: ``smollm2-135m/<task>`` for seed 0, else ``...@s<seed>``."""
    return f"{PARENT}/{task}" + (f"@s{seed}" if seed else "")


def parse_name(name: str) -> tuple[str, int]:
    """``(task, seed)`` of a built-in fine-tune name (inverse of :func:`model_name`)."""
    match = re.fullmatch(rf"{re.escape(PARENT)}/([a-z]+)(?:@s(\d+))?", name)
    if match is None or match.group(1) not in TASKS:
        raise ModelError(f"not a suite model name: {name!r} (expected {PARENT}/<task>[@s<seed>])")
    return match.group(1), int(match.group(2) or 0)


def names(seeds: tuple[int, ...] = SEEDS) -> list[str]:
    return [model_name(task, seed) for seed in seeds for task in TASKS]


def record(task: str, seed: int, parent_dir: Path, recipe: Recipe = RECIPE) -> dict[str, Any]:
    weights = parent_dir / "model.safetensors"
    parent_id = f"{parent_dir.name}:{weights.stat().st_size if weights.is_file() else 0}"
    return {"task": task, "seed": seed, "recipe": asdict(recipe), "format": FORMAT, "parent": parent_id}


def entry_dir(task: str, seed: int, parent_dir: Path, cache_dir: Path | str | None = None,
              recipe: Recipe = RECIPE) -> Path:
    text = json.dumps(record(task, seed, parent_dir, recipe), sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return cache_root(cache_dir).parent / "suite" / PARENT / f"{task}-s{seed}-{digest}"


def build(task: str, seed: int, parent_dir: Path, cache_dir: Path | str | None = None,
          progress: bool | None = None, recipe: Recipe = RECIPE) -> Path:
    """The directory of the fine-tune of ``parent_dir`` on ``task`` with ``seed``, trained on first use."""
    target = entry_dir(task, seed, parent_dir, cache_dir, recipe)
    if (target / SUITE_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.with_name(target.name + ".lock")):
        if (target / SUITE_FILE).is_file():  # built by another process while we waited
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            train_into(task, seed, parent_dir, staging, recipe, progress)
            _move_into_place(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def train_into(task: str, seed: int, parent_dir: Path, out_dir: Path, recipe: Recipe = RECIPE,
               progress: bool | None = None) -> dict[str, Any]:
    """Fine-tune the model in ``parent_dir`` on ``task`` and save it with its record to ``out_dir``."""
    with _quiet_transformers():
        model = transformers.AutoModelForCausalLM.from_pretrained(parent_dir, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(parent_dir)
    bar = _progress_bar(f"fine-tuning {model_name(task, seed)}", recipe.steps, progress)
    started, cpu_started = time.perf_counter(), time.process_time()
    losses = finetune(model, tokenizer, task, seed, recipe.steps, recipe.batch_size, recipe.lr, recipe.warmup,
                      callback=lambda step, loss: bar.update(1))
    bar.close()
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    with one_thread():
        scores = score_examples(model, tokenizer, make_examples(task, VALIDATION_EXAMPLES, seed=0, split="validation"))
    with _quiet_transformers():
        model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    info = {
        "name": model_name(task, seed),
        "record": record(task, seed, parent_dir, recipe),
        "losses": [round(loss, 5) for loss in losses],
        "validation": {"examples": VALIDATION_EXAMPLES, "seed": 0, **scores[task]},
        "train_seconds": round(seconds, 2),
        "train_cpu_seconds": round(cpu_seconds, 2),
        "torch_threads": 1,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }
    write_json(out_dir / SUITE_FILE, info)
    return info


def info(path: Path) -> dict[str, Any]:
    return read_json(Path(path) / SUITE_FILE)


def _progress_bar(desc: str, total: int, progress: bool | None) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False, disable=None if progress is None else not progress)

