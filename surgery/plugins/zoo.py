"""The built-in model zoo as a plugin: ``builtin:`` models, the ``synthetic`` data source, the
``tasks`` evaluate plugin and the ``surgery zoo`` commands.

- models: every zoo entry (``tiny-llama/base``, ``tiny-llama/task-a`` ...) as ``builtin:NAME``,
  trained on first use and cached (see :mod:`surgery.models.zoo`).
- data sources ``synthetic`` (option ``tasks``: a task, a mix name or a list), and the shortcuts
  ``synthetic-mix`` (the text tasks) and ``synthetic-image-mix`` (the image tasks, examples carry
  ``pixel_values`` [3, 16, 16]). Options ``n`` (default: the spec's ``max_samples``, else 256) and
  ``split`` (``test``, the held-out side, by default).
- evaluate ``tasks``: exact-match answer accuracy per task for each model of the step.
"""
from __future__ import annotations

import itertools
import json
from typing import Any

import click
from pydantic import Field, field_validator

from surgery import hookimpl
from surgery.core.artifacts import Artifact
from surgery.core.errors import DataError, PluginError
from surgery.core.options import Options

DEFAULT_EXAMPLES = 256


def _known_tasks(value: Any) -> Any:
    """Reject unknown task names while the recipe is validated, before any model is loaded."""
    from surgery.models.zoo.tasks import resolve_tasks

    if value is not None:
        try:
            resolve_tasks(value)
        except DataError as exc:
            raise ValueError(str(exc)) from None
    return value


class SyntheticOptions(Options):
    tasks: str | list[str] = Field("synthetic-mix", description="a task (copy, reverse, sort, inc, add, colour, "
                                   "shape), a mix (synthetic-mix, synthetic-image-mix) or a list of them")
    n: int | None = Field(None, ge=1, description="examples to draw (default: max_samples, else 256)")
    split: str = Field("test", pattern="^(train|test)$", description="held-out 'test' side or the 'train' side")

    _check_tasks = field_validator("tasks")(_known_tasks)


def _mix_options(mix: str) -> type[Options]:
    class MixOptions(SyntheticOptions):
        tasks: str | list[str] = Field(mix, description="a task, a mix or a list of them")

    MixOptions.__name__ = f"{mix.title().replace('-', '')}Options"
    return MixOptions


class TasksOptions(Options):
    tasks: list[str] | None = Field(None, description="tasks to score (default: the text tasks; plus the image "
                                    "tasks for models that take images)")
    n: int = Field(256, ge=1, description="held-out examples per task")
    seed: int = Field(1, description="seed of the held-out examples")
    batch_size: int = Field(128, ge=1, description="examples per forward pass")

    _check_tasks = field_validator("tasks")(_known_tasks)


# --- registrations -------------------------------------------------------------------------------

@hookimpl
def register_models(register):
    from surgery.models.zoo.catalog import ENTRIES

    for name in ENTRIES:
        register(name, _builder(name))


@hookimpl
def register_data_sources(register):
    register("synthetic", load_synthetic, SyntheticOptions)
    for mix in ("synthetic-mix", "synthetic-image-mix"):
        register(mix, load_synthetic, _mix_options(mix))


@hookimpl
def register_commands(cli):
    cli.add_command(zoo_group)


def _builder(name: str):
    def build(cache_dir):
        from surgery.models import zoo

        return zoo.build(name, cache_dir)

    from surgery.models.zoo.catalog import MODEL_CLASSES, get_entry

    build.__doc__ = f"Train (first use) or load zoo entry {name!r}; returns its directory."
    build.architecture = MODEL_CLASSES[get_entry(name).arch]  # read by validation, which loads nothing
    return build


def load_synthetic(spec, seed: int) -> list[dict]:
    """Examples ``{task, prompt, answer, text[, pixel_values]}`` drawn with the data seed."""
    from surgery.models.zoo.tasks import make_examples

    if spec.path is not None:
        raise DataError(f"source {spec.source!r} takes no 'path'")
    options = spec.options
    n = options.get("n") or spec.max_samples or DEFAULT_EXAMPLES
    return make_examples(options.get("tasks", "synthetic-mix"), n, seed=seed, split=options.get("split", "test"))


# --- evaluate: tasks -------------------------------------------------------------------------------

