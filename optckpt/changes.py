"""One change ``remap`` makes to a group's entry, as its plan lists it (hyperparameters and
LR scheduler entries alike), and :func:`majority`, which source group a merged target group
follows (both plans use it); torch-free."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from optckpt.json_values import jsonable

__all__ = ["Change", "majority"]


@dataclass(frozen=True)
class Change:
    """An entry of target group ``group`` whose value ``new`` differs from ``old``, and why.
    A negative ``group`` stands for no group (``null`` in JSON)."""

    group: int
    key: str
    old: Any
    new: Any
    why: str

    def to_json(self) -> dict[str, Any]:
        """``{"group", "key", "old", "new", "why"}``, JSON-safe."""
        return {
            "group": None if self.group < 0 else self.group,
            "key": self.key,
            "old": self.json_value(self.old),
            "new": self.json_value(self.new),
            "why": self.why,
        }

    def json_value(self, value: Any) -> Any:
        """How ``old`` and ``new`` are written in JSON."""
        return jsonable(value)


def majority(sources: Sequence[int]) -> tuple[int, Counter[int]]:
    """The source group most of a target group's carried parameters came from (the lowest
    index among equals), and the count of each."""
    counts = Counter(sources)
    return min(counts, key=lambda g: (-counts[g], g)), counts
