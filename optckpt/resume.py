"""Take a verified resume step: load a checkpoint's optimizer state, step it, check it.

:func:`resume_step` rebuilds the parameters (from the model weights in the checkpoint or a
``--model`` file, matched by the names :mod:`optckpt.names` gives: the keys of a name-keyed
state dict, ``param_names``, a ``--from`` layout, or an alignment with the weights that must
be the only one possible; seeded stand-ins with the state's shapes when there are no
weights), loads the state into the
bundled optimizer through optckpt's core, takes N steps on seeded synthetic gradients
(:mod:`optckpt.synthetic`), and reports each check. With ``check_torch`` the same steps are
taken by the matching ``torch.optim`` class from a fresh read of the same checkpoint, and
the two results are compared.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from optckpt.chunks import chunks, readable, reducible
from optckpt.errors import IncompatibleStateError, UsageError
from optckpt.optim.specs import (
    expected_state_shape,
    flat_state,
    gradients_of,
    param_dtype_from_state,
    param_shape_from_state,
    spec_of,
    state_mismatches,
)
from optckpt.statedict import REMAP_HINT, param_ids

if TYPE_CHECKING:
    from optckpt.io.write import ProgressStart

__all__ = ["Check", "GroupUpdate", "ResumeReport", "resume_step"]

_STEP_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, KeyError, AssertionError)


@dataclass
class Check:
    """One check: ``ok`` is ``True``/``False``, or ``None`` when skipped."""

    name: str
    ok: bool | None
    detail: str


@dataclass
class GroupUpdate:
    """How far a group's parameters moved over the steps.

    Attributes:
        update_rms: root mean square of (parameters after - before), over the group.
        update_max: largest absolute change of one element.
        effective_lr: for adaptive optimizers, ``update_rms / (steps * grad_rms)``: the
            learning rate plain SGD would need for the same move (``None`` otherwise).
    """

    index: int
    num_params: int
    lr: float | None
    update_rms: float
    update_max: float
    effective_lr: float | None


@dataclass
class ResumeReport:
    """What :func:`resume_step` found (``ok``: every check that ran passed)."""

    path: Path
    key: str
    optimizer: str
    optimizer_from: str
    params_from: str
    steps: int
    seed: int
    checks: list[Check] = field(default_factory=list)
    groups: list[GroupUpdate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    out: Path | None = None

    @property
    def ok(self) -> bool:
        """Whether no check failed or was skipped."""
        return all(c.ok for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` object (README, resume-step)."""
        return {
            "ok": self.ok,
            "path": str(self.path),
            "key": self.key,
            "optimizer": self.optimizer,
            "optimizer_from": self.optimizer_from,
            "params_from": self.params_from,
            "steps": self.steps,
            "seed": self.seed,
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks],
            "groups": [{k: _json_number(v) for k, v in vars(g).items()} for g in self.groups],
            "notes": self.notes,
            "out": None if self.out is None else str(self.out),
        }


