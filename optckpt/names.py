"""The one place that names parameters: sources of names, recovery by alignment.

A parameter's identity is its fully qualified name (FQN), as ``torch.distributed.checkpoint``
uses it. :func:`name_parameters` names every ID of an optimizer state dict from the first
source that applies (DESIGN.md, "Names"), and says which (:attr:`Naming.source`):

1. ``"keys"``: a name-keyed state dict (FSDP's ``optim_state_dict``,
   ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``): ``state`` keyed by
   FQN strings, ``params`` listing them. The keys are the names.
2. ``"param_names"``: the groups' ``param_names`` (an optimizer built from
   ``named_parameters()``).
3. ``"layout"``: the ``--from`` layout, read group by group in ID order.
4. ``"recovered"``: aligned with the model weights of the same file (or ``--model``) by
   :func:`optckpt.alignment.align`, which accepts an assignment only when it is the only one
   possible.
5. ``None``: unnamed; callers use stand-ins and every report says so.

inspect, diff, remap, resume-step and convert all name parameters here; :func:`pair_parameters`
pairs two state dicts' parameters by name and :func:`rekey` puts one in the keying asked for.
Names are compared with wrapper prefixes stripped as torch's ``_get_fqns`` strips them
(:func:`canonical`, :func:`match_names`), and :func:`to_name_keyed` / :func:`to_id_keyed` turn
one keying into the other: those live in :mod:`optckpt.fqn` and are re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from optckpt.alignment import Ambiguous, NoFit, Unsure, align
from optckpt.errors import IncompatibleStateError, UsageError
from optckpt.fqn import (  # re-exported (__all__): name forms and keyings live in optckpt.fqn
    WRAPPER_PREFIXES,
    NameMatch,
    _listed,
    canonical,
    is_name_keyed,
    match_names,
    to_id_keyed,
    to_name_keyed,
)
from optckpt.statedict import names_of, param_ids

__all__ = [
    "WRAPPER_PREFIXES",
    "AmbiguousNamesError",
    "NameMatch",
    "Naming",
    "Pairing",
    "canonical",
    "is_name_keyed",
    "match_names",
    "name_parameters",
    "pair_parameters",
    "recover",
    "rekey",
    "state_shape",
    "to_id_keyed",
    "to_name_keyed",
]

NamesSource = Literal["keys", "param_names", "layout", "recovered"]
Shape = tuple[int, ...]

FROM_HINT = "pass --from OLD_LAYOUT (the layout the checkpoint was saved with) to name them"


class AmbiguousNamesError(UsageError):
    """The IDs fit the model's parameters in more than one way (or not provably in one)."""


# --- optimizer facts --------------------------------------------------------------------------


def state_shape(state: Any) -> Shape | None:
    """The shape of the parameter a state belongs to, as its tensors tell it (``None``: unknown,
    which fits any parameter).

    The one call site of the optimizer facts that naming reads (:mod:`optckpt.optim.specs`):
    a state key with the parameter's shape, or Adafactor's factored ``row_var`` and
    ``col_var``. LBFGS's flat vectors and scalar state tell nothing.
    """
    from optckpt.optim.specs import param_shape_from_state

    return param_shape_from_state(None, state)


# --- naming -----------------------------------------------------------------------------------


_DESCRIPTIONS = {
    "keys": "the state dict's keys",
    "param_names": "param_names",
    "layout": "the --from layout",
}


@dataclass(frozen=True)
class Naming:
    """Names of a state dict's parameter IDs and their source.

    Attributes:
        names: ``{ID: name}`` for every ID in the groups; empty when unnamed.
        source: ``"keys"``, ``"param_names"``, ``"layout"``, ``"recovered"``, or ``None``.
        where: for ``"recovered"``, whose weights they were aligned with.
    """

    names: dict[Any, str] = field(default_factory=dict)
    source: NamesSource | None = None
    where: str = ""

    def describe(self) -> str:
        """Where the names came from, in words (``"param_names"``, ``"the model weights in
        x.pt, aligned by shape and order"``)."""
        if self.source == "recovered":
            return f"the model weights in {self.where}, aligned by shape and order"
        if self.source is None:
            return "nothing (unnamed)"
        return _DESCRIPTIONS[self.source]


