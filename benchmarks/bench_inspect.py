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

Targets (from the issue): inspect without ``--stats`` within 1.3x the wall time of the mmap
load, and under 400 MB (400e6 bytes) peak RSS, whatever the file size.

By default the page cache is warm: the file is read once before timing, so every command
sees it cached. ``--cold`` drops the page cache (needs root) before every run instead.

Usage::

    python benchmarks/bench_inspect.py                  # ~300M params, 3 repeats
    python benchmarks/bench_inspect.py --quick          # ~5M params, for a smoke run
    python benchmarks/bench_inspect.py --params 1e9 --repeats 5 --workdir /data/bench
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

WALL_TARGET = 1.3  # inspect wall <= this x mmap-load wall
RSS_TARGET = 400e6  # bytes

# GPT-2-like layout: token + position embeddings, N blocks of 12 tensors, final LayerNorm.
VOCAB = 50257
CONTEXT = 1024
LAYERS = 20


# --------------------------------------------------------------------------- generation


def layout(params: float) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a GPT-2-like model with about ``params`` parameters.

    The depth is fixed at ``LAYERS`` blocks (12 tensors each, 244 tensors in all); the width
    is solved for from ``params`` (12 L d^2 + (V + C) d ~ params), rounded to a multiple of 16.
    """
    a, b = 12 * LAYERS, VOCAB + CONTEXT
    d = (-b + math.sqrt(b * b + 4 * a * params)) / (2 * a)
    d = max(16, round(d / 16) * 16)
    shapes: list[tuple[str, tuple[int, ...]]] = [
        ("transformer.wte.weight", (VOCAB, d)),
        ("transformer.wpe.weight", (CONTEXT, d)),
    ]
    for i in range(LAYERS):
        h = f"transformer.h.{i}"
        shapes += [
            (f"{h}.ln_1.weight", (d,)),
            (f"{h}.ln_1.bias", (d,)),
            (f"{h}.attn.c_attn.weight", (3 * d, d)),
            (f"{h}.attn.c_attn.bias", (3 * d,)),
            (f"{h}.attn.c_proj.weight", (d, d)),
            (f"{h}.attn.c_proj.bias", (d,)),
            (f"{h}.ln_2.weight", (d,)),
            (f"{h}.ln_2.bias", (d,)),
            (f"{h}.mlp.c_fc.weight", (4 * d, d)),
            (f"{h}.mlp.c_fc.bias", (4 * d,)),
            (f"{h}.mlp.c_proj.weight", (d, 4 * d)),
            (f"{h}.mlp.c_proj.bias", (d,)),
        ]
    shapes += [("transformer.ln_f.weight", (d,)), ("transformer.ln_f.bias", (d,))]
    return shapes


def _group_templates(decay: float) -> tuple[dict, dict]:
    """Hyperparameter dicts of a genuine two-group ``torch.optim.AdamW`` (without params)."""
    import torch

    w = torch.nn.Parameter(torch.zeros(2, 2))
    b = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW(
        [
            {"params": [("w", w)], "weight_decay": decay},
            {"params": [("b", b)], "weight_decay": 0.0},
        ],
        lr=3e-4,
        betas=(0.9, 0.95),
    )
    decay_group, no_decay_group = (
        {k: v for k, v in g.items() if k not in ("params", "param_names")}
        for g in opt.state_dict()["param_groups"]
    )
    return decay_group, no_decay_group


def make_checkpoint(path: Path, params: float, *, step: int = 12_000, epoch: int = 3) -> int:
    """Write the training checkpoint to ``path``; return its number of model parameters.

    The optimizer state dict has the exact structure ``torch.optim.AdamW.state_dict()``
    gives (0-dim float32 ``step``, ``exp_avg``, ``exp_avg_sq``; group keys copied from a real
    AdamW), built directly rather than by running a step on 300M parameters. Values are
    random: weights ~ N(0, 0.02^2), exp_avg ~ N(0, 1e-3^2), exp_avg_sq = (1e-3 N(0, 1))^2.
    """
    import torch

    gen = torch.Generator().manual_seed(0)
    shapes = layout(params)
    decay_hp, no_decay_hp = _group_templates(0.1)

    def randn(shape: tuple[int, ...], scale: float, square: bool = False) -> torch.Tensor:
        t = torch.empty(shape)
        flat = t.view(-1)
        for start in range(0, flat.numel(), 1 << 24):
            chunk = flat[start : start + (1 << 24)]
            chunk.normal_(0.0, scale, generator=gen)
            if square:
                chunk.square_()
        return t

    model = {name: randn(shape, 0.02) for name, shape in shapes}
    decay = [name for name, shape in shapes if len(shape) > 1]
    no_decay = [name for name, shape in shapes if len(shape) <= 1]
    order = decay + no_decay  # torch numbers params group by group
    index = {name: i for i, name in enumerate(order)}
    state = {}
    for name in order:
        shape = model[name].shape
        state[index[name]] = {
            "step": torch.tensor(float(step)),
            "exp_avg": randn(tuple(shape), 1e-3),
            "exp_avg_sq": randn(tuple(shape), 1e-3, square=True),
        }
    param_groups = [
        {"param_names": decay, **decay_hp, "params": [index[n] for n in decay]},
        {"param_names": no_decay, **no_decay_hp, "params": [index[n] for n in no_decay]},
    ]
    ckpt = {
        "model": model,
        "optimizer": {"state": state, "param_groups": param_groups},
        "epoch": epoch,
    }
    torch.save(ckpt, path)
    return sum(t.numel() for t in model.values())


# --------------------------------------------------------------------------- measuring


@dataclass
class Command:
    label: str
    argv: list[str]
    target: bool = False  # the wall/RSS targets apply
    walls: list[float] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)  # bytes
    cpu: list[float] = field(default_factory=list)  # user + sys seconds

    @property
    def wall(self) -> float:
        return statistics.median(self.walls)

    @property
    def peak(self) -> int:
        return max(self.rss)


# Runs argv[2:] with stdout on /dev/null and writes "wall maxrss_kib cpu_s exit_code" to
# argv[1]. A separate small process, because a child's ru_maxrss starts from the RSS of the
# process it was forked from (Linux carries the pre-exec high-water mark over exec): forked
# from this script, which has imported torch, every command would report this script's RSS.
LAUNCHER = """
import os, sys, time
out, argv = sys.argv[1], sys.argv[2:]
null = os.open(os.devnull, os.O_WRONLY)
start = time.perf_counter()
pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=[(os.POSIX_SPAWN_DUP2, null, 1)])
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - start
with open(out, "w") as f:
    f.write(f"{wall} {ru.ru_maxrss} {ru.ru_utime + ru.ru_stime} {os.waitstatus_to_exitcode(status)}")
