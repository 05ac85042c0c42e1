"""``optckpt resume-step``: call :func:`optckpt.resume.resume_each`, render the checklist of
each optimizer state dict."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from optckpt.cli.options import MAX_SEED, AllowGlobal, CheckpointPath, Force, FromLayout, Key, Link
from optckpt.cli.render import console, print_json, print_notes, progress_when_writing, safe

if TYPE_CHECKING:
    from optckpt.resume import ResumeReport, ResumeRun


def resume_step(
    path: CheckpointPath,
    optimizer: Annotated[
        str | None,
        typer.Option(
            "--optimizer", help="Bundled optimizer name; guessed from the state if not given."
        ),
    ] = None,
    model: Annotated[
        Path | None,
        typer.Option("--model", help="Model weights file, when PATH holds none."),
    ] = None,
    source: FromLayout = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Steps to take.")] = 1,
    seed: Annotated[
        int, typer.Option("--seed", min=0, max=MAX_SEED, help="Seeds the gradients.")
    ] = 0,
    check_torch: Annotated[
        bool,
        typer.Option("--check-torch", help="Take the same steps with torch.optim and compare."),
    ] = False,
    atol: Annotated[
        float | None,
        typer.Option("--atol", help="With --check-torch: tolerance instead of bitwise."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    out: Annotated[  # str, not Path: Path would drop the "/" that asks for a DCP folder
        str | None,
        typer.Option(
            "-o",
            "--output",
            help="Write the checkpoint after the steps (if all pass): a file, a DCP folder "
            "(ending in /), or a folder for a folder.",
        ),
    ] = None,
    key: Key = None,
    force: Force = False,
    link: Link = False,
    allow_global: AllowGlobal = None,
) -> None:
    """Load the optimizer state, take N seeded steps, and check that it resumes (exit 1 if not)."""
    from optckpt.resume import ResumeOptions, resume_each

    options = ResumeOptions(
        key=key,
        optimizer=optimizer,
        model=model,
        steps=steps,
        seed=seed,
        check_torch=check_torch,
        atol=atol,
        out=out,
        force=force,
        link=link,
        allow_globals=allow_global or (),
        from_layout=source,
    )
    with progress_when_writing("writing", quiet=as_json) as progress:
        run = resume_each(path, options, progress=progress)
    if as_json:
        print_json(run.to_json())
    else:
        render_run(run)
    if not run.ok:
        raise typer.Exit(1)


def _number(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def render_run(run: ResumeRun) -> None:
    """Print each optimizer's checklist, then the verdict; the notes go to stderr."""
    out = console()
    print_notes(run.notes)
    for index, report in enumerate(run.results):
        if index:
            out.print()
        render(report)
    if run.out is not None:
        out.print(f"wrote {safe(run.out)}", soft_wrap=True)
    if run.ok:
        out.print("[green]ok[/]")
        return
    failed = [r.key for r in run.results if not r.ok]
    which = f" at {safe(', '.join(map(repr, failed)))}" if len(run.results) > 1 else ""
    out.print(f"[red]resume-step failed{which}[/]")


def render(report: ResumeReport) -> None:
    """Print one optimizer's checklist and the update size per group (escaped: ``safe``);
    its notes go to stderr."""
    from rich.table import Table

    out = console()
    where = f" at {report.key!r}" if report.key else ""
    out.print(
        safe(
            f"{report.path}{where}: {report.optimizer} ({report.optimizer_from}); "
            f"parameters from {report.params_from}; {report.steps} step(s), seed {report.seed}"
        ),
        soft_wrap=True,
    )
    marks = {True: "[green]pass[/]", False: "[red]FAIL[/]", None: "[yellow]skip[/]"}
    checks = Table(show_edge=False, show_header=False)
    checks.add_column("result")
    checks.add_column("check")
    checks.add_column("detail")
    for c in report.checks:
        checks.add_row(marks[c.ok], safe(c.name), safe(c.detail))
    out.print(checks)
    if report.groups:
        table = Table(show_edge=False)
        for column in ("group", "params", "lr", "update rms", "update max", "effective lr"):
            table.add_column(column, justify="right")
        for g in report.groups:
            table.add_row(
                str(g.index),
                str(g.num_params),
                _number(g.lr),
                _number(g.update_rms),
                _number(g.update_max),
                _number(g.effective_lr),
            )
        out.print(table)
    print_notes(report.notes)
