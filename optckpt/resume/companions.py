"""resume-step's view of the companions: do they agree with the optimizer it resumes?

The same checks as ``inspect``'s warnings (:mod:`optckpt.companions.checks`): a companion
that drives the resumed optimizer (or that no optimizer is sure to own, such as a GradScaler
beside several optimizers) and is certainly inconsistent fails the ``companions agree``
check. ``-o`` writes them as they were read, and says so: the synthetic steps advance the
optimizer only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from optckpt.companions import CompanionReport, checkpoint_companions, report_companions
from optckpt.locate import keyed_optimizers
from optckpt.resume.report import Check


def companions_of(
    checkpoint: Any, key: str, allow_globals: Iterable[str] = ()
) -> list[CompanionReport]:
    """The companions of ``checkpoint`` that belong with the optimizer at ``key`` (those
    that drive it, and those that drive no optimizer for sure)."""
    found = report_companions(
        checkpoint_companions(checkpoint, allow_globals), keyed_optimizers(checkpoint.root)
    )
    return [c for c in found if c.optimizer in (key, None)]


def _named(c: CompanionReport) -> str:
    where = repr(c.key) if c.key else "the top level"
    return f"{c.guess.name or c.kind.replace('_', ' ')} at {where}"


def agreement(companions: list[CompanionReport]) -> Check | None:
    """The ``companions agree`` check; ``None`` without a scheduler or scaler (trainer
    counters alone have nothing to disagree about)."""
    if not any(c.kind != "trainer" for c in companions):
        return None
    wrong = [f"{_named(c)}: {w}" for c in companions for w in c.warnings]
    if wrong:
        return Check("companions agree", False, "; ".join(wrong))
    return Check("companions agree", True, ", ".join(_named(c) for c in companions))


def unchanged_note(companions: list[CompanionReport], out: object) -> list[str]:
    """The note ``-o`` adds: the companions are written as read."""
    if not companions:
        return []
    listed = ", ".join(_named(c) for c in companions)
    return [
        f"{out} keeps {listed} as read: the synthetic steps advanced the optimizer only, "
        "not its scheduler, scaler or counters"
    ]
