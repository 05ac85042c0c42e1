"""Aligning an optimizer's parameter IDs with a model's parameters: the one assignment, or why not.

:func:`align` is the algorithm :mod:`optckpt.names` recovers names with (its docstring gives
the argument). It works on shapes and positions only; naming and messages are
:mod:`optckpt.names`' job.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Ambiguous", "NoFit", "Unsure", "align"]

Shape = tuple[int, ...]


class _Free:
    """Sorted model positions with deletions: the first free one after an index, or the last
    free one before it, in amortised near-constant time after a bisection (two union-find
    "skip" arrays with path halving)."""

    def __init__(self, positions: list[int]) -> None:
        self.pos = positions
        self.rank = {p: k for k, p in enumerate(positions)}
        self.right = list(range(len(positions) + 1))  # right[k]: k if free; len: none
        self.left = list(range(len(positions) + 1))  # left[k + 1]: k if free; left[0]: none

    def copy(self) -> _Free:
        other = _Free.__new__(_Free)
        other.pos, other.rank = self.pos, self.rank
        other.right, other.left = list(self.right), list(self.left)
        return other

    @staticmethod
    def _find(parent: list[int], k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    def after(self, index: int) -> int | None:
        k = self._find(self.right, bisect.bisect_right(self.pos, index))
        return self.pos[k] if k < len(self.pos) else None

    def before(self, index: int) -> int | None:
        k = self._find(self.left, bisect.bisect_left(self.pos, index))
        return self.pos[k - 1] if k > 0 else None

    def delete(self, position: int) -> None:
        k = self.rank[position]
        self.right[k] = k + 1
        self.left[k + 1] = k


class _Slots:
    """The model's parameter positions, free or taken, by shape and in all."""

    def __init__(self, shapes: Sequence[Shape]) -> None:
        self.shapes = shapes
        by_shape: dict[Shape, list[int]] = {}
        for p, s in enumerate(shapes):
            by_shape.setdefault(s, []).append(p)
        self.any = _Free(list(range(len(shapes))))
        self.by_shape = {s: _Free(ps) for s, ps in by_shape.items()}
        self.taken: set[int] = set()

    def copy(self) -> _Slots:
        other = _Slots.__new__(_Slots)
        other.shapes = self.shapes
        other.any = self.any.copy()
        other.by_shape = {s: f.copy() for s, f in self.by_shape.items()}
        other.taken = set(self.taken)
        return other

    def _free(self, shape: Shape | None) -> _Free | None:
        return self.any if shape is None else self.by_shape.get(shape)

    def after(self, shape: Shape | None, index: int) -> int | None:
        free = self._free(shape)
        return None if free is None else free.after(index)

    def before(self, shape: Shape | None, index: int) -> int | None:
        free = self._free(shape)
        return None if free is None else free.before(index)

    def take(self, position: int) -> None:
        self.taken.add(position)
        self.any.delete(position)
        self.by_shape[self.shapes[position]].delete(position)

    def between(self, shape: Shape | None, low: int, high: int) -> tuple[list[int], int]:
        """Free positions of ``shape`` (any, for ``None``) in ``[low, high]``, and how many
        positions were looked at."""
        free = self._free(shape)
        if free is None or low > high:
            return [], 1
        i, j = bisect.bisect_left(free.pos, low), bisect.bisect_right(free.pos, high)
        return [p for p in free.pos[i:j] if p not in self.taken], j - i + 1


@dataclass
class NoFit(Exception):
    """No assignment exists; ``reason`` says where it fails."""

    reason: str


@dataclass
class Ambiguous(Exception):
    """Two assignments exist: ``(ID, its position in one, its position in the other)`` for
    every ID they disagree on."""

    choices: list[tuple[Any, int, int]]


@dataclass
class Unsure(Exception):
    """The budget ran out before one assignment was proved the only one (``open_ids``: the
    IDs left undecided)."""

    open_ids: list[Any]


def _leftmost(
    slots: _Slots, ids: Sequence[Any], shapes: Mapping[Any, Shape | None], pinned: Mapping[Any, int]
) -> tuple[list[int] | None, Any]:
    """The pointwise-smallest embedding of ``ids`` (positions), or ``None`` and the ID at which
    none exists."""
    out: list[int] = []
    cur = -1
    for pid in ids:
        p = pinned.get(pid)
        if p is None:
            p = slots.after(shapes[pid], cur)
            if p is None:
                return None, pid
        elif p <= cur:
            return None, pid
        out.append(p)
        cur = p
    return out, None


def _rightmost(
    slots: _Slots,
    ids: Sequence[Any],
    shapes: Mapping[Any, Shape | None],
    pinned: Mapping[Any, int],
    end: int,
) -> list[int] | None:
    """The pointwise-largest embedding of ``ids``, or ``None``."""
    out: list[int] = []
    cur = end
    for pid in reversed(ids):
        p = pinned.get(pid)
        if p is None:
            p = slots.before(shapes[pid], cur)
            if p is None:
                return None
        elif p >= cur:
            return None
        out.append(p)
        cur = p
    out.reverse()
    return out