class Tasks:
    """Exact-match accuracy of each model on the zoo's synthetic tasks (held-out examples)."""

    @hookimpl
    def option_schema(self, stage):
        return TasksOptions if stage == "evaluate" else None

    @hookimpl
    def evaluate(self, ctx):
        options = ctx.options
        figures, meta = {}, {"tasks": {}, "n": options.n, "seed": options.seed}
        for name in ctx.models:
            loaded = ctx.model(name)
            loaded.view  # no adapter: one line here instead of an error from inside the forward pass
            scores = score_model(loaded.module, loaded.tokenizer, options.tasks, options.n, options.seed,
                                 options.batch_size, model_name=name)
            meta["tasks"][name] = scores
            figures.update({f"{name}/{task}": value for task, value in scores.items()})
            ctx.log(f"{name}: " + ", ".join(f"{task} {value:.3f}" for task, value in scores.items()))
        return Artifact(meta=meta, figures=figures)


def score_model(module, tokenizer, tasks: list[str] | None, n: int, seed: int, batch_size: int,
                model_name: str = "model") -> dict[str, float]:
    """Accuracy per task; ``tasks=None`` scores the text tasks, plus the image tasks for a LLaVA."""
    from surgery.models.zoo.tasks import IMAGE_TASKS, TEXT_TASKS, accuracy, resolve_tasks
    from surgery.models.zoo.tokenizer import TASK_TOKENS

    takes_images = module.config.model_type == "llava"
    chosen = resolve_tasks(tasks) if tasks else TEXT_TASKS + (IMAGE_TASKS if takes_images else ())
    if tokenizer is None or tokenizer.convert_tokens_to_ids(TASK_TOKENS[0]) == tokenizer.unk_token_id:
        raise PluginError(f"evaluate tasks: model {model_name!r} does not use the zoo's tokenizer")
    if not takes_images and any(task in IMAGE_TASKS for task in chosen):
        raise PluginError(f"evaluate tasks: model {model_name!r} takes no images (tasks {', '.join(IMAGE_TASKS)})")
    return {task: accuracy(module, tokenizer, task, n=n, seed=seed, batch_size=batch_size) for task in dict.fromkeys(chosen)}


tasks = Tasks()


# --- commands ------------------------------------------------------------------------------------

@click.group("zoo")
def zoo_group() -> None:
    """The built-in tiny models: list them, build them."""


@zoo_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def zoo_list(as_json: bool) -> None:
    """List zoo entries: parameters, held-out accuracy per task, built or not."""
    from surgery.models import zoo

    rows = [zoo.info(name) for name in zoo.entries()]
    if as_json:
        click.echo(json.dumps(rows, indent=2, sort_keys=True))
        return
    for row in rows:
        accuracy = ", ".join(f"{task} {value:.3f}" for task, value in row.get("accuracy", {}).items())
        params = f"{row['params']:,}" if "params" in row else "-"
        state = "built" if row["built"] else "not built"
        click.echo(f"{row['name']:<22} {params:>9}  {state:<9}  {accuracy or row['description']}")


@zoo_group.command("build")
@click.argument("names", nargs=-1)
@click.option("--jobs", "-j", default=None, type=click.IntRange(min=1),
              help="Entries trained at once, one process and one thread each (default: 2 if there are 2 cores).")
def zoo_build(names: tuple[str, ...], jobs: int | None) -> None:
    """Train and cache zoo entries (all of them when no NAME is given)."""
    import os

    from surgery.models import zoo

    chosen = list(names) or list(zoo.entries())
    for name in chosen:
        zoo.get_entry(name)  # unknown names fail before any training
    missing = [name for name in chosen if not zoo.is_built(name)]
    jobs = jobs or min(2, os.cpu_count() or 1, max(1, len(missing)))
    built = [(name, zoo.entry_dir(name)) for name in chosen if name not in missing]
    if jobs == 1:
        trained = ((name, zoo.build(name, progress=True)) for name in missing)
    else:  # worker processes only for what needs training: starting one costs seconds
        trained = zoo.build_many(missing, jobs=jobs)
    for name, path in itertools.chain(built, trained):
        record = zoo.info(name)
        accuracy = ", ".join(f"{task} {value:.3f}" for task, value in record["accuracy"].items())
        click.echo(f"{name}: {path} ({record['train_seconds']:.1f} s to train; {accuracy})")
