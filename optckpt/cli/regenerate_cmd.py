"""``optckpt regenerate``: check the flags, call :func:`optckpt.regenerate.regenerate_checkpoint`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from optckpt.cli.options import MAX_SEED, AllowGlobal, Force, GroupRules, Output
from optckpt.cli.render import fields, print_result, progress_when_writing


def regenerate(
    optimizer: Annotated[
        str,
        typer.Option("--optimizer", help="Bundled optimizer: adamw, sgd, ...", show_default=False),
    ],
    layout: Annotated[
        Path,
        typer.Option(
            "--layout",
            help="Layout JSON, or a model state dict file whose values start the run.",
            show_default=False,
        ),
    ],
    out: Output,
    steps: Annotated[int, typer.Option("--steps", min=0, help="Optimizer steps to take.")] = 1,
    seed: Annotated[
        int, typer.Option("--seed", min=0, max=MAX_SEED, help="Seeds parameters and gradients.")
    ] = 0,
    setting: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="[GROUP.]KEY=VALUE",
            help="Set a hyperparameter for every group, or for one (1.lr=1e-5); repeatable.",
        ),
    ] = None,
    group: GroupRules = None,
    bare: Annotated[
        bool, typer.Option("--bare", help="Write the optimizer state dict alone.")
    ] = False,
    names: Annotated[
        bool,
        typer.Option("--names/--no-names", help="Store param_names in the groups."),
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    force: Force = False,
    allow_global: AllowGlobal = None,
) -> None:
    """Write a checkpoint made by N seeded steps of a bundled optimizer on a layout."""
    from optckpt.regenerate import regenerate_checkpoint

    with progress_when_writing("writing", quiet=as_json) as progress:
        result = regenerate_checkpoint(
            optimizer,
            layout,
            out,
            steps=steps,
            seed=seed,
            settings=setting or (),
            group_rules=group or (),
            bare=bare,
            names=names,
            force=force,
            allow_globals=allow_global or (),
            progress=progress,
        )
    notes = []
    if result.dropped:
        notes.append(
            f"layout hyperparameters {result.optimizer} does not have were left out: "
            f"{', '.join(result.dropped)}"
        )
    keys = ("out", "optimizer", "steps", "seed", "params_from", "num_params", "groups")
    data = fields(result, *keys, "dropped", "bare")
    what = "optimizer state dict" if result.bare else "model and optimizer"
    line = (
        f"wrote {result.out}: {what}, {result.optimizer}, {result.num_params} parameters in "
        f"{len(result.groups)} group(s), {result.steps} step(s), seed {result.seed}, "
        f"parameters {result.params_from}"
    )
    print_result(as_json, data, [line], notes)