"""


def run_once(argv: list[str]) -> tuple[float, int, float]:
    """Run ``argv`` in a fresh process; return wall seconds, its peak RSS (bytes), CPU seconds.

    A tiny launcher process spawns the command and reads its rusage with ``os.wait4``, so the
    peak RSS is that one command's own, and the wall time excludes the launcher's start-up.
    """
    with tempfile.NamedTemporaryFile("r", suffix=".txt") as result:
        done = subprocess.run(
            [sys.executable, "-I", "-S", "-c", LAUNCHER, result.name, *argv],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            check=False,
        )
        fields = result.read().split()
    if done.returncode != 0 or len(fields) != 4 or fields[3] != "0":
        raise SystemExit(
            f"command failed: {' '.join(argv)}\n{done.stderr.decode(errors='replace')}"
        )
    wall, rss_kib, cpu = float(fields[0]), int(fields[1]), float(fields[2])
    return wall, rss_kib * 1024, cpu


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def warm_read(path: Path) -> None:
    with path.open("rb") as f:
        while f.read(1 << 24):
            pass


def optckpt_argv() -> list[str]:
    script = Path(sys.executable).parent / "optckpt"
    if script.exists():
        return [str(script)]
    found = shutil.which("optckpt")
    return [found] if found else [sys.executable, "-m", "optckpt"]


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
    cmds.append(Command("`python -c 'import torch'` (baseline)", [py, "-c", "import torch"]))
    return cmds


# --------------------------------------------------------------------------- reporting


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import torch

    return (
        f"{os.cpu_count()} CPUs ({cpu}), {ram:.1f} GiB RAM, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}, torch {torch.__version__}"
    )


def mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


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
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=300e6, help="model parameters (default 300e6)")
    ap.add_argument("--quick", action="store_true", help="small run: 5e6 params, 2 repeats")
    ap.add_argument("--repeats", type=int, default=None, help="runs per command (default 3)")
    ap.add_argument("--workdir", type=Path, help="keep the checkpoint here (reused if present)")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every run")
    ap.add_argument("--no-stats", action="store_true", help="skip `optckpt inspect --stats`")
    args = ap.parse_args(argv)
    params = 5e6 if args.quick else args.params
    repeats = args.repeats or (2 if args.quick else 3)

    if args.cold and not drop_caches():
        ap.error("--cold needs write access to /proc/sys/vm/drop_caches (root)")

    with tempfile.TemporaryDirectory(prefix="optckpt-bench-") as tmp:
        folder = args.workdir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"train-{int(params)}.pt"
        if path.exists():
            print(f"reusing {path}", file=sys.stderr)
        else:
            t0 = time.perf_counter()
            n = make_checkpoint(path, params)
            print(
                f"wrote {path}: {n:,} model params in {time.perf_counter() - t0:.1f}s",
                file=sys.stderr,
            )
        size = path.stat().st_size
        n_params = sum(math.prod(s) for _, s in layout(params))
        cmds = commands(path, stats=not args.no_stats)

        if not args.cold:
            warm_read(path)
            # warm the interpreter, torch's shared libraries and optckpt's modules too
            run_once([sys.executable, "-c", "import torch, optckpt.inspect, optckpt.cli.app"])
        # round-robin, so a burst of load from elsewhere hits every command alike
        for r in range(repeats):
            for c in cmds:
                if args.cold:
                    drop_caches()
                wall, rss, cpu = run_once(c.argv)
                c.walls.append(wall)
                c.rss.append(rss)
                c.cpu.append(cpu)
                print(f"[{r + 1}/{repeats}] {c.label}: {wall:.2f}s, {mb(rss)}", file=sys.stderr)

    cache = (
        "cold (page cache dropped before each run)" if args.cold else "warm (file read once first)"
    )
    print(f"machine: {machine()}")
    print(
        f"checkpoint: {n_params:,} model params, {len(layout(params))} tensors, "
        f"{size / 1e9:.2f} GB on disk; page cache {cache}; {repeats} runs per command\n"
    )
    print(table(cmds))
    print()
    print(verdict(cmds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
