"""``optckpt move``: check the flags, call :func:`optckpt.move.move_checkpoint`, report."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from optckpt.cli.options import AllowGlobal, Force, Key, Output
from optckpt.cli.render import byte_progress, human_bytes, safe


def move(
    path: Annotated[
        Path, typer.Argument(help="Checkpoint file.", metavar="PATH", show_default=False)
    ],
    device: Annotated[
        str, typer.Option("--device", help="cpu, cuda, cuda:1, meta, ...", show_default=False)
    ],
    out: Output,
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype", help="float32, bfloat16, float16 or float64 for floating state (never step)."
        ),
    ] = None,
    all_tensors: Annotated[
        bool,
        typer.Option(
            "--all-tensors",
            help="Move every tensor in the file (model weights too), not only optimizer state.",
        ),
    ] = False,
    key: Key = None,
    force: Force = False,
    allow_global: AllowGlobal = None,
) -> None:
    """Move optimizer state to another device and dtype, following torch's casting policy."""
    from optckpt.move import move_checkpoint

    with byte_progress("moving", path.stat().st_size if path.is_file() else 0) as progress:
        result = move_checkpoint(
            path,
            out,
            device=device,
            dtype=dtype,
            key=key,
            all_tensors=all_tensors,
            force=force,
            allow_globals=allow_global or (),
            progress=progress,
        )
    what = (
        "every tensor"
        if result.all_tensors
        else "optimizer state at " + ", ".join(repr(k) for k in result.optimizers)
    )
    dtype_text = f", {result.dtype}" if result.dtype else ""
    line = f"wrote {result.out} ({human_bytes(result.out.stat().st_size)}): {what} on {result.device}{dtype_text}"
    sys.stdout.write(safe(line, markup=False) + "\n")
    if result.kept_on:
        sys.stdout.write(
            f"note: the rest of the file stays saved on {safe(', '.join(result.kept_on), markup=False)} "
            "(torch.load needs map_location where that device is missing); "
            "--all-tensors moves it too\n"
        )
