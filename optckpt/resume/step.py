"""The resume step itself: options checked, the state loaded, stepped and checked, and the
checkpoint written when every check passed."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from optckpt.errors import UsageError
from optckpt.io.write import ProgressStart
from optckpt.layout import load_layout
from optckpt.locate import Located
from optckpt.optim.specs import gradients_of
from optckpt.resume.checks import (
    check_counters_advance,
    check_counters_agree,
    check_finite,
    check_loads,
    check_shapes,
    steps_of,
)
from optckpt.resume.companions import agreement, companions_of, unchanged_note
from optckpt.resume.optimizer import (
    STEP_ERRORS,
    describe_error,
    load_optimizer,
    optimizer_class,
    uncapture,
)
from optckpt.resume.options import ResumeOptions
from optckpt.resume.parameters import Params
from optckpt.resume.report import Check, ResumeReport, ResumeRun
from optckpt.resume.source import Source
from optckpt.resume.torch_compare import matches_torch
from optckpt.resume.updates import GradientSquares, group_updates, is_adaptive
from optckpt.resume.write import check_out, check_storable_as, write_checkpoint
from optckpt.synthetic import Gradients, take_steps


def _layout(from_layout: str | Path | Any | None, allow_globals: Iterable[str]) -> Any | None:
    """``--from`` as a :class:`~optckpt.layout.Layout` (loaded when it is a path)."""
    if isinstance(from_layout, (str, Path)):
        return load_layout(from_layout, (), allow_globals)
    return from_layout


def _skipped(names: list[str], why: str) -> list[Check]:
    return [Check(name, None, f"skipped: {why}") for name in names]


@dataclass
class Stepped:
    """The bundled optimizer after the steps, its parameters by ID, the state dict it was
    loaded from and each ID's name in the model weights (what ``-o`` writes back)."""

    optimizer: Any
    live: dict[Any, torch.Tensor]
    found: Located | None = None
    names: Mapping[Any, str] = field(default_factory=dict)


def _take_steps(
    optimizer: Any, name: str, ids: list[list[Any]], seed: int, steps: int
) -> tuple[Check, GradientSquares]:
    """The ``steps_taken`` check, and the gradients' squares seen on the way."""
    grads = GradientSquares(
        {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]},
        [0.0] * len(ids),
        [0] * len(ids),
    )
    try:
        take_steps(optimizer, Gradients(seed, gradients_of(name)), steps, grads.observe)
    except STEP_ERRORS as e:
        return Check("steps_taken", False, describe_error(e)), grads
    return Check("steps_taken", True, f"{steps} step(s) of {name}"), grads


def _check_and_step(
    report: ResumeReport,
    source: Source,
    cls: type,
    params: Params,
    state_dict: Any,
    check_torch: bool,
    atol: float | None,
) -> Stepped | None:
    """Load the state into ``cls``, take the steps, and add each check to ``report`` in order;
    ``None`` when a check stopped the run (the checks after it are added as skipped)."""
    name, steps = cls.__name__, report.steps
    ids = [list(g["params"]) for g in state_dict["param_groups"]]
    owned = source.owned(state_dict)
    # Checks of the saved state (copied exactly), before torch's cast can hide anything.
    shapes = check_shapes(owned["state"], params, name)
    agree = check_counters_agree(owned, params)
    finite_before = check_finite("finite_before", owned["state"], params.by_id, params.names)
    counters_before = steps_of(owned["state"], params.by_id)

    ours = load_optimizer(cls, params, owned)
    report.notes += uncapture(ours)
    report.checks += [check_loads(state_dict, ids, name), shapes, agree, finite_before]
    later = ["steps_taken", "step_counters_advance", "finite_after"]
    later += ["matches_torch"] if check_torch else []
    if not shapes.ok:
        report.checks += _skipped(later, "the shapes do not fit")
        return None
    taken, grads = _take_steps(ours, name, ids, source.seed, steps)
    report.checks.append(taken)
    if not taken.ok:
        report.checks += _skipped(later[1:], "the step failed")
        return None

    live = {
        pid: p
        for g, gid in zip(ours.param_groups, ids, strict=True)
        for p, pid in zip(g["params"], gid, strict=True)
    }
    counters_after = steps_of({pid: ours.state.get(p, {}) for pid, p in live.items()}, live)
    report.checks += [
        check_counters_advance(counters_before, counters_after, params, steps),
        check_finite("finite_after", ours.state_dict()["state"], live, params.names),
    ]
    report.groups = group_updates(
        ours, ids, params.before(), grads.squares, grads.count, steps, is_adaptive(name)
    )
    if check_torch:
        report.checks.append(matches_torch(source, cls, ours, params.names, steps, atol))
    return Stepped(ours, live)


