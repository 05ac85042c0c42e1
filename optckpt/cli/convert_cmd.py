"""``optckpt convert``: check the flags, call :func:`optckpt.convert.convert_checkpoint`, report."""

from __future__ import annotations

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
from optckpt.cli.render import bytes_written, fields, human_bytes, print_result, writing

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
    with writing(
        "converting", as_json=as_json, force=force, link=link, allow_global=allow_global
    ) as common:
        result = convert_checkpoint(
            path,
            out,
            fmt=fmt,
            optimizer=optimizer,
            key=key,
            keying=keying,
            sanitize=sanitize,
            **common,
        )
    notes += result.notes
    written = bytes_written(result.out)
    data = {
        **fields(result, "source", "source_format", "out"),
        "format": result.target_format,
        "bytes": written,
        "optimizer": optimizer,
        **fields(result, "rewritten", "keying", "rekeyed"),
    }
    if result.sanitized is not None:
        data["sanitized"] = [s.to_json() for s in result.sanitized]
    rewritten = (
        f"; rewrote {', '.join(repr(k) for k in result.rewritten)} for {optimizer}"
        if result.rewritten
        else ""
    )
    rekeyed = (
        f"; keyed {', '.join(repr(k) for k in result.rekeyed)} by {result.keying}"
        if result.rekeyed
        else ""
    )
    lines = [
        f"wrote {result.out} ({result.target_format}, {human_bytes(written)}) "
        f"from {result.source} ({result.source_format}){rewritten}{rekeyed}"
    ]
    lines += [f"sanitized {s.key or '<root>'}: {s.was} -> {s.now}" for s in result.sanitized or ()]
    if result.sanitized == []:
        lines.append("sanitized: nothing to rewrite")
    print_result(as_json, data, lines, notes)