def _group_ids(state_dict: Mapping[str, Any]) -> list[list[Any]]:
    """Each group's IDs in order, each ID once over all groups (its first listing)."""
    seen: set[Any] = set()
    groups = []
    for group in state_dict["param_groups"]:
        ids = []
        for pid in group["params"]:
            if pid not in seen:
                seen.add(pid)
                ids.append(pid)
        groups.append(ids)
    return groups


def _from_layout(state_dict: Mapping[str, Any], layout: Any) -> dict[Any, str]:
    sizes = [len(g["params"]) for g in state_dict["param_groups"]]
    wanted = [len(g["params"]) for g in layout.groups]
    if sizes != wanted:
        raise UsageError(f"--from layout has groups of {wanted} parameters, the checkpoint {sizes}")
    flat_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
    found: dict[Any, str] = dict(zip(flat_ids, layout.names()))
    wrong = [
        f"{name} is {list(layout.params[name].shape)} there, the state of ID {pid} {list(shape)}"
        for pid, name in found.items()
        if (shape := state_shape(state_dict["state"].get(pid))) is not None
        and shape != layout.params[name].shape
    ]
    if wrong:
        raise UsageError(
            "--from layout does not fit the checkpoint: "
            + "; ".join(wrong[:5])
            + (f" ... ({len(wrong)} in all)" if len(wrong) > 5 else "")
        )
    return found


def recover(
    state_dict: Mapping[str, Any],
    model_state: Mapping[str, torch.Tensor],
    *,
    where: str = "the checkpoint",
    hint: str = FROM_HINT,
) -> dict[Any, str]:
    """Names for every ID, aligned with the parameters of a model state dict
    (:func:`optckpt.alignment.align`).

    The candidates are the model state dict's parameters in order, as ``named_parameters()``
    has them (buffers and the second name of a tied weight left out).

    Raises:
        AmbiguousNamesError: more than one assignment fits (the message names the IDs and the
            parameters they could be), or one could not be proved the only one; exit 2.
        IncompatibleStateError: no assignment fits (the state was saved for another model).
    """
    from optckpt.layout import model_parameters

    params = model_parameters(model_state)
    candidates = list(params)
    groups = _group_ids(state_dict)
    state = state_dict["state"]
    shapes = {pid: state_shape(state.get(pid)) for ids in groups for pid in ids}
    n = len(shapes)
    ids = f"the checkpoint's {n} parameter IDs (group sizes {[len(g) for g in groups]})"
    weights = f"the {len(candidates)} parameters of the model weights in {where}"
    try:
        positions = align(groups, shapes, [tuple(t.shape) for t in params.values()])
    except NoFit as e:
        raise IncompatibleStateError(
            f"{ids} do not fit {weights} by shape in model order: {e.reason} (were the weights "
            f"saved for another model, or the groups not built in model order?); {hint}"
        ) from None
    except Ambiguous as e:
        shown = [f"ID {pid} could be {candidates[a]} or {candidates[b]}" for pid, a, b in e.choices]
        raise AmbiguousNamesError(
            f"{ids} fit {weights} in more than one way: {_listed(shown, 4)} (parameters of "
            f"equal shape that could be swapped, or without state); {hint}"
        ) from None
    except Unsure as e:
        raise AmbiguousNamesError(
            f"cannot prove that {ids} fit {weights} in only one way (IDs "
            f"{_listed(map(str, e.open_ids))} left open); {hint}"
        ) from None
    return {pid: candidates[p] for pid, p in positions.items()}


