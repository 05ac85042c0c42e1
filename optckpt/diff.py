"""Compare two optimizer state dicts: structure first, then every state tensor's values.

Parameters are paired as :func:`optckpt.pairing.pair_parameters` pairs them: by name (keys of a
name-keyed state dict, ``param_names``, or recovered for the side that lacks them; wrapper
prefixes stripped where only that makes names match), else by ID. Values are
compared bitwise by default (two NaNs with the same bits are equal); with a tolerance, as
``torch.isclose(a, b, rtol, atol, equal_nan=True)``. Tensors are read one pair at a time in
chunks, so comparing memory-mapped checkpoints costs little more than the chunks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from optckpt.companions import checkpoint_companions
from optckpt.companions.diff import CompanionDifference, diff_companions
from optckpt.described import DescribedTensor, dtype_name, is_tensor, layout_name
from optckpt.diff_values import as_torch, count_differing, same_value
from optckpt.errors import UsageError
from optckpt.inspect import jsonable
from optckpt.io import Checkpoint, load_checkpoint
from optckpt.io.pages import FileRanges, release
from optckpt.layout import load_layout
from optckpt.locate import KeyPath, Located, select_optimizers
from optckpt.names import sources_of
from optckpt.pairing import Pairing, pair_parameters
from optckpt.statedict import group_of, param_ids, validate_state_dict

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Difference:
    """One difference.

    Attributes:
        kind: ``group_count``, ``group_size``, ``hyperparam``, ``param_added``,
            ``param_removed``, ``state_key_added``, ``state_key_removed``, ``shape``,
            ``dtype``, ``device``, ``step``, ``values`` or ``value``.
        where: what differs, e.g. ``group 1`` or ``encoder.weight.exp_avg``.
        a: the value in A (shape, dtype, ...), or ``None``.
        b: the value in B, or ``None``.
        detail: for ``values``: ``differing``, ``numel``, ``max_abs``, ``max_rel``.
    """

    kind: str
    where: str
    a: Any = None
    b: Any = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PairDiff:
    """The differences between one optimizer state dict of A and one of B."""

    key_a: str
    key_b: str
    match_by: str
    differences: list[Difference]
    prefixes_stripped: list[str] = field(default_factory=list)  # e.g. ["_orig_mod."]


@dataclass(frozen=True)
class DiffReport:
    """The result of :func:`diff_checkpoints`."""

    path_a: Path
    path_b: Path
    pairs: list[PairDiff]
    tolerance: tuple[float, float] | None
    notes: list[str] = field(default_factory=list)  # which checkpoint-N of a folder was read
    # LR schedulers, GradScalers, trainer counters (optckpt.companions.diff)
    companions: list[CompanionDifference] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing differs."""
        return not any(p.differences for p in self.pairs) and not self.companions

    def to_json(self) -> dict[str, Any]:
        """The ``diff --json`` object."""
        return {
            "ok": self.ok,
            "a": str(self.path_a),
            "b": str(self.path_b),
            "tolerance": None
            if self.tolerance is None
            else {"rtol": self.tolerance[0], "atol": self.tolerance[1]},
            "pairs": [
                {
                    "key_a": p.key_a,
                    "key_b": p.key_b,
                    "match_by": p.match_by,
                    "prefixes_stripped": p.prefixes_stripped,
                    "differences": [
                        {
                            "kind": d.kind,
                            "where": d.where,
                            "a": jsonable(d.a),
                            "b": jsonable(d.b),
                            **jsonable(d.detail),
                        }
                        for d in p.differences
                    ],
                }
                for p in self.pairs
            ],
            "notes": self.notes,
            "companions": [c.to_json() for c in self.companions],
        }


