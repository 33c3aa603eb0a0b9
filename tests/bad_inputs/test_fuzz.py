"""Recipe fuzzing: mutated copies of the shipped recipes through ``surgery validate``.

Each case starts from one file in ``recipes/`` and applies one to three seeded mutations: delete a
key, swap a value's type, put in a random string, a huge, negative or non-finite number, wrap or
unwrap a value (wrong nesting), rename a key, name an unknown plugin, duplicate or drop a step,
set a top-level key (seed, device, output, ...) to an odd value;
some cases then cut or splice the YAML text itself. Every case must either validate (exit 0) or
fail with exactly one line ``error: ...`` and exit 2: never a traceback, never a hang (each case
runs under an alarm). The cases are deterministic in ``SEED``.
"""
from __future__ import annotations

import copy
import math
import random
import signal
import string
from pathlib import Path
from typing import Any

import pytest
import yaml

RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))
SEED = 20261202
CASES = 260
TIMEOUT_S = 10


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every location in the tree, as a tuple of keys and indexes (the root is ``()``)."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, prefix + (index,))
    return found


def _get(tree: Any, path: tuple) -> Any:
    for part in path:
        tree = tree[part]
    return tree


def _random_string(rng: random.Random) -> str:
    choices = [
        "", " ", "..", "../../..", "/", "~", "a/b", "x" * rng.randint(1, 300), "\u00e9\u4e2d\U0001f600",
        "null", "true", "1e999", "-0", "builtin:", "builtin:nope/none", "cuda:7", "mps", "cpu:0",
        "".join(rng.choice(string.printable) for _ in range(rng.randint(1, 40))),
    ]
    return rng.choice(choices)


def _random_value(rng: random.Random) -> Any:
    return rng.choice([
        None, True, False, 0, 1, -1, -(10**20), 10**30, 2**63, 2**64 + 1, 0.5, -1e308, math.inf, -math.inf, math.nan,
        _random_string(rng), [], {}, [1, "a", None], {"x": 1}, {1: 2}, [[[]]],
    ])


def _mutate(tree: dict, rng: random.Random) -> dict:
    paths = _paths(tree)
    path = rng.choice(paths)
    op = rng.choice(["delete", "type", "string", "number", "wrap", "unwrap", "rename", "plugin", "steps", "top"])
    if op == "top":
        key = rng.choice(["seed", "device", "output", "name", "on_nonfinite", "plugins", "models", "data"])
        tree[key] = rng.choice([_random_value(rng), _random_string(rng), rng.choice(
            [2**40, -5, "cuda", "cuda:0", "banana", "/", "..", "/dev/null/x", "report", {"a": "org/model"}])])
        return tree
    if op == "plugin":
        steps = tree.get("steps")
        if isinstance(steps, list) and steps and isinstance(steps[0], dict):
            step = rng.choice(steps)
            body = next(iter(step.values())) if isinstance(step, dict) and step else None
            if isinstance(body, dict):
                body["plugin"] = rng.choice(["nope", "", "linear", "fam", "tasks", "random", 7, None, ["linear"]])
                return tree
        op = "string"
    if op == "steps":
        steps = tree.get("steps")
        if isinstance(steps, list) and steps:
            action = rng.choice(["duplicate", "drop", "reverse", "empty"])
            if action == "duplicate":
                steps.append(copy.deepcopy(rng.choice(steps)))
            elif action == "drop":
                steps.pop(rng.randrange(len(steps)))
            elif action == "reverse":
                steps.reverse()
            else:
                tree["steps"] = []
            return tree
        op = "delete"
    if not path:
        return tree if op != "wrap" else {"recipe": tree}
    parent, key = _get(tree, path[:-1]), path[-1]
    value = parent[key]
    if op == "delete":
        del parent[key]
    elif op == "type":
        parent[key] = _random_value(rng)
    elif op == "string":
        parent[key] = _random_string(rng)
    elif op == "number":
        parent[key] = rng.choice([-1, 0, 10**30, -(10**30), 2**31, 2**63 - 1, 1e300, -0.0, math.nan, math.inf])
    elif op == "wrap":
        parent[key] = rng.choice([[value], {"value": value}, [[value]]])
    elif op == "unwrap":
        if isinstance(value, dict) and value:
            parent[key] = next(iter(value.values()))
        elif isinstance(value, list) and value:
            parent[key] = value[0]
        else:
            parent[key] = None
    elif op == "rename" and isinstance(parent, dict):
        parent[rng.choice([key + "s", key[:-1], key.upper(), "_" + key, 3, None])] = parent.pop(key)
    return tree


