"""The forms a parameter's name takes: wrapper prefixes, and the two keyings of a state dict.

A parameter's identity is its fully qualified name (FQN), as ``torch.distributed.checkpoint``
uses it. This module owns how names are compared and how a state dict is keyed by them:

* :func:`canonical` and :func:`match_names` strip the prefixes wrappers add
  (:data:`WRAPPER_PREFIXES`) as torch's ``_get_fqns`` strips them;
* :func:`is_name_keyed`, :func:`to_name_keyed` and :func:`to_id_keyed` tell and turn one
  keying (FQN strings, as ``get_optimizer_state_dict`` returns) into the other (integer IDs,
  as ``Optimizer.state_dict()`` returns).

Where names come from (keys, ``param_names``, a layout, recovery) is :mod:`optckpt.names`,
which re-exports these names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from optckpt.errors import UsageError
from optckpt.statedict import StateDict, param_ids

# Prefixes that wrappers add to parameter names and torch's ``_get_fqns``
# (torch/distributed/checkpoint/state_dict.py) leaves out of a parameter's FQN: torch.compile's
# OptimizedModule (``_orig_mod``), DDP / DataParallel (``module``), FSDP1
# (``_fsdp_wrapped_module``) and activation checkpointing (``_checkpoint_wrapped_module``).
WRAPPER_PREFIXES = ("_orig_mod.", "module.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
# Wrapper components dropped wherever they appear: torch drops them at any depth (FSDP and
# checkpoint wrappers sit around submodules). ``module`` only in the leading run of wrapper
# components, where DDP puts it: elsewhere it is an ordinary attribute name.
_ANYWHERE = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})
_LEADING = _ANYWHERE | {"module"}


def _listed(items: Iterable[str], limit: int = 5) -> str:
    items = list(items)
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


# --- wrapper prefixes -------------------------------------------------------------------------


def _strip(name: str) -> tuple[str, tuple[str, ...]]:
    """``name`` without wrapper components, and the prefixes removed (see :func:`canonical`)."""
    parts = name.split(".")
    kept: list[str] = []
    removed: list[str] = []
    leading = True
    for part in parts[:-1]:  # the last component is the parameter itself
        if part in _ANYWHERE or (leading and part in _LEADING):
            removed.append(part + ".")
            continue
        leading = False
        kept.append(part)
    kept.append(parts[-1])
    return ".".join(kept), tuple(removed)


def canonical(name: str) -> str:
    """A parameter name as its FQN, without the prefixes wrappers add.

    As torch's ``_get_fqns`` does: ``_orig_mod.`` (torch.compile), ``_fsdp_wrapped_module.``
    and ``_checkpoint_wrapped_module.`` wherever they appear, and DDP's ``module.`` at the
    start (``module._orig_mod.encoder.weight`` -> ``encoder.weight``).
    """
    return _strip(name)[0]


@dataclass(frozen=True)
class NameMatch:
    """Names of one side matched to names of the other.

    Attributes:
        found: ``{wanted name: available name}`` for every wanted name that has a match.
        stripped: the wrapper prefixes that had to be stripped for some match
            (``["_orig_mod."]``), in :data:`WRAPPER_PREFIXES` order; empty when every match
            was exact.
    """

    found: dict[str, str]
    stripped: list[str]


def match_names(wanted: Iterable[str], available: Iterable[str]) -> NameMatch:
    """Match names exactly, and those that match only without wrapper prefixes after that.

    A name equal on both sides matches itself. A name left over matches the leftover name on
    the other side with the same :func:`canonical` form, when exactly one name on each side
    has that form (``module.x`` and ``x`` both present: neither is guessed).
    """
    wanted, available = list(wanted), list(available)
    present = set(available)
    found = {w: w for w in wanted if w in present}
    taken = set(found.values())
    rest_wanted = [w for w in wanted if w not in found]
    rest_available = [a for a in available if a not in taken]
    if not rest_wanted or not rest_available:
        return NameMatch(found, [])
    by_form: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    for a in rest_available:
        form, removed = _strip(a)
        by_form.setdefault(form, []).append((a, removed))
    wanted_forms: dict[str, int] = {}
    stripped_w = {w: _strip(w) for w in rest_wanted}
    for form, _ in stripped_w.values():
        wanted_forms[form] = wanted_forms.get(form, 0) + 1
    removed_any: set[str] = set()
    for w, (form, removed) in stripped_w.items():
        candidates = by_form.get(form, [])
        if len(candidates) == 1 and wanted_forms[form] == 1:
            a, removed_a = candidates[0]
            found[w] = a
            removed_any.update(removed, removed_a)
    return NameMatch(found, [p for p in WRAPPER_PREFIXES if p in removed_any])


# --- keyings ----------------------------------------------------------------------------------


def is_name_keyed(state_dict: Mapping[str, Any]) -> bool:
    """Whether the groups list parameters by FQN strings rather than integer IDs."""
    ids = param_ids(state_dict)
    return bool(ids) and all(isinstance(pid, str) for pid in ids)


def to_name_keyed(
    state_dict: Mapping[str, Any], names: Mapping[Any, str], *, strip: bool = True
) -> StateDict:
    """The FQN-keyed form ``get_optimizer_state_dict`` returns (``set_optimizer_state_dict``
    loads it).

    ``state`` and every group's ``params`` are keyed by :func:`canonical` names, as torch
    keys them (``_get_fqns`` drops wrapper prefixes; ``strip=False`` keeps ``names`` as they
    are); other group keys, ``param_names`` included, are kept as torch keeps them. State
    under an ID in no group keeps its key.

    Raises:
        UsageError: an ID without a name, or two IDs with the same FQN.
    """
    ids = param_ids(state_dict)
    missing = [pid for pid in ids if pid not in names]
    if missing:
        raise UsageError(f"no name for parameter ID(s) {_listed(map(str, missing))}")
    fqn = {pid: canonical(names[pid]) if strip else names[pid] for pid in ids}
    owners: dict[str, Any] = {}
    for pid, name in fqn.items():
        if name in owners:
            raise UsageError(
                f"parameters {names[owners[name]]!r} and {names[pid]!r} have the same FQN "
                f"{name!r}; they cannot both be keys of a name-keyed state dict"
            )
        owners[name] = pid
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [fqn[p] for p in g["params"]]}
        for g in state_dict["param_groups"]
    ]
    state = {fqn.get(k, k): v for k, v in state_dict["state"].items()}
    return {**state_dict, "state": state, "param_groups": groups}


def to_id_keyed(state_dict: Mapping[str, Any]) -> StateDict:
    """The ID-keyed form ``Optimizer.state_dict()`` returns, with ``param_names``.

    IDs are numbered as torch's ``state_dict`` numbers parameters (positions in the
    concatenated ``params`` lists; a name listed in an earlier group keeps its ID). Groups
    without ``param_names`` get the names they list, so the names survive the conversion.
    """
    mapping: dict[Any, int] = {}
    start = 0
    groups = []
    for group in state_dict["param_groups"]:
        listed = list(group["params"])
        mapping.update({n: i for i, n in enumerate(listed, start) if n not in mapping})
        packed = {k: v for k, v in group.items() if k != "params"}
        packed.setdefault("param_names", [str(n) for n in listed])
        packed["params"] = [mapping[n] for n in listed]
        start += len(listed)
        groups.append(packed)
    state = {mapping.get(k, k): v for k, v in state_dict["state"].items()}
    return {**state_dict, "state": state, "param_groups": groups}