@dataclass
class _Comparer:
    """Compares state values recursively, collecting :class:`Difference` s in ``found``."""

    tolerance: tuple[float, float] | None
    checkpoints: tuple[Checkpoint, Checkpoint]
    ranges: FileRanges
    found: list[Difference] = field(default_factory=list)

    def tensors(
        self, a: torch.Tensor, b: torch.Tensor, where: str, paths: tuple[KeyPath, KeyPath]
    ) -> None:
        if tuple(a.shape) != tuple(b.shape):
            self.found.append(Difference("shape", where, list(a.shape), list(b.shape)))
            return
        if dtype_name(a.dtype) != dtype_name(b.dtype):
            names = (dtype_name(a.dtype), dtype_name(b.dtype))
            self.found.append(Difference("dtype", where, *names))
            if self.tolerance is None or a.is_complex() or b.is_complex():
                return  # with a tolerance, values of different dtypes are compared too
            from optckpt.chunks import readable

            if not (readable(as_torch(a).dtype) and readable(as_torch(b).dtype)):
                return
        dev_a = self.checkpoints[0].saved_device(paths[0], a)
        dev_b = self.checkpoints[1].saved_device(paths[1], b)
        if dev_a != dev_b and dev_a is not None and dev_b is not None:  # None: DCP, unrecorded
            self.found.append(Difference("device", where, dev_a, dev_b))
        if a.device.type == "meta" or b.device.type == "meta":
            return
        differing, max_abs, max_rel = count_differing(a, b, self.tolerance, where)
        # done with this pair: its pages of the mapped inputs can go
        for tensor in (a, b):
            if not isinstance(tensor, DescribedTensor):  # read from the files, not mapped
                self.ranges.drop(tensor.data_ptr(), tensor.numel() * tensor.element_size())
        if not differing:
            return
        if where.endswith(".step") and a.numel() == 1:
            self.found.append(Difference("step", where, a.item(), b.item()))
            return
        detail = {
            "differing": differing,
            "numel": a.numel(),
            "max_abs": max_abs,
            "max_rel": max_rel,
        }
        self.found.append(Difference("values", where, None, None, detail))

    def compare(self, a: Any, b: Any, where: str, paths: tuple[KeyPath, KeyPath]) -> None:
        """Compare ``a`` and ``b`` (``paths``: their key paths in their checkpoints)."""
        if is_tensor(a) and is_tensor(b):
            self.tensors(a, b, where, paths)
        elif isinstance(a, Mapping) and isinstance(b, Mapping):
            for k in a:
                if k not in b:
                    self.found.append(
                        Difference("state_key_removed", f"{where}.{k}", jsonable(a[k]), None)
                    )
            for k in b:
                if k not in a:
                    self.found.append(
                        Difference("state_key_added", f"{where}.{k}", None, jsonable(b[k]))
                    )
            for k in a:
                if k in b:
                    self.compare(a[k], b[k], f"{where}.{k}", ((*paths[0], k), (*paths[1], k)))
        elif isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b)):
                self.compare(x, y, f"{where}.{i}", ((*paths[0], i), (*paths[1], i)))
        elif where.endswith(".step") and _is_number(a) and _is_number(b):
            if _tensor_free_number(a) != _tensor_free_number(b) or type(a) is not type(b):
                self.found.append(Difference("step", where, jsonable(a), jsonable(b)))
        elif not same_value(a, b):
            self.found.append(Difference("value", where, jsonable(a), jsonable(b)))


