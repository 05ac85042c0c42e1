"""One report per companion, as ``inspect`` shows it and ``inspect --json`` writes it.

``companions[]`` of DESIGN.md's inspect JSON: ``{"key", "kind", "class", "summary"}``, plus
``"class_guess"`` (confidence, candidates, reason, as ``optimizer_guess``), ``"optimizer"``
(the key of the optimizer it drives, when that is certain), ``"warnings"`` (certainly
inconsistent) and ``"observations"`` (counts side by side that depend on the training loop).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optckpt.companions.checks import observations, pair, scaler_warnings, scheduler_warnings
from optckpt.companions.find import Companion, find_in_folder, find_in_tree
from optckpt.companions.summary import summarize
from optckpt.optim.guess import Guess


@dataclass
class CompanionReport:
    """What inspect shows of one companion."""

    key: str
    kind: str
    guess: Guess
    summary: dict[str, Any]
    optimizer: str | None = None
    warnings: list[str] = field(default_factory=list)
    observations: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The ``companions[]`` entry of ``inspect --json``."""
        return {
            "key": self.key,
            "kind": self.kind,
            "class": self.guess.name,
            "class_guess": {
                "confidence": self.guess.confidence,
                "candidates": list(self.guess.candidates),
                "reason": self.guess.reason,
            },
            "optimizer": self.optimizer,
            "summary": self.summary,
            "warnings": self.warnings,
            "observations": self.observations,
        }


def find_companions(
    root: Any,
    folder: Path | None = None,
    members: Iterable[str] = (),
    allow_globals: Iterable[str] = (),
    describe: bool = False,
) -> list[Companion]:
    """Every companion of a checkpoint: in its tree ``root`` (see
    :func:`~optckpt.companions.find.find_in_tree`) and, for a training ``folder``, in the
    companion files among its ``members``.

    Raises:
        UnreadableCheckpointError, UnsafeCheckpointError: a companion file cannot be read.
    """
    found = find_in_tree(root)
    if folder is not None:
        found += find_in_folder(folder, members, allow_globals, describe)
    return found


def checkpoint_companions(
    checkpoint: Any, allow_globals: Iterable[str] = (), describe: bool = False
) -> list[Companion]:
    """Every companion of a checkpoint as :func:`optckpt.io.load_checkpoint` reads it (its
    ``root``; for a training folder, whose ``members`` are listed, its companion files too,
    read without torch where they can be with ``describe``).

    Raises:
        UnreadableCheckpointError, UnsafeCheckpointError: a companion file cannot be read.
    """
    folder = Path(checkpoint.path) if checkpoint.members else None
    return find_companions(checkpoint.root, folder, checkpoint.members, allow_globals, describe)


def report_companion(
    companion: Companion, optimizers: Sequence[tuple[str, Mapping[str, Any]]]
) -> CompanionReport:
    """Summarize one companion and check it against the optimizer it drives.

    Args:
        companion: as found.
        optimizers: every optimizer state dict of the checkpoint, ``(key, state dict)``.
    """
    key = (
        pair(companion, optimizers) if companion.kind != "trainer" or len(optimizers) == 1 else None
    )
    optimizer = dict(optimizers).get(key) if key is not None else None
    warnings: list[str] = []
    if companion.kind == "lr_scheduler" and optimizer is not None:
        warnings = scheduler_warnings(companion, optimizer)
    elif companion.kind == "grad_scaler":
        warnings = scaler_warnings(companion)
    return CompanionReport(
        key=companion.key,
        kind=companion.kind,
        guess=companion.guess,
        summary=summarize(companion),
        optimizer=key,
        warnings=warnings,
        observations=observations(companion, optimizer),
    )


def report_companions(
    companions: Iterable[Companion], optimizers: Sequence[tuple[str, Mapping[str, Any]]]
) -> list[CompanionReport]:
    """:func:`report_companion` for each companion, in the order found."""
    return [report_companion(c, optimizers) for c in companions]
