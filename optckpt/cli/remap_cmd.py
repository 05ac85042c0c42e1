"""``optckpt remap``: check the flags, call :func:`optckpt.remapping.remap_checkpoint`, render the plan."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from optckpt.cli.options import (
    AllowGlobal,
    CheckpointPath,
    Force,
    FromLayout,
    GroupRules,
    Key,
    Link,
    OptionalRewriteOutput,
    OutputFormat,
)
from optckpt.cli.render import (
    console,
    print_json,
    print_notes,
    print_prefixes_stripped,
    safe,
    writing,
)

if TYPE_CHECKING:
    from optckpt.remapping import RemapPlan


def remap(
    path: CheckpointPath,
    to: Annotated[
        Path,
        typer.Option(
            "--to",
            help="Target layout: JSON, or a model state dict file (.pt/.safetensors).",
            show_default=False,
        ),
    ],
    out: OptionalRewriteOutput = None,
    fmt: OutputFormat = None,
    source: FromLayout = None,
    rename: Annotated[
        list[str] | None,
        typer.Option(
            "--rename",
            metavar="REGEX=REPL",
            help="Rename source parameters (repeatable, in order).",
        ),
    ] = None,
    group: GroupRules = None,
    reset_mismatched: Annotated[
        bool,
        typer.Option(
            "--reset-mismatched", help="Drop the state of parameters whose shape changed."
        ),
    ] = False,
    setting: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="[N.]KEY=VALUE",
            help="Set a hyperparameter in every target group, or in group N (1.lr=1e-5), over "
            "the checkpoint's and the layout's values; repeatable.",
        ),
    ] = None,
    hyperparams: Annotated[
        str | None,
        typer.Option(
            "--hyperparams",
            metavar="checkpoint|layout",
            help="Whose values win where the layout gives one: the checkpoint's trained values "
            "(default; --group rule values always win) or the layout's.",
            show_default=False,
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan; write nothing.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    drop_scheduler: Annotated[
        bool,
        typer.Option(
            "--drop-scheduler",
            help="Leave out an LR scheduler that cannot follow the new groups, instead of "
            "refusing.",
        ),
    ] = False,
    key: Key = None,
    force: Force = False,
    link: Link = False,
    allow_global: AllowGlobal = None,
) -> None:
    """Carry optimizer state to a new model layout or new param groups, matching by name."""
    from optckpt.errors import UsageError
    from optckpt.remapping import remap_checkpoint

    if dry_run and out is not None:
        raise UsageError("--dry-run writes nothing; drop -o")
    if not dry_run and out is None:
        raise UsageError("give -o OUT, or --dry-run to see the plan")
    with writing(
        "remapping", as_json=as_json, force=force, link=link, allow_global=allow_global
    ) as common:
        result = remap_checkpoint(
            path,
            to,
            out,
            source=source,
            rename=rename or (),
            group_rules=group or (),
            reset_mismatched=reset_mismatched,
            hyperparams=hyperparams,
            settings=setting or (),
            key=key,
            fmt=fmt,
            drop_scheduler=drop_scheduler,
            **common,
        )
    if as_json:
        print_json({"key": result.key, "out": result.out, **result.plan.to_json()}, result.notes)
        return
    render(result.plan)
    if result.out is not None:
        console().print(f"wrote {safe(result.out)}", soft_wrap=True)
    print_notes(result.notes)


def _names(items: list[str], limit: int = 6) -> str:
    """The first ``limit`` names, escaped for the terminal (a name may hold ``[/]`` or ESC)."""
    shown = ", ".join(items[:limit])
    return safe(shown) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def render(plan: RemapPlan) -> None:
    """Print the plan: a table per target group, then dropped parameters and warnings."""
    from rich.table import Table

    out = console()
    out.print(f"source names from {safe(plan.names_from or plan.names_source)}", soft_wrap=True)
    print_prefixes_stripped(out, plan.prefixes_stripped)
    table = Table(show_edge=False)
    for column in ("group", "carried", "renamed", "new", "reset", "hyperparameters from"):
        table.add_column(
            column, justify="right" if column not in ("hyperparameters from",) else "left"
        )
    for g in plan.groups:
        table.add_row(
            str(g.index),
            str(len(g.carried)),
            str(len(g.renamed)),
            str(len(g.new)),
            str(len(g.reset)),
            safe(g.hyperparams_from),
        )
    out.print(table)
    for g in plan.groups:
        if g.renamed:
            out.print(
                f"group {g.index} renamed: " + _names([f"{a} -> {b}" for a, b in g.renamed]),
                soft_wrap=True,
            )
        if g.new:
            out.print(f"group {g.index} new (no state): " + _names(g.new), soft_wrap=True)
        if g.reset:
            out.print(f"group {g.index} reset (shape changed): " + _names(g.reset), soft_wrap=True)
    _render_hyperparams(plan)
    for c in plan.scheduler_changes or ():
        if c.group < 0:  # the whole scheduler dropped
            out.print(f"scheduler {safe(c.key)} ({safe(c.old)}): {safe(c.why)}", soft_wrap=True)
            continue
        old = "-" if c.old is None else _value(c.old)
        new = "-" if c.new is None else _value(c.new)
        out.print(
            f"group {c.group} {safe(c.key)}: {safe(old)} -> {safe(new)} ({safe(c.why)})",
            soft_wrap=True,
        )
    if plan.dropped:
        out.print(f"dropped: {_names(plan.dropped)}", soft_wrap=True)
    for warning in plan.warnings:
        out.print(f"[yellow]warning:[/] {safe(warning)}", soft_wrap=True)


def _value(value: object) -> str:
    """A hyperparameter value as Python writes it (a tuple for a JSON list; a Tensor ``lr`` as
    ``tensor(0.01)``, which is no float ``0.01`` to torch's fused and capturable steps)."""
    import torch

    from optckpt.inspect import jsonable

    if isinstance(value, torch.Tensor) and value.dim() == 0:
        return f"tensor({jsonable(value)!r})"
    plain = jsonable(value)
    if isinstance(plain, list):
        return "(" + ", ".join(_value(v) for v in plain) + ")"
    return repr(plain)


def _render_hyperparams(plan: RemapPlan) -> None:
    """Every hyperparameter that differs from its source group's, and the layout's values that
    were not taken (the checkpoint's trained values are kept by default)."""
    out = console()
    for c in plan.hyperparam_changes:
        out.print(
            f"group {c.group} {safe(c.key)}: {safe(_value(c.old))} -> {safe(_value(c.new))} "
            f"({safe(c.why)})",
            soft_wrap=True,
        )
    if plan.hyperparams_kept:
        listed = "; ".join(
            f"{k.group}.{k.key} {_value(k.kept)} (layout {_value(k.layout)})"
            for k in plan.hyperparams_kept
        )
        out.print(
            f"kept the checkpoint's trained values where the layout differs: {safe(listed)}; "
            "take the layout's with --hyperparams layout or --set N.KEY=VALUE",
            soft_wrap=True,
        )