def name_parameters(
    state_dict: Mapping[str, Any],
    *,
    layout: Any | None = None,
    model_state: Mapping[str, torch.Tensor] | None = None,
    where: str = "the checkpoint",
    hint: str = FROM_HINT,
) -> Naming:
    """Name every parameter ID of ``state_dict`` from the first source that applies.

    Args:
        state_dict: an optimizer state dict (ID-keyed or name-keyed).
        layout: the layout it was saved with (``--from``), a :class:`~optckpt.layout.Layout`.
        model_state: model weights to recover names from (of the same file, or ``--model``).
        where: how messages name the weights' file.
        hint: how messages tell the user to name the parameters instead.

    Returns:
        A :class:`Naming`; ``source`` is ``None`` (and ``names`` empty) when no source applies.

    Raises:
        UsageError: a ``layout`` that does not fit the groups or the state's shapes.
        AmbiguousNamesError: recovery finds more than one assignment (see :func:`recover`).
        IncompatibleStateError: recovery finds none.
    """
    ids = param_ids(state_dict)
    if is_name_keyed(state_dict):
        return Naming({pid: pid for pid in ids}, "keys")
    named = names_of(state_dict)
    if ids and all(pid in named for pid in ids):
        return Naming({pid: named[pid] for pid in ids}, "param_names")
    if layout is not None:
        return Naming(_from_layout(state_dict, layout), "layout")
    if model_state is not None and ids:
        return Naming(recover(state_dict, model_state, where=where, hint=hint), "recovered", where)
    return Naming()


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


def _direct(state_dict: Mapping[str, Any]) -> dict[Any, str]:
    """The names a state dict carries itself (its keys, or ``param_names``)."""
    return name_parameters(state_dict).names


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
) -> Pairing:
    """Pair the parameters of two state dicts, by name wherever names can be had.

    When both carry names (keys or ``param_names``) they pair by name. When only one does, or
    a layout is given for a side, the other side is named from its sources (its layout, its
    model weights) as :func:`name_parameters` does; recovery refusing is an error, since the
    names are needed. When neither carries names and no layout is given, IDs pair with equal
    IDs, as torch's ``load_state_dict`` pairs them (no recovery is tried: two checkpoints of
    one run pair exactly so, even where recovery would be ambiguous). A side that stays
    unnamed pairs by position with a named one. Names pair after :func:`match_names`.

    Raises:
        AmbiguousNamesError, IncompatibleStateError, UsageError: as :func:`name_parameters`,
            for the side that needed naming.
    """
    names = [_direct(a), _direct(b)]
    if not (names[0] and names[1]) and (names[0] or names[1] or any(layouts)):
        for side, sd in enumerate((a, b)):
            if not names[side]:
                names[side] = name_parameters(
                    sd,
                    layout=layouts[side],
                    model_state=model_states[side],
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


KEYINGS = ("ids", "names")


def rekey(
    state_dict: Mapping[str, Any],
    keying: str,
    *,
    model_state: Mapping[str, torch.Tensor] | None = None,
    where: str = "the checkpoint",
) -> Mapping[str, Any]:
    """``state_dict`` in the keying asked for (``convert --keying``); itself if already so.

    ``"ids"``: torch's ID-keyed form with ``param_names`` (:func:`to_id_keyed`), which
    ``Optimizer.load_state_dict`` loads. ``"names"``: the FQN-keyed form
    (:func:`to_name_keyed`), which ``set_optimizer_state_dict`` loads; the names come from
    :func:`name_parameters` (``param_names``, or recovered from ``model_state``).

    Raises:
        UsageError: an unknown keying, or an ID-keyed state dict that cannot be named.
        AmbiguousNamesError, IncompatibleStateError: as :func:`name_parameters`.
    """
    if keying not in KEYINGS:
        raise UsageError(f"--keying {keying!r}: expected ids or names")
    if (keying == "names") == is_name_keyed(state_dict) or not param_ids(state_dict):
        return state_dict
    if keying == "ids":
        return to_id_keyed(state_dict)
    hint = (
        "name them first: `optckpt remap PATH --to OLD_LAYOUT --from OLD_LAYOUT -o NAMED` "
        "writes groups with param_names"
    )
    naming = name_parameters(state_dict, model_state=model_state, where=where, hint=hint)
    if naming.source is None:
        raise UsageError(
            "the state dict's groups carry no param_names and the checkpoint holds no model "
            f"state dict, so its parameters have no names to key it by; {hint}"
        )
    return to_name_keyed(state_dict, naming.names)
