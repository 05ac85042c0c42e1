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
4. ``"model config"``: a Hugging Face folder's ``config.json``, its model built without
   weights by :mod:`optckpt.hf_names`: ``named_parameters()`` split by the Trainer's
   weight-decay rule (else in model order), accepted only where every state shape fits and
   the assignment is the only one (:func:`optckpt.hf_names.from_model`).
5. ``"recovered"``: aligned with the model weights of the same file (or ``--model``) by
   :func:`optckpt.alignment.align`, which accepts an assignment only when it is the only one
   possible. Where one alone is ambiguous and the file holds other optimizers over the same
   weights (a Lightning GAN), they are aligned together, each parameter in one optimizer.
6. ``None``: unnamed; callers use stand-ins and every report says so.

:func:`sources_of` gathers what a checkpoint offers for 4 and 5 (:class:`NameSources`).

inspect, diff, remap, resume-step and convert all name parameters here; :func:`pair_parameters`
pairs two state dicts' parameters by name and :func:`rekey` puts one in the keying asked for.
Names are compared with wrapper prefixes stripped as torch's ``_get_fqns`` strips them
(:func:`canonical`, :func:`match_names`), and :func:`to_name_keyed` / :func:`to_id_keyed` turn
one keying into the other: those live in :mod:`optckpt.fqn` and are re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

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

if TYPE_CHECKING:
    import torch

__all__ = [
    "WRAPPER_PREFIXES",
    "AmbiguousNamesError",
    "NameMatch",
    "NameSources",
    "Naming",
    "canonical",
    "carried_names",
    "group_ids",
    "id_shapes",
    "is_name_keyed",
    "match_names",
    "name_parameters",
    "recover",
    "rekey",
    "sources_of",
    "state_shape",
    "to_id_keyed",
    "to_name_keyed",
]

