"""The plugin manager: finds built-in and third-party plugins, owns their registries, calls one plugin.

Built-in plugins are found through the ``surgery`` entry-point group, exactly like third-party
ones. A recipe's ``plugins:`` list or the CLI's ``--plugin`` adds a local ``.py`` file or an
importable module; it is registered under its ``PLUGIN_NAME`` attribute or its module name.

Plugins are imported only when something needs them. What the command line shows without running
anything (names, stages, summaries, descriptions, commands, and the names each plugin registers
through the ``register_*`` hooks) comes from the *plugin index*: a JSON file under
``<cache>/plugin-index/`` written the first time it is needed by importing every plugin once. It is
keyed by the entry points and their distributions' versions and by the size and modification time
of every file of the packages that provide them, so installing, removing or editing a plugin
builds a new one. So ``surgery plugins`` and ``surgery --help`` import no plugin, and
``surgery validate`` imports only the plugins its steps name and those that register the built-in
models, data sources and objectives it refers to.

Each manager owns one :class:`Registries`; a lookup of a name imports the plugin that registers
it (per the index) and calls its ``register_*`` hook; listing a registry calls them all. There is
no process-wide manager.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from surgery import hookspecs
from surgery.core.errors import PluginError
from surgery.core.registry import did_you_mean
from surgery.models.registries import HOOKS, Registries
from surgery.runtime import plugin_index

GROUP = "surgery"

_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class Manager:
    """Wraps ``pluggy.PluginManager`` with lookups by plugin name and stage; imports plugins lazily."""

    def __init__(self, load_entrypoints: bool = True) -> None:
        self.pm = pluggy.PluginManager("surgery")
        self.pm.add_hookspecs(hookspecs)
        self._pending: dict[str, importlib.metadata.EntryPoint] = {}
        if load_entrypoints:
            self._pending = {ep.name: ep for ep in importlib.metadata.entry_points(group=GROUP)}
        self._index: dict[str, dict[str, Any]] | None = None
        self._registries: Registries | None = None
        self._broadcast: dict[str, set[str]] = {hook: set() for hook in HOOKS}  # hook -> plugins it reached
        self._distributions: dict[str, str] = {}  # entry-point plugin -> "distribution version"

    @property
    def registries(self) -> Registries:
        """Everything the plugins registered (architectures, objectives, data sources, models)."""
        if self._registries is None:
            registries = Registries()
            for hook_name, kind in HOOKS.items():
                registry = getattr(registries, kind)
                registry.fill = lambda name, hook_name=hook_name, registry=registry: self._fill(hook_name, registry, name)
            self._registries = registries
        return self._registries

    def _fill(self, hook_name: str, registry: Any, name: str | None) -> None:
        """Call ``hook_name`` on every loaded plugin it has not reached, after importing the plugin
        that the index says registers ``name`` (every plugin with the hook when ``name`` is None or
        unknown to the index)."""
        kind = HOOKS[hook_name]
        pending = [n for n in self._pending if hook_name in self._indexed(n).get("hooks", [])]
        owners = [n for n, entry in (self._index or {}).items() if name in entry.get("registers", {}).get(kind, [])]
        for plugin_name in (owners if name is not None and owners else pending):
            if plugin_name in self._pending:
                self._load(plugin_name)
        for plugin_name, plugin in self.pm.list_name_plugin():
            if plugin_name in self._broadcast[hook_name] or not _is_hookimpl(getattr(plugin, hook_name, None)):
                continue
            self._broadcast[hook_name].add(plugin_name)
            getattr(plugin, hook_name)(register=registry.register)

    # --- loading ---------------------------------------------------------------------------

    def _load(self, name: str) -> object:
        """Import the entry point ``name`` and register what it points at."""
        entry = self._pending.pop(name)
        try:
            plugin = entry.load()
        except Exception as exc:  # a broken third-party package must not look like our bug
            raise PluginError(f"could not load the installed surgery plugin {name!r} ({entry.value}): "
                              f"{type(exc).__name__}: {exc}") from exc
        self.register(plugin, name)
        dist = getattr(entry, "dist", None)
        if dist is not None:
            self._distributions[name] = f"{dist.metadata['name']} {dist.version}"
        return plugin

    def load_all(self) -> None:
        """Import every installed plugin (the index and ``register_commands`` need them all)."""
        for name in list(self._pending):
            self._load(name)

    def register(self, plugin: object, name: str) -> None:
        """Register a plugin object or module under ``name``."""
        if self.pm.get_plugin(name) is plugin:
            return
        if self.pm.has_plugin(name) or name in self._pending:
            raise PluginError(f"a plugin named {name!r} is already registered")
        self.pm.register(plugin, name=name)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(plugin)
            raise PluginError(f"plugin {name!r}: {exc}") from exc

    def unregister(self, name: str) -> None:
        self._pending.pop(name, None)
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)
            self._registries = None
            self._broadcast = {hook: set() for hook in HOOKS}

    def add(self, ref: str, base_dir: Path | None = None) -> str:
        """Load a local plugin file (``./my_plugin.py``) or module (``pkg.module``); return its name."""
        module = _import_plugin(ref, base_dir)
        name = getattr(module, "PLUGIN_NAME", module.__name__.rsplit(".", 1)[-1])
        if self.pm.get_plugin(name) is module:
            return name
        self.register(module, name)
        return name

    # --- the index of installed plugins -------------------------------------------------------

    def _indexed(self, name: str) -> dict[str, Any]:
        """What the index knows of the not yet imported plugin ``name`` (empty for a loaded one)."""
        if name not in self._pending:
            return {}
        if self._index is None:
            self._index = plugin_index.load(list(self._pending.values()), self._describe_all)
        return self._index.get(name, {})

    def _describe_all(self) -> dict[str, dict[str, Any]]:
        """Import every pending plugin in a scratch manager and describe each (for the index)."""
        scratch = Manager(load_entrypoints=False)
        scratch._pending = dict(self._pending)
        index = {}
        for name in list(scratch._pending):
            try:
                scratch._load(name)
            except PluginError as exc:  # listed, and the error repeated when the plugin is used
                index[name] = {"stages": [], "hooks": [], "description": f"(cannot be loaded: {exc})"}
                continue
            index[name] = scratch.describe_plugin(name)
        return index

    def describe_plugin(self, name: str) -> dict[str, Any]:
        """The index entry of a loaded plugin: stages, hooks, texts, commands, registered names."""
        plugin = self.get(name)
        hooks = sorted(h for h in self.pm.hook.__dict__ if _is_hookimpl(getattr(plugin, h, None)))
        registers = {}
        for hook_name, kind in HOOKS.items():
            if hook_name in hooks:
                names: list[str] = []
                getattr(plugin, hook_name)(register=lambda n, *args, **kwargs: names.append(n))
                registers[kind] = names
        commands = {}
        if "register_commands" in hooks:
            import click

            group = click.Group()
            plugin.register_commands(cli=group)
            commands = {n: c.get_short_help_str(limit=200) for n, c in group.commands.items()}
        return {"stages": self.stages_of(name), "hooks": hooks, "description": self.description(name),
                "registers": registers, "commands": commands}

    # --- lookups ---------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted({name for name, _ in self.pm.list_name_plugin() if name} | set(self._pending))

    def has(self, name: str) -> bool:
        return name in self._pending or self.pm.has_plugin(name)

    def get(self, name: str) -> object:
        if name in self._pending:
            return self._load(name)
        plugin = self.pm.get_plugin(name)
        if plugin is None:
            raise PluginError(f"unknown plugin {name!r}" + did_you_mean(name, self.names()))
        return plugin

    def stages_of(self, name: str) -> list[str]:
        if name in self._pending:
            return list(self._indexed(name).get("stages", []))
        plugin = self.get(name)
        return [s for s in hookspecs.STAGES if _is_hookimpl(getattr(plugin, s, None))]

    def plugins_for(self, stage: str) -> list[str]:
        return [name for name in self.names() if stage in self.stages_of(name)]

    def description(self, name: str) -> str:
        """The plugin's whole docstring (its class's, or its module's)."""
        if name in self._pending:
            return self._indexed(name).get("description", "")
        plugin = self.get(name)
        doc = inspect.getdoc(plugin) if not isinstance(plugin, ModuleType) else inspect.cleandoc(plugin.__doc__ or "")
        return (doc or "").strip()

    def summary(self, name: str) -> str:
        """The first line of the plugin's description."""
        description = self.description(name)
        return description.splitlines()[0] if description else ""

    def commands(self) -> dict[str, str]:
        """Command name -> short help of every command the installed plugins add (from the index)."""
        found: dict[str, str] = {}
        for name in self._pending:
            found.update(self._indexed(name).get("commands", {}))
        return found

    def register_commands(self, cli: Any) -> None:
        """Import the plugins that add commands and let them add them to ``cli``."""
        for name in [n for n in self._pending if "register_commands" in self._indexed(n).get("hooks", [])]:
            self._load(name)
        self.pm.hook.register_commands(cli=cli)

    def schema(self, name: str, stage: str) -> type:
        """The options schema ``name`` declares for ``stage`` (NoOptions when it declares none)."""
        from surgery.core.options import NoOptions

        target = self.get(name)
        others = [p for p in self.pm.get_plugins() if p is not target]
        schema = self.pm.subset_hook_caller("option_schema", remove_plugins=others)(stage=stage)
        return schema or NoOptions

    def identity(self, name: str) -> str:
        """What a step fingerprint records of plugin ``name``: its distribution and version when it
        was installed as a package, plus a hash of its source file when it is a local file or a
        module of no distribution, so that editing that file makes its steps run again."""
        plugin = self.get(name)
        if name in self._distributions:
            return self._distributions[name]
        module = plugin if isinstance(plugin, ModuleType) else inspect.getmodule(
            plugin if inspect.isclass(plugin) else type(plugin))
        parts = []
        version = _distribution_version(getattr(module, "__name__", ""))
        if version:
            parts.append(version)
        source = getattr(module, "__file__", None)
        if not version and source and Path(source).is_file():
            parts.append("sha256:" + hashlib.sha256(Path(source).read_bytes()).hexdigest()[:16])
        return " ".join(parts) or "unversioned"

    def source_file(self, name: str) -> str | None:
        """The file plugin ``name`` was imported from, if any."""
        plugin = self.get(name)
        module = plugin if isinstance(plugin, ModuleType) else inspect.getmodule(type(plugin))
        return getattr(module, "__file__", None)

    def check_stage(self, name: str, stage: str) -> None:
        if not self.has(name) or stage not in self.stages_of(name):
            raise PluginError(f"no {stage} plugin named {name!r}" + did_you_mean(name, self.plugins_for(stage)))

    def call_stage(self, name: str, stage: str, **kwargs: Any) -> Any:
        """Call exactly plugin ``name``'s implementation of ``stage``."""
        self.check_stage(name, stage)
        target = self.get(name)
        others = [p for p in self.pm.get_plugins() if p is not target]
        return self.pm.subset_hook_caller(stage, remove_plugins=others)(**kwargs)


