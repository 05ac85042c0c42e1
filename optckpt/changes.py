"""One change ``remap`` makes to a group's entry, as its plan lists it (hyperparameters and
LR scheduler entries alike); torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from optckpt.json_values import jsonable

__all__ = ["Change"]


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
