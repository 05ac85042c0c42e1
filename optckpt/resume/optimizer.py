"""The bundled optimizer of a resume step: which class, built over the parameters, the state
loaded into it, ready to step on the CPU."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from optckpt.errors import IncompatibleStateError
from optckpt.optim import by_name
from optckpt.optim.guess import VERSIONED_GROUP_KEYS, guess_optimizer
from optckpt.optim.registry import defaults
from optckpt.resume.parameters import Params
from optckpt.statedict import REMAP_HINT

STEP_ERRORS = (RuntimeError, ValueError, TypeError, IndexError, KeyError, AssertionError)


def describe_error(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def build_optimizer(cls: type, params: Params, state_dict: Mapping[str, Any]) -> Any:
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
    required = set(defaults(cls)) - VERSIONED_GROUP_KEYS
    for index, group in enumerate(state_dict["param_groups"]):
        missing = sorted(required - set(group))
        if missing:
            raise IncompatibleStateError(
                f"group {index} has no {', '.join(missing)}: it was not saved by "
                f"{cls.__name__}; name the right optimizer with --optimizer, or leave it out "
                "to guess"
            )


def load_optimizer(cls: type, params: Params, state_dict: Mapping[str, Any]) -> Any:
    """Build ``cls`` over the parameters and load the state: the ``loads`` check's work."""
    try:
        optimizer = build_optimizer(cls, params, state_dict)
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


def uncapture(optimizer: Any) -> list[str]:
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


def optimizer_class(state_dict: Mapping[str, Any], name: str | None) -> tuple[type, str]:
    """The bundled optimizer class to resume with, and what named it.

    Raises:
        UnknownOptimizerError: ``name`` is not a bundled optimizer.
        IncompatibleStateError: no ``name`` and the guess is unsure (lists the candidates).
    """
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
