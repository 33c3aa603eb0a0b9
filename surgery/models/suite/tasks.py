"""The natural-language tasks of the SmolLM2 suite, generated locally and split by content.

Every example is ``{task, prompt, answer, text}`` with ``text = prompt + answer`` and the answer
starting with a space, so a BPE tokenizer gives the prompt's tokens followed by the answer's. Prompts
and answers are short (at most ~20 SmolLM2 tokens together) because fine-tuning cost grows with them.

- ``add``     ``Mia has 17 pens and gets 5 more. Total:``  -> `` 22``  (a word problem; 1..30 + 1..9)
- ``spell``   ``Spell the digits 4 0 7:``                  -> `` four zero seven``
- ``shift``   ``Shift each letter by one: c a t ->``       -> `` d b u``  (a letter cipher, a..y)
- ``reverse`` ``Reverse the words: moon dog horse ->``     -> `` horse dog moon``

The split (``train``, ``validation``, ``test``) is a property of the example's content (a hash of
its key, one in ten is test, one in ten validation), so the splits never share an example whatever
the seeds. Examples are drawn deterministically from ``(task, split, seed)``.
"""
from __future__ import annotations

import hashlib
import random
import string
from typing import Any, Callable

from surgery.core.errors import DataError

TASKS = ("add", "spell", "shift", "reverse")
SPLITS = ("train", "validation", "test")
SHARES = 10  # a key's bucket in 0..9: 0 test, 1 validation, the rest train
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NAMES = ("Mia", "Tom", "Ann", "Leo", "Sam", "Ivy", "Ben", "Zoe", "Max", "Eva")
OBJECTS = ("pens", "apples", "books", "coins", "cards", "shells", "stamps", "cups", "keys", "eggs")
WORDS = (
    "apple", "river", "stone", "cloud", "horse", "table", "green", "music", "paper", "light", "chair",
    "tiger", "bread", "glass", "money", "night", "ocean", "plant", "smile", "train", "water", "bird",
    "cake", "dog", "egg", "fish", "goat", "hat", "ink", "jam", "kite", "lamp", "moon", "nest", "owl",
    "pig", "queen", "rose", "sun", "tree", "van", "wolf", "yard", "zoo",
)
SHIFT_LETTERS = string.ascii_lowercase[:-1]  # a..y: every letter has a successor


def make_examples(task: str | list[str] | tuple[str, ...], n: int, seed: int = 0,
                  split: str = "test") -> list[dict[str, Any]]:
    """``n`` examples of ``task`` (a name, ``"all"`` or a list; a list is interleaved round-robin)."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    tasks = resolve_tasks(task)
    rng = random.Random(f"suite/{'+'.join(tasks)}/{split}/{seed}")
    return [_draw(tasks[i % len(tasks)], rng, split) for i in range(n)]


def resolve_tasks(task: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """A task name, ``"all"`` or a list of task names -> task names."""
    names = [task] if isinstance(task, str) else list(task)
    out: list[str] = []
    for name in names:
        if name == "all":
            out.extend(TASKS)
        elif name in TASKS:
            out.append(name)
        else:
            from surgery.core.registry import did_you_mean

            raise DataError(f"unknown suite task {name!r}" + did_you_mean(name, [*TASKS, "all"]))
    if not out:
        raise DataError("no suite task given")
    return tuple(out)


def split_of(key: str) -> str:
    """The split an example with content ``key`` belongs to."""
    bucket = int.from_bytes(hashlib.sha1(key.encode()).digest()[:4], "big") % SHARES
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def check_answer(example: dict[str, Any]) -> bool:
    """Recompute the answer from the prompt alone (a test oracle, independent of the drawers)."""
    prompt, task = example["prompt"], example["task"]
    words = prompt.rstrip(" ->:").split()
    if task == "add":
        numbers = [int(word) for word in words if word.isdigit()]
        expected = str(sum(numbers))
    elif task == "spell":
        expected = " ".join(DIGIT_WORDS[int(word)] for word in words[3:])
    elif task == "shift":
        expected = " ".join(chr(ord(letter) + 1) for letter in words[5:])
    elif task == "reverse":
        expected = " ".join(reversed(words[3:]))
    else:
        raise DataError(f"unknown suite task {task!r}")
    return example["answer"] == " " + expected


# --- drawing ----------------------------------------------------------------------------------

def _draw(task: str, rng: random.Random, split: str) -> dict[str, Any]:
    while True:  # rejection sampling into the split
        prompt, answer, key = _DRAWERS[task](rng)
        if split_of(f"{task}/{key}") == split:
            return {"task": task, "prompt": prompt, "answer": answer, "text": prompt + answer}


def _add(rng: random.Random) -> tuple[str, str, str]:
    name, thing = rng.choice(NAMES), rng.choice(OBJECTS)
    a, b = rng.randint(1, 30), rng.randint(1, 9)
    return f"{name} has {a} {thing} and gets {b} more. Total:", f" {a + b}", f"{name}/{thing}/{a}/{b}"


def _spell(rng: random.Random) -> tuple[str, str, str]:
    digits = [rng.randrange(10) for _ in range(rng.randint(2, 4))]
    key = " ".join(map(str, digits))
    return f"Spell the digits {key}:", " " + " ".join(DIGIT_WORDS[d] for d in digits), key


def _shift(rng: random.Random) -> tuple[str, str, str]:
    letters = [rng.choice(SHIFT_LETTERS) for _ in range(rng.randint(2, 4))]
    key = " ".join(letters)
    return f"Shift each letter by one: {key} ->", " " + " ".join(chr(ord(c) + 1) for c in letters), key


def _reverse(rng: random.Random) -> tuple[str, str, str]:
    words = rng.sample(WORDS, rng.randint(2, 4))
    key = " ".join(words)
    return f"Reverse the words: {key} ->", " " + " ".join(reversed(words)), key


_DRAWERS: dict[str, Callable[[random.Random], tuple[str, str, str]]] = {
    "add": _add, "spell": _spell, "shift": _shift, "reverse": _reverse,
}
