"""The SmolLM2 task suite as a plugin: fine-tunes as ``builtin:`` models, a data source, an evaluator
and the ``surgery suite`` commands (see :mod:`surgery.models.suite`).

- models ``builtin:smollm2-135m/<task>`` (fine-tuning seed 0) and ``builtin:smollm2-135m/<task>@s<N>``
  (seeds 1..4), tasks ``add``, ``spell``, ``shift``, ``reverse``: full float32 fine-tunes of
  ``builtin:smollm2-135m``, trained on first use (a progress bar on a terminal) and cached.
- data source ``suite``: options ``tasks`` (a task, ``all`` or a list), ``split`` (``train``,
  ``validation``, ``test``; default ``test``) and ``n`` (default: the spec's ``max_samples``, else 64
  per task); the data seed is the spec's or the recipe's.
- evaluate ``suite``: per model and task, exact-match accuracy (``<model>/<task>``) and answer NLL
  (``<model>/nll/<task>``) on ``n`` examples per task of ``split``, and the mean accuracy
  (``<model>/accuracy``). With ``from_data: true`` it scores the step's data entry instead (any
  prompt/answer examples, any tokenizer; grouped by their ``task`` field).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from pydantic import Field, field_validator

from surgery import hookimpl
from surgery.core.artifacts import Artifact
from surgery.core.errors import DataError
from surgery.core.options import Options

DEFAULT_EXAMPLES = 64
PARENT = "smollm2-135m"


def _known_tasks(value: Any) -> Any:
    from surgery.models.suite.tasks import resolve_tasks

    if value is not None:
        try:
            resolve_tasks(value)
        except DataError as exc:
            raise ValueError(str(exc)) from None
    return value


class SuiteDataOptions(Options):
    tasks: str | list[str] = Field("all", description="a suite task (add, spell, shift, reverse), 'all' or a list")
    split: str = Field("test", pattern="^(train|validation|test)$", description="train, validation or test")
    n: int | None = Field(None, ge=1, description=f"examples per task (default: max_samples, else {DEFAULT_EXAMPLES})")

    _check_tasks = field_validator("tasks")(_known_tasks)


class SuiteEvalOptions(Options):
    tasks: list[str] | None = Field(None, description="tasks to score (default: all); ignored with from_data")
    n: int = Field(DEFAULT_EXAMPLES, ge=1, description="examples per task")
    split: str = Field("test", pattern="^(train|validation|test)$", description="train, validation or test")
    seed: int = Field(1, description="seed of the examples")
    batch_size: int = Field(32, ge=1, description="examples per forward pass")
    from_data: bool = Field(False, description="score the step's data entry (prompt/answer examples, grouped by "
                            "their 'task' field) instead of generated suite examples")

    _check_tasks = field_validator("tasks")(_known_tasks)


# --- registrations -------------------------------------------------------------------------------

@hookimpl
def register_models(register):
    from surgery.models.suite import build

    # `register` is the models registry's own method: its registry also holds the parent, which the
    # real-models plugin registers, so a fine-tune finds its parent by name without importing it
    models = getattr(register, "__self__", None)
    for name in build.names():
        register(name, _builder(name, models))


@hookimpl
def register_data_sources(register):
    register("suite", load_suite, SuiteDataOptions)


@hookimpl
def register_commands(cli):
    cli.add_command(suite_group)


def _builder(name: str, models: Any):
    def build(cache_dir):
        from surgery.models.suite import build as suite_build

        task, seed = suite_build.parse_name(name)
        return suite_build.build(task, seed, parent_dir(models, cache_dir), cache_dir)

    build.__doc__ = f"Fine-tune (first use) or load suite model {name!r}; returns its directory."
    return build


def parent_dir(models: Any, cache_dir: Path | None = None) -> Path:
    """The converted SmolLM2 directory (``builtin:smollm2-135m``), built on first use."""
    from surgery.core.errors import ModelError

    if models is None or PARENT not in models:
        raise ModelError(f"suite models need builtin:{PARENT} (the real-models plugin): pip install 'model-surgery[real]'")
    return Path(models.get(PARENT)(cache_dir))


def load_suite(spec, seed: int) -> list[dict]:
    """Examples ``{task, prompt, answer, text}`` of the suite, ``n`` per task, tasks interleaved."""
    from surgery.models.suite.tasks import make_examples, resolve_tasks

    if spec.path is not None:
        raise DataError(f"source {spec.source!r} takes no 'path'")
    options = spec.options
    tasks = resolve_tasks(options.get("tasks", "all"))
    n = options.get("n") or spec.max_samples or DEFAULT_EXAMPLES
    return make_examples(list(tasks), n * len(tasks), seed=seed, split=options.get("split", "test"))


# --- evaluate ------------------------------------------------------------------------------------

class SuiteEval:
    """Exact-match accuracy and answer NLL per task of each model of the step."""

    @hookimpl
    def option_schema(self, stage):
        return SuiteEvalOptions if stage == "evaluate" else None

    @hookimpl
    def evaluate(self, ctx):
        from surgery.models.suite.tasks import make_examples, resolve_tasks
        from surgery.models.suite.train import score_examples
        from surgery.models.zoo.train import one_thread

        options = ctx.options
        if options.from_data:
            examples = ctx.examples()
        else:
            tasks = resolve_tasks(options.tasks or "all")
            examples = make_examples(list(tasks), options.n * len(tasks), seed=options.seed, split=options.split)
        figures: dict[str, float] = {}
        meta: dict[str, Any] = {"scores": {}, "n": options.n, "seed": options.seed, "split": options.split,
                                "data": ctx.step.data if options.from_data else None}
        for name in ctx.models:
            loaded = ctx.model(name)
            with one_thread():
                scores = score_examples(loaded.module, loaded.tokenizer, examples, options.batch_size)
            meta["scores"][name] = scores
            for task, score in scores.items():
                figures[f"{name}/{task}"] = score["accuracy"]
                figures[f"{name}/nll/{task}"] = score["nll"]
            figures[f"{name}/accuracy"] = sum(s["accuracy"] for s in scores.values()) / len(scores)
            ctx.log(f"{name}: " + ", ".join(f"{task} {s['accuracy']:.3f}" for task, s in scores.items()))
        return Artifact(meta=meta, figures=figures)


suite_eval = SuiteEval()


# --- commands ------------------------------------------------------------------------------------

@click.group("suite")
def suite_group() -> None:
    """The SmolLM2 task suite: fine-tunes of builtin:smollm2-135m on four tasks."""


@suite_group.command("build")
@click.option("--seeds", default="0", help="Comma-separated fine-tuning seeds (0..4), e.g. 0,1,2.")
@click.option("--tasks", default="all", help="Comma-separated tasks (default: all).")
def suite_build(seeds: str, tasks: str) -> None:
    """Fine-tune and cache the suite's models (skips those already built)."""
    import time

    from surgery.models.suite import build as suite_build_module
    from surgery.models.suite.tasks import resolve_tasks

    chosen = resolve_tasks([t.strip() for t in tasks.split(",") if t.strip()])
    seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    bad = [s for s in seed_list if s not in suite_build_module.SEEDS]
    if bad:
        raise click.BadParameter(f"seeds must be in 0..{max(suite_build_module.SEEDS)}, got {bad[0]}", param_hint="--seeds")
    from surgery.models.loading import cache_dir
    from surgery.runtime.manager import Manager

    parent = parent_dir(Manager().registries.models, cache_dir())
    started = time.perf_counter()
    for seed in seed_list:
        for task in chosen:
            path = suite_build_module.build(task, seed, parent, progress=True)
            record = suite_build_module.info(path)
            click.echo(f"{record['name']}: {path} ({record['train_seconds']:.0f} s to train; "
                       f"validation accuracy {record['validation']['accuracy']:.3f})")
    click.echo(f"suite ready in {time.perf_counter() - started:.0f} s")