def _text_mutation(text: str, rng: random.Random) -> str:
    op = rng.choice(["cut", "splice", "indent", "anchor", "tab"])
    lines = text.splitlines()
    if op == "cut":
        return text[: rng.randrange(len(text) + 1)]
    if op == "splice":
        position = rng.randrange(len(text) + 1)
        return text[:position] + rng.choice(["{", "]", ": ", "- ", "&a ", "*a", "!!python/none ", "\n  ", "'", "%"]) + text[position:]
    if op == "indent":
        index = rng.randrange(len(lines))
        lines[index] = " " * rng.randint(1, 5) + lines[index]
    elif op == "anchor":
        lines.insert(0, "z0: &z0 [q, q, q, q, q, q, q, q]")
        lines[1:1] = [f"z{i}: &z{i} [" + ", ".join([f"*z{i - 1}"] * 8) + "]" for i in range(1, rng.randint(2, 9))]
    else:
        index = rng.randrange(len(lines))
        lines[index] = "\t" + lines[index]
    return "\n".join(lines) + "\n"


def _safe_plugin_refs(tree: Any, original: list) -> None:
    """A mutation must never make the recipe import a real module (``plugins:`` runs code)."""
    if isinstance(tree, dict) and isinstance(tree.get("plugins"), list):
        tree["plugins"] = [ref if ref in original or not isinstance(ref, str) else f"surgery_fuzz_missing_{i}"
                           for i, ref in enumerate(tree["plugins"])]
    elif isinstance(tree, dict) and isinstance(tree.get("plugins"), str):
        tree["plugins"] = "surgery_fuzz_missing"


def make_cases() -> list[tuple[str, str]]:
    rng = random.Random(SEED)
    cases = []
    for number in range(CASES):
        source = RECIPES[number % len(RECIPES)]
        tree = yaml.safe_load(source.read_text(encoding="utf-8"))
        original = list(tree.get("plugins") or [])
        for _ in range(rng.randint(1, 3)):
            tree = _mutate(tree, rng)
        if isinstance(tree, dict):
            _safe_plugin_refs(tree, original)
        text = yaml.safe_dump(tree, sort_keys=False, allow_unicode=True)
        if rng.random() < 0.2:
            text = _text_mutation(text, rng)
        cases.append((f"{number:03d}-{source.stem}", text))
    return cases


FUZZ_CASES = make_cases()


class CaseTimeout(Exception):
    pass


@pytest.fixture
def alarm():
    def expire(signum, frame):
        raise CaseTimeout(f"no answer within {TIMEOUT_S} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TIMEOUT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_cases_are_deterministic_and_distinct():
    assert make_cases() == FUZZ_CASES
    assert len({text for _, text in FUZZ_CASES}) > 0.9 * len(FUZZ_CASES)


@pytest.mark.parametrize("case", FUZZ_CASES, ids=[name for name, _ in FUZZ_CASES])
def test_mutated_recipe_validates_or_fails_in_one_line(case, tmp_path, monkeypatch, surgery_cli, alarm):
    name, text = case
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SURGERY_ALLOW_DOWNLOAD", "0")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text, encoding="utf-8")
    result = surgery_cli("validate", recipe)
    assert result.exit_code in (0, 2), result
    assert "Traceback" not in result.out + result.err
    if result.exit_code == 2:
        lines = result.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {recipe}: "), result.err
    else:
        assert result.err.strip() == "" and result.out.strip().endswith(")"), result
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]  # validate writes nothing
