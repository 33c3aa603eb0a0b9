"""The plugin manager: loads built-in and third-party plugins, owns their registries, calls one plugin.

Built-in plugins are found through the ``surgery`` entry-point group, exactly like third-party
ones. A recipe's ``plugins:`` list or the CLI's ``--plugin`` adds a local ``.py`` file or an
importable module; it is registered under its ``PLUGIN_NAME`` attribute or its module name.

Each manager owns one :class:`Registries`, filled by broadcasting the ``register_*`` hooks to its
plugins when first asked for and again after a plugin is added; there is no process-wide manager.
"""
from __future__ import annotations

import hashlib
import importlib
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

_MODULE_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


class Manager:
    """Wraps ``pluggy.PluginManager`` with lookups by plugin name and stage."""

    def __init__(self, load_entrypoints: bool = True) -> None:
        self.pm = pluggy.PluginManager("surgery")
        self.pm.add_hookspecs(hookspecs)
        if load_entrypoints:
            self._load_entrypoints()
        self.pm.check_pending()
        self._registries: Registries | None = None

    @property
    def registries(self) -> Registries:
        """Everything the plugins registered (architectures, objectives, data sources, models)."""
        if self._registries is None:
            registries = Registries()
            for hook_name in HOOKS:
                getattr(self.pm.hook, hook_name)(register=registries.registrar(hook_name))
            self._registries = registries
        return self._registries

    # --- loading ---------------------------------------------------------------------------

    def _load_entrypoints(self) -> None:
        try:
            self.pm.load_setuptools_entrypoints("surgery")
        except Exception as exc:  # a broken third-party package must not look like our bug
            raise PluginError(f"could not load an installed surgery plugin: {type(exc).__name__}: {exc}") from exc

    def register(self, plugin: object, name: str) -> None:
        """Register a plugin object or module under ``name`` and collect what it registers."""
        if self.pm.get_plugin(name) is plugin:
            return
        if self.pm.has_plugin(name):
            raise PluginError(f"a plugin named {name!r} is already registered")
        self.pm.register(plugin, name=name)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(plugin)
            raise PluginError(f"plugin {name!r}: {exc}") from exc
        self._registries = None

    def unregister(self, name: str) -> None:
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)
            self._registries = None

    def add(self, ref: str, base_dir: Path | None = None) -> str:
        """Load a local plugin file (``./my_plugin.py``) or module (``pkg.module``); return its name."""
        module = _import_plugin(ref, base_dir)
        name = getattr(module, "PLUGIN_NAME", module.__name__.rsplit(".", 1)[-1])
        if self.pm.get_plugin(name) is module:
            return name
        self.register(module, name)
        return name

    # --- lookups ---------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(name for name, _ in self.pm.list_name_plugin() if name)

    def get(self, name: str) -> object:
        plugin = self.pm.get_plugin(name)
        if plugin is None:
            raise PluginError(f"unknown plugin {name!r}" + did_you_mean(name, self.names()))
        return plugin

    def stages_of(self, name: str) -> list[str]:
        plugin = self.get(name)
        return [s for s in hookspecs.STAGES if _is_hookimpl(getattr(plugin, s, None))]

    def plugins_for(self, stage: str) -> list[str]:
        return [name for name in self.names() if stage in self.stages_of(name)]

    def summary(self, name: str) -> str:
        plugin = self.get(name)
        doc = inspect.getdoc(plugin) if not isinstance(plugin, ModuleType) else plugin.__doc__
        return (doc or "").strip().splitlines()[0] if doc and doc.strip() else ""

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
        for registered, dist in self.pm.list_plugin_distinfo():
            if registered is plugin:
                return f"{dist.project_name} {dist.version}"
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
        if not self.pm.has_plugin(name) or stage not in self.stages_of(name):
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