NamesSource = Literal["keys", "param_names", "layout", "model config", "recovered"]
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
        source: ``"keys"``, ``"param_names"``, ``"layout"``, ``"model config"``,
            ``"recovered"``, or ``None``.
        where: for ``"recovered"``, whose weights they were aligned with; for
            ``"model config"``, the config the model was built from.
        how: how they were matched, in words (for ``"recovered"`` and ``"model config"``).
        notes: why a source that could have named them did not (a note for the user).
    """

    names: dict[Any, str] = field(default_factory=dict)
    source: NamesSource | None = None
    where: str = ""
    how: str = ""
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        """Where the names came from, in words (``"param_names"``, ``"the model weights in
        x.pt, aligned by shape and order"``)."""
        if self.source == "recovered":
            return f"the model weights in {self.where}, aligned by shape and order{self.how}"
        if self.source == "model config":
            return f"the model of {self.where}, {self.how}"
        if self.source is None:
            return "nothing (unnamed)"
        return _DESCRIPTIONS[self.source]


@dataclass(frozen=True)
class NameSources:
    """What a checkpoint offers to name an optimizer's parameters besides the state dict
    itself (:func:`sources_of`).

    Attributes:
        model_state: model weights in model order (of the same file), to recover names from.
        siblings: the other optimizer state dicts of the file, over the same weights.
        config_folder: a folder with a Hugging Face ``config.json`` (a Trainer checkpoint).
    """

    model_state: Mapping[str, torch.Tensor] | None = None
    siblings: tuple[Mapping[str, Any], ...] = ()
    config_folder: Path | None = None


def sources_of(checkpoint: Any, state_dict: Mapping[str, Any] | None = None) -> NameSources:
    """What ``checkpoint`` (a :class:`~optckpt.io.Checkpoint`) offers to name the parameters
    of ``state_dict``, one of its optimizers: its model weights, its other optimizers, and
    for a folder with a ``config.json`` (next to its optimizer files) that folder."""
    from optckpt.hf_names import CONFIG_FILE
    from optckpt.layout import model_state_of
    from optckpt.locate import locate_optimizers

    model_state = model_state_of(checkpoint)
    siblings: tuple[Mapping[str, Any], ...] = ()
    if model_state is not None and state_dict is not None:
        siblings = tuple(
            found.state_dict
            for found in locate_optimizers(checkpoint.root)
            if found.state_dict is not state_dict
        )
    folder = None
    if checkpoint.members and checkpoint.sources:
        parent = Path(checkpoint.sources[0]).parent
        if (parent / CONFIG_FILE).is_file():
            folder = parent
    return NameSources(model_state, siblings, folder)


def group_ids(state_dict: Mapping[str, Any]) -> list[list[Any]]:
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


def id_shapes(state_dict: Mapping[str, Any], groups: list[list[Any]]) -> dict[Any, Shape | None]:
    """The shape of the parameter of each ID of ``groups``, as its state tells it."""
    state = state_dict["state"]
    return {pid: state_shape(state.get(pid)) for ids in groups for pid in ids}


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


def _jointly(
    state_dict: Mapping[str, Any],
    siblings: Sequence[Mapping[str, Any]],
    candidates: list[str],
    model_shapes: list[Shape],
) -> dict[Any, int] | None:
    """Positions for ``state_dict``'s IDs when it and its sibling optimizers are aligned
    together with one model's parameters, each parameter in one optimizer (Lightning's
    optimizers over parts of one module); ``None`` unless exactly one assignment fits.

    A sibling whose own names (keys, ``param_names``) are all the model's takes those
    parameters out of the candidates; the others (unnamed, or named relative to a submodule,
    as ``self.generator.named_parameters()`` names them) join as more groups."""
    known = set(candidates)
    taken: set[str] = set()
    groups: list[list[Any]] = []
    shapes: dict[Any, Shape | None] = {}
    for k, sd in enumerate([state_dict, *siblings]):
        named = set(carried_names(sd).values()) if k else set()
        if named and named <= known:
            taken |= named
            continue
        own = group_ids(sd)
        own_shapes = id_shapes(sd, own)
        groups += [[(k, pid) for pid in ids] for ids in own]
        shapes.update({(k, pid): shape for pid, shape in own_shapes.items()})
    keep = [p for p, name in enumerate(candidates) if name not in taken]
    try:
        positions = align(groups, shapes, [model_shapes[p] for p in keep])
    except (NoFit, Ambiguous, Unsure):
        return None
    return {pid: keep[p] for (k, pid), p in positions.items() if k == 0}


def recover(
    state_dict: Mapping[str, Any],
    model_state: Mapping[str, torch.Tensor],
    *,
    where: str = "the checkpoint",
    hint: str = FROM_HINT,
    siblings: Sequence[Mapping[str, Any]] = (),
) -> dict[Any, str]:
    """Names for every ID, aligned with the parameters of a model state dict
    (:func:`optckpt.alignment.align`).

    The candidates are the model state dict's parameters in order, as ``named_parameters()``
    has them (buffers and the second name of a tied weight left out). When the IDs alone fit
    in more than one way and ``siblings`` (the file's other optimizers) are given, all are
    aligned together, each parameter held by one optimizer; that is taken only when it is
    the only assignment.

    Raises:
        AmbiguousNamesError: more than one assignment fits (the message names the IDs and the
            parameters they could be), or one could not be proved the only one; exit 2.
        IncompatibleStateError: no assignment fits (the state was saved for another model).
    """
    return _recover(state_dict, model_state, where, hint, siblings)[0]


def _recover(
    state_dict: Mapping[str, Any],
    model_state: Mapping[str, torch.Tensor],
    where: str,
    hint: str,
    siblings: Sequence[Mapping[str, Any]],
) -> tuple[dict[Any, str], str]:
    from optckpt.layout import model_parameters

    params = model_parameters(model_state)
    candidates = list(params)
    model_shapes = [tuple(t.shape) for t in params.values()]
    groups = group_ids(state_dict)
    shapes = id_shapes(state_dict, groups)
    n = len(shapes)
    ids = f"the checkpoint's {n} parameter IDs (group sizes {[len(g) for g in groups]})"
    weights = f"the {len(candidates)} parameters of the model weights in {where}"
    try:
        positions = align(groups, shapes, model_shapes)
    except NoFit as e:
        raise IncompatibleStateError(
            f"{ids} do not fit {weights} by shape in model order: {e.reason} (were the weights "
            f"saved for another model, or the groups not built in model order?); {hint}"
        ) from None
    except (Ambiguous, Unsure) as e:
        joint = _jointly(state_dict, siblings, candidates, model_shapes) if siblings else None
        if joint is None:
            together = (
                f"; aligned together with the file's {len(siblings)} other optimizer(s), each "
                "parameter in one optimizer, they do not fit in one way only either"
                if siblings
                else ""
            )
            if isinstance(e, Ambiguous):
                shown = [
                    f"ID {pid} could be {candidates[a]} or {candidates[b]}"
                    for pid, a, b in e.choices
                ]
                why = (
                    f"{ids} fit {weights} in more than one way: {_listed(shown, 4)} (parameters "
                    "of equal shape that could be swapped, or without state)"
                )
            else:
                why = (
                    f"cannot prove that {ids} fit {weights} in only one way (IDs "
                    f"{_listed(map(str, e.open_ids))} left open)"
                )
            raise AmbiguousNamesError(f"{why}{together}; {hint}") from None
        positions = joint
        how = f", together with the file's {len(siblings)} other optimizer(s)"
    else:
        how = ""
    return {pid: candidates[positions[pid]] for own in groups for pid in own}, how


def name_parameters(
    state_dict: Mapping[str, Any],
    *,
    layout: Any | None = None,
    model_state: Mapping[str, torch.Tensor] | None = None,
    sources: NameSources | None = None,
    where: str = "the checkpoint",
    hint: str = FROM_HINT,
) -> Naming:
    """Name every parameter ID of ``state_dict`` from the first source that applies.

    Args:
        state_dict: an optimizer state dict (ID-keyed or name-keyed).
        layout: the layout it was saved with (``--from``), a :class:`~optckpt.layout.Layout`.
        model_state: model weights to recover names from (``--model``); else those of
            ``sources``.
        sources: what the checkpoint offers besides (:func:`sources_of`): its model weights,
            its other optimizers, a folder with a Hugging Face ``config.json``.
        where: how messages name the weights' file.
        hint: how messages tell the user to name the parameters instead.

    Returns:
        A :class:`Naming`; ``source`` is ``None`` (and ``names`` empty) when no source
        applies, and ``notes`` say why a model config did not name them.

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
    sources = sources or NameSources()
    notes: list[str] = []
    if sources.config_folder is not None and ids:
        from optckpt.hf_names import NoNames, config_model, from_model

        model, note = config_model(sources.config_folder, len(ids))  # imports transformers
        if model is not None:
            try:
                found, how = from_model(state_dict, model)
                return Naming(found, "model config", model.where, how)
            except NoNames as e:
                note = f"no names from the model of {model.where}: {e}"
        if note:
            notes.append(note)
    if model_state is None:
        model_state = sources.model_state
    if model_state is not None and ids:
        found, how = _recover(state_dict, model_state, where, hint, sources.siblings)
        return Naming(found, "recovered", where, how, tuple(notes))
    return Naming(notes=tuple(notes))


def carried_names(state_dict: Mapping[str, Any]) -> dict[Any, str]:
    """The names a state dict carries itself (its keys, or ``param_names``)."""
    return name_parameters(state_dict).names


KEYINGS = ("ids", "names")


def rekey(
    state_dict: Mapping[str, Any],
    keying: str,
    *,
    model_state: Mapping[str, torch.Tensor] | None = None,
    where: str = "the checkpoint",
    sources: NameSources | None = None,
) -> Mapping[str, Any]:
    """``state_dict`` in the keying asked for (``convert --keying``); itself if already so.

    ``"ids"``: torch's ID-keyed form with ``param_names`` (:func:`to_id_keyed`), which
    ``Optimizer.load_state_dict`` loads. ``"names"``: the FQN-keyed form
    (:func:`to_name_keyed`), which ``set_optimizer_state_dict`` loads; the names come from
    :func:`name_parameters` (``param_names``, or recovered from ``model_state``, or from
    what ``sources`` offers: :func:`sources_of`).

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
    naming = name_parameters(
        state_dict, model_state=model_state, sources=sources, where=where, hint=hint
    )
    if naming.source is None:
        raise UsageError(
            "the state dict's groups carry no param_names and the checkpoint holds no model "
            "state dict, so its parameters have no names to key it by"
            + "".join(f"; {note}" for note in naming.notes)
            + f"; {hint}"
        )
    return to_name_keyed(state_dict, naming.names)
