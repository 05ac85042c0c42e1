"""``optckpt inspect``: check the flags, call :func:`optckpt.inspect.inspect_checkpoint`, render."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Any

import typer

from optckpt.cli.options import AllowGlobal, CheckpointPath, Key
from optckpt.cli.render import (
    console,
    human_bytes,
    print_json,
    print_notes,
    safe,
    short_dtype,
)

if TYPE_CHECKING:
    from optckpt.companions import CompanionReport
    from optckpt.inspect import InspectReport, OptimizerReport, ParamReport

_ROWS = 50  # parameters shown without --all
_BAR = 28


def inspect(
    path: CheckpointPath,
    key: Key = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object instead of tables.")
    ] = False,
    stats: Annotated[
        bool,
        typer.Option(
            "--stats", help="Read the values: norms, min/max, non-finite counts, a bar view."
        ),
    ] = False,
    show_all: Annotated[
        bool, typer.Option("--all", help=f"List every parameter, not the first {_ROWS}.")
    ] = False,
    allow_global: AllowGlobal = None,
) -> None:
    """Show what an optimizer checkpoint holds: groups, per-parameter state, totals, warnings."""
    from optckpt.inspect import inspect_checkpoint

    report = inspect_checkpoint(path, key=key, stats=stats, allow_globals=allow_global or ())
    if as_json:
        print_json(report.to_json(), report.notes)
        return
    render(report, show_all=show_all)
    print_notes(report.notes)


def render(report: InspectReport, *, show_all: bool = False) -> None:
    """Print the report as rich tables (every name, path and value escaped: see ``safe``)."""
    out = console()
    out.print(
        f"[bold]{safe(report.path)}[/]  {safe(report.format)}, {human_bytes(report.size)}",
        soft_wrap=True,
    )
    if report.top_level_keys:
        keys = report.top_level_keys
        shown = ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")
        out.print(f"top-level keys: {safe(shown)}", soft_wrap=True)
    if report.storage is not None:
        files = report.storage["files"]
        out.print(
            f"dcp: {len(files)} files, {report.storage['tensors']} tensors in "
            f"{report.storage['chunks']} chunks ({report.storage['sharded']} sharded)",
            soft_wrap=True,
        )
        _render_sharded(report.storage["layouts"], show_all)
    for optimizer in report.optimizers:
        out.print()
        _render_optimizer(optimizer, show_all)
    for companion in report.companions:
        out.print()
        render_companion(companion)


def _render_sharded(layouts: list[dict[str, Any]], show_all: bool) -> None:
    """The tensors of a DCP folder saved in more than one chunk: shape, dtype, how they are
    split, files (the first ``_ROWS`` without ``--all``; unsharded ones are only counted)."""
    from rich.table import Table

    sharded = [t for t in layouts if len(t["chunks"]) > 1]
    if not sharded:
        return
    rows = sharded if show_all else sharded[:_ROWS]
    table = Table(title="sharded tensors", title_justify="left", show_edge=False)
    for column in ("tensor", "shape", "dtype", "chunks", "split", "files"):
        table.add_column(column, justify="right" if column == "chunks" else "left")
    for t in rows:
        files = t["files"]
        shown = ", ".join(files) if len(files) <= 3 else f"{files[0]}, ... ({len(files)} files)"
        table.add_row(
            safe(t["key"]),
            "[" + ",".join(map(str, t["shape"])) + "]",
            safe(short_dtype(t["dtype"])),
            str(len(t["chunks"])),
            _split(t),
            safe(shown),
        )
    console().print(table)
    if len(rows) < len(sharded):
        console().print(
            f"... {len(sharded) - len(rows)} more sharded tensors (--all lists them, --json "
            "gives all)"
        )


def _split(layout: dict[str, Any]) -> str:
    """How a tensor's chunks split it: ``"dim 0: 3+2"`` (sizes along the one split dimension,
    in order), else the split dimensions."""
    shape, chunks = layout["shape"], layout["chunks"]
    dims = sorted({d for c in chunks for d, n in enumerate(c["sizes"]) if n != shape[d]})
    if len(dims) == 1:
        d = dims[0]
        ordered = sorted(chunks, key=lambda c: c["offsets"][d])
        return f"dim {d}: " + "+".join(str(c["sizes"][d]) for c in ordered)
    return "dims " + ",".join(map(str, dims)) if dims else "replicated"


def render_companion(companion: CompanionReport) -> None:
    """Print one companion: where, its class, its summary, then observations and warnings."""
    out = console()
    kind = companion.kind.replace("_", " ")
    guess = companion.guess
    named = guess.name or ("counters" if companion.kind == "trainer" else "unknown class")
    if guess.name and len(guess.candidates) > 1:
        named = f"{guess.name}? (or {', '.join(c for c in guess.candidates if c != guess.name)})"
    verb = "counts the steps of" if companion.kind == "trainer" else "drives"
    drives = f", {verb} {companion.optimizer!r}" if companion.optimizer else ""
    out.print(
        f"[bold]{safe(kind)} at {safe(repr(companion.key) if companion.key else 'the top level')}"
        f"[/]: {safe(named)}{safe(drives)}",
        soft_wrap=True,
    )
    _render_summary(companion.summary, "  ")
    for line in companion.observations:
        out.print(f"  {safe(line)}", soft_wrap=True)
    for warning in companion.warnings:
        out.print(f"[yellow]warning:[/] {safe(warning)}", soft_wrap=True)


def _render_summary(summary: dict[str, Any], indent: str) -> None:
    out = console()
    children = summary.get("schedulers")
    shown = ", ".join(
        f"{k}={_fmt(v)}" for k, v in summary.items() if k != "schedulers" and v is not None
    )
    out.print(f"{indent}{safe(shown)}", soft_wrap=True)
    for i, child in enumerate(children or []):
        out.print(
            f"{indent}scheduler {i}: {safe(child['class'] or 'unknown class')}", soft_wrap=True
        )
        _render_summary(child["summary"], indent + "  ")


def _fmt(value: Any) -> str:
    """A value as plain text (not escaped: callers pass the result through ``safe``)."""
    from optckpt.inspect import jsonable

    plain = jsonable(value)
    if isinstance(plain, float):
        return f"{plain:g}"
    if isinstance(plain, list):
        return "(" + ", ".join(_fmt(v) for v in plain) + ")"
    if isinstance(plain, dict) and "shape" in plain:
        return f"tensor{plain['shape']}"
    return str(plain)


def _render_optimizer(opt: OptimizerReport, show_all: bool) -> None:
    from rich.table import Table

    out = console()
    where = repr(opt.key) if opt.key else "the top level (bare state dict)"
    guess = opt.guess
    if guess.name is None:
        named = f"unknown optimizer ({guess.reason})"  # the keys it saw
    elif guess.sure:
        named = guess.name
    else:
        named = f"{guess.name}? (or {', '.join(c for c in guess.candidates if c != guess.name)}; {guess.reason})"
    out.print(f"[bold]optimizer at {safe(where)}[/]: {safe(named)}", soft_wrap=True)

    varying = sorted(opt.varying_hyperparams)
    groups = Table(title="param groups", title_justify="left", show_edge=False)
    groups.add_column("group", justify="right")
    groups.add_column("params", justify="right")
    groups.add_column("with state", justify="right")
    for name in varying:
        groups.add_column(safe(name), style="bold yellow")
    for g in opt.groups:
        groups.add_row(
            str(g.index),
            str(g.num_params),
            str(g.params_with_state),
            *(safe(_fmt(g.hyperparams.get(k, "-"))) for k in varying),
        )
    out.print(groups)
    if opt.groups:
        shared = {k: v for k, v in opt.groups[0].hyperparams.items() if k not in varying}
        if shared:
            out.print(
                "shared: " + safe(", ".join(f"{k}={_fmt(v)}" for k, v in shared.items())),
                soft_wrap=True,
            )
        if varying:
            out.print("[yellow]highlighted: hyperparameters that differ between groups[/]")

    rows = opt.params if show_all else opt.params[:_ROWS]
    params = Table(
        title=f"parameters (names from {safe(opt.names_from)})"
        if opt.names_source
        else "parameters",
        title_justify="left",
        show_edge=False,
    )
    # A name-keyed state dict's IDs are the names: one column says it.
    name_keyed = opt.names_source == "keys"
    columns = ("name", "group", "state", "device", "step", "bytes")
    for column in columns if name_keyed else ("id", *columns):
        params.add_column(
            column, justify="right" if column in ("id", "group", "step", "bytes") else "left"
        )
    for p in rows:
        params.add_row(
            *(() if name_keyed else (safe(p.id),)),
            safe(p.name or "-"),
            "-" if p.group is None else str(p.group),
            safe(_state_summary(p)),
            safe(", ".join(sorted(_devices(p))) or "-"),
            safe(_fmt(opt.steps[p.id])) if p.id in opt.steps else "-",
            human_bytes(p.nbytes),
        )
    out.print(params)
    if len(rows) < len(opt.params):
        out.print(
            f"... {len(opt.params) - len(rows)} more parameters (--all lists them, --json gives all)"
        )

    totals = opt.totals()
    out.print(
        f"totals: {totals['params']} params, {totals['params_with_state']} with state, "
        f"{totals['numel']:,} elements, {human_bytes(totals['bytes'])}"
        + "".join(
            f"; {safe(dtype)}: {v['numel']:,} elements, {human_bytes(v['bytes'])}"
            for dtype, v in opt.by_dtype().items()
        ),
        soft_wrap=True,
    )
    if any(p.stats for p in opt.params):
        _render_stats(opt, rows)
    for warning in opt.warnings:
        out.print(f"[yellow]warning:[/] {safe(warning)}", soft_wrap=True)


def _state_summary(p: ParamReport) -> str:
    from optckpt.inspect import TensorInfo

    parts = []
    for key, value in p.state.items():
        if key == "step":
            continue
        if isinstance(value, TensorInfo):
            shape = ",".join(str(d) for d in value.shape)
            parts.append(f"{key} {short_dtype(value.dtype)}[{shape}]")
        elif isinstance(value, list):
            parts.append(f"{key} list[{len(value)}]")
        else:
            parts.append(f"{key}={_fmt(value)}")
    return " ".join(parts) or ("-" if not p.state else "")


def _devices(p: ParamReport) -> set[str]:
    return {v.device for v in p.tensor_infos() if v.device is not None}  # DCP records none


def _render_stats(opt: OptimizerReport, rows: list[ParamReport]) -> None:
    from rich.table import Table

    from optckpt.inspect import picture_label, picture_value

    out = console()
    table = Table(title="state values", title_justify="left", show_edge=False)
    for column in ("param", "key", "norm", "min", "max", "non-finite"):
        table.add_column(column, justify="left" if column in ("param", "key") else "right")
    for p in rows:
        for key, s in p.stats.items():
            bad = f"[bold red]{s.nonfinite}[/]" if s.nonfinite else "0"
            table.add_row(
                safe(p.name or p.id),
                safe(key),
                f"{s.norm:.4g}",
                "-" if s.min is None else f"{s.min:.4g}",
                "-" if s.max is None else f"{s.max:.4g}",
                bad,
            )
    out.print(table)
    if opt.picture is None:
        return
    # Padded before escaping markup: rich's escapes take no room on screen.
    values = [(safe(p.name or p.id, markup=False), picture_value(p, opt.picture)) for p in rows]
    plotted = [(label, v) for label, v in values if v is not None and v > 0 and math.isfinite(v)]
    if not plotted:
        return
    out.print(f"[bold]{safe(picture_label(opt.picture))}[/] per parameter (log scale)")
    logs = [math.log10(v) for _, v in plotted]
    low, high = min(logs), max(logs)
    span = (high - low) or 1.0
    width = max(len(label) for label, _ in plotted)
    for (label, value), lg in zip(plotted, logs):
        out.print(
            f"{safe(f'{label:<{width}}')}  {_bar(1 + (_BAR - 1) * (lg - low) / span):<{_BAR}}  {value:.3e}",
            highlight=False,
        )


def _bar(length: float) -> str:
    blocks = " ▏▎▍▌▋▊▉█"
    full, frac = int(length), length - int(length)
    return "█" * full + (blocks[int(frac * 8)] if frac >= 0.125 else "")
