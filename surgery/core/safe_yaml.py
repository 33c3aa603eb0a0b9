"""Bounded YAML for recipes and ``--set`` values: ``yaml.SafeLoader`` plus limits.

``yaml.safe_load`` refuses Python tags but not a small file that expands into an enormous one
("billion laughs": anchors whose aliases nest), an alias that refers to itself, or nesting so deep
that the composer overflows the stack. Here the document is composed into its node graph first,
with a depth bound while composing; the graph is then measured (nodes counted as if every alias
were expanded, cycles refused) before anything is constructed. Each failure is one
:class:`~surgery.errors.RecipeError` line naming the YAML line.

Limits: ``MAX_DEPTH`` levels of nesting, ``MAX_NODES`` expanded nodes, and a file size of
``$SURGERY_RECIPE_MAX_BYTES`` (default 1 MiB; raise it for a very large recipe).
"""
from __future__ import annotations

import os
from typing import Any

import yaml

from surgery.core.errors import RecipeError

MAX_DEPTH = 64
MAX_NODES = 100_000
SIZE_ENV = "SURGERY_RECIPE_MAX_BYTES"
DEFAULT_MAX_BYTES = 1 << 20


def max_bytes() -> int:
    """The recipe size limit: ``$SURGERY_RECIPE_MAX_BYTES`` or 1 MiB."""
    text = os.environ.get(SIZE_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_BYTES
    try:
        value = int(text)
    except ValueError:
        raise RecipeError(f"${SIZE_ENV}: expected a number of bytes, got {text!r}") from None
    if value <= 0:
        raise RecipeError(f"${SIZE_ENV}: expected a positive number of bytes, got {value}")
    return value


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader whose composer counts nesting and stops at ``MAX_DEPTH``."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise RecipeError(f"line {mark.line + 1}: nested deeper than {MAX_DEPTH} levels")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load(text: str, where: str | None = None) -> Any:
    """Parse one YAML document under the limits; ``where`` prefixes every error."""
    try:
        limit = max_bytes()
    except RecipeError as exc:
        raise RecipeError(str(exc), where=where) from None
    size = len(text.encode("utf-8", errors="replace"))
    if size > limit:
        raise RecipeError(f"{size} bytes, more than the {limit}-byte limit (raise it with ${SIZE_ENV})", where=where)
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        check_graph(node)
        return loader.construct_document(node)
    except RecipeError as exc:
        raise RecipeError(str(exc), where=where) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError(f"{line}invalid YAML: {problem}", where=where) from None
    except ValueError as exc:  # e.g. an integer longer than Python converts (sys.get_int_max_str_digits)
        raise RecipeError(f"invalid value: {exc}", where=where) from None
    except RecursionError:  # not reached under MAX_DEPTH; kept so it can never be a traceback
        raise RecipeError(f"nested deeper than {MAX_DEPTH} levels", where=where) from None
    finally:
        loader.dispose()


def check_graph(root: yaml.Node) -> None:
    """Refuse cyclic aliases and documents over ``MAX_NODES`` nodes once aliases are expanded;
    duplicate keys in one mapping too (``safe_load`` would keep the last silently).

    Iterative, memoised per node: a shared anchor is measured once, so the check is linear in the
    size of the file however far the aliases would expand.
    """
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in _children(node))
            if sizes[key] > MAX_NODES:
                raise RecipeError(f"line {node.start_mark.line + 1}: expands to more than {MAX_NODES} nodes "
                                  "(anchors and aliases nested too far)")
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise RecipeError(f"line {node.start_mark.line + 1}: an alias refers to the node that contains it")
        _check_duplicates(node)
        on_path.add(key)
        stack.append((node, True))
        for child in _children(node):
            child_key = id(child)
            if child_key in on_path:
                raise RecipeError(f"line {child.start_mark.line + 1}: an alias refers to the node that contains it")
            if child_key not in sizes:
                stack.append((child, False))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_duplicates(node: yaml.Node) -> None:
    if not isinstance(node, yaml.MappingNode):
        return
    seen: set[str] = set()
    for key, _ in node.value:
        if isinstance(key, yaml.ScalarNode):
            if key.value in seen:
                raise RecipeError(f"line {key.start_mark.line + 1}: duplicate key {key.value!r}")
            seen.add(key.value)
