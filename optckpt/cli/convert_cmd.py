"""``optckpt convert``: check the flags, call :func:`optckpt.convert.convert_checkpoint`, report."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from optckpt.cli.options import (
    AllowGlobal,
    AsJson,
    CheckpointPath,
    Force,
    Link,
    OutputFormat,
    RewriteOutput,
)
from optckpt.cli.render import (
    human_bytes,
    print_json,
    print_notes,
    progress_when_writing,
    safe,
)

# `--to` names a layout in every other command (remap's target); here it was the format.
_TO_DEPRECATED = "--to is deprecated in convert; use --format (--to names a layout in remap)"


def convert(
    path: CheckpointPath,
    out: RewriteOutput,
    fmt: OutputFormat = None,
    to: Annotated[
        str | None,
        typer.Option("--to", help="Deprecated: use --format.", hidden=True),
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
    sanitize: Annotated[
        bool,
        typer.Option(
            "--sanitize",
            help="Rewrite numpy values, argparse.Namespace and paths into plain types, so the "
            "output loads with torch.load(weights_only=True); lists each rewrite.",
        ),
    ] = False,
    as_json: AsJson = False,
    force: Force = False,
    link: Link = False,
    allow_global: AllowGlobal = None,
) -> None:
    """Convert a checkpoint between .pt, .safetensors and DCP folders, keeping everything in it."""
    from optckpt.convert import convert_checkpoint
    from optckpt.errors import UsageError

    notes = []
    if to is not None:
        if fmt is not None and fmt != to:
            raise UsageError(f"--format {fmt} and --to {to} disagree; give --format only")
        fmt = to
        notes.append(_TO_DEPRECATED)
    with progress_when_writing("converting", quiet=as_json) as progress:
        result = convert_checkpoint(
            path,
            out,
            fmt=fmt,
            optimizer=optimizer,
            key=key,
            force=force,
            link=link,
            allow_globals=allow_global or (),
            progress=progress,
            keying=keying,
            sanitize=sanitize,
        )
    notes += result.notes
    written = result.out.stat().st_size if result.out.is_file() else _folder_size(result.out)
    if as_json:
        data = {
            "source": result.source,
            "source_format": result.source_format,
            "out": result.out,
            "format": result.target_format,
            "bytes": written,
            "optimizer": optimizer,
            "rewritten": result.rewritten,
            "keying": result.keying,
            "rekeyed": result.rekeyed,
        }
        if result.sanitized is not None:
            data["sanitized"] = [s.to_json() for s in result.sanitized]
        print_json(data, notes)
        return
    rewritten = (
        f"; rewrote {', '.join(repr(k) for k in result.rewritten)} for {optimizer}"
        if result.rewritten
        else ""
    )
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
    for s in result.sanitized or ():
        sys.stdout.write(
            safe(f"sanitized {s.key or '<root>'}: {s.was} -> {s.now}", markup=False) + "\n"
        )
    if result.sanitized == []:
        sys.stdout.write("sanitized: nothing to rewrite\n")
    print_notes(notes)


def _folder_size(folder: Path) -> int:
    """Bytes of the files in a folder (a DCP checkpoint, a training folder), however deep;
    0 for anything else."""
    from optckpt.io.folders import files_under

    return sum(p.stat().st_size for p in files_under(folder)) if folder.is_dir() else 0
