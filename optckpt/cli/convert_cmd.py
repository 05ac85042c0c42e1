"""``optckpt convert``: check the flags, call :func:`optckpt.convert.convert_checkpoint`, report."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from optckpt.cli.options import AllowGlobal, Force
from optckpt.cli.render import byte_progress, human_bytes, safe


def convert(
    path: Annotated[
        Path,
        typer.Argument(help="Checkpoint file, or DCP folder.", metavar="PATH", show_default=False),
    ],
    out: Annotated[
        str,  # not a Path, which would drop the "/" that asks for a DCP folder
        typer.Option(
            "-o",
            "--output",
            help="Output file, or DCP folder (ending in /); never an input.",
            show_default=False,
        ),
    ],
    to: Annotated[
        str | None,
        typer.Option(
            "--to",
            help="pt, safetensors or dcp (default: from -o: its extension, or a folder).",
        ),
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
    """Convert a checkpoint between .pt, .safetensors and DCP folders, keeping everything in it."""
    from optckpt.convert import convert_checkpoint

    size = path.stat().st_size if path.is_file() else _folder_size(path)
    with byte_progress("converting", size) as progress:
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
    written = result.out.stat().st_size if result.out.is_file() else _folder_size(result.out)
    line = (
        f"wrote {result.out} ({result.target_format}, {human_bytes(written)}) "
        f"from {result.source} ({result.source_format}){rewritten}"
        + (
            f"; keyed {', '.join(repr(k) for k in result.rekeyed)} by {result.keying}"
            if result.rekeyed
            else ""
        )
    )
    sys.stdout.write(safe(line, markup=False) + "\n")


def _folder_size(folder: Path) -> int:
    """Bytes of the files in a folder (a DCP checkpoint); 0 for anything else."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) if folder.is_dir() else 0
