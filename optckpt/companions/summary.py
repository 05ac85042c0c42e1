"""What inspect shows of each companion: its ``summary`` (DESIGN.md, inspect JSON).

``lr_scheduler``: ``last_epoch``, ``step_count``, ``last_lrs`` (the lr it set in each group,
``get_last_lr()``), ``base_lrs`` and the class's own settings (``step_size``, ``T_max``, ...;
a nested SequentialLR / ChainedScheduler's ``schedulers``, each with its class);
``grad_scaler``: ``scale``, ``growth_tracker`` and the growth and backoff settings;
``trainer``: ``global_step``, ``epoch`` and the other counters there are (Lightning's
``optimizer_steps`` and ``scheduler_steps`` from its ``loops``, and its
``hyper_parameters``, as data).

Every value is plain JSON (non-finite floats as ``"nan"``, ``"inf"``, ``"-inf"``): no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from optckpt.companions.find import COUNTER_KEYS, Companion
from optckpt.companions.kinds import BASE_KEYS, guess_scheduler
from optckpt.json_values import jsonable

# Private keys worth showing, under their public name.
_RENAMED = {"_milestones": "milestones", "_anneal_func_type": "anneal_strategy"}
_HIDDEN = BASE_KEYS | {"_schedulers", "_schedule_phases", "_scale_fn_custom", "verbose"}


def number(value: Any) -> float | int | None:
    """A Python number from a number or a one-element tensor (duck-typed: no torch import);
    ``None`` for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    item, numel = getattr(value, "item", None), getattr(value, "numel", None)
    if callable(item) and callable(numel) and numel() == 1:
        try:
            found = item()
        except (RuntimeError, ValueError):  # a meta tensor has no value
            return None
        return found if isinstance(found, (int, float)) and not isinstance(found, bool) else None
    return None


def plain(value: Any) -> Any:
    """A JSON-safe form of a companion's value: :func:`~optckpt.json_values.jsonable`, with a
    one-element tensor (a GradScaler's ``scale``) as its number."""
    found = number(value)
    return jsonable(found if found is not None else value)


def scheduler_summary(state: Mapping[str, Any]) -> dict[str, Any]:
    """The summary of one scheduler state dict (children of SequentialLR / ChainedScheduler
    under ``schedulers``, each ``{"class": ..., "summary": ...}``)."""
    out: dict[str, Any] = {
        "last_epoch": plain(state.get("last_epoch")),
        "step_count": plain(state.get("_step_count")),
        "last_lrs": plain(state.get("_last_lr")),
    }
    if "base_lrs" in state:
        out["base_lrs"] = plain(state["base_lrs"])
    for key, value in state.items():
        name = _RENAMED.get(str(key), str(key))
        if key in _HIDDEN or (str(key).startswith("_") and key not in _RENAMED):
            continue
        out[name] = plain(value)
    children = state.get("_schedulers")
    if isinstance(children, (list, tuple)):
        out["schedulers"] = [
            {"class": guess_scheduler(c).name, "summary": scheduler_summary(c)}
            for c in children
            if isinstance(c, Mapping)
        ]
    return out


def scaler_summary(state: Mapping[str, Any]) -> dict[str, Any]:
    """The summary of a GradScaler state dict."""
    return {
        "scale": plain(number(state.get("scale"))),
        "growth_tracker": plain(number(state.get("_growth_tracker"))),
        "growth_factor": plain(state.get("growth_factor")),
        "backoff_factor": plain(state.get("backoff_factor")),
        "growth_interval": plain(state.get("growth_interval")),
    }


def _lightning_steps(loops: Any) -> dict[str, Any]:
    """Optimizer and scheduler steps Lightning's fit loop counted (its progress trackers)."""
    fit = loops.get("fit_loop") if isinstance(loops, Mapping) else None
    if not isinstance(fit, Mapping):
        return {}

    def completed(key: str, *inner: str) -> Any:
        node = fit.get(key)
        for k in (*inner, "total", "completed"):
            node = node.get(k) if isinstance(node, Mapping) else None
        return node

    out = {}
    auto = completed("epoch_loop.automatic_optimization.optim_progress", "optimizer", "step")
    manual = completed("epoch_loop.manual_optimization.optim_step_progress")
    if isinstance(auto, int) or isinstance(manual, int):
        out["optimizer_steps"] = (auto or 0) + (manual or 0)
    scheduler = completed("epoch_loop.scheduler_progress")
    if isinstance(scheduler, int):
        out["scheduler_steps"] = scheduler
    return out


def trainer_summary(state: Mapping[str, Any]) -> dict[str, Any]:
    """The summary of trainer counters (``global_step`` and ``epoch`` always, ``None`` where
    absent)."""
    out: dict[str, Any] = {"global_step": None, "epoch": None}
    for key in (*COUNTER_KEYS, "max_steps"):
        if key in state and number(state[key]) is not None:
            out[key] = plain(state[key])
    out.update(_lightning_steps(state.get("loops")))
    if isinstance(state.get("hyper_parameters"), Mapping):  # Lightning's save_hyperparameters()
        out["hyper_parameters"] = plain(state["hyper_parameters"])
    return out


def summarize(companion: Companion) -> dict[str, Any]:
    """The ``summary`` object of one companion, by its kind."""
    if companion.kind == "lr_scheduler":
        return scheduler_summary(companion.state)
    if companion.kind == "grad_scaler":
        return scaler_summary(companion.state)
    return trainer_summary(companion.state)
