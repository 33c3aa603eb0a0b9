"""The named things plugins add through the ``register_*`` hooks, held together.

A :class:`Registries` belongs to one :class:`surgery.runtime.manager.Manager`, which fills it from
its plugins; everything that looks a name up receives it (``ctx.registries`` in a step,
``info.context["registries"]`` in a pydantic validator). No module holds one of its own. This
module imports nothing heavy, so building a manager does not import torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from surgery.core.errors import DataError, ModelError, PluginError
from surgery.core.registry import Registry

if TYPE_CHECKING:
    from pydantic import BaseModel

    from surgery.models.adapters import BuildView
    from surgery.models.data import DataSpec
    from surgery.models.objectives import Objective

Loader = Callable[["DataSpec", int], "list[dict]"]
BuildModel = Callable[..., Any]  # build(cache_dir) -> directory of a built-in model


@dataclass(frozen=True)
class DataSource:
    name: str
    load: Loader
    schema: "type[BaseModel] | None" = None


class DataSourceRegistry(Registry[DataSource]):
    """The registry ``register_data_sources`` hooks fill: ``register(name, load, schema=None)``."""

    def __init__(self) -> None:
        super().__init__("data source", DataError)

    def register(self, name: str, load: Loader, schema: "type[BaseModel] | None" = None) -> None:  # type: ignore[override]
        super().register(name, DataSource(name, load, schema))


@dataclass
class Registries:
    """Architecture adapters, objectives, data sources and built-in models, each by name."""

    architectures: "Registry[BuildView]" = field(default_factory=lambda: Registry("architecture", ModelError))
    objectives: "Registry[Objective]" = field(default_factory=lambda: Registry("objective", PluginError))
    data_sources: DataSourceRegistry = field(default_factory=DataSourceRegistry)
    models: Registry[BuildModel] = field(default_factory=lambda: Registry("built-in model", ModelError))

    def view(self, model: Any, part: str = "language") -> Any:
        """The canonical :class:`surgery.models.adapters.ModelView` of ``model`` (or of one ``part``)."""
        from surgery.models.adapters import view

        return view(model, self.architectures, part)

    def registrar(self, hook_name: str) -> Callable[..., None]:
        """The ``register`` callable that hook ``hook_name`` (``register_<kind>``) receives."""
        return getattr(self, HOOKS[hook_name]).register


# registration hook -> the Registries field it fills
HOOKS = {
    "register_architectures": "architectures",
    "register_objectives": "objectives",
    "register_data_sources": "data_sources",
    "register_models": "models",
}
