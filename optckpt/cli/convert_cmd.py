"""``optckpt convert``: check the flags, call :func:`optckpt.convert.convert_checkpoint`, report."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from optckpt.cli.options import AllowGlobal, Force, Output
from optckpt.cli.render import byte_progress, human_bytes, safe


def convert(
    path: Annotated[
        Path, typer.Argument(help="Checkpoint file.", metavar="PATH", show_default=False)
    ],
    out: Output,
    to: Annotated[
        str | None,
        typer.Option("--to", help="pt or safetensors (default: from the extension of -o)."),
    ] = None,
    optimizer: Annotated[
        str | None,
        typer.Option(
            "--optimizer", help="Rewrite the groups for this optimizer class (adam <-> adamw)."
        ),
    ] = None,
    key: Annotated[
        str | None,
        typer.Option(
            "--key",
            help="Key path of the state dict --optimizer or --keying rewrites (default: all).",
        ),
    ] = None,
    keying: Annotated[
        str | None,
        typer.Option(
            "--keying",
            metavar="ids|names",
            help="Key the optimizer state by IDs with param_names (Optimizer.load_state_dict) "
            "or by parameter FQNs (set_optimizer_state_dict).",
        ),
    ] = None,
    force: Force = False,
    allow_global: AllowGlobal = None,
) -> None:
    """Convert a checkpoint between .pt and .safetensors, keeping everything in it."""
    from optckpt.convert import convert_checkpoint

    with byte_progress("converting", path.stat().st_size if path.is_file() else 0) as progress:
        result = convert_checkpoint(
            path,
            out,
            to=to,
            optimizer=optimizer,
            key=key,
            force=force,
            allow_globals=allow_global or (),
            progress=progress,
            keying=keying,
        )
    rewritten = (
        f"; rewrote {', '.join(repr(k) for k in result.rewritten)} for {optimizer}"
        if result.rewritten
        else ""
    )
    line = (
        f"wrote {result.out} ({result.target_format}, {human_bytes(result.out.stat().st_size)}) "
        f"from {result.source} ({result.source_format}){rewritten}"
        + (
            f"; keyed {', '.join(repr(k) for k in result.rekeyed)} by {keying}"
            if result.rekeyed
            else ""
        )
    )
    sys.stdout.write(safe(line, markup=False) + "\n")
