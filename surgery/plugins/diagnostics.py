"""The ``surgery report`` and ``surgery compare`` commands over saved attribution runs.

The computation lives in :mod:`surgery.engines.diagnostics`; this plugin only adds the commands.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from surgery import hookimpl

if TYPE_CHECKING:
    import click


@hookimpl
def register_commands(cli: "click.Group") -> None:
    from surgery.engines.diagnostics import register_commands as add_report_and_compare

    add_report_and_compare(cli)
