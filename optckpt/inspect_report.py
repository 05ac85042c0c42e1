"""What ``optckpt inspect`` reports, and its ``--json`` form.

The report classes (:class:`InspectReport`, one :class:`OptimizerReport` per optimizer state
dict, :class:`GroupReport`, :class:`ParamReport`, :class:`TensorInfo`, :class:`TensorStats`)
and :func:`jsonable` / :meth:`InspectReport.to_json`, which give the object DESIGN.md
specifies for ``inspect --json``. Reading a checkpoint into a report (naming, stats,
warnings) is :mod:`optckpt.inspect`, which re-exports these names.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optckpt.companions import CompanionReport
from optckpt.described import dtype_name as dtype_name  # re-exported: defined with DType
from optckpt.json_values import jsonable as jsonable  # re-exported: defined there
from optckpt.optim.guess import Guess


@dataclass(frozen=True)
class TensorInfo:
    """Shape, dtype and device of one state tensor (the device it was saved from)."""

    shape: tuple[int, ...]
    dtype: str
    device: str | None  # None: not recorded (DCP)
    numel: int
    nbytes: int


@dataclass(frozen=True)
class TensorStats:
    """Values of one state tensor: L2 norm, finite min/max, non-finite count, RMS, mean."""

    norm: float
    min: float | None
    max: float | None
    nonfinite: int
    rms: float
    mean: float


@dataclass
class ParamReport:
    """One parameter ID: its group, name and state."""

    id: Any
    name: str | None
    group: int | None
    state: dict[str, TensorInfo | Any]
    stats: dict[str, TensorStats] = field(default_factory=dict)

    def tensor_infos(self) -> list[TensorInfo]:
        """Every state tensor, including those inside lists (LBFGS keeps its history so)."""
        return list(_tensor_infos(self.state.values()))

    @property
    def numel(self) -> int:
        return sum(v.numel for v in self.tensor_infos())

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.tensor_infos())


def _tensor_infos(values: Iterable[Any]) -> Iterator[TensorInfo]:
    for value in values:
        if isinstance(value, TensorInfo):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from _tensor_infos(value)


@dataclass(frozen=True)
class GroupReport:
    """One param group: its size, how many of its parameters have state, its hyperparameters."""

    index: int
    num_params: int
    params_with_state: int
    hyperparams: dict[str, Any]


@dataclass
class OptimizerReport:
    """One optimizer state dict found in the checkpoint."""

    key: str
    guess: Guess
    groups: list[GroupReport]
    params: list[ParamReport]
    steps: dict[Any, float]
    names_source: str | None
    warnings: list[str]
    picture: str | None = None
    names_from: str = ""  # the source of the names, in words
    notes: list[str] = field(default_factory=list)  # about the run: why a source gave no names

    @property
    def varying_hyperparams(self) -> set[str]:
        """Hyperparameters whose value differs between groups."""
        keys = {k for g in self.groups for k in g.hyperparams}
        return {
            k
            for k in keys
            if len({repr(g.hyperparams.get(k, "<missing>")) for g in self.groups}) > 1
        }

    def totals(self) -> dict[str, int]:
        """Counts and sizes over every parameter's state."""
        grouped = [p for p in self.params if p.group is not None]
        return {
            "params": len(grouped),
            "params_with_state": sum(1 for p in grouped if p.state),
            "numel": sum(p.numel for p in self.params),
            "bytes": sum(p.nbytes for p in self.params),
        }

    def by_dtype(self) -> dict[str, dict[str, int]]:
        """Elements and bytes of state tensors per dtype."""
        out: dict[str, dict[str, int]] = defaultdict(lambda: {"numel": 0, "bytes": 0})
        for p in self.params:
            for v in p.tensor_infos():
                out[v.dtype]["numel"] += v.numel
                out[v.dtype]["bytes"] += v.nbytes
        return dict(sorted(out.items()))


@dataclass
class InspectReport:
    """Everything ``optckpt inspect`` shows."""

    path: Path
    format: str
    size: int
    top_level_keys: list[str]
    optimizers: list[OptimizerReport]
    storage: dict[str, Any] | None = None  # DCP: files, tensors, chunks, sharded tensors
    read_notes: list[str] = field(default_factory=list)  # which checkpoint-N was read
    # LR schedulers, GradScalers, trainer counters (optckpt.companions)
    companions: list[CompanionReport] = field(default_factory=list)

    @property
    def notes(self) -> list[str]:
        """What optckpt says about its run (``note:`` lines, ``"notes"`` in JSON), once each:
        how it read the checkpoint, then what each optimizer's names need."""
        found = (n for o in self.optimizers for n in o.notes)
        return list(dict.fromkeys([*self.read_notes, *found]))

    def to_json(self) -> dict[str, Any]:
        """The ``inspect --json`` object of DESIGN.md."""
        found: dict[str, Any] = {
            "path": str(self.path),
            "format": self.format,
            "optimizers": [_optimizer_json(o) for o in self.optimizers],
            "companions": [c.to_json() for c in self.companions],
        }
        if self.storage is not None:
            found["dcp"] = self.storage
        return found


def _optimizer_json(report: OptimizerReport) -> dict[str, Any]:
    params = []
    for p in report.params:
        entry: dict[str, Any] = {
            "id": jsonable(p.id),
            "name": p.name,
            "group": p.group,
            "state": {str(k): _state_json(v) for k, v in p.state.items()},
        }
        if p.id in report.steps:
            entry["step"] = jsonable(report.steps[p.id])  # nan in a damaged checkpoint
        if p.stats:
            entry["stats"] = {k: jsonable(vars(s)) for k, s in p.stats.items()}
        params.append(entry)
    return {
        "key": report.key,
        "optimizer": report.guess.name,
        "optimizer_guess": {
            "confidence": report.guess.confidence,
            "candidates": list(report.guess.candidates),
            "reason": report.guess.reason,
        },
        "names_source": report.names_source,
        "param_groups": [
            {
                "index": g.index,
                "num_params": g.num_params,
                "params_with_state": g.params_with_state,
                "hyperparams": jsonable(g.hyperparams),
            }
            for g in report.groups
        ],
        "params": params,
        "totals": {**report.totals(), "by_dtype": report.by_dtype()},
        "warnings": report.warnings,
    }


def _state_json(value: Any) -> Any:
    if isinstance(value, TensorInfo):
        return {"shape": list(value.shape), "dtype": value.dtype, "device": value.device}
    if isinstance(value, (list, tuple)):
        return [_state_json(v) for v in value]
    return jsonable(value)
