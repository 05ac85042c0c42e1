"""Code shared by the benchmarks: the checkpoint generator and the per-process launcher.

* :func:`make_checkpoint` writes a GPT-2-like training checkpoint (``{"model": ...,
  "optimizer": AdamW state dict, "epoch": ...}``) of about ``params`` model parameters;
* :func:`run_once` runs one command in a fresh process and returns its wall time, its own
  peak RSS (``ru_maxrss`` from ``os.wait4``) and its CPU time (user + sys);
* :func:`parse_args`, :func:`workdir`, :func:`checkpoint`, :func:`measure` and
  :func:`describe` are the steps every checkpoint benchmark takes (options, folder, input,
  round-robin timing, report header);
* :func:`drop_caches`, :func:`warm_read`, :func:`optckpt_argv`, :func:`machine` and
  :func:`mb` are the small helpers around them.

Imported by the scripts in this folder (run as ``python benchmarks/<script>.py``, which puts
this folder on ``sys.path``).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

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
    outputs: list[Path] = field(default_factory=list)  # files to delete after each run

    def record(self, wall: float, rss: int, cpu: float) -> None:
        self.walls.append(wall)
        self.rss.append(rss)
        self.cpu.append(cpu)

    @property
    def wall(self) -> float:
        return statistics.median(self.walls)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu)

    @property
    def peak(self) -> int:
        return max(self.rss)


# Runs argv[3:] with stdout on /dev/null and writes "wall maxrss_kib cpu_s exit_code" to
# argv[1]. A separate small process, because a child's ru_maxrss starts from the RSS of the
# process it was forked from (Linux carries the pre-exec high-water mark over exec): forked
# from this script, which has imported torch, every command would report this script's RSS.
# Before the clock starts, a child of it maps, faults in and unmaps argv[2] bytes of memory
# (see run_once's ``prime``).
LAUNCHER = """
import mmap, os, sys, time
out, prime, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
if prime:  # in a child of its own: the command's ru_maxrss would start from this one's
    child = os.fork()
    if child == 0:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
        mmap.mmap(-1, prime, flags=flags).close()
        os._exit(0)
    os.waitpid(child, 0)
null = os.open(os.devnull, os.O_WRONLY)
start = time.perf_counter()
pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=[(os.POSIX_SPAWN_DUP2, null, 1)])
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - start
with open(out, "w") as f:
    f.write(f"{wall} {ru.ru_maxrss} {ru.ru_utime + ru.ru_stime} {os.waitstatus_to_exitcode(status)}")
