"""The resume step itself: options checked, the state loaded, stepped and checked, and the
checkpoint written when every check passed."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from optckpt.errors import UsageError
from optckpt.io.safetensors_format import check_storable
from optckpt.io.write import ProgressStart, check_output, format_for
from optckpt.layout import load_layout
from optckpt.locate import tensors_in
from optckpt.optim.specs import gradients_of
from optckpt.resume.checks import (
    check_counters_advance,
    check_counters_agree,
    check_finite,
    check_loads,
    check_shapes,
    steps_of,
)
from optckpt.resume.optimizer import (
    STEP_ERRORS,
    describe_error,
    load_optimizer,
    optimizer_class,
    uncapture,
)
from optckpt.resume.report import Check, ResumeReport
from optckpt.resume.source import Source
from optckpt.resume.torch_compare import matches_torch
from optckpt.resume.updates import GradientSquares, group_updates, is_adaptive
from optckpt.resume.write import write_checkpoint
from optckpt.synthetic import MAX_SEED, Gradients, take_steps


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
        layout = load_layout(from_layout, (), allow_globals)
    source = Source(
        path, key, None if model is None else Path(model), seed, tuple(allow_globals), layout
    )
    checkpoint, found = source.read()
    if out is not None and fmt == "safetensors":  # refused now, not after the steps
        check_storable((str(key), t.dtype) for key, t in tensors_in(checkpoint.root))
    state_dict = found.state_dict
    cls, optimizer_from = optimizer_class(state_dict, optimizer)
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
    shapes = check_shapes(owned["state"], params, cls.__name__)
    agree = check_counters_agree(owned, params)
    finite_before = check_finite("finite_before", owned["state"], params.by_id, params.names)
    counters_before = steps_of(owned["state"], params.by_id)

    ours = load_optimizer(cls, params, owned)
    report.notes += uncapture(ours)
    report.checks += [
        check_loads(state_dict, ids, cls.__name__),
        shapes,
        agree,
        finite_before,
    ]
    later = ["steps_taken", "step_counters_advance", "finite_after"]
    later += ["matches_torch"] if check_torch else []
    if not shapes.ok:
        report.checks += [Check(name, None, "skipped: the shapes do not fit") for name in later]
        return _nothing_written(report, out)

    grads = GradientSquares(
        {id(p): i for i, g in enumerate(ours.param_groups) for p in g["params"]},
        [0.0] * len(ids),
        [0] * len(ids),
    )
    try:
        take_steps(ours, Gradients(seed, gradients_of(cls.__name__)), steps, grads.observe)
    except STEP_ERRORS as e:
        report.checks.append(Check("steps_taken", False, describe_error(e)))
        report.checks += [Check(name, None, "skipped: the step failed") for name in later[1:]]
        return _nothing_written(report, out)
    report.checks.append(Check("steps_taken", True, f"{steps} step(s) of {cls.__name__}"))

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
        ours, ids, params.before(), grads.squares, grads.count, steps, is_adaptive(cls.__name__)
    )
    if check_torch:
        report.checks.append(matches_torch(source, cls, ours, params.names, steps, atol))

    if out is not None:
        if not report.ok:
            return _nothing_written(report, out)
        write_checkpoint(source, checkpoint, found, ours, live, params.weights, out, fmt, progress)
        report.out = out
        saved_on = sorted(set(checkpoint.placement.values()) - {"cpu"})
        if saved_on:
            report.notes.append(
                f"the input was saved on {', '.join(saved_on)}; {out} keeps those devices "
                "(the steps ran on the CPU)"
            )
    return report
