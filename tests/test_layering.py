"""The package is a stack of layers and imports only go down.

``core`` (knows no model) < ``models`` (what a model, data set or objective is) < ``engines``
(shared computation, plugin base classes) < ``runtime`` (the manager, recipes, the runner) <
``plugins`` (one module per method; never another plugin) < ``cli``. ``hookspecs`` sits beside
``core`` and imports nothing of ours at run time. Imports inside ``if TYPE_CHECKING:`` are
annotations, not dependencies, and are not counted; imports inside functions are.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "surgery"
LAYERS = {"core": 0, "hookspecs": 0, "models": 1, "engines": 2, "runtime": 3, "plugins": 4, "cli": 5}


def layer_of(module: str) -> str | None:
    """``surgery.models.data`` -> ``models``; the package root and templates are outside the stack."""
    parts = module.split(".")
    if parts[0] != "surgery" or len(parts) == 1:
        return None
    return parts[1] if parts[1] in LAYERS else None


def runtime_imports(path: Path) -> list[tuple[int, str]]:
    """Every ``surgery...`` module imported by ``path`` outside ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {id(node) for block in ast.walk(tree) if _is_type_checking(block) for node in ast.walk(block)}
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            base = node.module
            found += [(node.lineno, f"{base}.{a.name}" if base == "surgery" else base) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] == "surgery"]


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_sits_in_a_layer():
    loose = [module_name(p) for p in MODULES if layer_of(module_name(p)) is None and module_name(p) not in
             ("surgery", "surgery.templates")]
    assert loose == []


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_only_go_down(path: Path):
    own = layer_of(module_name(path))
    if own is None:
        return
    upward = []
    for line, name in runtime_imports(path):
        if name == "surgery.hookimpl":
            continue  # the marker, re-exported by the package root
        target = layer_of(name)
        if target is None and name.startswith("surgery.") and name.split(".")[1] not in ("templates", "__version__"):
            upward.append(f"line {line}: {name} (not in any layer)")
        elif target is not None and LAYERS[target] > LAYERS[own]:
            upward.append(f"line {line}: {name} ({target} is above {own})")
    assert upward == []


@pytest.mark.parametrize("path", sorted((PACKAGE / "plugins").glob("*.py")), ids=lambda p: p.stem)
def test_no_plugin_imports_another_plugin(path: Path):
    assert [name for _, name in runtime_imports(path) if name.startswith("surgery.plugins")] == []


def test_the_checker_sees_an_upward_import(tmp_path: Path):
    bad = tmp_path / "bad.py"
    bad.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import surgery.cli\n"
                   "def f():\n    from surgery.runtime.runner import Run\n")
    assert runtime_imports(bad) == [(5, "surgery.runtime.runner")]


def test_the_package_root_imports_only_core_and_the_hook_marker_eagerly():
    eager = [name for _, name in runtime_imports(PACKAGE / "__init__.py")]
    assert all(layer_of(name) in ("core", "hookspecs") for name in eager), eager