def _saved_on(checkpoint: Any, out: Path) -> list[str]:
    """A note when the input was saved off the CPU: ``out`` keeps those devices."""
    saved_on = sorted(set(checkpoint.placement.values()) - {"cpu"})
    if not saved_on:
        return []
    return [
        f"the input was saved on {', '.join(saved_on)}; {out} keeps those devices "
        "(the steps ran on the CPU)"
    ]


def _resume_one(
    source: Source,
    checkpoint: Any,
    found: Located,
    options: ResumeOptions,
) -> tuple[ResumeReport, Stepped | None]:
    """The checks of one optimizer state dict, and what its steps left to write (``None``
    when a check stopped the run)."""
    cls, optimizer_from = optimizer_class(found.state_dict, options.optimizer)
    params = source.parameters(checkpoint, found.state_dict)
    report = ResumeReport(
        source.path,
        found.key,
        cls.__name__,
        optimizer_from,
        params.source,
        options.steps,
        source.seed,
    )
    report.notes += params.notes
    stepped = _check_and_step(
        report, source, cls, params, found.state_dict, options.check_torch, options.atol
    )
    if stepped is not None:
        stepped.found, stepped.names = found, params.weights
    report.companions = companions_of(checkpoint, found.key, source.allow_globals)
    agree = agreement(report.companions)
    if agree is not None:
        report.checks.append(agree)
    return report, stepped


def resume_each(
    path: str | Path,
    options: ResumeOptions | None = None,
    *,
    progress: ProgressStart | None = None,
    only_one: bool = False,
) -> ResumeRun:
    """Take the resume steps of :func:`resume_step` for every optimizer state dict of the
    checkpoint (or the one at ``options.key``), each checked on its own.

    Arguments are those of :func:`resume_step`; ``options.optimizer`` needs a ``key`` where
    the checkpoint holds several. ``only_one``: refuse a checkpoint with several and no ``key``
    (what :func:`resume_step` takes). ``options.out`` is written once, with every state dict
    stepped, when every check of every one passed.

    Returns:
        The :class:`ResumeRun`: a report per state dict.

    Raises:
        As :func:`resume_step`; UsageError for ``optimizer`` over several state dicts.
    """
    path, o = Path(path), options or ResumeOptions()
    o.check()
    output = None
    if o.out is not None:
        output = check_out(o.out, path, o.model, o.from_layout, force=o.force, link=o.link)
    layout = _layout(o.from_layout, o.allow_globals)
    model = None if o.model is None else Path(o.model)
    source = Source(path, o.key, model, o.seed, tuple(o.allow_globals), layout)
    checkpoint, every = source.read_every(only_one=only_one)
    if o.optimizer is not None and len(every) > 1:
        listed = ", ".join(repr(f.key) for f in every)
        raise UsageError(
            f"--optimizer names one optimizer; the checkpoint holds several ({listed}): "
            "pick one with --key"
        )
    if output is not None:
        check_storable_as(checkpoint, output)
    run = ResumeRun(path, [], notes=checkpoint.notes())
    done = []
    for found in every:
        report, stepped = _resume_one(replace(source, key=found.key), checkpoint, found, o)
        run.results.append(report)
        done.append(stepped)
    if output is None:
        return run
    if not run.ok:
        run.notes.append(f"nothing written to {output.path}: a check failed")
        return run
    write_checkpoint(source, checkpoint, [d for d in done if d is not None], output, progress)
    run.out = output.path
    for report in run.results:
        report.out = output.path
    run.notes += _saved_on(checkpoint, output.path)
    kept = {c.key: c for report in run.results for c in report.companions}
    run.notes += unchanged_note(list(kept.values()), output.path)
    return run


def resume_step(
    path: str | Path,
    options: ResumeOptions | None = None,
    *,
    progress: ProgressStart | None = None,
) -> ResumeReport:
    """Load a checkpoint's optimizer state, take ``steps`` steps, and check the result.

    Args:
        path: the checkpoint (any format optckpt reads).
        options: the flags (:class:`ResumeOptions`; its defaults when ``None``).
        progress: called with the bytes of tensors to write when writing ``options.out``
            starts; the callback it returns is told each write.

    Returns:
        The :class:`ResumeReport`; ``report.ok`` says whether every check passed. (For
        every state dict of a checkpoint that holds several, :func:`resume_each`.)

    Raises:
        UsageError: bad options, several optimizer state dicts and no ``key``, IDs that fit the
            weights in more than one way (:class:`~optckpt.names.AmbiguousNamesError`).
        UnreadableCheckpointError: the checkpoint or ``model`` cannot be read.
        IncompatibleStateError: an unsure guess of the optimizer, weights that do not fit the
            groups, a state that does not load (group count or size mismatch).
    """
    run = resume_each(path, options, progress=progress, only_one=True)
    (report,) = run.results
    report.notes[:0] = [n for n in run.notes if n not in report.notes]
    report.out = run.out
    return report
