"""Real torch LR schedulers for the companion tests: every class of torch.optim.lr_scheduler,
built on a real optimizer and stepped, as a training loop would."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim import lr_scheduler as sched

Factory = Callable[[torch.optim.Optimizer], object]


def _decay(epoch: int) -> float:
    return 0.9**epoch


def _keep(epoch: int) -> float:
    return 0.95


def _per_group(optimizer: torch.optim.Optimizer, first: float) -> list[float]:
    """A different value per group: ``first``, twice it, ..."""
    return [first * (i + 1) for i in range(len(optimizer.param_groups))]


SCHEDULERS: dict[str, Factory] = {
    "StepLR": lambda o: sched.StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o: sched.MultiStepLR(o, milestones=[1, 3, 3], gamma=0.5),
    "ExponentialLR": lambda o: sched.ExponentialLR(o, gamma=0.9),
    "CosineAnnealingLR": lambda o: sched.CosineAnnealingLR(o, T_max=10, eta_min=1e-4),
    "CosineAnnealingWarmRestarts": lambda o: sched.CosineAnnealingWarmRestarts(o, T_0=2, T_mult=2),
    "LinearLR": lambda o: sched.LinearLR(o, start_factor=0.25, total_iters=4),
    "ConstantLR": lambda o: sched.ConstantLR(o, factor=0.5, total_iters=2),
    "PolynomialLR": lambda o: sched.PolynomialLR(o, total_iters=6, power=2.0),
    "OneCycleLR": lambda o: sched.OneCycleLR(o, max_lr=_per_group(o, 1.0), total_steps=10),
    "CyclicLR": lambda o: sched.CyclicLR(
        o, base_lr=0.01, max_lr=_per_group(o, 0.1), step_size_up=2
    ),
    "LambdaLR": lambda o: sched.LambdaLR(o, lr_lambda=_decay),
    "MultiplicativeLR": lambda o: sched.MultiplicativeLR(o, lr_lambda=_keep),
    "SequentialLR": lambda o: sched.SequentialLR(
        o, [sched.LinearLR(o, start_factor=0.5, total_iters=2), sched.StepLR(o, 2)], milestones=[2]
    ),
    "ChainedScheduler": lambda o: sched.ChainedScheduler(
        [sched.ConstantLR(o, factor=0.5, total_iters=3), sched.ExponentialLR(o, gamma=0.9)]
    ),
    "ReduceLROnPlateau": lambda o: sched.ReduceLROnPlateau(o, patience=0, min_lr=1e-3),
}
"""Every scheduler class, by name: a factory taking the optimizer."""


class TwoLayers(nn.Module):
    """Two linear layers, one param group each (so per-group entries differ); an optional
    third layer for a model that grew."""

    def __init__(self, extra: bool = False) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)
        self.c = nn.Linear(2, 2) if extra else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b(self.a(x))
        return self.c(h) if self.c is not None else h


def groups_of(model: TwoLayers) -> list[dict[str, object]]:
    """One group per layer, with their own lr (named, so remap knows the parameters)."""
    groups: list[dict[str, object]] = [
        {
            "params": list(model.a.parameters()),
            "lr": 0.1,
            "param_names": [f"a.{n}" for n, _ in model.a.named_parameters()],
        },
        {
            "params": list(model.b.parameters()),
            "lr": 0.05,
            "param_names": [f"b.{n}" for n, _ in model.b.named_parameters()],
        },
    ]
    if model.c is not None:
        groups.append(
            {
                "params": list(model.c.parameters()),
                "lr": 0.02,
                "param_names": [f"c.{n}" for n, _ in model.c.named_parameters()],
            }
        )
    return groups


def make_optimizer(model: TwoLayers) -> torch.optim.Optimizer:
    """SGD with momentum (OneCycleLR and CyclicLR cycle its momentum)."""
    return torch.optim.SGD(groups_of(model), lr=0.1, momentum=0.9)


def step(scheduler: object, optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """One training step: forward, backward, the optimizer's step, the scheduler's."""
    optimizer.zero_grad()
    model(torch.randn(5, 3)).pow(2).mean().backward()
    optimizer.step()
    if isinstance(scheduler, sched.ReduceLROnPlateau):
        scheduler.step(1.0)  # a metric that never improves: it reduces the lr
    else:
        scheduler.step()


def trained(name: str, steps: int = 3) -> tuple[TwoLayers, torch.optim.Optimizer, Any]:
    """A model, its optimizer and a scheduler of class ``name``, ``steps`` steps in."""
    model = TwoLayers()
    optimizer = make_optimizer(model)
    scheduler = SCHEDULERS[name](optimizer)
    for _ in range(steps):
        step(scheduler, optimizer, model)
    return model, optimizer, scheduler
