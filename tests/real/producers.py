"""Checkpoints written by real training code: the model, the optimizers and the wrappers.

Imported by the tests for :class:`Net` and :func:`train`; run as a script
(``python producers.py KIND OUT``) for the producers that need a process group (DDP, FSDP1):
each runs in a process of its own, rank 0 of a gloo group of world size 1 on the CPU, so the
group never leaks into the test process.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn


class Net(nn.Module):
    """An encoder (linear, LayerNorm, linear), a head, and an optional extra layer."""

    def __init__(self, extra: bool = False) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 8))
        self.extra = nn.Linear(8, 8) if extra else None
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        if self.extra is not None:
            h = h + self.extra(h)
        return self.head(h)


def decay_split(params: Iterable[Any], **hyper: Any) -> list[dict[str, Any]]:
    """The nanoGPT / Trainer weight-decay split: matrices decay, vectors do not. ``params``
    are tensors, or ``(name, tensor)`` pairs (then the groups carry ``param_names``)."""
    items = list(params)

    def dim(p: Any) -> int:
        return (p[1] if isinstance(p, tuple) else p).dim()

    return [
        {"params": [p for p in items if dim(p) >= 2], "weight_decay": 0.1, **hyper},
        {"params": [p for p in items if dim(p) < 2], "weight_decay": 0.0, **hyper},
    ]


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 3) -> None:
    """A few real steps on random data."""
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).pow(2).mean().backward()
        optimizer.step()


def _ddp(out: Path, split: bool, named: bool) -> None:
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(Net())
    params = model.named_parameters() if named else model.parameters()
    groups = decay_split(params) if split else [{"params": list(params)}]
    optimizer = torch.optim.AdamW(groups, lr=1e-2)
    train(model, optimizer)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, out)


def _fsdp(out: Path) -> None:
    from torch.distributed.fsdp import (
        FullOptimStateDictConfig,
        FullStateDictConfig,
        StateDictType,
    )
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    # FSDP1 on the CPU: it looks for an accelerator unless told the device.
    model = FSDP(Net(), device_id=torch.device("cpu"), use_orig_params=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, optimizer)
    with FSDP.state_dict_type(
        model,
        StateDictType.FULL_STATE_DICT,
        FullStateDictConfig(rank0_only=False),
        FullOptimStateDictConfig(rank0_only=False),
    ):
        checkpoint = {
            "model": model.state_dict(),
            "optimizer": FSDP.optim_state_dict(model, optimizer),
        }
    torch.save(checkpoint, out)


def main(kind: str, out: str) -> None:
    """Write the checkpoint of producer ``kind`` to ``out``."""
    import torch.distributed as dist

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as store:
        dist.init_process_group("gloo", init_method=f"file://{store}/store", rank=0, world_size=1)
        try:
            if kind == "fsdp":
                _fsdp(Path(out))
            else:  # ddp, ddp-split, ddp-named
                _ddp(Path(out), split=kind == "ddp-split", named=kind == "ddp-named")
        finally:
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
