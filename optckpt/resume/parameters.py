"""The parameters a resume step loads the state onto: the model weights matched by name, or
seeded stand-ins with the state's shapes."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from optckpt.errors import IncompatibleStateError
from optckpt.layout import model_parameters
from optckpt.names import NameSources, match_names, name_parameters
from optckpt.optim.specs import flat_state, param_dtype_from_state, param_shape_from_state
from optckpt.statedict import REMAP_HINT, param_ids
from optckpt.synthetic import seeded_parameters


@dataclass
class Params:
    """The live parameters by ID, what to compare them with afterwards, and their origin.

    ``names`` are the parameters' names (reports label IDs with them); ``weights`` the key of
    each ID's tensor in the model weights (a name, or a wrapper-prefixed form of it).
    """

    by_id: dict[Any, torch.Tensor]
    names: dict[Any, str]
    before: Callable[[], dict[Any, torch.Tensor]]
    source: str
    notes: list[str]
    weights: dict[Any, str] = field(default_factory=dict)


# How each source of names matched the IDs to the weights, for the report.
_HOW = {
    "keys": "by the state dict's keys (name-keyed)",
    "param_names": "by param_names",
    "layout": "by the --from layout",
    "model config": "by the names of the model built from config.json",
    "recovered": "by state shape in model order (no param_names)",
}


class Unnamed(Exception):
    """Weights sorted by name, and nothing names the parameters (``notes``: why a source
    that could have did not)."""

    def __init__(self, notes: tuple[str, ...]) -> None:
        super().__init__("unnamed")
        self.notes = notes


def params_from_weights(
    state_dict: Mapping[str, Any],
    weights: Mapping[str, torch.Tensor],
    where: str,
    layout: Any | None = None,
    sources: NameSources | None = None,
    ordered: bool = True,
) -> Params:
    """Match IDs to model weights by the names :func:`optckpt.names.name_parameters` gives
    (wrapper prefixes stripped where only that makes them match).

    Args:
        sources: what the checkpoint offers to name them (:func:`optckpt.names.sources_of`).
        ordered: the weights are in the model's order, so names may be recovered from them;
            ``False`` for weights sorted by name (plain safetensors), matched by name only.

    Raises:
        IncompatibleStateError: a named parameter is not in the weights, or the IDs fit no
            parameters of the weights (torch's group size mismatch).
        AmbiguousNamesError: the IDs fit the weights in more than one way (exit 2).
        Unnamed: ``ordered`` is false and nothing names the parameters.
    """
    for index, group in enumerate(state_dict["param_groups"]):
        if "param_names" in group and len(group["param_names"]) != len(group["params"]):
            raise IncompatibleStateError(
                f"group {index} lists {len(group['params'])} parameter IDs but "
                f"{len(group['param_names'])} param_names: the state dict was edited by hand?"
            )
    try:
        naming = name_parameters(
            state_dict,
            layout=layout,
            model_state=weights if ordered else None,
            sources=sources,
            where=where,
        )
    except IncompatibleStateError as e:  # the weights are another model's
        raise IncompatibleStateError(f"{e}; to carry the state to them, {REMAP_HINT}") from None
    if not naming.names and not ordered:
        raise Unnamed(naming.notes)
    names = naming.names
    matched = match_names(names.values(), weights)
    missing = [n for n in names.values() if n not in matched.found]
    if missing:
        raise IncompatibleStateError(
            f"the optimizer names {len(missing)} parameter(s) that the model weights in "
            f"{where} lack: {', '.join(missing[:5])}"
            + (" ..." if len(missing) > 5 else "")
            + f"; {REMAP_HINT}"
        )
    keys = {pid: matched.found[n] for pid, n in names.items()}
    notes = list(naming.notes)
    frozen = len(model_parameters(weights)) - len(set(keys.values()))
    if frozen > 0:
        why = (
            "frozen, or held by the file's other optimizers"
            if sources and sources.siblings
            else "frozen"
        )
        notes.append(f"{frozen} model parameter(s) not in the optimizer ({why})")
    how = _HOW[naming.source] if naming.source else "by ID"
    if matched.stripped:
        how += f", wrapper prefixes {', '.join(matched.stripped)} stripped"
    return Params(
        # copies: the optimizer updates them in place, and the originals are the "before"
        by_id={pid: weights[k].detach().clone() for pid, k in keys.items()},
        names=names,
        before=lambda: {pid: weights[k] for pid, k in keys.items()},
        source=f"model weights in {where}, {how}",
        notes=notes,
        weights=keys,
    )


def seeded_params(
    state_dict: Mapping[str, Any],
    seed: int,
    layout: Any | None = None,
    sources: NameSources | None = None,
) -> Params:
    """Seeded stand-ins with the shapes and dtypes the state tells (``(1,)`` where it does not),
    named where :func:`optckpt.names.name_parameters` names them without weights (the state
    dict, ``layout``, a folder's model config in ``sources``)."""
    ids = param_ids(state_dict)
    state = state_dict["state"]
    specs: list[tuple[tuple[int, ...], torch.dtype]] = []
    unknown = 0
    for pid in ids:
        shape = param_shape_from_state(None, state.get(pid))
        dtype = param_dtype_from_state(None, state.get(pid))
        if shape is None or not isinstance(dtype, torch.dtype):
            unknown += 1
            shape, dtype = (1,), torch.float32
        specs.append(
            (shape, dtype if dtype.is_floating_point or dtype.is_complex else torch.float32)
        )
    notes = []
    flat = flat_state(None, state.get(ids[0])) if ids else None
    if unknown == len(ids) and isinstance(flat, torch.Tensor) and ids:
        # LBFGS keeps one flat vector over all parameters: stand-ins that add up to its size.
        rest = max(flat.numel() - (len(ids) - 1), 1)
        one: tuple[int, ...] = (1,)
        specs = [(one, flat.dtype)] * (len(ids) - 1) + [((rest,), flat.dtype)]
        notes.append(
            f"parameter shapes unknown: {len(ids)} flat stand-ins of {flat.numel()} elements in all"
        )
    elif unknown:
        notes.append(f"{unknown} parameter(s) without state: stand-ins of shape [1]")
    values = dict(zip(ids, seeded_parameters(specs, seed), strict=True))
    naming = name_parameters(state_dict, layout=layout, sources=sources)
    notes += naming.notes
    return Params(
        by_id=values,
        names=naming.names,
        before=lambda: dict(zip(ids, seeded_parameters(specs, seed), strict=True)),
        source="seeded stand-ins with the state's shapes (no model weights found)",
        notes=notes,
    )
