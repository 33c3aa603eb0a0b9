"""The ``surgery`` command line."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import typing
from importlib import resources
from pathlib import Path

import click

from surgery.core.errors import SurgeryError, located, one_line
from surgery.core.places import DOWNLOAD_ENV, allow_downloads, check_device, downloads_allowed, resolved_note
from surgery.runtime.manager import Manager
from surgery.runtime.recipe import load_recipe


def _manager(plugin_refs: tuple[str, ...] = ()) -> Manager:
    """The command's manager (built once in :func:`main`), with the ``--plugin`` files added."""
    manager = click.get_current_context().find_object(Manager)
    if manager is None:  # the group was invoked directly, not through main()
        manager = click.get_current_context().find_root().obj = Manager()
    for ref in plugin_refs:
        try:
            manager.add(ref, Path.cwd())
        except SurgeryError as exc:
            raise located(exc, "--plugin") from None
    return manager


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def cli(debug: bool) -> None:
    """Surgery on transformer models: capture, score, align, fuse, attribute, prune, heal."""


def _allow_download(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        allow_downloads()
    return value


ALLOW_DOWNLOAD = click.option(
    "--allow-download", is_flag=True, expose_value=False, is_eager=True, callback=_allow_download,
    help=f"Let hub ids (org/name) be downloaded; off by default (or set {DOWNLOAD_ENV}=1).")


def _common_run_options(fn):
    fn = click.option("--plugin", "plugin_refs", multiple=True, metavar="MODULE_OR_FILE",
                      help="Load an extra plugin (imports and runs its Python code).")(fn)
    fn = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key, e.g. steps.2.plugin=ties.")(fn)
    fn = ALLOW_DOWNLOAD(fn)
    return fn


def _checked_device(device: str | None) -> str | None:
    if device is None:
        return None
    try:
        return check_device(device)
    except SurgeryError as exc:
        raise SurgeryError(str(exc), where="--device") from None


def _check_nproc(nproc: int, device: str) -> None:
    """No more processes than CUDA devices (for a CUDA run) or CPU cores: each one loads the models."""
    if device.startswith("cuda"):
        import torch

        limit, what = torch.cuda.device_count(), "CUDA devices"
    else:
        limit, what = os.cpu_count() or 1, "CPU cores"
    if nproc > limit:
        raise SurgeryError(f"{nproc} processes, more than the {limit} {what} here", where="--nproc")


def _output_line(path: Path) -> str:
    return f"{path}{resolved_note(path)}"


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@_common_run_options
@click.option("--output", default=None, help="Run directory (overrides the recipe's output).")
@click.option("--device", default=None, help="torch device, e.g. cpu or cuda:0.")
@click.option("--nproc", default=1, type=click.IntRange(min=1), help="Data-parallel processes (torchrun).")
@click.option("--force", default=None, is_flag=False, flag_value="all", metavar="[STEP]",
              help="Compute again instead of reusing: every step, or STEP (name or index) and the steps after it.")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def run(recipe: str, overrides: tuple[str, ...], plugin_refs: tuple[str, ...], output: str | None, device: str | None,
        nproc: int, force: str | None, debug: bool) -> None:
    """Validate RECIPE, then run its steps (finished steps are reused)."""
    from surgery.core import distributed
    from surgery.runtime.runner import first_forced, run_recipe

    device = _checked_device(device)
    manager = _manager(plugin_refs)
    parsed = load_recipe(recipe, manager, overrides, output)
    first_forced(parsed, force)  # an unknown step name fails here, before anything runs
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        _check_nproc(nproc, device or parsed.device)
        sys.exit(_relaunch_with_torchrun(nproc))
    report = run_recipe(parsed, manager, device, force=force)
    if distributed.rank() != 0:
        return
    for step in report["steps"]:
        figures = ", ".join(f"{k}={_short(v)}" for k, v in step["figures"].items())
        click.echo(f"[{step['index']}] {step['stage']:<9} {step['plugin']:<16} {step['status']:<6} {step['seconds']:>7.2f}s  {figures}")
    click.echo(f"run directory: {_output_line(parsed.output)}")


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@_common_run_options
def validate(recipe: str, overrides: tuple[str, ...], plugin_refs: tuple[str, ...]) -> None:
    """Check RECIPE without loading any model or data (plugin files it names are imported: they run)."""
    manager = _manager(plugin_refs)
    parsed = load_recipe(recipe, manager, overrides)
    for path in [manager.source_file(manager.add(ref, Path.cwd())) or ref for ref in plugin_refs] + parsed.plugin_files:
        click.echo(f"imported plugin code: {path}")
    click.echo(f"{recipe}: ok ({len(parsed.steps)} steps, output {_output_line(parsed.output)})")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--plugin", "plugin_refs", multiple=True, metavar="MODULE_OR_FILE", help="Load an extra plugin.")
def plugins(as_json: bool, plugin_refs: tuple[str, ...]) -> None:
    """List installed plugins, the stages they implement and what they do."""
    manager = _manager(plugin_refs)
    rows = [{"name": n, "stages": manager.stages_of(n), "summary": manager.summary(n)} for n in manager.names()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        click.echo(f"{row['name']:<20} {','.join(row['stages']) or '(registers)':<28} {row['summary']}")


@cli.command()
@click.argument("plugin")
@click.option("--plugin", "plugin_refs", multiple=True, metavar="MODULE_OR_FILE", help="Load an extra plugin.")
def describe(plugin: str, plugin_refs: tuple[str, ...]) -> None:
    """Show PLUGIN's stages and options (types, defaults, descriptions)."""
    manager = _manager(plugin_refs)
    click.echo(f"{plugin}: {manager.summary(plugin)}")
    for stage in manager.stages_of(plugin):
        click.echo(f"\n  {stage}:")
        fields = manager.schema(plugin, stage).model_fields
        if not fields:
            click.echo("    (no options)")
        for name, field in fields.items():
            default = "required" if field.is_required() else f"default {field.get_default(call_default_factory=True)!r}"
            click.echo(f"    {name:<18} {_type_name(field.annotation):<22} {default:<22} {field.description or ''}")


@cli.command(name="eval")
@click.argument("models", nargs=-1, required=True)
@click.option("--tasks", default=None, help="Comma-separated tasks for the `tasks` evaluator (default: its own).")
@click.option("--n", "count", default=256, type=click.IntRange(min=1), help="Held-out examples per task.")
@click.option("--evaluator", default="tasks", help="The evaluate plugin to use.")
@click.option("--device", default=None, help="torch device, e.g. cpu or cuda:0.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@ALLOW_DOWNLOAD
def eval_command(models: tuple[str, ...], tasks: str | None, count: int, evaluator: str, device: str | None, as_json: bool) -> None:
    """Score MODELS (builtin:NAME, directories or hub ids) side by side in one table."""
    import tempfile

    from surgery.runtime.recipe import validate
    from surgery.runtime.runner import run_recipe

    device = _checked_device(device)
    manager = _manager()
    options: dict = {"plugin": evaluator}
    if evaluator in ("tasks", "suite"):
        options["n"] = count
        if tasks:
            options["tasks"] = [t.strip() for t in tasks.split(",") if t.strip()]
    names = {Path(m).name if not m.startswith("builtin:") else m[len("builtin:"):]: m for m in models}
    with tempfile.TemporaryDirectory(prefix="surgery-eval-") as tmp:
        raw = {"name": "eval", "models": names, "steps": [{"evaluate": options}], "output": tmp}
        report = run_recipe(validate(raw, manager, base_dir=Path.cwd(), source="eval"), manager, device, quiet=True)
    figures = report["steps"][0]["figures"]
    if as_json:
        click.echo(json.dumps(figures, indent=2, sort_keys=True))
        return
    columns = sorted({key[len(n) + 1:] for key in figures for n in names if key.startswith(n + "/")})
    width = max(len(n) for n in names) + 2
    click.echo(f"{'model':<{width}}" + "".join(f"{c:>14}" for c in columns))
    for name in names:
        row = [figures.get(f"{name}/{c}") for c in columns]
        click.echo(f"{name:<{width}}" + "".join(f"{_short(v):>14}" if v is not None else f"{'-':>14}" for v in row))


@cli.command()
@click.argument("template", default="merge")
@click.option("--output", "-o", default=None, help="File to write (default: TEMPLATE.yaml).")
def init(template: str, output: str | None) -> None:
    """Write a starter recipe (templates: see `surgery init --list`)."""
    names = sorted(p.name[:-5] for p in resources.files("surgery.templates").iterdir() if p.name.endswith(".yaml"))
    if template not in names:
        from surgery.core.registry import did_you_mean

        raise SurgeryError(f"unknown template {template!r}" + did_you_mean(template, names))
    target = Path(output or f"{template}.yaml")
    if target.exists():
        raise SurgeryError(f"{target} exists; choose another name with --output")
    from surgery.core.io import write_text

    text = resources.files("surgery.templates").joinpath(f"{template}.yaml").read_text()
    try:
        write_text(target, text)
    except OSError as exc:
        raise SurgeryError(f"{target}: cannot write: {exc.strerror or exc}") from None
    click.echo(f"wrote {target}; run it with: surgery run {target}")


def _relaunch_with_torchrun(nproc: int) -> int:
    """Run this same command under torchrun with ``nproc`` processes; return its exit code."""
    args = [a for a in sys.argv[1:] if not a.startswith("--nproc")]
    if "--nproc" in sys.argv:
        position = sys.argv.index("--nproc")
        args = [a for i, a in enumerate(sys.argv[1:], 1) if i not in (position, position + 1)]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "surgery.cli", *args]
    return subprocess.call(command)


def _type_name(annotation: object) -> str:
    """'float', 'int | None', 'heads|neurons' for a Literal: short and readable."""
    if typing.get_origin(annotation) is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(annotation))
    if isinstance(annotation, type):
        return annotation.__name__
    text = str(annotation).replace("typing.", "")
    # a per-layer/per-tensor merge setting (surgery.engines.merge_params.Setting): its description says the forms
    text = re.sub(r"Annotated\[(.*?), BeforeValidator\(.*?\)\]", r"\1", text)
    return re.sub(r"Union\[float, list\[float\], list\[[\w.]*Conditional\]\]", "setting", text)


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _quiet_transformers() -> None:
    """Our own progress bars say what is happening; transformers' per-load bars are noise."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _load_manager() -> Manager | None:
    """The one manager of this command, with the plugins' commands added to the group."""
    try:
        manager = Manager()
    except SurgeryError:
        return None  # reported again, with a message, when a command needs the manager
    manager.pm.hook.register_commands(cli=cli)
    return manager


def _usage_line(exc: click.ClickException) -> str:
    """Click's usage error on one line, naming the command and where to read its help."""
    message = one_line(exc.format_message())
    ctx = getattr(exc, "ctx", None)
    command = ctx.command_path if ctx is not None else "surgery"
    return f"{command}: {message} (see '{command} --help')"


def main() -> None:
    """Entry point: one-line errors and exit code 2 for bad input; tracebacks only with --debug."""
    debug = "--debug" in sys.argv
    if not downloads_allowed() and "--allow-download" not in sys.argv:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing leaves the machine unless asked
    _quiet_transformers()
    try:
        code = cli.main(standalone_mode=False, obj=_load_manager(), prog_name="surgery")
        if isinstance(code, int) and code:
            sys.exit(code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        if debug:
            raise
        click.echo(f"error: {_usage_line(exc)}", err=True)
        sys.exit(2)
    except SurgeryError as exc:
        if debug:
            raise
        click.echo(f"error: {one_line(str(exc))}", err=True)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
