"""``diff`` of the companions of two checkpoints: structure and values.

Companions are paired by key path (``scheduler`` with ``scheduler``); one left over of a kind
on each side is paired with the other (a Trainer folder's ``scheduler.pt`` with a file's
``lr_scheduler``). Their state dicts are compared key by key: a key only one side has, a list
of another length, a value that differs (numbers exactly, or within ``rtol`` / ``atol`` as
``math.isclose`` compares them, when a tolerance is given). Plain Python, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from optckpt.companions.find import Companion
from optckpt.companions.summary import number, plain


@dataclass(frozen=True)
class CompanionDifference:
    """One difference between companions.

    Attributes:
        kind: ``companion_added`` / ``companion_removed`` (only in B / only in A),
            ``companion_kind``, ``companion_class``, ``key_added`` / ``key_removed``,
            ``length`` (a list of another length) or ``value``.
        where: the key path, in A's naming (``scheduler.base_lrs.1``).
        a: the value in A, or ``None``.
        b: the value in B, or ``None``.
    """

    kind: str
    where: str
    a: Any = None
    b: Any = None

    def to_json(self) -> dict[str, Any]:
        """``{"kind", "where", "a", "b"}``, JSON-safe."""
        return {"kind": self.kind, "where": self.where, "a": plain(self.a), "b": plain(self.b)}


def _join(where: str, key: object) -> str:
    return f"{where}.{key}" if where else str(key)


def _same(a: Any, b: Any, tolerance: tuple[float, float] | None) -> bool:
    x, y = number(a), number(b)
    if x is not None and y is not None:
        if math.isnan(x) or math.isnan(y):
            return math.isnan(x) and math.isnan(y)
        if tolerance is None:
            return x == y
        return math.isclose(x, y, rel_tol=tolerance[0], abs_tol=tolerance[1])
    return bool(plain(a) == plain(b))


def _compare(
    a: Any,
    b: Any,
    where: str,
    tolerance: tuple[float, float] | None,
    out: list[CompanionDifference],
) -> None:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in a:
            if key not in b:
                out.append(CompanionDifference("key_removed", _join(where, key), a[key], None))
            else:
                _compare(a[key], b[key], _join(where, key), tolerance, out)
        for key in b:
            if key not in a:
                out.append(CompanionDifference("key_added", _join(where, key), None, b[key]))
    elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            out.append(CompanionDifference("length", where, len(a), len(b)))
            return
        for index, (x, y) in enumerate(zip(a, b)):
            _compare(x, y, _join(where, index), tolerance, out)
    elif not _same(a, b, tolerance):
        out.append(CompanionDifference("value", where, a, b))


def _pairs(
    a: Sequence[Companion], b: Sequence[Companion]
) -> tuple[list[tuple[Companion, Companion]], list[Companion], list[Companion]]:
    """Paired by key, then the one left of a kind on each side; and what is left."""
    by_key = {c.key: c for c in b}
    pairs = [(x, by_key[x.key]) for x in a if x.key in by_key]
    paired = {id(c) for pair in pairs for c in pair}
    left_a = [c for c in a if id(c) not in paired]
    left_b = [c for c in b if id(c) not in paired]
    for kind in ("lr_scheduler", "grad_scaler", "trainer"):
        xs = [c for c in left_a if c.kind == kind]
        ys = [c for c in left_b if c.kind == kind]
        if len(xs) == 1 and len(ys) == 1:
            pairs.append((xs[0], ys[0]))
            left_a.remove(xs[0])
            left_b.remove(ys[0])
    return pairs, left_a, left_b


def diff_companions(
    a: Sequence[Companion],
    b: Sequence[Companion],
    tolerance: tuple[float, float] | None = None,
) -> list[CompanionDifference]:
    """Every difference between the companions of A and those of B.

    Args:
        a, b: the companions of each checkpoint (:func:`optckpt.companions.find_companions`).
        tolerance: ``(rtol, atol)`` for numbers, or ``None`` to compare them exactly.
    """
    pairs, only_a, only_b = _pairs(a, b)
    out = [
        CompanionDifference("companion_removed", c.key or c.kind, c.guess.name, None)
        for c in only_a
    ]
    out += [
        CompanionDifference("companion_added", c.key or c.kind, None, c.guess.name) for c in only_b
    ]
    for x, y in pairs:
        where = x.key or x.kind
        if x.kind != y.kind:
            out.append(CompanionDifference("companion_kind", where, x.kind, y.kind))
            continue
        if x.guess.name != y.guess.name:
            out.append(CompanionDifference("companion_class", where, x.guess.name, y.guess.name))
        _compare(x.state, y.state, where, tolerance, out)
    return out