def _is_number(x: Any) -> bool:
    """A real number: a Python int or float, or a real one-element tensor with data."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return True
    if not (
        is_tensor(x)
        and x.numel() == 1
        and layout_name(x) == "strided"
        and x.device.type != "meta"
        and not x.is_complex()
    ):
        return False
    if isinstance(x, DescribedTensor):
        return bool(x.dtype.format)  # the reader leaves other one-element tensors to torch
    from optckpt.chunks import readable

    return readable(x.dtype)


def _tensor_free_number(x: Any) -> float:
    return float(x.item()) if is_tensor(x) else float(x)


def diff_state_dicts(
    a: Located,
    b: Located,
    *,
    tolerance: tuple[float, float] | None = None,
    checkpoints: tuple[Checkpoint, Checkpoint] | None = None,
    layouts: tuple[Any | None, Any | None] = (None, None),
) -> PairDiff:
    """Every difference between two optimizer state dicts.

    Args:
        a, b: the state dicts and their key paths.
        tolerance: ``(rtol, atol)`` for ``torch.isclose``; ``None`` compares bits.
        checkpoints: the checkpoints they came from, to compare saved devices (and whose
            model weights name a side that needs names).
        layouts: the layouts A and B were saved with (``--from-a``, ``--from-b``), if any.

    Raises:
        AmbiguousNamesError: a side needed names and its IDs fit its weights in more than
            one way (see :func:`optckpt.pairing.pair_parameters`).
        UnreadableCheckpointError: either is not a valid optimizer state dict
            (:func:`~optckpt.statedict.validate_state_dict`), or holds a tensor that claims
            far more elements than its storage holds.
    """
    validate_state_dict(a.state_dict, where=a.key)
    validate_state_dict(b.state_dict, where=b.key)
    if checkpoints is None:
        dummy = Checkpoint(path=Path(), format="", size=0, root=None)
        checkpoints = (dummy, dummy)
    pairing = pair_parameters(
        a.state_dict,
        b.state_dict,
        layouts=layouts,
        sources=(
            sources_of(checkpoints[0], a.state_dict),
            sources_of(checkpoints[1], b.state_dict),
        ),
        wheres=(str(checkpoints[0].path), str(checkpoints[1].path)),
        hints=(
            "pass --from-a OLD_LAYOUT (the layout A was saved with) to name them",
            "pass --from-b OLD_LAYOUT (the layout B was saved with) to name them",
        ),
    )
    sources = [*checkpoints[0].sources, *checkpoints[1].sources]
    with FileRanges(sources) as ranges:
        found = _diff(a, b, _Comparer(tolerance, checkpoints, ranges), pairing)
    release(sources)
    return found


def _diff(a: Located, b: Located, comparer: _Comparer, pairing: Pairing) -> PairDiff:
    sa, sb = a.state_dict, b.state_dict
    out = comparer.found
    ga, gb = sa["param_groups"], sb["param_groups"]
    if len(ga) != len(gb):
        out.append(Difference("group_count", "param_groups", len(ga), len(gb)))
    for index, (x, y) in enumerate(zip(ga, gb)):
        if len(x["params"]) != len(y["params"]):
            out.append(
                Difference("group_size", f"group {index}", len(x["params"]), len(y["params"]))
            )
        for k in sorted({*x, *y} - {"params", "param_names"}, key=str):
            if k not in x or k not in y or not same_value(x[k], y[k]):
                out.append(
                    Difference(
                        "hyperparam", f"group {index}.{k}", jsonable(x.get(k)), jsonable(y.get(k))
                    )
                )

    ids_a, ids_b = param_ids(sa), param_ids(sb)
    label_a, label_b = pairing.labels
    by_name = pairing.by == "name"
    id_of_b = {label: pid for pid, label in label_b.items()}
    group_a, group_b = group_of(sa), group_of(sb)
    for pid in ids_a:
        label = label_a[pid]
        if label not in id_of_b:
            out.append(Difference("param_removed", label, group_a.get(pid), None))
            continue
        other = id_of_b[label]
        if by_name and group_a.get(pid) != group_b.get(other) and len(ga) == len(gb):
            out.append(Difference("value", f"{label} group", group_a.get(pid), group_b.get(other)))
        state_a, state_b = sa["state"].get(pid, {}), sb["state"].get(other, {})
        comparer.compare(
            state_a, state_b, label, ((*a.path, "state", pid), (*b.path, "state", other))
        )
    known_a = set(label_a.values())
    for pid in ids_b:
        if label_b[pid] not in known_a:
            out.append(Difference("param_added", label_b[pid], None, group_b.get(pid)))
    return PairDiff(a.key, b.key, pairing.by, out, pairing.stripped)


def _pairs(found_a: list[Located], found_b: list[Located]) -> list[tuple[Located, Located]]:
    if len(found_a) == 1 and len(found_b) == 1:
        return [(found_a[0], found_b[0])]
    keys_a, keys_b = [f.key for f in found_a], [f.key for f in found_b]
    if keys_a == keys_b:
        return list(zip(found_a, found_b))
    raise UsageError(
        f"cannot pair the optimizer state dicts (A has {', '.join(map(repr, keys_a))}; "
        f"B has {', '.join(map(repr, keys_b))}); pick them with --key-a and --key-b"
    )


def diff_checkpoints(
    path_a: str | Path,
    path_b: str | Path,
    *,
    key_a: str | None = None,
    key_b: str | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    allow_globals: Iterable[str] = (),
    from_a: str | Path | Any | None = None,
    from_b: str | Path | Any | None = None,
    describe: bool | None = None,
) -> DiffReport:
    """Compare the optimizer state dicts of two checkpoints (any formats).

    ``from_a`` and ``from_b`` are the layouts A and B were saved with (paths or
    :class:`~optckpt.layout.Layout`), for a side whose parameters must be named to be paired
    with the other's and that carries no names (see :func:`optckpt.pairing.pair_parameters`).

    Without keys, a file holding one state dict is paired with the other's one, and files
    holding several are paired key by key. With ``rtol`` or ``atol`` (the other defaults to
    0), values are compared with ``torch.isclose``; otherwise bitwise: then (``describe``
    ``None`` or true) both files are read without torch where the reader models them, the
    bytes of each pair of tensors are compared from file to file, and tensors are made only
    for pairs that differ (the report is the same as when torch reads both). Without keys, the
    companions (LR schedulers, GradScalers, trainer counters) are compared too
    (:func:`optckpt.companions.diff.diff_companions`); with a key, only those optimizers.

    Raises:
        UsageError: unpairable state dicts, a bad key or a negative tolerance, a side that
            needs names and cannot be named in only one way.
        UnreadableCheckpointError: either input cannot be read.
    """
    tolerance = None
    if rtol is not None or atol is not None:
        tolerance = (rtol or 0.0, atol or 0.0)
        if min(tolerance) < 0:
            raise UsageError("--rtol and --atol must not be negative")
    # Bitwise, values are bytes: both files are read without torch where the reader models
    # them (optckpt.io.structure), and tensors are made only for pairs whose bytes differ.
    if describe is None:
        describe = tolerance is None
    ca = load_checkpoint(path_a, allow_globals=allow_globals, describe=describe)
    cb = load_checkpoint(path_b, allow_globals=allow_globals, describe=describe)
    pairs = _pairs(select_optimizers(ca.root, key_a), select_optimizers(cb.root, key_b))
    layouts = tuple(
        load_layout(x, (), allow_globals) if isinstance(x, (str, Path)) else x
        for x in (from_a, from_b)
    )
    return DiffReport(
        path_a=Path(path_a),
        path_b=Path(path_b),
        pairs=[
            diff_state_dicts(
                x, y, tolerance=tolerance, checkpoints=(ca, cb), layouts=(layouts[0], layouts[1])
            )
            for x, y in pairs
        ],
        tolerance=tolerance,
        notes=ca.notes() + cb.notes(),
        companions=diff_companions(
            checkpoint_companions(ca, allow_globals),
            checkpoint_companions(cb, allow_globals),
            tolerance,
        )
        if key_a is None and key_b is None
        else [],
    )