def _json_number(value: Any) -> Any:
    """``None`` for NaN and infinities, which JSON cannot hold."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


# --- parameters -------------------------------------------------------------------------------


@dataclass
class _Params:
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
    "recovered": "by state shape in model order (no param_names)",
}


def _from_weights(
    state_dict: Mapping[str, Any],
    weights: Mapping[str, torch.Tensor],
    where: str,
    layout: Any | None = None,
) -> _Params:
    """Match IDs to model weights by the names :func:`optckpt.names.name_parameters` gives
    (wrapper prefixes stripped where only that makes them match).

    Raises:
        IncompatibleStateError: a named parameter is not in the weights, or the IDs fit no
            parameters of the weights (torch's group size mismatch).
        AmbiguousNamesError: the IDs fit the weights in more than one way (exit 2).
    """
    from optckpt.layout import model_parameters
    from optckpt.names import match_names, name_parameters

    for index, group in enumerate(state_dict["param_groups"]):
        if "param_names" in group and len(group["param_names"]) != len(group["params"]):
            raise IncompatibleStateError(
                f"group {index} lists {len(group['params'])} parameter IDs but "
                f"{len(group['param_names'])} param_names: the state dict was edited by hand?"
            )
    try:
        naming = name_parameters(state_dict, layout=layout, model_state=weights, where=where)
    except IncompatibleStateError as e:  # the weights are another model's
        raise IncompatibleStateError(f"{e}; to carry the state to them, {REMAP_HINT}") from None
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
    notes: list[str] = []
    frozen = len(model_parameters(weights)) - len(set(keys.values()))
    if frozen > 0:
        notes.append(f"{frozen} model parameter(s) not in the optimizer (frozen)")
    how = _HOW[naming.source] if naming.source else "by ID"
    if matched.stripped:
        how += f", wrapper prefixes {', '.join(matched.stripped)} stripped"
    return _Params(
        # copies: the optimizer updates them in place, and the originals are the "before"
        by_id={pid: weights[k].detach().clone() for pid, k in keys.items()},
        names=names,
        before=lambda: {pid: weights[k] for pid, k in keys.items()},
        source=f"model weights in {where}, {how}",
        notes=notes,
        weights=keys,
    )


def _seeded(state_dict: Mapping[str, Any], seed: int, layout: Any | None = None) -> _Params:
    """Seeded stand-ins with the shapes and dtypes the state tells (``(1,)`` where it does not),
    named where :func:`optckpt.names.name_parameters` names them without weights."""
    from optckpt.names import name_parameters
    from optckpt.synthetic import seeded_parameters

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
    return _Params(
        by_id=values,
        names=name_parameters(state_dict, layout=layout).names,
        before=lambda: dict(zip(ids, seeded_parameters(specs, seed), strict=True)),
        source="seeded stand-ins with the state's shapes (no model weights found)",
        notes=notes,
    )


# --- checks -----------------------------------------------------------------------------------


def _label(pid: Any, names: Mapping[Any, str]) -> str:
    return f"ID {pid} ({names[pid]})" if pid in names else f"ID {pid}"


def _listed(items: list[str], limit: int = 4) -> str:
    return "; ".join(items[:limit]) + (f"; ... ({len(items)} in all)" if len(items) > limit else "")


def _check_shapes(state: Mapping[Any, Any], params: _Params, optimizer_name: str) -> Check:
    """Every state tensor against the shape torch gives it for its parameter, as
    :mod:`optckpt.optim.specs` declares it (LBFGS's flat vectors: all parameters' size)."""
    wrong = []
    checked = 0
    total = sum(p.numel() for p in params.by_id.values())
    for pid, p in params.by_id.items():
        s = state.get(pid)
        if not isinstance(s, Mapping):
            continue
        shape = tuple(p.shape)
        checked += sum(
            isinstance(v, torch.Tensor)
            and expected_state_shape(optimizer_name, k, shape, total) is not None
            for k, v in s.items()
        )
        for key, found, want in state_mismatches(optimizer_name, s, shape, total):
            wrong.append(
                f"{key} of {_label(pid, params.names)} is {list(found)}, expected {list(want)}"
            )
    if wrong:
        return Check("shapes", False, _listed(wrong))
    return Check("shapes", True, f"{checked} state tensor(s) fit their parameters")


def _steps_of(state: Mapping[Any, Any], ids: Iterable[Any]) -> dict[Any, float]:
    found = {}
    for pid in ids:
        s = state.get(pid)
        if isinstance(s, Mapping) and "step" in s:
            value = s["step"]
            found[pid] = float(value.item() if isinstance(value, torch.Tensor) else value)
    return found


def _check_loads(state_dict: Mapping[str, Any], ids: list[list[Any]], name: str) -> Check:
    """The state loaded (group count and sizes fit); state under keys that are no parameter's
    ID fails: torch keeps it on load but no parameter ever uses it (a JSON round trip that
    made the IDs strings, say), so those moments would silently restart."""
    known = {pid for group in ids for pid in group}
    orphans = [key for key in state_dict["state"] if key not in known]
    if orphans:
        listed = ", ".join(repr(k) for k in orphans[:5]) + (" ..." if len(orphans) > 5 else "")
        return Check("loads", False, f"state under {listed} belongs to no parameter of the groups")
    sizes = ", ".join(str(len(g)) for g in ids)
    return Check("loads", True, f"{len(ids)} group(s) of {sizes} parameter(s) into {name}")


def _check_counters_agree(state_dict: Mapping[str, Any], params: _Params) -> Check:
    groups = state_dict["param_groups"]
    steps = _steps_of(state_dict["state"], params.by_id)
    if not steps:
        return Check("step_counters_agree", True, "no step counters in the state")
    problems, summary = [], []
    for index, group in enumerate(groups):
        values = [steps[pid] for pid in group["params"] if pid in steps]
        # NaN is no count, and NaN != NaN: give it one bucket of its own
        distinct = sorted({v for v in values if not math.isnan(v)})
        nan = sum(1 for v in values if math.isnan(v))
        if len(distinct) + bool(nan) > 1 or nan:
            counts = [f"{v:g} for {values.count(v)}" for v in distinct]
            counts += [f"nan for {nan}"] if nan else []
            problems.append(f"group {index}: step " + ", ".join(counts))
        elif distinct:
            summary.append(f"group {index}: {distinct[0]:g}")
    if problems:
        return Check("step_counters_agree", False, _listed(problems))
    without = len(params.by_id) - len(steps)
    extra = f" ({without} parameter(s) have no state yet)" if without else ""
    return Check("step_counters_agree", True, ", ".join(summary) + extra)


def _count_nonfinite(t: torch.Tensor) -> int:
    """How many elements of ``t`` are NaN or infinite (0 for non-floating tensors, for meta
    tensors, which hold no values, and for packed dtypes no reduction reads)."""
    if t.numel() == 0 or not (t.is_floating_point() or t.is_complex()):
        return 0
    if t.is_meta or not readable(t.dtype):
        return 0
    count = 0
    for chunk in chunks(t):  # bounded temporaries, any strides, float8 through float64
        values = reducible(chunk)
        # one pass without a temporary (NaN and infinities reach the min or max), then
        # count only where something is wrong
        low, high = torch.aminmax(torch.view_as_real(values) if values.is_complex() else values)
        if not (math.isfinite(float(low)) and math.isfinite(float(high))):
            count += int(values.numel() - torch.isfinite(values).sum().item())
    return count


def _nonfinite(tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    bad = []
    for label, t in tensors:
        count = _count_nonfinite(t)
        if count:
            bad.append(f"{label}: {count} non-finite value(s)")
    return bad


def _state_tensors(
    state: Mapping[Any, Any], names: Mapping[Any, str]
) -> Iterator[tuple[str, torch.Tensor]]:
    for pid, s in state.items():
        if isinstance(s, Mapping):
            for key, value in s.items():
                if isinstance(value, torch.Tensor):
                    yield f"{key} of {_label(pid, names)}", value


def _check_finite(
    name: str,
    state: Mapping[Any, Any],
    tensors: Mapping[Any, torch.Tensor],
    names: Mapping[Any, str],
) -> Check:
    bad = _nonfinite(
        [*((f"parameter {_label(pid, names)}", t) for pid, t in tensors.items())]
    ) + _nonfinite(_state_tensors(state, names))
    if bad:
        return Check(name, False, _listed(bad))
    return Check(name, True, "parameters and state are finite")


# --- comparing with torch ---------------------------------------------------------------------


def _same(a: Any, b: Any, atol: float | None) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if atol is not None and (a.is_floating_point() or a.is_complex()):
            return bool(torch.allclose(a, b, rtol=0.0, atol=atol, equal_nan=True))
        if torch.equal(a, b):
            return True
        both_nan = a.isnan() & b.isnan() if a.is_floating_point() or a.is_complex() else False
        return bool(((a == b) | both_nan).all())
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k], atol) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y, atol) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b)


def _compare_with_torch(
    ours: Any, theirs: Any, names: Mapping[Any, str], atol: float | None
) -> list[str]:
    """Where the two optimizers disagree (parameters, state, hyperparameters)."""
    wrong = []
    mine, torch_sd = ours.state_dict(), theirs.state_dict()
    for index, (a, b) in enumerate(zip(ours.param_groups, theirs.param_groups, strict=True)):
        for p, q, pid in zip(
            a["params"],
            b["params"],
            mine["param_groups"][index]["params"],
            strict=True,
        ):
            if not _same(p.detach(), q.detach(), atol):
                wrong.append(f"parameter {_label(pid, names)}")
    for index, (g, h) in enumerate(
        zip(mine["param_groups"], torch_sd["param_groups"], strict=True)
    ):
        if not _same(g, h, atol):
            keys = [k for k in g.keys() | h.keys() if not _same(g.get(k), h.get(k), atol)]
            wrong.append(f"group {index} hyperparameters {sorted(map(str, keys))}")
    for pid in mine["state"].keys() | torch_sd["state"].keys():
        s, t = mine["state"].get(pid, {}), torch_sd["state"].get(pid, {})
        for key in s.keys() | t.keys():
            if not _same(s.get(key), t.get(key), atol):
                wrong.append(f"{key} of {_label(pid, names)}")
    return wrong


def _owned(value: Any, ranges: Any = None) -> Any:
    """``value`` with every tensor copied (dicts, lists and tuples rebuilt around them).

    With ``ranges`` (a :class:`~optckpt.io.pages.FileRanges`), the mapped pages of each
    tensor are let go once it is copied, so the input is never resident in full.
    """
    if isinstance(value, torch.Tensor):
        copy = value.clone()
        if ranges is not None:
            ranges.drop(value.data_ptr(), value.numel() * value.element_size())
        return copy
    if isinstance(value, Mapping):
        return {k: _owned(v, ranges) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_owned(v, ranges) for v in value]
        return items if isinstance(value, list) else tuple(items)
    return value


# --- the resume step --------------------------------------------------------------------------


def _build(cls: type, params: _Params, state_dict: Mapping[str, Any]) -> Any:
    named = all(pid in params.names for pid in params.by_id) and any(
        "param_names" in g for g in state_dict["param_groups"]
    )
    groups = [
        {
            "params": [
                (params.names[pid], params.by_id[pid]) if named else params.by_id[pid]
                for pid in g["params"]
            ]
        }
        for g in state_dict["param_groups"]
    ]
    return cls(groups)


def _check_hyperparameters(cls: type, state_dict: Mapping[str, Any]) -> None:
    """Refuse groups that lack hyperparameters ``cls`` has always had (``--optimizer`` names
    another optimizer than the one that saved the state); keys torch added over the releases
    may be missing from older checkpoints.

    Raises:
        IncompatibleStateError: names the missing keys.
    """
    from optckpt.optim.guess import VERSIONED_GROUP_KEYS
    from optckpt.optim.registry import defaults

    required = set(defaults(cls)) - VERSIONED_GROUP_KEYS
    for index, group in enumerate(state_dict["param_groups"]):
        missing = sorted(required - set(group))
        if missing:
            raise IncompatibleStateError(
                f"group {index} has no {', '.join(missing)}: it was not saved by "
                f"{cls.__name__}; name the right optimizer with --optimizer, or leave it out "
                "to guess"
            )


def _load(cls: type, params: _Params, state_dict: Mapping[str, Any]) -> Any:
    """Build ``cls`` over the parameters and load the state: the ``loads`` check's work."""
    try:
        optimizer = _build(cls, params, state_dict)
    except (ValueError, TypeError) as e:
        raise IncompatibleStateError(f"{cls.__name__} refuses these parameters: {e}") from e
    try:
        optimizer.load_state_dict(state_dict)
    except IncompatibleStateError:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise IncompatibleStateError(
            f"the state does not load into {cls.__name__}: {e}; {REMAP_HINT}"
        ) from e
    return optimizer


def _uncapture(optimizer: Any) -> list[str]:
    """Turn off ``capturable`` in groups whose parameters are on the CPU, where torch refuses
    to step with it (a checkpoint saved from CUDA graphs); the notes say which."""
    notes = []
    for index, group in enumerate(optimizer.param_groups):
        if group.get("capturable") and all(p.device.type == "cpu" for p in group["params"]):
            group["capturable"] = False
            notes.append(
                f"group {index} was saved with capturable=True, which steps only on an "
                "accelerator: stepped with capturable=False on the CPU"
            )
    return notes


def _adaptive(optimizer: str) -> bool:
    """Whether the step size adapts per element: the report then gives an effective lr."""
    spec = spec_of(optimizer)
    return spec is not None and spec.adaptive


def _squares(t: torch.Tensor) -> float:
    """The sum of ``|x|^2`` over ``t``, accumulated in float64 without a float64 copy."""
    real = torch.view_as_real(t) if t.is_complex() else t
    return float(torch.linalg.vector_norm(real, dtype=torch.float64)) ** 2


def _updates(
    optimizer: Any,
    ids: list[list[Any]],
    before: Mapping[Any, torch.Tensor],
    grad_squares: list[float],
    grad_count: list[int],
    steps: int,
    adaptive: bool,
) -> list[GroupUpdate]:
    result = []
    for index, group in enumerate(optimizer.param_groups):
        squares, numel, largest = 0.0, 0, 0.0
        for p, pid in zip(group["params"], ids[index], strict=True):
            change = p.detach() - before[pid]
            if change.numel():
                squares += _squares(change)
                largest = max(largest, float(change.abs().max()))
            numel += change.numel()
        rms = math.sqrt(squares / numel) if numel else 0.0
        grad_rms = math.sqrt(grad_squares[index] / grad_count[index]) if grad_count[index] else 0.0
        lr = group.get("lr")
        result.append(
            GroupUpdate(
                index=index,
                num_params=len(group["params"]),
                lr=float(lr) if isinstance(lr, (int, float, torch.Tensor)) else None,
                update_rms=rms,
                update_max=largest,
                effective_lr=rms / (steps * grad_rms) if adaptive and grad_rms else None,
            )
        )
    return result


@dataclass
class _Source:
    """What a run reads: the checkpoint, the optimizer state dict in it, the model weights.

    ``mapped`` collects the files read, whose memory-mapped pages may be released (nothing
    ever writes into them: the optimizers step copies, see :meth:`owned`).
    """

    path: Path
    key: str | None
    model: Path | None
    seed: int
    allow_globals: tuple[str, ...]
    layout: Any | None = None  # --from: the Layout the checkpoint was saved with
    mapped: list[Path] = field(default_factory=list)

    def read(self) -> tuple[Any, Any]:
        """A fresh read of the checkpoint and the one optimizer state dict located in it."""
        from optckpt.io import load_checkpoint
        from optckpt.locate import select_optimizers

        checkpoint = load_checkpoint(self.path, allow_globals=self.allow_globals)
        self.mapped.extend(checkpoint.sources)
        found = select_optimizers(checkpoint.root, self.key)
        if len(found) > 1:
            listed = ", ".join(repr(f.key) for f in found)
            raise UsageError(
                f"the checkpoint holds several optimizer state dicts ({listed}); pick one with --key"
            )
        return checkpoint, found[0]

    def weights(self, checkpoint: Any) -> tuple[Mapping[str, torch.Tensor] | None, str]:
        """The model weights (of the checkpoint, or of ``--model``) and where they are."""
        from optckpt.io import load_checkpoint
        from optckpt.layout import find_model_state, model_state_of

        if self.model is None:
            return model_state_of(checkpoint), str(self.path)
        model_checkpoint = load_checkpoint(self.model, allow_globals=self.allow_globals)
        self.mapped.extend(model_checkpoint.sources)
        weights = find_model_state(model_checkpoint.root)
        if weights is None:
            raise UsageError(f"--model {self.model}: holds no model state dict")
        return weights, str(self.model)

    def parameters(self, checkpoint: Any, state_dict: Mapping[str, Any]) -> _Params:
        """The parameters to load ``state_dict`` onto (see :func:`_from_weights`, :func:`_seeded`)."""
        from optckpt.io.pages import release

        weights, where = self.weights(checkpoint)
        if weights is None:
            return _seeded(state_dict, self.seed, self.layout)
        params = _from_weights(state_dict, weights, where, self.layout)
        release(self.mapped)  # the weights are copied: their mapped pages can go
        return params

    def owned(self, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        """``state_dict`` with its state copied: the optimizers step it in place, and nothing
        may ever write into the mapped input (see :mod:`optckpt.io.pages`)."""
        from optckpt.io.pages import FileRanges

        with FileRanges(self.mapped) as ranges:
            return {**state_dict, "state": _owned(state_dict["state"], ranges)}


def _optimizer_class(state_dict: Mapping[str, Any], name: str | None) -> tuple[type, str]:
    """The bundled optimizer class to resume with, and what named it.

    Raises:
        UnknownOptimizerError: ``name`` is not a bundled optimizer.
        IncompatibleStateError: no ``name`` and the guess is unsure (lists the candidates).
    """
    from optckpt.optim import by_name
    from optckpt.optim.guess import guess_optimizer

    if name is not None:
        cls = by_name(name)
        _check_hyperparameters(cls, state_dict)
        return cls, "--optimizer"
    guess = guess_optimizer(state_dict)
    if not guess.sure or guess.name is None:
        listed = ", ".join(guess.candidates) or "none"
        raise IncompatibleStateError(
            f"cannot tell which optimizer saved this state ({guess.reason}; candidates: "
            f"{listed}); name it with --optimizer"
        )
    return by_name(guess.name), f"guessed: {guess.reason}"


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


@dataclass
class _Gradients:
    """Sums of squared gradients per group, seen before each step (for the effective lr)."""

    group_of: dict[int, int]
    squares: list[float]
    count: list[int]

    def observe(self, tensors: list[torch.Tensor]) -> None:
        for p in tensors:
            assert p.grad is not None  # take_steps set every gradient
            g = p.grad.to_dense() if p.grad.is_sparse else p.grad
            i = self.group_of[id(p)]
            self.squares[i] += _squares(g)
            self.count[i] += g.numel()


def _check_counters_advance(
    before: Mapping[Any, float], after: Mapping[Any, float], params: _Params, steps: int
) -> Check:
    if not before and not after:
        return Check("step_counters_advance", True, "no step counters in the state")
    wrong = [
        f"{_label(pid, params.names)}: {before.get(pid, 0.0):g} -> {after.get(pid, math.nan):g}"
        for pid in params.by_id
        if after.get(pid, math.nan) - before.get(pid, 0.0) != steps
    ]
    if wrong:
        return Check("step_counters_advance", False, f"not advanced by {steps}: " + _listed(wrong))
    return Check("step_counters_advance", True, f"every counter advanced by {steps}")


def _check_torch(
    source: _Source, cls: type, ours: Any, names: Mapping[Any, str], steps: int, atol: float | None
) -> Check:
    """Take the same steps with ``torch.optim`` from a fresh read, compare with ``ours``."""
    from optckpt.synthetic import Gradients, take_steps

    fresh, found = source.read()
    state_dict = found.state_dict
    name = f"torch.optim.{cls.__name__}"
    try:
        theirs = _build(
            getattr(torch.optim, cls.__name__), source.parameters(fresh, state_dict), state_dict
        )
        theirs.load_state_dict(source.owned(state_dict))
        _uncapture(theirs)
        take_steps(theirs, Gradients(source.seed, gradients_of(cls.__name__)), steps)
    except _STEP_ERRORS as e:
        return Check("matches_torch", False, f"{name} failed: {_error(e)}")
    wrong = _compare_with_torch(ours, theirs, names, atol)
    how = "bitwise" if atol is None else f"within atol={atol:g}"
    if wrong:
        return Check("matches_torch", False, f"differs from {name} ({how}): " + _listed(wrong))
    return Check("matches_torch", True, f"parameters and state equal {name}'s, {how}")


def _write(
    source: _Source,
    checkpoint: Any,
    found: Any,
    ours: Any,
    live: Mapping[Any, torch.Tensor],
    names: Mapping[Any, str],
    out: Path,
    fmt: str,
    progress: ProgressStart | None = None,
) -> None:
    """Write ``checkpoint`` with the stepped state and, when they came from it, weights
    (``names``: each ID's key in those weights). The state keeps its keying."""
    from optckpt.devices import carry_devices
    from optckpt.io.write import save_checkpoint, tensor_bytes
    from optckpt.layout import tied
    from optckpt.names import is_name_keyed, to_name_keyed

    loaded = source.weights(checkpoint)[0] if source.model is None else None
    weights = loaded if isinstance(loaded, dict) else {}  # this file's weights, stepped below
    new_state = ours.state_dict()
    if is_name_keyed(found.state_dict):  # name-keyed in, name-keyed out, under the same keys
        saved_ids = [pid for g in found.state_dict["param_groups"] for pid in g["params"]]
        new_ids = [pid for g in new_state["param_groups"] for pid in g["params"]]
        new_state = to_name_keyed(new_state, dict(zip(new_ids, saved_ids)), strip=False)
    # Groups stepped with capturable off on the CPU (_uncapture) are saved as they came.
    for group, saved in zip(new_state["param_groups"], found.state_dict["param_groups"]):
        if "capturable" in saved:
            group["capturable"] = saved["capturable"]
    # Each stepped tensor records the device its input tensor was saved from (a CUDA
    # checkpoint comes out tagged cuda:0 as it went in); the rest of the file keeps its own.
    from_file = {pid: names[pid] for pid in live if names.get(pid) in weights}
    param_devices = {pid: checkpoint.saved_device(weights[name]) for pid, name in from_file.items()}
    devices = carry_devices(
        checkpoint, found.state_dict, new_state, same_ids=True, param_devices=param_devices
    )
    # The loaded tree is ours to change (never written back): swap the stepped state in.
    found.state_dict.clear()
    found.state_dict.update(new_state)
    aliases = tied(weights)
    for pid, name in from_file.items():
        stepped = live[pid].detach()
        devices[stepped.untyped_storage().data_ptr()] = param_devices[pid]
        for alias in (name, *aliases[name]):
            weights[alias] = stepped  # tied weights stay tied
    save_checkpoint(
        checkpoint.root,
        out,
        fmt,
        sources=source.mapped,
        saved_devices=devices,
        progress=progress(tensor_bytes(checkpoint.root)) if progress else None,
    )


def _nothing_written(report: ResumeReport, out: Path | None) -> ResumeReport:
    if out is not None:
        report.notes.append(f"nothing written to {out}: a check failed")
    return report


def resume_step(
    path: str | Path,
    *,
    key: str | None = None,
    optimizer: str | None = None,
    model: str | Path | None = None,
    steps: int = 1,
    seed: int = 0,
    check_torch: bool = False,
    atol: float | None = None,
    out: str | Path | None = None,
    force: bool = False,
    allow_globals: Iterable[str] = (),
    progress: ProgressStart | None = None,
    from_layout: str | Path | Any | None = None,
) -> ResumeReport:
    """Load a checkpoint's optimizer state, take ``steps`` steps, and check the result.

    Args:
        path: the checkpoint (any format optckpt reads).
        key: the key path of the optimizer state dict, when the file holds several.
        optimizer: the bundled optimizer's name; guessed from the state when ``None``.
        model: a file with the model weights, when ``path`` has none.
        steps: steps to take (1 or more).
        seed: seeds the gradients (and stand-in parameters); see :mod:`optckpt.synthetic`.
        check_torch: take the same steps with ``torch.optim`` and compare.
        atol: with ``check_torch``, accept differences up to ``atol`` instead of bitwise.
        out: write the checkpoint after the steps here (only when every check passed).
        force: overwrite ``out``.
        allow_globals: pickle globals to let through (see :func:`optckpt.io.load_checkpoint`).
        progress: called with the bytes of tensors to write when writing ``out`` starts; the
            callback it returns is told each write.
        from_layout: the layout the checkpoint was saved with (``--from``: a path or a
            :class:`~optckpt.layout.Layout`), to name the IDs of a state dict without
            ``param_names`` (see :mod:`optckpt.names`).

    Returns:
        The :class:`ResumeReport`; ``report.ok`` says whether every check passed.

    Raises:
        UsageError: bad options, several optimizer state dicts and no ``key``, IDs that fit the
            weights in more than one way (:class:`~optckpt.names.AmbiguousNamesError`).
        UnreadableCheckpointError: the checkpoint or ``model`` cannot be read.
        IncompatibleStateError: an unsure guess of the optimizer, weights that do not fit the
            groups, a state that does not load (group count or size mismatch).
    """
    from optckpt.io.write import check_output, format_for
    from optckpt.synthetic import MAX_SEED, Gradients, take_steps

    path = Path(path)
    if steps < 1:
        raise UsageError(f"--steps must be 1 or more, not {steps}")
    if not 0 <= seed <= MAX_SEED:
        raise UsageError(f"--seed must be between 0 and {MAX_SEED}, not {seed}")
    if atol is not None and not check_torch:
        raise UsageError("--atol applies to --check-torch")
    if atol is not None and not atol >= 0:
        raise UsageError(f"--atol must be 0 or more, not {atol}")
    if out is not None:
        out = Path(out)
        fmt = format_for(out)
        layout_file = [Path(from_layout)] if isinstance(from_layout, (str, Path)) else []
        check_output(out, [path, *([Path(model)] if model else []), *layout_file], force=force)
        if path.is_dir():
            raise UsageError(f"{path} is a folder; give -o only for a checkpoint file")

    layout = from_layout
    if isinstance(from_layout, (str, Path)):
        from optckpt.layout import load_layout

        layout = load_layout(from_layout, (), allow_globals)
    source = _Source(
        path, key, None if model is None else Path(model), seed, tuple(allow_globals), layout
    )
    checkpoint, found = source.read()
    if out is not None and fmt == "safetensors":  # refused now, not after the steps
        from optckpt.io.safetensors_format import check_storable
        from optckpt.locate import tensors_in

        check_storable((str(key), t.dtype) for key, t in tensors_in(checkpoint.root))
    state_dict = found.state_dict
    cls, optimizer_from = _optimizer_class(state_dict, optimizer)
    params = source.parameters(checkpoint, state_dict)
    report = ResumeReport(
        path=path,
        key=found.key,
        optimizer=cls.__name__,
        optimizer_from=optimizer_from,
        params_from=params.source,
        steps=steps,
        seed=seed,
        notes=list(params.notes),
    )
    ids = [list(g["params"]) for g in state_dict["param_groups"]]
    owned = source.owned(state_dict)

    # Checks of the saved state (copied exactly), before torch's cast can hide anything.
    shapes = _check_shapes(owned["state"], params, cls.__name__)
    agree = _check_counters_agree(owned, params)
    finite_before = _check_finite("finite_before", owned["state"], params.by_id, params.names)
    counters_before = _steps_of(owned["state"], params.by_id)

    ours = _load(cls, params, owned)
    report.notes += _uncapture(ours)
    report.checks += [
        _check_loads(state_dict, ids, cls.__name__),
        shapes,
        agree,
        finite_before,
    ]
    later = ["steps_taken", "step_counters_advance", "finite_after"]
    later += ["matches_torch"] if check_torch else []
    if not shapes.ok:
        report.checks += [Check(name, None, "skipped: the shapes do not fit") for name in later]
        return _nothing_written(report, out)

    grads = _Gradients(
        {id(p): i for i, g in enumerate(ours.param_groups) for p in g["params"]},
        [0.0] * len(ids),
        [0] * len(ids),
    )
    try:
        take_steps(ours, Gradients(seed, gradients_of(cls.__name__)), steps, grads.observe)
    except _STEP_ERRORS as e:
        report.checks.append(Check("steps_taken", False, _error(e)))
        report.checks += [Check(name, None, "skipped: the step failed") for name in later[1:]]
        return _nothing_written(report, out)
    report.checks.append(Check("steps_taken", True, f"{steps} step(s) of {cls.__name__}"))

    live = {
        pid: p
        for g, gid in zip(ours.param_groups, ids, strict=True)
        for p, pid in zip(g["params"], gid, strict=True)
    }
    counters_after = _steps_of({pid: ours.state.get(p, {}) for pid, p in live.items()}, live)
    report.checks += [
        _check_counters_advance(counters_before, counters_after, params, steps),
        _check_finite("finite_after", ours.state_dict()["state"], live, params.names),
    ]
    report.groups = _updates(
        ours, ids, params.before(), grads.squares, grads.count, steps, _adaptive(cls.__name__)
    )
    if check_torch:
        report.checks.append(_check_torch(source, cls, ours, params.names, steps, atol))

    if out is not None:
        if not report.ok:
            return _nothing_written(report, out)
        _write(source, checkpoint, found, ours, live, params.weights, out, fmt, progress)
        report.out = out
        saved_on = sorted(set(checkpoint.saved_devices.values()) - {"cpu"})
        if saved_on:
            report.notes.append(
                f"the input was saved on {', '.join(saved_on)}; {out} keeps those devices "
                "(the steps ran on the CPU)"
            )
    return report
