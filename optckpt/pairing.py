"""Pairing the parameters of two state dicts (``diff``): by name wherever names can be had
(:func:`optckpt.names.name_parameters`), else by position against a named side, else by ID
as torch's ``load_state_dict`` pairs them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from optckpt.fqn import match_names
from optckpt.names import FROM_HINT, NameSources, carried_names, name_parameters
from optckpt.statedict import param_ids

if TYPE_CHECKING:
    import torch

__all__ = ["Pairing", "pair_parameters"]


@dataclass(frozen=True)
class Pairing:
    """How the parameters of two state dicts pair up (``diff``): equal labels are one pair.

    Attributes:
        labels: ``({ID of A: label}, {ID of B: label})``.
        by: ``"name"``, ``"position"`` (one side named, the other not: the n-th ID of one is
            the n-th of the other, as torch's ``load_state_dict`` pairs them) or ``"id"``.
        stripped: wrapper prefixes stripped to pair names (see :func:`match_names`).
    """

    labels: tuple[dict[Any, str], dict[Any, str]]
    by: str
    stripped: list[str] = field(default_factory=list)


def pair_parameters(
    a: Mapping[str, Any],
    b: Mapping[str, Any],
    *,
    layouts: tuple[Any | None, Any | None] = (None, None),
    model_states: tuple[Mapping[str, torch.Tensor] | None, Mapping[str, torch.Tensor] | None] = (
        None,
        None,
    ),
    wheres: tuple[str, str] = ("A", "B"),
    hints: tuple[str, str] = (FROM_HINT, FROM_HINT),
    sources: tuple[NameSources | None, NameSources | None] = (None, None),
) -> Pairing:
    """Pair the parameters of two state dicts, by name wherever names can be had.

    When both carry names (keys or ``param_names``) they pair by name. When only one does, or
    a layout is given for a side, the other side is named from its sources (its layout, its
    model weights, what ``sources`` offers) as :func:`name_parameters` does; recovery
    refusing is an error, since the
    names are needed. When neither carries names and no layout is given, IDs pair with equal
    IDs, as torch's ``load_state_dict`` pairs them (no recovery is tried: two checkpoints of
    one run pair exactly so, even where recovery would be ambiguous). A side that stays
    unnamed pairs by position with a named one. Names pair after :func:`match_names`.

    Raises:
        AmbiguousNamesError, IncompatibleStateError, UsageError: as :func:`name_parameters`,
            for the side that needed naming.
    """
    names = [carried_names(a), carried_names(b)]
    if not (names[0] and names[1]) and (names[0] or names[1] or any(layouts)):
        for side, sd in enumerate((a, b)):
            if not names[side]:
                names[side] = name_parameters(
                    sd,
                    layout=layouts[side],
                    model_state=model_states[side],
                    sources=sources[side],
                    where=wheres[side],
                    hint=hints[side],
                ).names
    ids_a, ids_b = param_ids(a), param_ids(b)
    if names[0] and names[1]:
        matched = match_names(names[0].values(), names[1].values())
        back = {nb: na for na, nb in matched.found.items()}
        labels_b = {pid: back.get(n, n) for pid, n in names[1].items()}
        return Pairing((dict(names[0]), labels_b), "name", matched.stripped)
    if names[0] or names[1]:
        labels_a = {pid: names[0].get(pid, f"ID {pid}") for pid in ids_a}
        labels_b = {pid: names[1].get(pid, f"ID {pid}") for pid in ids_b}
        for pa, pb in zip(ids_a, ids_b):
            label = names[0].get(pa) or names[1][pb]
            labels_a[pa] = labels_b[pb] = label
        return Pairing((labels_a, labels_b), "position")
    return Pairing(({p: f"ID {p}" for p in ids_a}, {p: f"ID {p}" for p in ids_b}), "id")
