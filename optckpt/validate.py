"""Whether an object is an optimizer state dict optckpt can use, checked before anything walks it.

* :func:`is_optimizer_state_dict` tells whether an object has the shape of one;
* :func:`validate_state_dict` refuses what has that shape but that no optimizer could use
  (``params`` holding lists, a complex ``step``, ``lr = 10**400``, ...);
* :func:`show_value` and :func:`huge_int` are the value descriptions and the too-large-int
  search its messages use, shared with the layout and regenerate readers.

The state-dict rules themselves (pack, unpack, cast) are :mod:`optckpt.statedict`, which
re-exports these names.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from optckpt.described import dtype_name, is_tensor, layout_name
from optckpt.errors import UnreadableCheckpointError


def is_optimizer_state_dict(obj: object) -> bool:
    """Tell whether ``obj`` has the shape of an optimizer state dict.

    That is a mapping with a ``state`` mapping and a ``param_groups`` list of mappings that
    each have a ``params`` list.
    """
    if not isinstance(obj, Mapping):
        return False
    state, groups = obj.get("state"), obj.get("param_groups")
    return (
        isinstance(state, Mapping)
        and isinstance(groups, (list, tuple))
        and all(
            isinstance(g, Mapping) and isinstance(g.get("params"), (list, tuple)) for g in groups
        )
    )


# The dtypes a ``step`` tensor may have: torch keeps it as a float32 (or float64) 0-dim tensor,
# older versions as an integer; bool, complex, float8 and the wide unsigned types are no count.
_STEP_DTYPES = frozenset(
    {"float16", "bfloat16", "float32", "float64", "uint8", "int8", "int16", "int32", "int64"}
)


def show_value(value: Any) -> str:
    """A short description of a value for a message (never the repr of a huge int)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    if is_tensor(value):
        return f"a {dtype_name(value.dtype)} tensor of shape {list(value.shape)}"
    text = repr(value) if isinstance(value, (int, float, complex, str, bytes)) else ""
    if text and len(text) <= 40:
        return text
    return f"a {type(value).__name__}"