def _distribution_version(module_name: str) -> str | None:
    """``"dist version"`` of the installed distribution that provides top-level ``module_name``."""
    from importlib import metadata

    top = module_name.split(".", 1)[0]
    if not top or top.startswith("surgery_local_plugin_"):
        return None
    names = metadata.packages_distributions().get(top) or []
    for dist in names:
        try:
            return f"{dist} {metadata.version(dist)}"
        except metadata.PackageNotFoundError:
            continue
    return None


def _is_hookimpl(obj: object) -> bool:
    return obj is not None and hasattr(obj, "surgery_impl")


def _import_plugin(ref: str, base_dir: Path | None) -> ModuleType:
    if ref.endswith(".py") or "/" in ref or "\\" in ref:
        path = Path(ref)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if not path.is_file():
            raise PluginError(f"plugin file not found: {ref}")
        module_name = f"surgery_local_plugin_{path.stem}"
        loaded = sys.modules.get(module_name)
        if loaded is not None and Path(loaded.__file__).resolve() == path.resolve():
            return loaded
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise PluginError(f"plugin file {ref}: {type(exc).__name__}: {exc}") from exc
        return module
    if not _MODULE_NAME.fullmatch(ref):
        raise PluginError(f"{ref!r} is neither a plugin file (*.py) nor a module name like 'pkg.module'")
    try:
        return importlib.import_module(ref)
    except ImportError as exc:
        raise PluginError(f"cannot import plugin module {ref!r}: {exc}") from exc
    except Exception as exc:  # the module's own code raised while importing
        raise PluginError(f"plugin module {ref!r}: {type(exc).__name__}: {exc}") from exc
