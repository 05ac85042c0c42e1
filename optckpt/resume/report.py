"""The resume-step report: the checks, the per-group updates, and the ``--json`` object."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optckpt.companions import CompanionReport


@dataclass
class Check:
    """One check: ``ok`` is ``True``/``False``, or ``None`` when skipped."""

    name: str
    ok: bool | None
    detail: str


@dataclass
class GroupUpdate:
    """How far a group's parameters moved over the steps.

    Attributes:
        update_rms: root mean square of (parameters after - before), over the group.
        update_max: largest absolute change of one element.
        effective_lr: for adaptive optimizers, ``update_rms / (steps * grad_rms)``: the
            learning rate plain SGD would need for the same move (``None`` otherwise).
    """

    index: int
    num_params: int
    lr: float | None
    update_rms: float
    update_max: float
    effective_lr: float | None


@dataclass
class ResumeReport:
    """What :func:`resume_step` found (``ok``: every check that ran passed)."""

    path: Path
    key: str
    optimizer: str
    optimizer_from: str
    params_from: str
    steps: int
    seed: int
    checks: list[Check] = field(default_factory=list)
    groups: list[GroupUpdate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    out: Path | None = None
    # the LR schedulers, scalers and counters beside the optimizer (optckpt.companions)
    companions: list[CompanionReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether no check failed or was skipped."""
        return all(c.ok for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` object (README, resume-step)."""
        return {
            "ok": self.ok,
            "path": str(self.path),
            "key": self.key,
            "optimizer": self.optimizer,
            "optimizer_from": self.optimizer_from,
            "params_from": self.params_from,
            "steps": self.steps,
            "seed": self.seed,
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks],
            "groups": [dict(vars(g)) for g in self.groups],
            "notes": self.notes,
            "out": None if self.out is None else str(self.out),
            "companions": [c.to_json() for c in self.companions],
        }


@dataclass
class ResumeRun:
    """What :func:`~optckpt.resume.resume_each` found: one report per optimizer state dict
    checked, in the checkpoint's order (``ok``: all of them passed).

    Attributes:
        path: the checkpoint given.
        results: one :class:`ResumeReport` per optimizer state dict.
        notes: about the run as a whole (which ``checkpoint-N`` was read, nothing written).
        out: where the checkpoint was written, if it was.
    """

    path: Path
    results: list[ResumeReport]
    notes: list[str] = field(default_factory=list)
    out: Path | None = None

    @property
    def ok(self) -> bool:
        """Whether every optimizer state dict passed every check."""
        return all(r.ok for r in self.results)

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` object: one optimizer's report as it is (its ``notes`` after the
        run's), or for several ``{"ok", "path", "results": [report, ...], "notes", "out"}``."""
        out = None if self.out is None else str(self.out)
        if len(self.results) == 1:
            (only,) = self.results
            return {**only.to_json(), "notes": self.notes + only.notes, "out": out}
        return {
            "ok": self.ok,
            "path": str(self.path),
            "results": [r.to_json() for r in self.results],
            "notes": self.notes,
            "out": out,
        }