def _is_id(value: Any) -> bool:
    # Integers are torch's positions (negative ones are odd but harmless, as in torch); strings
    # are the FQNs of name-keyed state (DCP, FSDP). A bool equals 0 or 1 and hides one of them.
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _leaves(root: Any) -> Iterator[Any]:
    """Every value inside ``root`` that is not a dict, list or tuple (dict keys included),
    each container visited once: a reference cycle ends the walk instead of looping."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        value = stack.pop()
        if isinstance(value, (Mapping, list, tuple)):
            if id(value) in seen:
                continue
            seen.add(id(value))
            if isinstance(value, Mapping):
                stack.extend(value.keys())
                stack.extend(value.values())
            else:
                stack.extend(value)
        else:
            yield value


def huge_int(root: Any) -> int | None:
    """The first int inside ``root`` (through dicts, lists and tuples) that no float can hold
    (``10**400``: torch's arithmetic on it raises ``OverflowError``), else ``None``."""
    for value in _leaves(root):
        if isinstance(value, int) and not isinstance(value, bool):
            try:
                float(value)
            except OverflowError:
                return value
    return None


def _step_problem(step: Any) -> str | None:
    if is_tensor(step):
        if (
            layout_name(step) != "strided"
            or dtype_name(step.dtype) not in _STEP_DTYPES
            or step.numel() != 1
        ):
            return f"is {show_value(step)}"
        return None
    if isinstance(step, bool) or not isinstance(step, (int, float)):
        return f"is {show_value(step)}"
    return None


def _entry_problem(entry: Any, shaped: frozenset[str]) -> str | None:
    """What is wrong with one parameter's state, or ``None``."""
    if not isinstance(entry, Mapping):
        return f"is {show_value(entry)}, not a dict of state values"
    if "step" in entry:
        problem = _step_problem(entry["step"])
        if problem:
            return f"has a step that {problem}; a step is a number, or a real tensor of one element"
    for key, value in entry.items():
        if key in shaped and not is_tensor(value):
            return f"has {key!r} = {show_value(value)}; torch keeps a tensor there"
    for value in _leaves(entry):
        if is_tensor(value) and layout_name(value) != "strided":
            layout = layout_name(value)
            return f"holds a {layout} tensor; optimizer state is dense"
    huge = huge_int(entry)
    if huge is not None:
        return f"holds {show_value(huge)}, too large for any float"
    return None


def validate_state_dict(state_dict: Any, *, where: str = "") -> None:
    """Refuse what has the shape of an optimizer state dict but is none that torch could write
    or any command could use, before anything walks it.

    torch's ``load_state_dict`` checks only the group count and sizes, and fails later, deep
    inside ``step``, on the rest. optckpt checks the rest up front:

    * ``param_groups`` is a list of dicts, each with a ``params`` list;
    * every ID (in ``params`` and as a ``state`` key) is an int or a str (the FQN of
      name-keyed state): not a bool, float, tensor, list or dict. Negative IDs, IDs listed
      twice, and IDs listed in two groups are kept, as torch keeps them (a bundled optimizer
      then refuses the last, as ``torch.optim`` does: that is incompatible, exit 4);
    * every parameter's state is a dict; its ``step``, when present, is a real number: a
      Python int or float, or a one-element tensor of a float or integer dtype (not bool,
      complex or float8); parameter-shaped keys (``exp_avg``, ...) hold tensors; every state
      tensor is dense;
    * no int anywhere (hyperparameters, ``param_names``, state) is too large for a float
      (``lr = 10**400``: torch raises ``OverflowError`` at the first step). Hyperparameters of
      other odd types (complex, NaN, nested dicts, strings) are kept: they are the saved
      values, inspect shows them, and an optimizer that cannot use them says so.

    These are inputs that cannot be read as an optimizer state dict, so the error is
    :class:`~optckpt.errors.UnreadableCheckpointError` (exit 3). Whether a valid state dict
    fits a given optimizer (group count and sizes, shapes) is
    :func:`~optckpt.statedict.check_groups`' question
    (:class:`~optckpt.errors.IncompatibleStateError`, exit 4).

    Args:
        state_dict: the candidate.
        where: its key path in the checkpoint, for the message.

    Raises:
        UnreadableCheckpointError: the first problem found, with where it is.
    """
    from optckpt.optim.specs import param_shaped_keys  # optckpt.optim imports optckpt.statedict

    at = f" at {where!r}" if where else ""

    def refuse(problem: str) -> UnreadableCheckpointError:
        return UnreadableCheckpointError(f"not a valid optimizer state dict{at}: {problem}")

    if not isinstance(state_dict, Mapping):
        raise refuse(f"it is {show_value(state_dict)}, not a dict")
    state, groups = state_dict.get("state"), state_dict.get("param_groups")
    if not isinstance(state, Mapping):
        raise refuse(f"'state' is {show_value(state)}, not a dict")
    if not isinstance(groups, (list, tuple)):
        raise refuse(f"'param_groups' is {show_value(groups)}, not a list")
    for index, group in enumerate(groups):
        if not isinstance(group, Mapping):
            raise refuse(f"param_groups[{index}] is {show_value(group)}, not a dict")
        params = group.get("params")
        if not isinstance(params, (list, tuple)):
            raise refuse(f"param_groups[{index}]['params'] is {show_value(params)}, not a list")
        for pid in params:
            if not _is_id(pid):
                raise refuse(
                    f"param_groups[{index}]['params'] lists {show_value(pid)}; "
                    "parameter IDs are integers or names"
                )
        huge = huge_int(group)
        if huge is not None:
            raise refuse(f"param_groups[{index}] holds {show_value(huge)}, too large for any float")
    shaped = param_shaped_keys()
    for pid, entry in state.items():
        if not _is_id(pid):
            raise refuse(
                f"'state' has the key {show_value(pid)}; parameter IDs are integers or names"
            )
        problem = _entry_problem(entry, shaped)
        if problem:
            raise refuse(
                f"the state of {'ID ' if isinstance(pid, int) else ''}{show_value(pid)} {problem}"
            )
