"""``optckpt diff``: call :func:`optckpt.diff.diff_checkpoints`, render, exit 0 or 1."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from optckpt.cli.options import AllowGlobal
from optckpt.cli.render import console, print_json, print_notes, print_prefixes_stripped, safe

if TYPE_CHECKING:
    from optckpt.diff import Difference, DiffReport


def diff(
    a: Annotated[Path, typer.Argument(help="First checkpoint.", metavar="A", show_default=False)],
    b: Annotated[Path, typer.Argument(help="Second checkpoint.", metavar="B", show_default=False)],
    key_a: Annotated[
        str | None, typer.Option("--key-a", help="Key path of the state dict in A.")
    ] = None,
    key_b: Annotated[
        str | None, typer.Option("--key-b", help="Key path of the state dict in B.")
    ] = None,
    atol: Annotated[
        float | None, typer.Option("--atol", help="Absolute tolerance (default: compare bits).")
    ] = None,
    rtol: Annotated[
        float | None, typer.Option("--rtol", help="Relative tolerance (default: compare bits).")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help='Print one JSON object with "ok".')
    ] = False,
    from_a: Annotated[
        Path | None,
        typer.Option("--from-a", help="Layout A was saved with, to name it by (no names in A)."),
    ] = None,
    from_b: Annotated[
        Path | None,
        typer.Option("--from-b", help="Layout B was saved with, to name it by (no names in B)."),
    ] = None,
    allow_global: AllowGlobal = None,
) -> None:
    """Compare two optimizer checkpoints; exit 0 when identical, 1 when they differ."""
    from optckpt.diff import diff_checkpoints

    report = diff_checkpoints(
        a,
        b,
        key_a=key_a,
        key_b=key_b,
        rtol=rtol,
        atol=atol,
        allow_globals=allow_global or (),
        from_a=from_a,
        from_b=from_b,
    )
    if as_json:
        print_json(report.to_json())
    else:
        render(report)
        print_notes(report.notes)
    if not report.ok:
        raise typer.Exit(1)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _detail(d: Difference) -> str:
    if d.kind != "values":
        return ""
    x = d.detail
    return f"{x['differing']:,} of {x['numel']:,} differ; max abs {x['max_abs']:.3g}, max rel {x['max_rel']:.3g}"


def render(report: DiffReport) -> None:
    """Print the differences as a table, or one line when there are none (escaped: ``safe``)."""
    from rich.table import Table

    out = console()
    how = (
        "bitwise"
        if report.tolerance is None
        else f"rtol={report.tolerance[0]:g}, atol={report.tolerance[1]:g}"
    )
    if report.ok:
        out.print(f"identical ({how})")
        return
    for pair in report.pairs:
        if not pair.differences:
            continue
        title = (
            f"{report.path_a}:{pair.key_a or '<bare>'} vs {report.path_b}:{pair.key_b or '<bare>'}"
        )
        out.print(
            f"[bold]{safe(title)}[/] (params matched by {safe(pair.match_by)}; {how})",
            soft_wrap=True,
        )
        print_prefixes_stripped(out, pair.prefixes_stripped)
        table = Table(show_edge=False)
        for column in ("what", "where", "A", "B", "detail"):
            table.add_column(column)
        for d in pair.differences:
            table.add_row(*(safe(x) for x in (d.kind, d.where, _cell(d.a), _cell(d.b), _detail(d))))
        out.print(table)
    if report.companions:
        table = Table(title="companions", title_justify="left", show_edge=False)
        for column in ("what", "where", "A", "B"):
            table.add_column(column)
        for c in report.companions:
            table.add_row(*(safe(x) for x in (c.kind, c.where, _cell(c.a), _cell(c.b))))
        out.print(table)
    total = sum(len(p.differences) for p in report.pairs) + len(report.companions)
    out.print(f"{total} differences")
