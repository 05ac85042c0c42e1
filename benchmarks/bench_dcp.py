"""Benchmark optckpt on DCP folders: ``convert`` against ``dcp_to_torch_save``, ``inspect``
against the folder's size.

Writes two AdamW DCP checkpoints with two ranks (FSDP2, ``fully_shard``, gloo on the CPU):
``LAYERS`` square linear layers with bias, width solved from the size asked for (odd, so every
weight is sharded unevenly), one real AdamW step, ``get_state_dict`` + ``dcp.save``. Model
weights, ``exp_avg`` and ``exp_avg_sq``: 12 bytes per parameter. The large one is ``--size``
GB (2 by default), the small one a quarter of it with the same number of tensors.

Then times, each command in a fresh process (wall time, CPU time, the process's own peak RSS
from ``os.wait4``: see ``_common.run_once``), round-robin:

* ``optckpt convert DCP -o OUT.pt`` and ``-o OUT.safetensors`` (large folder);
* ``dcp_to_torch_save(DCP, OUT.pt)``, torch's own conversion (large folder);
* ``optckpt move DCP --dtype bfloat16`` and ``optckpt remap DCP --to LAYOUT`` (the folder's
  own names and shapes: every state carried), each to ``OUT.pt`` and to a DCP folder
  ``OUT/`` (large folder): they stream as ``convert`` does;
* ``optckpt inspect DCP --json`` on both folders: it reads ``.metadata`` and the small values
  only, so its time should not grow with the size;
* ``python -c "import torch"``, the floor of every command.

Targets (issue 14): convert within 0.25x the wall time of ``dcp_to_torch_save``, and peak RSS
at most 15% of the checkpoint's size above the ``import torch`` floor (the RSS target is
applied to move and remap too).

Usage::

    python benchmarks/bench_dcp.py                     # 2 GB and 0.5 GB, 3 repeats
    python benchmarks/bench_dcp.py --size 0.2 --repeats 1   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

from _common import Command, machine, mb, measure, optckpt_argv

LAYERS = 24
BYTES_PER_PARAM = 12  # float32 weight + exp_avg + exp_avg_sq

PRODUCER = """
import os, sys, torch, warnings
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

def work(rank, world, out, width, layers):
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method="file://" + out + ".rendezvous", rank=rank, world_size=world)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(0)
    with torch.device("meta"):
        model = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    model.to_empty(device="cpu")
    for layer in model:
        nn.init.normal_(layer.weight, std=0.02)
        nn.init.zeros_(layer.bias)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    model(torch.randn(2, width)).square().mean().backward()
    optimizer.step()
    msd, osd = get_state_dict(model, optimizer)
    dcp.save({"model": msd, "optim": osd, "epoch": 1}, checkpoint_id=out)
    dist.barrier()
    os._exit(0)

if __name__ == "__main__":
    out, width, layers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    mp.spawn(work, args=(2, out, width, layers), nprocs=2)
"""

DCP_TO_TORCH_SAVE = (
    "import sys, warnings; warnings.filterwarnings('ignore'); "
    "from torch.distributed.checkpoint.format_utils import dcp_to_torch_save; "
    "dcp_to_torch_save(sys.argv[1], sys.argv[2])"
)


def width_for(size_gb: float) -> int:
    """An odd width whose checkpoint comes to about ``size_gb`` GB."""
    width = round(math.sqrt(size_gb * 1e9 / (BYTES_PER_PARAM * LAYERS)))
    return width | 1


def write_layout(path: Path, width: int) -> None:
    """The producer's model as a remap layout: its names and shapes, one group."""
    params = {}
    for i in range(LAYERS):
        params[f"{i}.weight"] = {"shape": [width, width]}
        params[f"{i}.bias"] = {"shape": [width]}
    path.write_text(json.dumps({"params": params, "groups": [{"params": list(params)}]}))


def produce(folder: Path, size_gb: float) -> int:
    """Write the DCP folder with two ranks; its size in bytes."""
    script = folder.parent / "producer.py"
    script.write_text(PRODUCER)
    code = os.spawnv(
        os.P_WAIT,
        sys.executable,
        [sys.executable, str(script), str(folder), str(width_for(size_gb)), str(LAYERS)],
    )
    if code != 0 or not (folder / ".metadata").exists():
        raise SystemExit(f"the producer failed (exit {code})")
    return sum(p.stat().st_size for p in folder.iterdir())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=float, default=2.0, help="GB of the large checkpoint")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_dcp.", dir=args.workdir))
    try:
        large, small = work / "large", work / "small"
        large_bytes = produce(large, args.size)
        small_bytes = produce(small, args.size / 4)
        optckpt = optckpt_argv()
        py = sys.executable
        layout = work / "layout.json"
        write_layout(layout, width_for(args.size))
        pt, folder = work / "out.pt", work / "out"
        to_pt, to_dcp = ["-o", str(pt)], ["-o", f"{folder}/"]
        move = [*optckpt, "move", str(large), "--dtype", "bfloat16"]
        remap = [*optckpt, "remap", str(large), "--to", str(layout)]
        torch_save = Command(
            "dcp_to_torch_save",
            [py, "-c", DCP_TO_TORCH_SAVE, str(large), str(work / "ref.pt")],
            outputs=[work / "ref.pt"],
        )
        floor_command = Command("python -c 'import torch'", [py, "-c", "import torch"])
        commands = [
            Command("optckpt convert -o OUT.pt", [*optckpt, "convert", str(large), *to_pt], True, outputs=[pt]),
            Command("optckpt convert -o OUT.safetensors", [*optckpt, "convert", str(large), "-o", str(work / "out.safetensors")], True, outputs=[work / "out.safetensors"]),
            torch_save,
            Command("optckpt move --dtype bfloat16 -o OUT.pt", [*move, *to_pt], True, outputs=[pt]),
            Command("optckpt move --dtype bfloat16 -o OUT/ (DCP)", [*move, *to_dcp], True, outputs=[folder]),
            Command("optckpt remap --to LAYOUT -o OUT.pt", [*remap, *to_pt], True, outputs=[pt]),
            Command("optckpt remap --to LAYOUT -o OUT/ (DCP)", [*remap, *to_dcp], True, outputs=[folder]),
            Command(f"optckpt inspect --json ({large_bytes / 1e9:.2f} GB)", [*optckpt, "inspect", str(large), "--json"]),
            Command(f"optckpt inspect --json ({small_bytes / 1e9:.2f} GB)", [*optckpt, "inspect", str(small), "--json"]),
            floor_command,
        ]  # fmt: skip
        inputs = [f for folder in (large, small) for f in folder.iterdir()]
        measure(commands, args.repeats, warm=inputs, imports="torch, optckpt.cli.app")
        floor = floor_command.peak
        reference = torch_save.wall
        print(f"machine: {machine()}")
        print(
            f"large: {large_bytes / 1e9:.2f} GB, small: {small_bytes / 1e9:.2f} GB, {LAYERS} layers"
        )
        print(f"{args.repeats} runs each; wall and CPU are medians, RSS the largest\n")
        print(
            "| command | wall (s) | CPU (s) | peak RSS | RSS above floor | vs dcp_to_torch_save |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        for c in commands:
            above = c.peak - floor
            share = f"{mb(above)} ({above / large_bytes:.0%})" if c.target else mb(above)
            ratio = f"{c.wall / reference:.2f}x" if c.target or c is torch_save else ""
            print(
                f"| {c.label} | {c.wall:.2f} | {c.cpu_median:.2f} | {mb(c.peak)} | {share} | {ratio} |"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
