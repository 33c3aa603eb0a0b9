"""The zoo's entries: one small declarative record per model, the recipe it is trained from.

A record fixes everything that determines the weights (architecture, size, tasks, steps, learning
rates, batch size, seed, parent), so its hash names the cache directory: change a field and the
model is rebuilt under a new name, never confused with the old one.

Merge fixtures: ``tiny-llama/base`` is trained on the four sequence tasks (copy, reverse, sort,
inc); ``task-a`` (reverse) and ``task-b`` (sort) are short fine-tunes of it at lr 3e-4, which stay
in the base's basin, so averaging or task arithmetic of the two keeps both skills (a passing
control). ``task-c`` learns a task the base never saw (add modulo 23) at lr 1e-3 and forgets the
others: merging it with ``task-a`` or ``task-b`` is the failing control. ``tiny-llava/*`` starts its
language model from ``tiny-llama/base``, so its language model merges with the plain Llama
fine-tunes; its vision tower is its own.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from surgery.core.errors import ModelError
from surgery.core.registry import did_you_mean

FORMAT = 1  # bump when the tokenizer, the tasks or the training loop change what a record produces

SMALL = {"layers": 2, "hidden": 64, "heads": 4}
SMALL_GQA = {"layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2}
LLAVA = {**SMALL, "vision_layers": 1, "vision_hidden": 64}

BASE_TASKS = ("copy", "reverse", "sort", "inc")
PAIR_TASKS = ("copy", "reverse")
TASK_A, TASK_B, TASK_C = "reverse", "sort", "add"
LLAVA_TASKS = ("colour", "shape", "shape", "shape") + BASE_TASKS  # shape is repeated: it is the slow one


# the transformers class each architecture builds (validation reads it; nothing is imported)
MODEL_CLASSES = {"llama": "LlamaForCausalLM", "llada": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "gpt2": "GPT2LMHeadModel", "bert": "BertForMaskedLM", "llava": "LlavaForConditionalGeneration"}


@dataclass(frozen=True)
class Entry:
    """How one zoo model is made. ``language_lr`` is the language model's rate in a LLaVA."""

    name: str
    arch: str
    size: dict[str, int]
    tasks: tuple[str, ...]
    steps: int
    lr: float
    batch_size: int = 64
    seed: int = 0
    parent: str | None = None
    language_lr: float | None = None
    description: str = ""

    @property
    def objective(self) -> str:
        return {"bert": "masked", "llada": "diffusion"}.get(self.arch, "causal")

    def record(self) -> dict[str, Any]:
        """The JSON record that determines the weights (the description is not part of it)."""
        record = asdict(self)
        record.pop("description")
        record["tasks"] = list(self.tasks)
        record["format"] = FORMAT
        record["parent_hash"] = entry_hash(ENTRIES[self.parent]) if self.parent else None
        return record


def entry_hash(entry: Entry) -> str:
    """A short hash of the entry's record (and, through ``parent_hash``, of its ancestors')."""
    text = json.dumps(entry.record(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def get_entry(name: str) -> Entry:
    if name not in ENTRIES:
        raise ModelError(f"unknown zoo model {name!r}" + did_you_mean(name, list(ENTRIES)))
    return ENTRIES[name]


def lineage(entry: Entry) -> list[Entry]:
    """The entry's ancestors, root first, then the entry."""
    chain = [entry]
    while chain[0].parent:
        chain.insert(0, ENTRIES[chain[0].parent])
    return chain


def eval_tasks(entry: Entry) -> tuple[str, ...]:
    """Tasks an entry is scored on: its own and every ancestor's, in first-seen order."""
    seen: list[str] = []
    for ancestor in lineage(entry):
        seen.extend(task for task in ancestor.tasks if task not in seen)
    return tuple(seen)


def _entries(*items: Entry) -> dict[str, Entry]:
    return {entry.name: entry for entry in items}


ENTRIES: dict[str, Entry] = _entries(
    Entry("tiny-llama/base", "llama", SMALL, BASE_TASKS, steps=800, lr=3e-3,
          description="Llama, 2 layers x 64, 4 heads, trained on copy, reverse, sort and inc"),
    Entry("tiny-llama/task-a", "llama", SMALL, (TASK_A,), steps=150, lr=3e-4, parent="tiny-llama/base",
          description=f"tiny-llama/base fine-tuned on {TASK_A} (lr 3e-4: merge-friendly)"),
    Entry("tiny-llama/task-b", "llama", SMALL, (TASK_B,), steps=150, lr=3e-4, parent="tiny-llama/base",
          description=f"tiny-llama/base fine-tuned on {TASK_B} (lr 3e-4: merge-friendly)"),
    Entry("tiny-llama/task-c", "llama", SMALL, (TASK_C,), steps=400, lr=1e-3, parent="tiny-llama/base",
          description=f"tiny-llama/base fine-tuned on {TASK_C}, a task the base never saw (lr 1e-3: forgets the rest)"),
    Entry("tiny-llama-gqa/base", "llama", SMALL_GQA, PAIR_TASKS, steps=800, lr=3e-3,
          description="Llama with grouped-query attention (4 query heads, 2 KV heads), copy and reverse"),
    Entry("tiny-qwen2/base", "qwen2", SMALL_GQA, PAIR_TASKS, steps=400, lr=3e-3,
          description="Qwen2 (q/k/v biases, 4 query heads, 2 KV heads), copy and reverse"),
    Entry("tiny-gpt2/base", "gpt2", SMALL, PAIR_TASKS, steps=900, lr=1e-3,
          description="GPT-2 (Conv1D projections, learned positions), copy and reverse"),
    Entry("tiny-bert/base", "bert", SMALL, PAIR_TASKS, steps=400, lr=3e-3,
          description="BERT masked LM: the whole answer is masked and predicted in one pass"),
    Entry("tiny-llada/base", "llada", SMALL, PAIR_TASKS, steps=800, lr=3e-3,
          description="Llama made bidirectional, trained as a masked-diffusion model (LLaDA-style)"),
    Entry("tiny-llava/base", "llava", LLAVA, LLAVA_TASKS, steps=800, lr=3e-3, language_lr=3e-4,
          parent="tiny-llama/base",
          description="LLaVA: a CLIP-style vision tower + the tiny-llama/base language model, taught colours and shapes"),
    Entry("tiny-llava/task-a", "llava", LLAVA, (TASK_A,), steps=150, lr=3e-4, parent="tiny-llava/base",
          description=f"tiny-llava/base, language model fine-tuned on {TASK_A}"),
    Entry("tiny-llava/task-b", "llava", LLAVA, (TASK_B,), steps=150, lr=3e-4, parent="tiny-llava/base",
          description=f"tiny-llava/base, language model fine-tuned on {TASK_B}"),
)