def _no_fit(pid: Any, shapes: Mapping[Any, Shape | None]) -> NoFit:
    shape = shapes[pid]
    what = f"the shape of ID {pid}'s state {list(shape)}" if shape is not None else f"ID {pid}"
    return NoFit(f"no parameter left in model order with {what}")


def _propagate(
    groups: Sequence[Sequence[Any]],
    shapes: Mapping[Any, Shape | None],
    slots: _Slots,
    max_rounds: int,
) -> tuple[dict[Any, int], dict[int, tuple[list[int], list[int]]]]:
    """Positions every assignment must give (``forced``), and each group's bounds."""
    end = len(slots.shapes)
    forced: dict[Any, int] = {}
    bounds: dict[int, tuple[list[int], list[int]]] = {}
    pending = set(range(len(groups)))
    for _ in range(max_rounds):
        newly: list[tuple[Any, int]] = []
        for g in sorted(pending):
            ids = groups[g]
            left, failed = _leftmost(slots, ids, shapes, forced)
            if left is None:
                raise _no_fit(failed, shapes)
            right = _rightmost(slots, ids, shapes, forced, end)
            assert right is not None  # an embedding exists, so a largest one does
            bounds[g] = (left, right)
            newly += [
                (pid, a) for pid, a, b in zip(ids, left, right) if a == b and pid not in forced
            ]
        if not newly:
            return forced, bounds
        touched: set[Shape | None] = set()
        owner: dict[int, Any] = {}
        for pid, p in newly:
            if p in owner:  # two IDs that every assignment puts on one parameter: none exists
                raise NoFit(
                    f"IDs {owner[p]} and {pid} (in different groups) both need model parameter {p}"
                )
            owner[p] = pid
            forced[pid] = p
            slots.take(p)
            touched.add(slots.shapes[p])
        # only groups with an open ID that could have used a position just taken
        touched.add(None)
        pending = {
            g
            for g, ids in enumerate(groups)
            if any(pid not in forced and shapes[pid] in touched for pid in ids)
        }
    # rounds used up: bounds may be stale, recompute them once without forcing more
    for g, ids in enumerate(groups):
        if any(pid not in forced for pid in ids):
            left, failed = _leftmost(slots, ids, shapes, forced)
            if left is None:
                raise _no_fit(failed, shapes)
            right = _rightmost(slots, ids, shapes, forced, end)
            assert right is not None
            bounds[g] = (left, right)
    return forced, bounds


def _construct(
    groups: Sequence[Sequence[Any]],
    shapes: Mapping[Any, Shape | None],
    slots: _Slots,
    forced: Mapping[Any, int],
    order: Sequence[int],
    leftmost: bool,
) -> dict[Any, int] | None:
    """One full assignment, built group by group (``None`` if this greedy order finds none)."""
    slots = slots.copy()
    end = len(slots.shapes)
    found = dict(forced)
    for g in order:
        ids = groups[g]
        if all(pid in forced for pid in ids):
            continue
        emb = (
            _leftmost(slots, ids, shapes, forced)[0]
            if leftmost
            else _rightmost(slots, ids, shapes, forced, end)
        )
        if emb is None:
            return None
        for pid, p in zip(ids, emb):
            if pid not in forced:
                found[pid] = p
                slots.take(p)
    return found


def _search(
    groups: Sequence[Sequence[Any]],
    shapes: Mapping[Any, Shape | None],
    slots: _Slots,
    forced: Mapping[Any, int],
    bounds: Mapping[int, tuple[list[int], list[int]]],
    budget: int,
) -> list[dict[Any, int]] | None:
    """Up to two full assignments, by a depth-first search over the open IDs within their
    bounds; ``None`` when the search would cost more than ``budget`` steps."""
    # (ID, group, its index in the group, lowest and highest position it may take)
    steps: list[tuple[Any, int, int, int, int]] = []
    for g, ids in enumerate(groups):
        if g in bounds:
            left, right = bounds[g]
            steps += [
                (pid, g, j, left[j], right[j]) for j, pid in enumerate(ids) if pid not in forced
            ]
    slots = slots.copy()
    chosen: dict[Any, int] = {}
    found: list[dict[Any, int]] = []
    spent = 0

    def options(k: int) -> list[int]:
        nonlocal spent
        pid, g, j, low, high = steps[k]
        ids = groups[g]
        if j > 0:  # after the previous ID of the group, wherever it went
            low = max(low, chosen.get(ids[j - 1], forced.get(ids[j - 1], -1)) + 1)
        if j + 1 < len(ids) and ids[j + 1] in forced:
            high = min(high, forced[ids[j + 1]] - 1)
        if spent > budget:
            return []
        free, looked_at = slots.between(shapes[pid], low, high)
        spent += looked_at
        return free[::-1]  # taken from the end: lowest first

    stack = [options(0)]
    while stack:
        spent += 1
        if spent > budget:
            return None
        k = len(stack) - 1
        pid = steps[k][0]
        if pid in chosen:  # undo this level's previous choice
            slots.taken.discard(chosen.pop(pid))
        if not stack[-1]:
            stack.pop()
            continue
        p = stack[-1].pop()
        chosen[pid] = p
        slots.taken.add(p)
        if k + 1 == len(steps):
            found.append({**forced, **chosen})
            if len(found) == 2:
                return found
            continue
        stack.append(options(k + 1))
    return found


