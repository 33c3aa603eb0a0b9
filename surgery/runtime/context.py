"""What a stage hook sees: ``StepContext``, a view of the running recipe from one step."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch
from tqdm.auto import tqdm

from surgery.core import guards
from surgery.core.artifacts import Artifact
from surgery.core.errors import DataError, RecipeError, SurgeryError
from surgery.models.checkpoint import CheckpointWriter, copy_side_files
from surgery.runtime.recipe import Step, _validate_options

if TYPE_CHECKING:
    from surgery.models.loading import LoadedModel
    from surgery.models.objectives import Objective
    from surgery.models.registries import Registries
    from surgery.runtime.runner import Run

MODEL_SUBDIR = "model"


class StepContext:
    """The running recipe as one step sees it: its options, models, data and upstream artifacts."""

    def __init__(self, run: "Run", step: Step, out_dir: Path, parent: "StepContext | None" = None) -> None:
        self.run = run
        self.step = step
        self.out_dir = out_dir
        self.parent = parent  # the step that called this plugin through ``call``
        self.saved_model: Path | None = None

    # --- identity ------------------------------------------------------------------------------
    @property
    def options(self) -> Any:
        return self.step.options

    @property
    def stage(self) -> str:
        return self.step.stage

    @property
    def plugin(self) -> str:
        return self.step.plugin

    @property
    def index(self) -> int:
        return self.step.index

    @property
    def name(self) -> str:
        return self.step.name

    @property
    def seed(self) -> int:
        return self.run.recipe.seed

    @property
    def device(self) -> torch.device:
        return torch.device(self.run.device)

    # --- models --------------------------------------------------------------------------------
    @property
    def models(self) -> list[str]:
        return list(self.step.models)

    def model(self, name: str) -> "LoadedModel":
        return self.run.model(name)

    def model_path(self, name: str) -> Path:
        return self.run.model_path(name)

    def save_model(self, module: torch.nn.Module, like: str) -> Path:
        """``save_pretrained`` ``module`` (safetensors) with the tokenizer/side files of model ``like``."""
        target = self.out_dir / MODEL_SUBDIR
        guards.check_module(f"{self.step.output_model or like} (saved by this step)", module)
        # the tokenizer's files are copied as they are, never re-serialised from a loaded tokenizer,
        # so the bytes do not depend on what this process happened to load before
        copy_side_files(self.run.model_path(like), target)
        module.save_pretrained(target, safe_serialization=True)  # config and weights of `module`
        self.saved_model = target
        return target

    def model_writer(self, like: str, max_shard_mb: float | None = None) -> CheckpointWriter:
        """A streaming writer for the merged state dict; call ``.close()`` when done."""
        max_bytes = int(max_shard_mb * 2**20) if max_shard_mb else None
        self.saved_model = self.out_dir / MODEL_SUBDIR
        return CheckpointWriter(self.saved_model, like=self.run.model_path(like), max_shard_bytes=max_bytes)

    # --- data ----------------------------------------------------------------------------------
    def data_spec(self, data: str | None = None) -> Any:
        """The validated entry (``surgery.models.data.DataSpec``) of the step's data, or of ``data``."""
        name = data or self.step.data
        if name is None:
            raise SurgeryError(f"{self.where}: this step needs data, and the recipe defines none")
        if name not in self.run.recipe.data:
            raise SurgeryError(f"{self.where}: unknown data {name!r}")
        return self.run.recipe.data[name]

    def examples(self, data: str | None = None) -> list[dict]:
        """The examples of the step's data entry (or of ``data``); errors name the entry."""
        spec = self.data_spec(data)
        try:
            return self.run.examples(spec)
        except DataError as exc:
            raise DataError(f"data.{data or self.step.data}: {exc}") from None

    def batches(self, tokenizer: Any, data: str | None = None, batch_size: int | None = None) -> Iterator[dict]:
        from surgery.models.data import batches

        spec = self.data_spec(data)
        size = batch_size or spec.batch_size
        return _named_batches(batches(self.examples(data), tokenizer, size, spec.max_tokens), data or self.step.data)

    def shard(self, items: list) -> list[tuple[int, Any]]:
        """This process's share of ``items`` as (global index, item) pairs (all of them when alone)."""
        from surgery.core.distributed import shard

        return shard(items)

    def all_reduce(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sum streamed statistics over data-parallel processes (in place; identity when alone)."""
        from surgery.core.distributed import all_reduce_sum

        return all_reduce_sum(tensors)

    @property
    def registries(self) -> "Registries":
        """The architectures, objectives, data sources and built-in models the plugins registered."""
        return self.run.manager.registries

    def objective(self, name: str) -> "Objective":
        """The registered objective ``name``."""
        return self.registries.objectives.get(name)

    # --- other steps ---------------------------------------------------------------------------
    def upstream(self, stage: str) -> Artifact:
        """The artifact of the step named in ``inputs:`` for ``stage``, else the latest earlier one."""
        return self.run.upstream(self.step, stage)

    def weighter(self) -> Any:
        """The token weighter of the recipe's ``weight`` step, or uniform weights."""
        return self.run.weighter()

    def call(self, stage: str, plugin: str, options: dict | None = None, models: list[str] | None = None) -> Any:
        """Call another plugin's stage hook with validated ``options`` in a child context."""
        manager = self.run.manager
        where = f"{self.where} -> {stage}: {plugin}"
        try:
            manager.check_stage(plugin, stage)
        except SurgeryError as exc:
            raise RecipeError(f"{where}: {exc}") from None
        opts = _validate_options(manager.schema(plugin, stage), dict(options or {}), where, self.run.recipe.source,
                                 manager.registries)
        child_step = Step(self.index, stage, plugin, f"{self.name}/{stage}-{plugin}", models or self.models,
                          self.step.data, {}, None, opts, dict(options or {}))
        child = StepContext(self.run, child_step, self.out_dir / f"{stage}-{plugin}", parent=self)
        child.out_dir.mkdir(parents=True, exist_ok=True)
        return manager.call_stage(plugin, stage, ctx=child)

    # --- reporting -----------------------------------------------------------------------------
    @property
    def where(self) -> str:
        """``step 2 (tune: preference)``; in a called plugin ``step 2 (tune: preference) -> constrain: fpo``."""
        if self.parent is not None:
            return f"{self.parent.where} -> {self.stage}: {self.plugin}"
        return f"step {self.index} ({self.stage}: {self.plugin})"

    def progress(self, iterable: Iterable, desc: str, total: int | None = None) -> Iterable:
        return tqdm(iterable, desc=f"[{self.index}] {desc}", total=total, leave=False, disable=self.run.quiet)

    def log(self, message: str) -> None:
        self.run.log(f"{self.where}: {message}")



def _named_batches(batches: Iterator[dict], data: str | None) -> Iterator[dict]:
    """``batches`` with data errors (an example that gives no tokens ...) naming the data entry."""
    try:
        yield from batches
    except DataError as exc:
        raise DataError(f"data.{data}: {exc}") from None
