"""``optckpt move``: check the flags, call :func:`optckpt.move.move_checkpoint`, report."""

from __future__ import annotations

from typing import Annotated

import typer

from optckpt.cli.options import (
    AllowGlobal,
    AsJson,
    CheckpointPath,
    Force,
    Key,
    Link,
    OutputFormat,
    RewriteOutput,
)
from optckpt.cli.render import bytes_written, fields, human_bytes, print_result, writing


def move(
    path: CheckpointPath,
    out: RewriteOutput,
    device: Annotated[
        str | None,
        typer.Option(
            "--device",
            help="cpu, cuda, cuda:1, meta, ...; without it tensors stay where they were saved.",
            show_default=False,
        ),
    ] = None,
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
    fmt: OutputFormat = None,
    key: Key = None,
    as_json: AsJson = False,
    force: Force = False,
    link: Link = False,
    allow_global: AllowGlobal = None,
) -> None:
    """Move optimizer state to another device and dtype, following torch's casting policy."""
    from optckpt.move import move_checkpoint

    with writing(
        "moving", as_json=as_json, force=force, link=link, allow_global=allow_global
    ) as common:
        result = move_checkpoint(
            path,
            out,
            device=device,
            dtype=dtype,
            key=key,
            all_tensors=all_tensors,
            fmt=fmt,
            **common,
        )
    written = bytes_written(result.out)
    notes = list(result.notes)
    if result.kept_on:
        notes.append(
            f"the rest of the file stays saved on {', '.join(result.kept_on)} "
            "(torch.load needs map_location where that device is missing); "
            "--all-tensors moves it too"
        )
    data = {
        "out": result.out,
        "bytes": written,
        **fields(result, "device", "dtype", "optimizers", "all_tensors", "kept_on"),
    }
    what = (
        "every tensor"
        if result.all_tensors
        else "optimizer state at " + ", ".join(repr(k) for k in result.optimizers)
    )
    if result.device is None:
        where = f"cast to {result.dtype}, on the devices it was saved from"
    else:
        where = f"on {result.device}" + (f", {result.dtype}" if result.dtype else "")
    line = f"wrote {result.out} ({human_bytes(written)}): {what} {where}"
    print_result(as_json, data, [line], notes)
