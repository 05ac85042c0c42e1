"""Benchmark `optckpt resume-step` and `regenerate` against the obvious torch scripts, in one run.

On a GPT-2-like AdamW training checkpoint (benchmarks/_common.py, default 100M parameters),
each in a fresh process, round-robin:

* `optckpt resume-step CKPT` (one step on synthetic gradients, every check);
* `optckpt resume-step CKPT --check-torch` (the same, plus the same step by torch.optim);
* the torch script a user would write: `torch.load(weights_only=True, mmap=True)`, clone the
  weights into parameters, `torch.optim.AdamW(...).load_state_dict(...)`, random gradients,
  one `step()`;
* `optckpt regenerate --optimizer adamw --layout CKPT --steps 1 -o OUT.pt` (the model weights
  of the checkpoint as starting values), against the torch script doing the same: load the
  weights, AdamW, seeded gradients, one step, `torch.save({"model", "optimizer"})`;
* `python -c "import torch"`, the floor.

Reports the median wall time, median CPU time and the largest peak RSS, and the ratios that
matter: resume-step / torch script, and peak RSS above `import torch`'s over the size of one
resumed run (weights + gradients + AdamW state, what a training process holds).

    python benchmarks/bench_resume.py [--params 100e6] [--repeats 3] [--workdir DIR]
"""

from __future__ import annotations

import math
import sys

from _common import (
    Command,
    checkpoint,
    layout,
    machine,
    mb,
    measure,
    optckpt_argv,
    parse_args,
    workdir,
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

REGENERATE_SCRIPT = """
import sys, torch
weights = torch.load(sys.argv[1], weights_only=True, mmap=True)["model"]
params = {n: w.clone() for n, w in weights.items()}
opt = torch.optim.AdamW(list(params.items()))
gen = torch.Generator().manual_seed(1)
for p in params.values():
    p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
opt.step()
torch.save({"model": params, "optimizer": opt.state_dict()}, sys.argv[2])
"""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(__doc__, argv, params=100e6, quick=False)
    with workdir(args.workdir) as folder:
        ckpt = checkpoint(folder / f"resume_{int(args.params)}.pt", args.params)
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
            Command(
                "optckpt regenerate --steps 1",
                [
                    *optckpt,
                    "regenerate",
                    "--optimizer",
                    "adamw",
                    "--layout",
                    str(ckpt),
                    "--steps",
                    "1",
                    "-o",
                    str(folder / "regen.pt"),
                    "--force",
                ],
                target=True,
                outputs=[folder / "regen.pt"],
            ),
            Command(
                "torch script (weights, AdamW, 1 step, save)",
                [sys.executable, "-c", REGENERATE_SCRIPT, str(ckpt), str(folder / "script.pt")],
                outputs=[folder / "script.pt"],
            ),
            Command("python -c 'import torch'", [sys.executable, "-c", "import torch"]),
        ]
        measure(commands, args.repeats, warm=[ckpt], imports="torch, optckpt.cli.app")

    print(f"machine: {machine()}")
    print(
        f"checkpoint: {n_params:,} parameters, {mb(size)} "
        f"file; one resumed run (weights + grads + AdamW state) = {mb(run_bytes)}\n"
    )
    floor = commands[-1].peak  # what `import torch` alone holds
    print("| command | median wall (s) | CPU (s) | peak RSS | (RSS - import torch) / run |")
    print("|---|---:|---:|---:|---:|")
    for c in commands:
        extra = (c.peak - floor) / run_bytes
        print(f"| {c.label} | {c.wall:.2f} | {c.cpu_median:.2f} | {mb(c.peak)} | {extra:.2f}x |")
    print()
    for c, script in (
        (commands[0], commands[2]),
        (commands[1], commands[2]),
        (commands[3], commands[4]),
    ):
        print(
            f"- {c.label}: wall {c.wall / script.wall:.2f}x the torch script, CPU "
            f"{c.cpu_median / script.cpu_median:.2f}x, peak RSS {c.peak / script.peak:.2f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
