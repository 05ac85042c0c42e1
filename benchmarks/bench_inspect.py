"""Benchmark ``optckpt inspect`` against plain ``torch.load`` on a large AdamW checkpoint.

Generates a transformer-like training checkpoint (``{"model": ..., "optimizer": ...,
"epoch": ...}``, AdamW with ``param_names`` and two groups, ~300M parameters, ~3.6 GB) in a
temporary folder, then times each command in a fresh process and reads that process's own
peak RSS from ``os.wait4``:

* ``optckpt inspect PATH`` (tables, stdout to /dev/null)
* ``optckpt inspect PATH --json``
* ``python -c "import torch; torch.load(p, weights_only=True)"`` (full load)
* the same with ``mmap=True``
* ``optckpt inspect PATH --stats`` (reads every value; informative, no target)
* ``python -c "import torch"`` (baseline: interpreter + torch import)

Targets: ``inspect --json`` within 0.30x the wall time of ``python -c "import torch"`` and
under 100 MB (100e6 bytes) peak RSS, whatever the file size (issue 17: ``inspect`` without
``--stats`` reads the structure without torch); the earlier targets (within 1.3x the mmap
load, under 400 MB) are reported beside them.

By default the page cache is warm: the file is read once before timing, so every command
sees it cached. ``--cold`` drops the page cache (needs root) before every run instead.

Usage::

    python benchmarks/bench_inspect.py                  # ~300M params, 3 repeats
    python benchmarks/bench_inspect.py --quick          # ~5M params, for a smoke run
    python benchmarks/bench_inspect.py --params 1e9 --repeats 5 --workdir /data/bench
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from _common import Command, checkpoint, describe, mb, measure, optckpt_argv, parse_args, workdir

WALL_TARGET = 1.3  # inspect wall <= this x mmap-load wall (issue 6)
RSS_TARGET = 400e6  # bytes (issue 6)
IMPORT_TARGET = 0.30  # inspect --json wall <= this x `import torch` wall (issue 17)
RSS_TARGET_NO_TORCH = 100e6  # bytes (issue 17)
BASELINE = "`python -c 'import torch'` (baseline)"


def commands(path: Path, stats: bool) -> list[Command]:
    py, opt, p = sys.executable, optckpt_argv(), str(path)
    load = "import sys, torch; torch.load(sys.argv[1], weights_only=True{})"
    cmds = [
        Command("`optckpt inspect`", [*opt, "inspect", p], target=True),
        Command("`optckpt inspect --json`", [*opt, "inspect", p, "--json"], target=True),
        Command("`torch.load(weights_only=True)` (full load)", [py, "-c", load.format(""), p]),
        Command(
            "`torch.load(weights_only=True, mmap=True)`",
            [py, "-c", load.format(", mmap=True"), p],
        ),
    ]
    if stats:
        cmds.append(Command("`optckpt inspect --stats`", [*opt, "inspect", p, "--stats"]))
    cmds.append(Command(BASELINE, [py, "-c", "import torch"]))
    return cmds


# --------------------------------------------------------------------------- reporting


def table(cmds: list[Command]) -> str:
    rows = [
        "| command | median wall (s) | min-max wall (s) | CPU (s, median) | peak RSS (max) |",
        "|---|---:|---:|---:|---:|",
    ]
    for c in cmds:
        rows.append(
            f"| {c.label} | {c.wall:.2f} | {min(c.walls):.2f}-{max(c.walls):.2f} "
            f"| {statistics.median(c.cpu):.2f} | {mb(c.peak)} |"
        )
    return "\n".join(rows)


def verdict(cmds: list[Command]) -> str:
    by = {c.label: c for c in cmds}
    mmap = by["`torch.load(weights_only=True, mmap=True)`"]
    full = by["`torch.load(weights_only=True)` (full load)"]
    base = by[BASELINE]
    lines = []
    for c in cmds:
        if not c.target:
            continue
        r_mmap, r_full = c.wall / mmap.wall, c.wall / full.wall
        r_cpu = statistics.median(c.cpu) / statistics.median(mmap.cpu)
        ok_wall, ok_rss = r_mmap <= WALL_TARGET, c.peak < RSS_TARGET
        lines.append(
            f"- {c.label}: wall / mmap load = **{r_mmap:.2f}x** "
            f"(target <= {WALL_TARGET}x: {'met' if ok_wall else 'MISSED'}), "
            f"wall / full load = {r_full:.2f}x, CPU / mmap-load CPU = {r_cpu:.2f}x, "
            f"peak RSS {mb(c.peak)} "
            f"(target < {mb(RSS_TARGET)}: {'met' if ok_rss else 'MISSED'})"
        )
        r_import = c.wall / base.wall
        ok_import, ok_small = r_import <= IMPORT_TARGET, c.peak < RSS_TARGET_NO_TORCH
        lines.append(
            f"  - without torch: wall / `import torch` = **{r_import:.2f}x** "
            f"(target <= {IMPORT_TARGET}x: {'met' if ok_import else 'MISSED'}), "
            f"peak RSS {mb(c.peak)} "
            f"(target < {mb(RSS_TARGET_NO_TORCH)}: {'met' if ok_small else 'MISSED'})"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    def no_stats(ap: argparse.ArgumentParser) -> None:
        ap.add_argument("--no-stats", action="store_true", help="skip `optckpt inspect --stats`")

    args = parse_args(__doc__, argv, params=300e6, extra=no_stats)
    with workdir(args.workdir) as folder:
        path = checkpoint(folder / f"train-{int(args.params)}.pt", args.params)
        size = path.stat().st_size
        cmds = commands(path, stats=not args.no_stats)
        measure(
            cmds,
            args.repeats,
            warm=[path],
            imports="torch, optckpt.inspect, optckpt.cli.app",
            cold=args.cold,
        )

    print(describe(args.params, size, args.repeats, cold=args.cold))
    print(table(cmds))
    print()
    print(verdict(cmds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
