"""Train zoo entries on first use and cache them as ordinary Hugging Face directories.

Cache layout: ``$SURGERY_CACHE`` (default ``~/.cache/model-surgery``) ``/zoo/<name>-<hash>/`` with
``config.json``, ``model.safetensors``, the tokenizer files and ``zoo.json`` (the entry record,
held-out accuracy per task, parameter count, training time). An entry is trained in a temporary
directory beside its final place and renamed into place when complete, under a lock file, so an
interrupted or concurrent build never leaves a half-written model where a reader looks.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForMaskedLM

from surgery.core.io import read_json, write_json
from surgery.models.zoo.architectures import (
    build_model, language_model_state, load_language_model, prepare_for_inference
)
from surgery.models.zoo.catalog import Entry, entry_hash, eval_tasks, get_entry, lineage
from surgery.models.zoo.tasks import accuracy
from surgery.models.zoo.tokenizer import build_tokenizer
from surgery.models.zoo.train import single_thread, train

ZOO_FILE = "zoo.json"
EVAL_EXAMPLES = 512
EVAL_SEED = 1
AUTO_CLASSES = {"bert": AutoModelForMaskedLM, "llava": AutoModelForImageTextToText}


def cache_root(cache_dir: Path | str | None = None) -> Path:
    """``cache_dir`` or ``$SURGERY_CACHE`` or ``~/.cache/model-surgery``, plus ``/zoo``."""
    base = cache_dir or os.environ.get("SURGERY_CACHE") or Path.home() / ".cache" / "model-surgery"
    return Path(base).expanduser() / "zoo"


def entry_dir(name: str, cache_dir: Path | str | None = None) -> Path:
    """Where entry ``name`` lives (or will live) in the cache."""
    entry = get_entry(name)
    return cache_root(cache_dir) / f"{entry.name}-{entry_hash(entry)}"


def is_built(name: str, cache_dir: Path | str | None = None) -> bool:
    return (entry_dir(name, cache_dir) / ZOO_FILE).is_file()


def build(name: str, cache_dir: Path | str | None = None, progress: bool | None = None) -> Path:
    """Return the directory of zoo entry ``name``, training it (and its parents) first if needed.

    ``progress``: show a tqdm bar per trained entry (None: only on a terminal).
    """
    target = entry_dir(name, cache_dir)
    if (target / ZOO_FILE).is_file():
        return target
    entry = get_entry(name)
    parent_dir = build(entry.parent, cache_dir, progress) if entry.parent else None
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.with_name(target.name + ".lock")):
        if (target / ZOO_FILE).is_file():  # built by another process while we waited
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            _train_into(entry, parent_dir, staging, progress)
            _move_into_place(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def build_many(names: list[str], cache_dir: Path | str | None = None, jobs: int = 1) -> Iterator[tuple[str, Path]]:
    """Build several entries, ``jobs`` processes at a time; yield ``(name, path)`` as each is ready.

    Entries are started parents first (shallowest lineage first); a child whose parent another
    process is still training waits on the parent's lock. Each entry trains on one thread, so the
    weights are the same whatever ``jobs`` is.
    """
    ordered = sorted(names, key=lambda name: len(lineage(get_entry(name))))
    if jobs <= 1:
        for name in ordered:
            yield name, build(name, cache_dir)
        return
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(build, name, cache_dir, False): name for name in ordered}
        for future in as_completed(futures):
            yield futures[future], future.result()


def load(path: Path | str) -> tuple[torch.nn.Module, Any]:
    """Load a zoo directory as (model in eval mode, tokenizer), bidirectional models restored."""
    path = Path(path)
    arch = read_json(path / ZOO_FILE)["entry"]["arch"]
    with _quiet_transformers():
        model = AUTO_CLASSES.get(arch, AutoModelForCausalLM).from_pretrained(path)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return prepare_for_inference(model).eval(), tokenizer


def _train_into(entry: Entry, parent_dir: Path | None, out_dir: Path, progress: bool | None) -> None:
    tokenizer = build_tokenizer()
    started, cpu_started = time.perf_counter(), time.process_time()
    with single_thread(entry.seed), _quiet_transformers():
        model = _initial_model(entry, parent_dir)
        bar = _progress_bar(entry, progress)
        losses = train(
            model, tokenizer, entry.tasks, entry.steps, entry.lr, entry.batch_size, entry.seed,
            entry.objective, param_groups=_param_groups(model, entry), callback=lambda step, loss: bar.update(1),
        )
        bar.close()
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        scores = {task: accuracy(model, tokenizer, task, n=EVAL_EXAMPLES, seed=EVAL_SEED) for task in eval_tasks(entry)}
        model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    write_json(out_dir / ZOO_FILE, {
        "name": entry.name,
        "description": entry.description,
        "entry": entry.record(),
        "hash": entry_hash(entry),
        "auto_class": AUTO_CLASSES.get(entry.arch, AutoModelForCausalLM).__name__,
        "bidirectional": entry.arch == "llada",
        "accuracy": scores,
        "eval": {"examples": EVAL_EXAMPLES, "seed": EVAL_SEED, "split": "test"},
        "params": sum(p.numel() for p in model.parameters()),
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "train_seconds": round(seconds, 2),
        "train_cpu_seconds": round(cpu_seconds, 2),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    })


def _initial_model(entry: Entry, parent_dir: Path | None) -> torch.nn.Module:
    """Random init under the entry's seed, then the parent's weights where there is a parent."""
    model = build_model(entry.arch, entry.size)
    if parent_dir is None:
        return model
    parent, _ = load(parent_dir)
    if parent.config.model_type == model.config.model_type:
        model.load_state_dict(parent.state_dict())
    else:  # a plain Llama parent becomes a LLaVA's language model
        load_language_model(model, language_model_state(parent))
    return model


def _param_groups(model: torch.nn.Module, entry: Entry) -> list[dict[str, Any]]:
    if entry.language_lr is None:
        return [{"params": list(model.parameters())}]
    language, other = [], []
    for name, param in model.named_parameters():
        is_language = name.startswith("model.language_model.") or name.startswith("lm_head.")
        (language if is_language else other).append(param)
    return [{"params": other}, {"params": language, "lr": entry.language_lr}]


def _move_into_place(staging: Path, target: Path) -> None:
    try:
        os.replace(staging, target)
    except OSError:
        if not (target / ZOO_FILE).is_file():  # not a lost race: a stale, incomplete directory
            shutil.rmtree(target)
            os.replace(staging, target)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX); elsewhere builders may race and the rename decides."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' own progress bars (weight loading/saving) while the zoo builds."""
    utils = transformers.utils.logging
    was_disabled = utils.is_progress_bar_enabled() is False
    utils.disable_progress_bar()
    try:
        yield
    finally:
        if not was_disabled:
            utils.enable_progress_bar()


def _progress_bar(entry: Entry, progress: bool | None) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=entry.steps, desc=f"training {entry.name}", unit="step", leave=False,
                disable=None if progress is None else not progress)
