"""Benchmark ``optckpt convert``, ``diff`` and ``move`` against torch scripts and ``cp``.

Generates the training checkpoint of ``bench_inspect.py`` (AdamW, model + ``exp_avg`` +
``exp_avg_sq``; ~250M parameters, ~3 GB by default) in a temporary folder, plus a byte copy of
it and its safetensors conversion, then times every command below in a fresh process and reads
that process's own peak RSS from ``os.wait4`` (see ``_common.run_once``):

convert
  * ``optckpt convert CKPT -o OUT.safetensors``
  * ``torch.load`` (full, and ``mmap=True``), flatten to ``{name: tensor}``,
    ``safetensors.torch.save_file``
  * ``cp CKPT OUT``, and ``cp CKPT OUT && sync OUT`` (optckpt fsyncs what it writes and
    ``cp`` does not, so the synced copy is the like-for-like baseline)
diff
  * ``optckpt diff CKPT COPY`` (and, informative, ``optckpt diff CKPT CKPT.safetensors``)
  * ``torch.load`` both (full, and ``mmap=True``) and ``torch.equal`` every tensor
  * ``cmp CKPT COPY``
move
  * ``optckpt move CKPT --device cpu --dtype bfloat16 -o OUT.pt``
  * ``torch.load`` (full, and ``mmap=True``), cast the optimizer state but ``step`` to
    bfloat16, ``torch.save``
  * against the same ``cp`` and ``cp && sync`` rows as convert

plus ``python -c "import torch"``, the fixed start-up cost of every Python command.

Targets (issue 17): ``convert`` within 1.15x the wall time of ``cp && sync OUT``, bitwise
``diff`` of two identical files within 1.3x ``cmp``; ``move`` (issue 11) within 1.5x
``cp && sync OUT``; and peak RSS well below the file size, taken here as at most 1/4 of it.
Each ratio divides medians of the same run.

Every round runs each command once, in a fresh seeded shuffle, so a burst of load from other
processes hits all of them alike and no command always follows the same one; CPU time (user
+ sys) is reported beside wall time because it is much less affected by such load. After
every run its output is deleted and the file system synced (untimed), so no command pays for
an earlier one's write-back. Just before each run (untimed) the launcher faults in and frees
1.1x the checkpoint's size of memory (at most the free memory), so every command writes into
pages the hypervisor backs: on a VM with free page reporting, memory freed a second or more
earlier has been handed back to the host, and faulting 3 GiB of it back in took 4-6 s
instead of 0.5 s (see benchmarks/README.md, issue 17). The page cache is warm by
default (the inputs are read once before timing); ``--cold`` drops it before every run
instead (needs root).

Usage::

    python benchmarks/bench_files.py                     # ~250M params (~3 GB), 3 repeats
    python benchmarks/bench_files.py --quick             # ~5M params, for a smoke run
    python benchmarks/bench_files.py --params 1e9 --repeats 5 --workdir /data/bench
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path

from _common import (
    Command,
    checkpoint,
    describe,
    mb,
    measure,
    optckpt_argv,
    parse_args,
    run_once,
    workdir,
)

# optckpt wall <= ratio x the named baseline's wall, by operation
TARGETS = {
    "convert": ("`cp && sync OUT`", 1.15),
    "diff": ("`cmp`", 1.3),
    "move": ("`cp && sync OUT`", 1.5),
}
RSS_FRACTION = 0.25  # optckpt peak RSS <= this x file size ("well below the file size")

# The "obvious" torch scripts. Paths come in as sys.argv; {mmap} is "" or ", mmap=True".
TORCH_CONVERT = """
import sys, torch
from safetensors.torch import save_file
sd = torch.load(sys.argv[1], weights_only=True{mmap})
flat = {{}}
def walk(node, name):
    if isinstance(node, torch.Tensor):
        flat[name] = node.contiguous()
    elif isinstance(node, dict):
        for k, v in node.items():
            walk(v, f"{{name}}.{{k}}" if name else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            walk(v, f"{{name}}.{{i}}")
walk(sd, "")
save_file(flat, sys.argv[2])
"""

TORCH_DIFF = """
import sys, torch
a = torch.load(sys.argv[1], weights_only=True{mmap})
b = torch.load(sys.argv[2], weights_only=True{mmap})
def same(x, y):
    if isinstance(x, torch.Tensor):
        return (isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape
                and torch.equal(x, y))
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return (type(x) is type(y) and len(x) == len(y)
                and all(same(p, q) for p, q in zip(x, y)))
    return x == y
sys.exit(0 if same(a, b) else 1)
"""

TORCH_MOVE = """
import sys, torch
sd = torch.load(sys.argv[1], weights_only=True{mmap})
for st in sd["optimizer"]["state"].values():
    for k, v in st.items():
        if k != "step" and isinstance(v, torch.Tensor) and v.is_floating_point():
            st[k] = v.to(torch.bfloat16)
torch.save(sd, sys.argv[2])
"""

CP, CP_SYNC, CMP = "`cp`", "`cp && sync OUT`", "`cmp`"


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found on PATH")
    return found


def torch_runs(
    script: str,
    then: str,
    args: list[str],
    *,
    outputs: tuple[Path, ...] | list[Path] = (),
    both: str = "",
) -> list[Command]:
    """``script`` (one of the ``TORCH_*`` above) run with a full load and with ``mmap=True``."""
    return [
        Command(
            f"torch: `load{load}`{both}{full} + {then}",
            [sys.executable, "-c", script.format(mmap=mmap), *args],
            outputs=list(outputs),
        )
        for load, full, mmap in (("", " (full)", ""), ("(mmap=True)", "", ", mmap=True"))
    ]


def commands(ckpt: Path, copy: Path, st: Path, out: Path) -> dict[str, list[Command]]:
    """The commands, by operation. ``out`` is the folder outputs go to."""
    opt, p = optckpt_argv(), str(ckpt)
    out_st, out_pt, out_cp = out / "out.safetensors", out / "out.pt", out / "out.copy"
    cp = Command(CP, [_tool("cp"), p, str(out_cp)], outputs=[out_cp])
    # `sync FILE` fsyncs that one file (coreutils >= 8.24), like optckpt's fsync of its output.
    cp_sync = Command(
        CP_SYNC,
        [_tool("sh"), "-c", 'cp "$1" "$2" && sync "$2"', "sh", p, str(out_cp)],
        outputs=[out_cp],
    )
    convert = [
        Command(
            "`optckpt convert CKPT -o OUT.safetensors`",
            [*opt, "convert", p, "-o", str(out_st)],
            target=True,
            outputs=[out_st],
        ),
        *torch_runs(TORCH_CONVERT, "`save_file`", [p, str(out_st)], outputs=[out_st]),
        cp,
        cp_sync,
    ]
    diff = [
        Command("`optckpt diff CKPT COPY`", [*opt, "diff", p, str(copy)], target=True),
        Command("`optckpt diff CKPT CKPT.safetensors` (informative)", [*opt, "diff", p, str(st)]),
        *torch_runs(TORCH_DIFF, "`torch.equal`", [p, str(copy)], both=" both"),
        Command(CMP, [_tool("cmp"), p, str(copy)]),
    ]
    move = [
        Command(
            "`optckpt move CKPT --device cpu --dtype bfloat16 -o OUT.pt`",
            [*opt, "move", p, "--device", "cpu", "--dtype", "bfloat16", "-o", str(out_pt)],
            target=True,
            outputs=[out_pt],
        ),
        *torch_runs(TORCH_MOVE, "cast + `save`", [p, str(out_pt)], outputs=[out_pt]),
    ]
    baseline = [Command("`python -c 'import torch'`", [sys.executable, "-c", "import torch"])]
    return {"convert": convert, "diff": diff, "move": move, "baseline": baseline}


def references(groups: dict[str, list[Command]]) -> dict[str, list[Command]]:
    """The baselines each operation's wall time is divided by."""
    by = {c.label: c for cmds in groups.values() for c in cmds}
    return {
        "convert": [by[CP], by[CP_SYNC]],
        "diff": [by[CMP]],
        "move": [by[CP], by[CP_SYNC]],
        "baseline": [],
    }


# --------------------------------------------------------------------------- reporting


def table(cmds: list[Command], refs: list[Command], size: int) -> str:
    ref_cols = "".join(f" wall / {r.label} |" for r in refs)
    head = f"| command | median wall (s) | min-max wall (s) | CPU (s, median) | peak RSS (max) | RSS / file |{ref_cols}"
    rows = [head, "|---|" + "---:|" * (5 + len(refs))]
    for c in cmds:
        ratios = "".join(f" {c.wall / r.wall:.2f}x |" for r in refs)
        rows.append(
            f"| {c.label} | {c.wall:.2f} | {min(c.walls):.2f}-{max(c.walls):.2f} "
            f"| {c.cpu_median:.2f} | {mb(c.peak)} | {c.peak / size:.0%} |{ratios}"
        )
    return "\n".join(rows)


def verdict(group: str, cmds: list[Command], refs: list[Command], size: int) -> list[str]:
    lines = []
    target_ref, target = TARGETS.get(group, ("", math.inf))
    for c in cmds:
        if not c.target:
            continue
        parts = []
        for r in refs:
            ratio = c.wall / r.wall
            cpu = c.cpu_median / r.cpu_median if r.cpu_median > 0 else math.inf
            if r.label == target_ref:
                ok = "met" if ratio <= target else "MISSED"
                parts.append(
                    f"wall / {r.label} = **{ratio:.2f}x** (target <= {target}x: {ok}; "
                    f"CPU ratio {cpu:.1f}x)"
                )
            else:
                parts.append(f"wall / {r.label} = {ratio:.2f}x (CPU ratio {cpu:.1f}x)")
        rss_ok = "met" if c.peak <= RSS_FRACTION * size else "MISSED"
        parts.append(
            f"peak RSS {mb(c.peak)} = {c.peak / size:.0%} of the file "
            f"(target <= {RSS_FRACTION:.0%}: {rss_ok})"
        )
        lines.append(f"- {c.label}: " + "; ".join(parts))
    return lines


# --------------------------------------------------------------------------- main


def prepare(folder: Path, params: float) -> tuple[Path, Path, Path]:
    """The checkpoint, a byte copy of it and its safetensors conversion (reused if present)."""
    ckpt = folder / f"train-{int(params)}.pt"
    copy = folder / f"train-{int(params)}.copy.pt"
    st = folder / f"train-{int(params)}.safetensors"
    checkpoint(ckpt, params)
    if not copy.exists() or copy.stat().st_size != ckpt.stat().st_size:
        shutil.copyfile(ckpt, copy)
    if not st.exists():
        run_once([*optckpt_argv(), "convert", str(ckpt), "-o", str(st)])
    return ckpt, copy, st


def main(argv: list[str] | None = None) -> int:
    def only(ap: argparse.ArgumentParser) -> None:
        ap.add_argument(
            "--only",
            choices=("convert", "diff", "move"),
            action="append",
            help="run only these operations (repeatable; the cp/cmp baselines come along)",
        )

    args = parse_args(__doc__, argv, params=250e6, extra=only)
    with workdir(args.workdir) as folder:
        ckpt, copy, st = prepare(folder, args.params)
        size = ckpt.stat().st_size
        out = folder / "out"
        out.mkdir(exist_ok=True)
        groups = commands(ckpt, copy, st, out)
        refs = references(groups)
        if args.only:
            keep = {*args.only, "baseline"}
            groups = {g: cmds for g, cmds in groups.items() if g in keep}
            if "move" in keep and "convert" not in keep:
                groups["move"] = groups["move"] + refs["move"]
        order: list[Command] = []
        for c in (c for cmds in groups.values() for c in cmds):
            if all(c is not o for o in order):
                order.append(c)
        try:
            measure(
                order,
                args.repeats,
                warm=[ckpt, copy, st],
                imports="torch, safetensors, optckpt.cli.app",
                cold=args.cold,
                prime=size + size // 10,
            )
        finally:
            shutil.rmtree(out, ignore_errors=True)

    print(describe(args.params, size, args.repeats, cold=args.cold))
    notes = []
    for group, cmds in groups.items():
        shown = [*cmds, *(r for r in refs[group] if all(r is not c for c in cmds))]
        print(f"### {group}\n")
        print(table(shown, refs[group], size))
        print()
        notes += verdict(group, cmds, refs[group], size)
    print("\n".join(notes))
    base = groups["baseline"][0]
    by = {c.label: c for cmds in groups.values() for c in cmds}
    floor = ", ".join(
        f"{base.wall / by[label].wall:.2f}x {label}" for label in (CP, CP_SYNC, CMP) if label in by
    )
    print(
        f"- for scale: `python -c 'import torch'` alone takes {base.wall:.2f}s wall "
        f"({floor}) and {mb(base.peak)} ({base.peak / size:.0%} of the file)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
