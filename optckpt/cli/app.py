"""The Typer app and its single exit point.

Every command raises :class:`~optckpt.errors.OptckptError` for bad input; :class:`_Group`
turns it into one ``error: ...`` line on stderr and the error's exit code (the traceback too
when ``OPTCKPT_DEBUG=1``). Any other exception is a bug and propagates with its traceback.
Commands import torch lazily, so ``optckpt --help`` stays instant.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from optckpt import __version__
from optckpt.cli import (
    convert_cmd,
    diff_cmd,
    inspect_cmd,
    move_cmd,
    regenerate_cmd,
    remap_cmd,
    resume_cmd,
)
from optckpt.errors import OptckptError


class _Group(TyperGroup):
    """The app's group: reports :class:`OptckptError` as one line and its exit code."""

    def invoke(self, ctx: Any) -> Any:  # click.Context, vendored by typer
        try:
            return super().invoke(ctx)
        except OptckptError as e:
            if os.environ.get("OPTCKPT_DEBUG") == "1":
                traceback.print_exc(file=sys.stderr)
            message = " ".join(str(e).split())  # one line, whatever the message holds
            sys.stderr.write(f"error: {message}\n")
            raise typer.Exit(int(e.exit_code)) from None


app = typer.Typer(
    cls=_Group,
    name="optckpt",
    help="Inspect, diff, remap, move, convert, regenerate and resume-step PyTorch optimizer checkpoints.",
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"optckpt {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
) -> None:
    """Inspect, diff, remap, move, convert, regenerate and resume-step PyTorch optimizer checkpoints."""


app.command("inspect")(inspect_cmd.inspect)
app.command("diff")(diff_cmd.diff)
app.command("move")(move_cmd.move)
app.command("convert")(convert_cmd.convert)
app.command("remap")(remap_cmd.remap)
app.command("regenerate")(regenerate_cmd.regenerate)
app.command("resume-step")(resume_cmd.resume_step)


def main() -> None:
    """Run the command line (the ``optckpt`` console script and ``python -m optckpt``)."""
    app()
