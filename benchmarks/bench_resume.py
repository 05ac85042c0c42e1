"""Benchmark `optckpt resume-step` against the obvious torch script, in one run.

On a GPT-2-like AdamW training checkpoint (benchmarks/_common.py, default 100M parameters),
each in a fresh process, round-robin:

* `optckpt resume-step CKPT` (one step on synthetic gradients, every check);
* `optckpt resume-step CKPT --check-torch` (the same, plus the same step by torch.optim);
* the torch script a user would write: `torch.load(weights_only=True, mmap=True)`, clone the
  weights into parameters, `torch.optim.AdamW(...).load_state_dict(...)`, random gradients,
  one `step()`;
* `python -c "import torch"`, the floor.

Reports the median wall time, median CPU time and the largest peak RSS, and the ratios that
matter: resume-step / torch script, and peak RSS over the size of one resumed run (weights +
gradients + optimizer state, what a training process holds).

    python benchmarks/bench_resume.py [--params 100e6] [--repeats 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

from _common import (
    Command,
    layout,
    machine,
    make_checkpoint,
    mb,
    optckpt_argv,
    run_once,
    warm_read,
)

TORCH_SCRIPT = """
import sys, torch
ckpt = torch.load(sys.argv[1], weights_only=True, mmap=True)
weights = ckpt["model"]
sd = ckpt["optimizer"]
params = {n: weights[n].clone() for g in sd["param_groups"] for n in g["param_names"]}
opt = torch.optim.AdamW([{"params": [(n, params[n]) for n in g["param_names"]]} for g in sd["param_groups"]])
opt.load_state_dict(sd)
for p in params.values():
    p.grad = torch.randn_like(p)
opt.step()
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=100e6, help="model parameters (default 100e6)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per command (default 3)")
    ap.add_argument("--workdir", type=Path, help="keep the checkpoint here (reused if present)")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="optckpt-bench-") as tmp:
        folder = args.workdir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        ckpt = folder / f"resume_{int(args.params)}.pt"
        if not ckpt.exists():
            print(f"writing {ckpt} ...", file=sys.stderr)
            make_checkpoint(ckpt, args.params)
        size = ckpt.stat().st_size
        n_params = sum(math.prod(s) for _, s in layout(args.params))
        weights = 4 * n_params
        run_bytes = weights * 4  # weights + gradients + exp_avg + exp_avg_sq, float32
        optckpt = optckpt_argv()
        commands = [
            Command("optckpt resume-step", [*optckpt, "resume-step", str(ckpt)], target=True),
            Command(
                "optckpt resume-step --check-torch",
                [*optckpt, "resume-step", str(ckpt), "--check-torch"],
                target=True,
            ),
            Command(
                "torch script (load, AdamW, 1 step)",
                [sys.executable, "-c", TORCH_SCRIPT, str(ckpt)],
            ),
            Command("python -c 'import torch'", [sys.executable, "-c", "import torch"]),
        ]
        warm_read(ckpt)
        run_once([sys.executable, "-c", "import torch, optckpt.cli.app"])
        for r in range(args.repeats):
            for c in commands:
                wall, rss, cpu = run_once(c.argv)
                c.record(wall, rss, cpu)
                print(
                    f"[{r + 1}/{args.repeats}] {c.label}: {wall:.2f}s, {cpu:.2f}s CPU, {mb(rss)}",
                    file=sys.stderr,
                )

    print(f"machine: {machine()}")
    print(
        f"checkpoint: {n_params:,} parameters, {mb(size)} "
        f"file; one resumed run (weights + grads + AdamW state) = {mb(run_bytes)}\n"
    )
    print("| command | median wall (s) | CPU (s) | peak RSS | RSS / run |")
    print("|---|---:|---:|---:|---:|")
    for c in commands:
        print(
            f"| {c.label} | {c.wall:.2f} | {c.cpu_median:.2f} | {mb(c.peak)} | {c.peak / run_bytes:.2f}x |"
        )
    script = commands[2]
    print()
    for c in commands[:2]:
        print(
            f"- {c.label}: wall {c.wall / script.wall:.2f}x the torch script, CPU "
            f"{c.cpu_median / script.cpu_median:.2f}x, peak RSS {c.peak / script.peak:.2f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