"""


def run_once(argv: list[str], *, prime: int = 0) -> tuple[float, int, float]:
    """Run ``argv`` in a fresh process; return wall seconds, its peak RSS (bytes), CPU seconds.

    A tiny launcher process spawns the command and reads its rusage with ``os.wait4``, so the
    peak RSS is that one command's own, and the wall time excludes the launcher's start-up.

    ``prime``: bytes of memory the launcher faults in and frees just before the clock starts,
    so that the first ``prime`` bytes of new memory the command takes (page cache for what it
    writes, mostly) are pages the hypervisor already backs, whatever ran before (see
    :func:`reported_mib`). Bounded by ``MemFree`` less 512 MiB, so that it never evicts
    cached inputs.
    """
    prime = max(0, min(prime, free_memory() - (512 << 20)))
    with tempfile.NamedTemporaryFile("r", suffix=".txt") as result:
        done = subprocess.run(
            [sys.executable, "-I", "-S", "-c", LAUNCHER, result.name, str(prime), *argv],
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


def free_memory() -> int:
    """``MemFree`` of ``/proc/meminfo`` in bytes (0 where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemFree:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# Free page reporting (virtio-balloon): the guest hands free memory back to the hypervisor
# a second or more after it is freed; touching such a page again costs a fault on the host.
REPORTED_KIB = Path("/sys/module/page_reporting/parameters/reported_kib")


def reported_mib() -> float:
    """MiB of free memory this guest has handed back to its hypervisor so far (free page
    reporting), or 0 where the kernel does not say. On the project's VMs, a 3 GB copy into
    pages handed back this way took 4-6 s instead of 0.5 s: the difference between two
    commands can be which of them found such pages."""
    try:
        return int(REPORTED_KIB.read_text()) / 1024
    except (OSError, ValueError):
        return 0.0


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


# --------------------------------------------------------------------------- the steps


def parse_args(
    doc: str,
    argv: list[str] | None,
    *,
    params: float,
    repeats: int = 3,
    quick: bool = True,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """The options every checkpoint benchmark takes, parsed; ``extra`` adds a script's own.

    ``--params``, ``--repeats`` and ``--workdir``, plus ``--quick`` (5e6 params, 2 repeats)
    and ``--cold`` (drop the page cache before every run; needs root) where ``quick``.
    ``args.params`` and ``args.repeats`` come back resolved (``--quick`` applied).
    """
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument(
        "--params", type=float, default=params, help=f"model parameters (default {params:.0e})"
    )
    ap.add_argument(
        "--repeats", type=int, default=None, help=f"runs per command (default {repeats})"
    )
    ap.add_argument("--workdir", type=Path, help="keep the inputs here (reused if present)")
    if quick:
        ap.add_argument("--quick", action="store_true", help="small run: 5e6 params, 2 repeats")
        ap.add_argument("--cold", action="store_true", help="drop the page cache before every run")
    if extra is not None:
        extra(ap)
    args = ap.parse_args(argv)
    args.quick = getattr(args, "quick", False)
    args.cold = getattr(args, "cold", False)
    if args.quick:
        args.params = 5e6
    args.repeats = args.repeats or (2 if args.quick else repeats)
    if args.cold and not drop_caches():
        ap.error("--cold needs write access to /proc/sys/vm/drop_caches (root)")
    return args


@contextmanager
def workdir(folder: Path | None) -> Iterator[Path]:
    """``folder`` (created if missing, kept afterwards), or a temporary one removed at the end."""
    with tempfile.TemporaryDirectory(prefix="optckpt-bench-") as tmp:
        path = folder or Path(tmp)
        path.mkdir(parents=True, exist_ok=True)
        yield path


def checkpoint(path: Path, params: float) -> Path:
    """``path``, written by :func:`make_checkpoint` unless it is already there (then reused)."""
    if path.exists():
        print(f"reusing {path}", file=sys.stderr)
    else:
        t0 = time.perf_counter()
        n = make_checkpoint(path, params)
        print(
            f"wrote {path}: {n:,} model params in {time.perf_counter() - t0:.1f}s",
            file=sys.stderr,
        )
    return path


def measure(
    cmds: list[Command],
    repeats: int,
    *,
    warm: list[Path],
    imports: str,
    cold: bool = False,
    prime: int = 0,
) -> None:
    """Run every command ``repeats`` times, recording each run into its Command.

    Every round runs each command once, in an order shuffled afresh each round (seeded, so
    a rerun repeats it): a burst of load from other processes hits every command alike, and
    no command always follows the same one (what ran just before changes which memory and
    disk state a command starts from). Warm (the default): the ``warm`` files are read and
    ``python -c "import <imports>"`` run once first, so every command finds them cached;
    ``cold``: the page cache is dropped before every run instead. After each run its outputs
    (files or folders) are deleted and the file system synced, untimed, so no command pays
    for an earlier one's write-back. ``prime``: see :func:`run_once` (the size of the largest
    output, for a benchmark whose commands write files).
    """
    if not cold:
        for path in warm:
            warm_read(path)
        run_once([sys.executable, "-c", f"import {imports}"])
    order = random.Random(17)
    for r in range(repeats):
        for c in order.sample(cmds, len(cmds)):
            if cold:
                drop_caches()
            before = reported_mib()
            wall, rss, cpu = run_once(c.argv, prime=prime)
            handed_back = reported_mib() - before
            c.record(wall, rss, cpu)
            for o in c.outputs:
                if o.is_dir():
                    shutil.rmtree(o)
                else:
                    o.unlink(missing_ok=True)
            os.sync()
            print(
                f"[{r + 1}/{repeats}] {c.label}: {wall:.2f}s wall, {cpu:.2f}s CPU, {mb(rss)}, "
                f"load {os.getloadavg()[0]:.2f}, {handed_back:.0f} MiB handed back meanwhile",
                file=sys.stderr,
            )


def describe(params: float, size: int, repeats: int, *, cold: bool) -> str:
    """The report's header: the machine, the checkpoint, the page cache and the repeats."""
    n_params = sum(math.prod(s) for _, s in layout(params))
    cache = "cold (page cache dropped before each run)" if cold else "warm (inputs read once first)"
    return (
        f"machine: {machine()}\n"
        f"checkpoint: {n_params:,} model params, {len(layout(params))} tensors, "
        f"{size / 1e9:.2f} GB on disk; page cache {cache}; {repeats} runs per command\n"
    )
