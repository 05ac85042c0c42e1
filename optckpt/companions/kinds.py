"""What LR scheduler and GradScaler state dicts look like, and which class wrote one.

A scheduler's ``state_dict()`` is its ``__dict__`` without the optimizer (torch's
``LRScheduler.state_dict``), so every class leaves its own settings as a fingerprint: ``step_size``
is StepLR's, ``T_0`` CosineAnnealingWarmRestarts', ``_schedule_phases`` OneCycleLR's. The keys
below are torch 2.13's (checked against the installed ``torch.optim.lr_scheduler`` by the
tests); the guess scores a state dict's keys against them as :mod:`optckpt.optim.guess` scores
an optimizer's, so a checkpoint from an older torch, which lacks a few keys, still fits.

Plain Python only (no torch import): ``inspect`` reads companions on its torch-free path too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from optckpt.optim.guess import Guess

# Every LRScheduler subclass keeps these (LRScheduler.__init__ and step()).
BASE_KEYS = frozenset(
    {
        "base_lrs",
        "last_epoch",
        "_step_count",
        "_last_lr",
        "_is_initial",
        "_get_lr_called_within_step",
    }
)
# Keys some torch releases write and others do not: their absence is no evidence.
VERSIONED_KEYS = frozenset(
    {
        "verbose",
        "_is_initial",
        "_get_lr_called_within_step",
        "default_min_lr",
        "_anneal_func_type",
        "anneal_func",
        "_scale_fn_custom",
        "_scale_fn_ref",
        "_step_count",
    }
)

SCHEDULER_KEYS: dict[str, frozenset[str]] = {
    "StepLR": frozenset({"step_size", "gamma"}),
    "MultiStepLR": frozenset({"milestones", "gamma"}),
    "ExponentialLR": frozenset({"gamma"}),
    "CosineAnnealingLR": frozenset({"T_max", "eta_min"}),
    "CosineAnnealingWarmRestarts": frozenset({"T_0", "T_i", "T_mult", "eta_min", "T_cur"}),
    "LinearLR": frozenset({"start_factor", "end_factor", "total_iters"}),
    "ConstantLR": frozenset({"factor", "total_iters"}),
    "PolynomialLR": frozenset({"total_iters", "power"}),
    "OneCycleLR": frozenset(
        {"total_steps", "_schedule_phases", "_anneal_func_type", "cycle_momentum", "use_beta1"}
    ),
    "CyclicLR": frozenset(
        {
            "max_lrs",
            "total_size",
            "step_ratio",
            "mode",
            "gamma",
            "scale_mode",
            "cycle_momentum",
            "use_beta1",
            "base_momentums",
            "max_momentums",
            "_scale_fn_custom",
        }
    ),
    "LambdaLR": frozenset({"lr_lambdas"}),
    "MultiplicativeLR": frozenset({"lr_lambdas"}),
    "SequentialLR": frozenset({"_milestones", "_schedulers"}),
    "ChainedScheduler": frozenset({"_schedulers"}),
    "ReduceLROnPlateau": frozenset(
        {
            "factor",
            "default_min_lr",
            "min_lrs",
            "patience",
            "cooldown",
            "eps",
            "mode_worse",
            "mode",
            "threshold",
            "threshold_mode",
            "best",
            "cooldown_counter",
            "num_bad_epochs",
        }
    ),
}
"""Each ``torch.optim.lr_scheduler`` class's own state keys (beyond :data:`BASE_KEYS`)."""

# The base keys each class keeps besides its own (SequentialLR and ChainedScheduler are no
# ordinary LRScheduler: they keep their children's state; ReduceLROnPlateau keeps two).
_OWN_BASE: dict[str, frozenset[str]] = {
    "SequentialLR": frozenset({"last_epoch", "_last_lr"}),
    "ChainedScheduler": frozenset({"_last_lr"}),
    "ReduceLROnPlateau": frozenset({"last_epoch", "_last_lr"}),
}

PER_GROUP_KEYS = (
    "base_lrs",
    "_last_lr",
    "min_lrs",
    "max_lrs",
    "base_momentums",
    "max_momentums",
    "lr_lambdas",
)
"""Scheduler state keys that hold one entry per param group of the optimizer."""

SCALER_KEYS = frozenset({"scale", "growth_factor", "backoff_factor", "growth_interval"})
"""The keys ``torch.amp.GradScaler.state_dict()`` writes besides ``_growth_tracker``."""


def expected_keys(name: str) -> frozenset[str]:
    """Every key torch 2.13's ``name`` scheduler writes into its state dict."""
    return SCHEDULER_KEYS[name] | _OWN_BASE.get(name, BASE_KEYS)


def is_scaler_state(node: object) -> bool:
    """Whether ``node`` has the shape of a ``torch.amp.GradScaler`` (or ``torch.cuda.amp``)
    state dict: ``scale`` and ``_growth_tracker`` with the growth and backoff settings."""
    return (
        isinstance(node, Mapping)
        and "_growth_tracker" in node
        and {"scale", "growth_factor", "backoff_factor"} <= set(node)
    )


def is_scheduler_state(node: object) -> bool:
    """Whether ``node`` has the shape of an LR scheduler state dict: a per-group ``base_lrs``
    or ``_last_lr`` list with ``last_epoch``, ReduceLROnPlateau's ``min_lrs`` and
    ``num_bad_epochs``, or a SequentialLR / ChainedScheduler's list of such children."""
    if not isinstance(node, Mapping) or "state" in node or "param_groups" in node:
        return False
    if "_schedulers" in node and isinstance(node["_schedulers"], (list, tuple)):
        return bool(node["_schedulers"]) and all(is_scheduler_state(c) for c in node["_schedulers"])
    if "min_lrs" in node and "num_bad_epochs" in node:
        return True
    lists = any(isinstance(node.get(k), (list, tuple)) for k in ("base_lrs", "_last_lr"))
    return lists and isinstance(node.get("last_epoch"), int)


def _score(name: str, keys: set[str]) -> float:
    expected = expected_keys(name) - (VERSIONED_KEYS - keys)
    return len(keys & expected) / len(keys | expected) if keys else 0.0


def guess_scheduler(state: Mapping[str, Any]) -> Guess:
    """Name the ``torch.optim.lr_scheduler`` class that most likely wrote ``state``.

    Returns:
        A :class:`~optckpt.optim.guess.Guess`: confidence 1 when the keys are exactly one
        class's; LambdaLR and MultiplicativeLR keep the same keys, so either is given with
        both candidates and confidence 0.5; ``name`` ``None`` when nothing fits.
    """
    keys = {str(k) for k in state}
    scores = {name: _score(name, keys) for name in SCHEDULER_KEYS}
    ranked = sorted(scores, key=lambda n: -scores[n])
    best = scores[ranked[0]]
    if best < 0.5:
        return Guess(None, round(best, 2), (), f"keys {', '.join(sorted(keys))} fit no scheduler")
    close = tuple(n for n in ranked if best - scores[n] < 0.05)
    if len(close) > 1:
        return Guess(close[0], round(best / 2, 2), close, "several schedulers keep these keys")
    exact = keys == expected_keys(close[0])
    return Guess(close[0], 1.0 if exact else round(best, 2), close, "state keys")
