"""Options several commands share, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from optckpt.seeds import MAX_SEED

__all__ = [
    "MAX_SEED",
    "AllowGlobal",
    "AsJson",
    "CheckpointPath",
    "Force",
    "FromLayout",
    "GroupRules",
    "Key",
    "Link",
    "OptionalRewriteOutput",
    "Output",
    "OutputFormat",
    "RewriteOutput",
]

CheckpointPath = Annotated[
    Path,
    typer.Argument(
        help="Checkpoint file, training folder or DCP folder.", metavar="PATH", show_default=False
    ),
]
_REWRITE_OUTPUT = typer.Option(
    "-o",
    "--output",
    help="Output file, DCP folder (ending in /), or a folder for a training folder; "
    "never an input.",
    show_default=False,
)
# str, not Path: Path would drop the "/" that asks for a DCP folder.
RewriteOutput = Annotated[str, _REWRITE_OUTPUT]
OptionalRewriteOutput = Annotated[str | None, _REWRITE_OUTPUT]
"""``-o`` of a command that rewrites a checkpoint (optional: remap, which has --dry-run)."""

Output = Annotated[
    Path,
    typer.Option(
        "-o",
        "--output",
        help="Output file: new, or a regular file with --force; never an input.",
        show_default=False,
    ),
]
OutputFormat = Annotated[
    str | None,
    typer.Option(
        "--format",
        metavar="pt|safetensors|dcp",
        help="Output format (default: from -o: its extension, or a folder).",
    ),
]
FromLayout = Annotated[
    Path | None,
    typer.Option(
        "--from", help="Layout the checkpoint was saved with, if its groups carry no names."
    ),
]
Force = Annotated[bool, typer.Option("--force", help="Overwrite the output file if it exists.")]
Link = Annotated[
    bool,
    typer.Option(
        "--link",
        help="Training folder output: hard-link the files carried over instead of copying them "
        "(no space, no time; but saving into the output in place then changes the input too).",
    ),
]
AsJson = Annotated[
    bool,
    typer.Option("--json", help='Print one JSON object (notes in its "notes") instead of text.'),
]
AllowGlobal = Annotated[
    list[str] | None,
    typer.Option(
        "--allow-global", metavar="MODULE.NAME", help="Let this pickle global load (repeatable)."
    ),
]
Key = Annotated[
    str | None,
    typer.Option("--key", help="Key path of one optimizer state dict, e.g. optimizer_states.0."),
]
GroupRules = Annotated[
    list[str] | None,
    typer.Option(
        "--group",
        metavar="REGEX:KEY=VALUE,...",
        help="Split a model state dict layout into groups (repeatable; first match wins).",
    ),
]
