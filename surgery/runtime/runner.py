"""Runs a validated recipe step by step into a run directory, reusing finished steps.

Run directory layout::

    <output>/
      report.json                 every step: status (ran/reused), seconds, figures
      run.log
      00-capture-fam/             tensors.safetensors, meta.json, done.json, plots, model/
      01-score-fam/ ...

A step is finished when its ``done.json`` exists; it records the plugin and the validated options
the step ran with, the step's fingerprint (stage, plugin, normalised options, model fingerprints,
data spec, seed, and the previous step's fingerprint) and the size of every file the step wrote. A re-run reuses a finished step whose fingerprint is
unchanged and whose files are all there with their recorded sizes. Steps are written into a
temporary directory and renamed into place, so a crash never leaves a directory that looks
finished, and a file cut short later is never read as valid.

The fingerprint includes the plugin's identity (distribution version, or a hash of a local plugin
file), so an edited plugin runs again; ``force`` (``surgery run --force [STEP]``) computes a step
and those after it again regardless. While it runs, rank 0 holds ``<output>/.lock``
(:mod:`surgery.core.runlock`): a second run on the same directory stops with one line.

A step that fails leaves nothing behind: its temporary directory is removed, and so is the run
directory when this run created it and no step finished. Errors carry the recipe file and the step.
Non-finite values are handled by :mod:`surgery.core.guards` under the recipe's ``on_nonfinite``.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from surgery.core.version import VERSION
from surgery.core import distributed, guards
from surgery.core.artifacts import Artifact
from surgery.core.errors import PluginError, SurgeryError, located
from surgery.core.io import read_json, write_json, write_model_card
from surgery.core.registry import did_you_mean
from surgery.core.runlock import LOCK_FILE, RunLock
from surgery.models.loading import LoadedModel, fingerprint, load_model, resolve_path
from surgery.runtime.context import StepContext
from surgery.runtime.manager import Manager
from surgery.runtime.recipe import Recipe, Step

DONE_FILE = "done.json"
REPORT_FILE = "report.json"
LOG_FILE = "run.log"


class Run:
    """State of one recipe execution: loaded models, finished artifacts, the report."""

    def __init__(self, recipe: Recipe, manager: Manager, device: str | None = None, quiet: bool | None = None,
                 force: str | None = None) -> None:
        self.recipe = recipe
        self.force_from = first_forced(recipe, force)  # steps from this index on are computed again
        self.manager = manager
        self.device = device or recipe.device
        self.quiet = quiet
        self.output = recipe.output
        self.loaded: dict[str, LoadedModel] = {}
        self.produced: dict[str, tuple[Path, str]] = {}  # model name -> (directory, fingerprint)
        self.finished: dict[str, tuple[Step, Artifact]] = {}
        self._examples: dict[str, list[dict]] = {}
        self._partial: Path | None = None  # the temporary directory of the step being computed
        self.report: dict[str, Any] = {"recipe": recipe.name, "source": recipe.source, "version": VERSION, "steps": []}

    # --- models and data -----------------------------------------------------------------------
    def model_path(self, name: str) -> Path:
        if name in self.produced:
            return self.produced[name][0]
        path = resolve_path(self.recipe.models[name], self.manager.registries.models)
        if not isinstance(path, Path):
            raise SurgeryError(f"model {name!r} ({path}) is not a local checkpoint; weight-space steps need one")
        return path

    def model_fingerprint(self, name: str) -> str:
        if name in self.produced:
            return self.produced[name][1]
        return fingerprint(resolve_path(self.recipe.models[name], self.manager.registries.models))

    def model(self, name: str) -> LoadedModel:
        if name not in self.loaded:
            from surgery.models.loading import ModelSpec

            spec = ModelSpec(path=str(self.produced[name][0])) if name in self.produced else self.recipe.models[name]
            self.log(f"loading model {name!r} from {spec.path}")
            loaded = load_model(name, spec, self.manager.registries, self.device)
            guards.check_module(name, loaded.module)
            self.loaded[name] = loaded
        return self.loaded[name]

    def examples(self, spec: Any) -> list[dict]:
        from surgery.models.data import load_examples

        key = spec.model_dump_json()
        if key not in self._examples:
            self._examples[key] = load_examples(spec, self.recipe.seed, self.manager.registries.data_sources,
                                                self.recipe.base_dir)
        return self._examples[key]

    # --- steps ---------------------------------------------------------------------------------
    def upstream(self, step: Step, stage: str) -> Artifact:
        wanted = step.inputs.get(stage)
        for name, (earlier, artifact) in reversed(list(self.finished.items())):
            if (wanted and name == wanted) or (not wanted and earlier.stage == stage):
                return artifact
        raise SurgeryError(f"step {step.index} ({step.stage}: {step.plugin}) needs an earlier {stage} step")

    def weighter(self) -> Any:
        for step in self.recipe.steps:
            if step.stage == "weight":
                ctx = StepContext(self, step, self.output / step.dirname)
                return self.manager.call_stage(step.plugin, "weight", ctx=ctx)
        return UniformWeighter()

    def _models_named_in(self, step: Step) -> list[str]:
        """Recipe models an option names (e.g. a fuse step's ``parent``) besides the step's own."""
        values = step.options.model_dump(mode="json").values()
        return sorted({v for v in values if isinstance(v, str) and v in self.recipe.models and v not in step.models})

    def step_fingerprint(self, step: Step, previous: str) -> str:
        data = self.recipe.data.get(step.data) if step.data else None
        record = {
            "version": VERSION, "stage": step.stage, "plugin": step.plugin,
            "plugin_identity": self.manager.identity(step.plugin),
            "options": step.options.model_dump(mode="json"), "models": {m: self.model_fingerprint(m) for m in step.models},
            "named_models": {m: self.model_fingerprint(m) for m in self._models_named_in(step)},
            "data": data.model_dump(mode="json") if data is not None else None, "inputs": step.inputs,
            "seed": self.recipe.seed, "previous": previous, "as": step.output_model,
        }
        if self.recipe.on_nonfinite != "stop":  # a step that went on past NaN is not a clean one
            record["on_nonfinite"] = self.recipe.on_nonfinite
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]

    def execute(self) -> dict[str, Any]:
        """Run every step in order, holding the run directory's lock; return the report."""
        distributed.init_from_env(self.device)
        created = not self.output.exists()
        try:
            _make_run_dir(self.output)
            lock = RunLock(self.output, self.log) if distributed.rank() == 0 else contextlib.nullcontext()
            lock.__enter__()
        except SurgeryError as exc:
            if created:
                shutil.rmtree(self.output, ignore_errors=True)
            raise located(exc, self.recipe.source) from None
        try:
            self.log(f"run {self.recipe.name!r} from {self.recipe.source}")
            previous = ""
            for step in self.recipe.steps:
                previous = self.step_fingerprint(step, previous)
                self._run_step(step, previous)
            self.log("done")
        except Exception as exc:
            self._discard_partial(created, exc)
            if isinstance(exc, SurgeryError):
                raise located(exc, self.recipe.source) from exc
            raise
        finally:
            lock.__exit__(None, None, None)
        return self.report

    def _discard_partial(self, created: bool, exc: Exception) -> None:
        """After a failed step: remove its temporary directory, and the run directory if this run
        made it and it holds nothing else but the log (no finished step, no resumable state such as
        a tune step's checkpoints)."""
        if self._partial is not None:
            shutil.rmtree(self._partial, ignore_errors=True)
        if distributed.rank() != 0:
            return
        left = {path.name for path in self.output.iterdir()} if self.output.is_dir() else set()
        if created and left <= {LOG_FILE, REPORT_FILE, LOCK_FILE}:
            shutil.rmtree(self.output, ignore_errors=True)
        else:
            try:
                self.log(f"failed: {exc}")
            except SurgeryError:
                pass  # the original error is the one to report

    def _run_step(self, step: Step, fp: str) -> None:
        final = self.output / step.dirname
        start = time.perf_counter()
        artifact = None if step.index >= self.force_from else _reusable(final, fp)
        status = "reused"
        if artifact is None:
            self._compute(step, final, fp)
            status = "ran"
            distributed.barrier()  # ranks > 0 read what rank 0 wrote
            artifact = Artifact.load(final)
        nonfinite = _read_done(final).get("nonfinite", []) if distributed.rank() == 0 else []
        seconds = round(time.perf_counter() - start, 3)
        self.finished[step.name] = (step, artifact)
        if step.output_model and artifact.model_dir is not None:
            self.produced[step.output_model] = (artifact.model_dir, fp)
        self.log(f"step {step.index} ({step.stage}: {step.plugin}) {status} in {seconds}s")
        for finding in nonfinite:
            self.log(f"step {step.index} ({step.stage}: {step.plugin}): {finding}")
        entry = {
            "index": step.index, "name": step.name, "stage": step.stage, "plugin": step.plugin, "status": status,
            "seconds": seconds, "dir": step.dirname, "figures": artifact.figures, "model": step.output_model,
        }
        if nonfinite:
            entry["nonfinite"] = nonfinite
        self.report["steps"].append(entry)
        if distributed.rank() == 0:
            write_json(self.output / REPORT_FILE, self.report)

    def _compute(self, step: Step, final: Path, fp: str) -> None:
        rank = distributed.rank()
        tmp = self.output / (f".{step.dirname}.tmp" if rank == 0 else f".{step.dirname}.rank{rank}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self._partial = tmp
        ctx = StepContext(self, step, tmp)
        torch.manual_seed(self.recipe.seed)
        where = f"step {step.index} ({step.stage}: {step.plugin})"
        with guards.policy(self.recipe.on_nonfinite) as found:
            artifact = self._call(step, ctx)
            if not isinstance(artifact, Artifact):
                raise PluginError(f"{where}: plugin returned {type(artifact).__name__}, not an Artifact")
            try:
                guards.check_tensors("artifact tensor", artifact.tensors)
            except SurgeryError as exc:
                raise located(exc, where) from None
        if rank != 0:  # only rank 0 writes the run directory
            shutil.rmtree(tmp, ignore_errors=True)
            self._partial = None
            return None
        if artifact.model_dir is None and ctx.saved_model is not None:
            artifact.model_dir = ctx.saved_model
        if artifact.model_dir is not None and Path(artifact.model_dir).is_dir() and Path(artifact.model_dir).is_relative_to(tmp):
            self._model_card(step, Path(artifact.model_dir))
        artifact.save(tmp)
        done = {"fingerprint": fp, "finished": _now(), "files": _file_sizes(tmp), "plugin": step.plugin,
                "options": step.options.model_dump(mode="json")}
        if found.findings:
            done["nonfinite"] = found.findings
        write_json(tmp / DONE_FILE, done)
        _replace_dir(tmp, final)
        self._partial = None
        return None

    def _model_card(self, step: Step, model_dir: Path) -> None:
        """README.md in a model a step wrote: the step, its inputs and the recipe that made it."""
        inputs = []
        for name in step.models:
            source = ("made by an earlier step of this recipe" if name in self.produced
                      else f"`{self.recipe.models[name].path}`")
            inputs.append(f"| {name} | {source} | `{self.model_fingerprint(name)[:16]}` |")
        options = yaml.safe_dump(step.options.model_dump(mode="json"), sort_keys=True, width=100)
        sections = [
            ("How it was made", f"Step {step.index} of recipe `{self.recipe.name}`: `{step.stage}` with the "
                                f"`{step.plugin}` plugin (model-surgery {VERSION}), seed {self.recipe.seed}."),
            ("Inputs", "| model | source | fingerprint |\n|---|---|---|\n" + "\n".join(inputs)),
            ("Options", f"```yaml\n{options}```"),
        ]
        source = Path(self.recipe.source)
        if source.is_file():
            sections.append(("Recipe", f"```yaml\n{source.read_text(encoding='utf-8').rstrip()}\n```"))
        front = {"library_name": "transformers", "tags": ["model-surgery", step.stage, step.plugin],
                 "base_model": [self.recipe.models[n].path for n in step.models if n not in self.produced]}
        write_model_card(model_dir, step.output_model or f"{self.recipe.name} step {step.index}", front, sections)

    def _call(self, step: Step, ctx: StepContext) -> Any:
        where = f"step {step.index} ({step.stage}: {step.plugin})"
        try:
            return self.manager.call_stage(step.plugin, step.stage, ctx=ctx)
        except SurgeryError as exc:
            if str(exc).startswith("step "):
                raise
            raise type(exc)(str(exc), where=where) from exc
        except Exception as exc:
            raise PluginError(f"plugin raised {type(exc).__name__}: {exc}", where=where) from exc

    def log(self, message: str) -> None:
        if distributed.rank() != 0:
            return
        try:
            with open(self.output / LOG_FILE, "a", encoding="utf-8") as handle:
                handle.write(f"{_now()} {message}\n")
        except OSError as exc:
            raise SurgeryError(f"{self.output / LOG_FILE}: cannot write: {exc.strerror or exc}") from None


class UniformWeighter:
    """Every real token weighs 1, padding 0."""

    def weights(self, logits_btv: torch.Tensor | None, input_ids_bt: torch.Tensor, mask_bt: torch.Tensor) -> torch.Tensor:
        return mask_bt.to(torch.float32)


def _file_sizes(directory: Path) -> dict[str, int]:
    """Size in bytes of every file under ``directory`` (``done.json`` aside), by relative path."""
    return {
        path.relative_to(directory).as_posix(): path.stat().st_size
        for path in sorted(directory.rglob("*")) if path.is_file() and path.name != DONE_FILE
    }


def _read_done(directory: Path) -> dict[str, Any]:
    try:
        record = read_json(directory / DONE_FILE)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _reusable(final: Path, fp: str) -> Artifact | None:
    """The finished step's artifact when its fingerprint matches and every file it wrote is there
    with its recorded size; None (compute again) otherwise."""
    record = _read_done(final)
    files = record.get("files")
    if record.get("fingerprint") != fp or not isinstance(files, dict):
        return None
    for name, size in files.items():
        path = final / name
        if not path.is_file() or path.stat().st_size != size:
            return None
    try:
        return Artifact.load(final)
    except Exception:  # unreadable despite matching sizes: compute it again
        return None


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move ``tmp`` onto ``final``; an old ``final`` is moved aside first and then deleted."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.replace(old)
    tmp.replace(final)
    shutil.rmtree(old, ignore_errors=True)


def first_forced(recipe: Recipe, force: str | None) -> int:
    """The index of the first step ``--force`` recomputes: every step for ``all`` (or an empty
    value), else the step named, numbered or whose directory is ``force``; ``len(steps)`` for none."""
    if force is None:
        return len(recipe.steps)
    if force in ("", "all"):
        return 0
    for step in recipe.steps:
        if force in (step.name, str(step.index), step.dirname):
            return step.index
    choices = list(dict.fromkeys(name for step in recipe.steps for name in (step.name, step.dirname)))
    raise SurgeryError(f"--force {force!r}: no such step" + did_you_mean(force, choices), where=recipe.source)


def _make_run_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise SurgeryError(f"{path}: exists and is not a directory (or lies under a file)") from None
    except OSError as exc:
        raise SurgeryError(f"{path}: cannot create the run directory: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise SurgeryError(f"{path}: the run directory is not writable")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def run_recipe(recipe: Recipe, manager: Manager, device: str | None = None, quiet: bool | None = None,
               force: str | None = None) -> dict[str, Any]:
    return Run(recipe, manager, device, quiet, force).execute()