def align(
    groups: Sequence[Sequence[Any]],
    shapes: Mapping[Any, Shape | None],
    model_shapes: Sequence[Shape],
    *,
    max_rounds: int = 32,
    budget: int = 100_000,
) -> dict[Any, int]:
    """The one assignment of IDs to model parameter positions, or an error saying why not.

    The problem: the model's parameters ``0..m-1`` in order, each of a shape; groups of IDs,
    each ID of a shape or of unknown shape (no state yet: it fits anything). An assignment
    maps every ID to a distinct parameter of its shape such that each group's IDs take
    increasing positions: each group is a subsequence of the model's parameters, the groups
    interleave arbitrarily, and parameters no group holds (frozen ones) are left over. This
    covers ``Optimizer(model.parameters())`` (one group) and groups built by filtering
    ``named_parameters()`` (weight decay / no decay, frozen parameters left out).

    The argument:

    1. *Bounds of one group.* For one group over a set of free positions (some positions of
       the group's own IDs pinned), the greedy leftmost embedding ``L`` (each ID takes the
       first free fitting position after the previous one) is pointwise the smallest of all
       embeddings, and the greedy rightmost ``R`` the largest (induction along the group:
       ``L[i]`` is the first fitting position after ``L[i-1] <= E[i-1] < E[i]``). So every
       embedding ``E`` has ``L <= E <= R``, and where ``L[i] == R[i]`` every embedding gives
       ID ``i`` that position. If ``L`` does not exist, no embedding does.
    2. *Propagation.* Restricted to one group, any full assignment is an embedding of that
       group in the positions not forced to another group's IDs. So positions forced by (1)
       are forced in every assignment; they are taken away from the other groups and (1) is
       repeated until nothing new is forced. Two IDs forced onto one position, or a group
       with no embedding, mean no assignment exists.
    3. *What is left open.* If every ID is forced, that is the only possible assignment. If
       not, full assignments are built greedily (groups in order and reversed, leftmost and
       rightmost); two different ones prove ambiguity (with one group this is exact:
       ``L != R`` are two assignments). Otherwise a depth-first search over the open IDs,
       within their bounds, counts assignments up to two within ``budget`` steps (after
       ``max_rounds`` rounds of (2) the bounds are still valid, only wider). When the budget
       runs out, the answer is "unsure", a refusal: a wrong answer is never given.

    Cost: a position lookup is a bisection plus a union-find step over that shape's sorted
    positions, so one round is ``O(n log m)`` for ``n`` IDs; realistic layouts settle in one
    or two rounds (one group: always one), the rounds are capped, and the search is
    budgeted. Memory is ``O(n + m)``.

    Args:
        groups: the IDs of each group, in order (each ID once over all groups).
        shapes: each ID's shape, ``None`` where unknown.
        model_shapes: the shape of each model parameter, in model order.

    Returns:
        ``{ID: position}``.

    Raises:
        NoFit: no assignment exists.
        Ambiguous: more than one does (two of them given).
        Unsure: the rounds or the search budget ran out first (a refusal).
    """
    n = sum(len(g) for g in groups)
    if n > len(model_shapes):
        raise NoFit(f"more IDs ({n}) than parameters ({len(model_shapes)})")
    slots = _Slots(model_shapes)
    forced, bounds = _propagate(groups, shapes, slots, max_rounds)
    open_ids = [pid for ids in groups for pid in ids if pid not in forced]
    if not open_ids:
        return forced
    order = list(range(len(groups)))
    built: list[dict[Any, int]] = []
    for sequence, leftmost in (
        (order, True),
        (order, False),
        (order[::-1], True),
        (order[::-1], False),
    ):
        one = _construct(groups, shapes, slots, forced, sequence, leftmost)
        if one is not None and one not in built:
            built.append(one)
    if len(built) < 2:
        searched = _search(groups, shapes, slots, forced, bounds, budget)
        if searched is None:
            raise Unsure(open_ids)
        if not searched:
            raise NoFit("no assignment keeps every group in model order")
        if len(searched) == 1:
            return searched[0]
        built = searched
    a, b = built[0], built[1]
    raise Ambiguous([(pid, a[pid], b[pid]) for pid in open_ids if a[pid] != b[pid]])
