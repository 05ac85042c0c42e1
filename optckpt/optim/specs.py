"""What each torch optimizer class keeps, declared once (torch's ``OptimizerInfo`` is the model).

One :class:`OptimizerSpec` per class of ``torch.optim`` (torch 2.13): its group keys with their
defaults, its per-parameter state keys and how each one's shape follows from the parameter's,
the state key ``inspect`` pictures, whether ``step`` is torch's counter tensor, whether the
step size adapts per element, and the gradients it takes. Every command reads these facts
from here: the optimizer guess (:mod:`optckpt.optim.guess`), inspect's picture and warnings,
remap's shape check, resume-step's checks and stand-in parameters.
``tests/optim/test_specs.py`` builds every ``torch.optim`` class of the installed torch,
steps it, and checks that each spec predicts exactly the state and group keys torch wrote.

How a state value relates to its parameter (:data:`Kind`), as torch creates it:

* ``"param"`` — a tensor of the parameter's shape (``exp_avg``, ``momentum_buffer``, ...);
* ``"row"``, ``"col"`` — Adafactor's factored second moment of a parameter with 2 or more
  dimensions: ``row_var`` is the shape with the last dimension 1, ``col_var`` the shape with
  the second-to-last dimension 1 (``torch/optim/_adafactor.py``, ``_init_group``);
* ``"scalar"`` — a 0-dim tensor (``step``, ASGD's ``eta`` and ``mu``, NAdam's ``mu_product``);
* ``"number"`` — a Python number (SparseAdam's ``step``, LBFGS's counters and ``prev_loss``);
* ``"scalar_or_number"`` — either (LBFGS's ``t`` and ``H_diag``: ``1`` until it has history);
* ``"flat"`` — one 1-dim tensor over all the optimizer's parameters, concatenated (LBFGS);
* ``"flat_list"`` — a list of such vectors (LBFGS's history ``old_dirs``, ``old_stps``);
* ``"scalar_list"`` — a list of 0-dim tensors, or ``None`` where unset (LBFGS's ``ro``, ``al``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "SCHEDULER_GROUP_KEYS",
    "SPECS",
    "Kind",
    "OptimizerSpec",
    "StateKey",
    "expected_state_shape",
    "flat_state",
    "gradients_of",
    "is_second_moment",
    "param_dtype_from_state",
    "param_shape_from_state",
    "param_shaped_keys",
    "picture_label",
    "picture_order",
    "spec_of",
    "state_mismatches",
]

Kind = Literal[
    "param",
    "row",
    "col",
    "scalar",
    "number",
    "scalar_or_number",
    "flat",
    "flat_list",
    "scalar_list",
]

# When an optional state key is present, from the group's options and the parameter's
# number of dimensions; the names are what StateKey.when says.
_CONDITIONS: dict[str, Callable[[Mapping[str, Any], int], bool]] = {
    "amsgrad": lambda group, ndim: bool(group.get("amsgrad")),
    "momentum != 0": lambda group, ndim: group.get("momentum", 0) != 0,
    "centered": lambda group, ndim: bool(group.get("centered")),
    "ndim >= 2": lambda group, ndim: ndim >= 2,
    "ndim < 2": lambda group, ndim: ndim < 2,
}


@dataclass(frozen=True)
class StateKey:
    """One per-parameter state key.

    Attributes:
        name: the key in ``state[id]``.
        kind: how its value relates to the parameter (see the module doc).
        when: the condition under which torch writes it (a name in ``_CONDITIONS``); ``None``
            for always.
        sometimes: torch may leave it out even when ``when`` holds (LBFGS writes its history
            only once an iteration found a direction).
        second_moment: a running average of squared gradients: inspect pictures its square
            root.
    """

    name: str
    kind: Kind
    when: str | None = None
    sometimes: bool = False
    second_moment: bool = False

    def applies(self, group: Mapping[str, Any], ndim: int) -> bool:
        """Whether torch writes this key for a parameter of ``ndim`` dimensions in ``group``."""
        return self.when is None or _CONDITIONS[self.when](group, ndim)


@dataclass(frozen=True)
class OptimizerSpec:
    """The facts of one ``torch.optim`` class (torch 2.13).

    Attributes:
        name: the torch class name (``"AdamW"``).
        defaults: group keys and their default values, in torch's order (``optimizer.defaults``).
        state: the per-parameter state keys.
        picture: the state key inspect's ``--stats`` bars picture, if any.
        adaptive: the step size adapts per element (resume-step reports an effective lr).
        gradients: ``"dense"``, ``"sparse"`` (SparseAdam) or ``"closure"`` (LBFGS), as
            :mod:`optckpt.synthetic` draws them.
        first_param_only: the whole state lives under the first parameter (LBFGS).
        matrices_only: takes only 2-D parameters (Muon).
    """

    name: str
    defaults: Mapping[str, Any]
    state: tuple[StateKey, ...]
    picture: str | None = None
    adaptive: bool = False
    gradients: Literal["dense", "sparse", "closure"] = "dense"
    first_param_only: bool = False
    matrices_only: bool = False
    _by_name: dict[str, StateKey] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {k.name: k for k in self.state})

    def key(self, name: str) -> StateKey | None:
        """The state key called ``name``, if this class has it."""
        return self._by_name.get(name)

    @property
    def group_keys(self) -> frozenset[str]:
        """The hyperparameter keys of every group."""
        return frozenset(self.defaults)

    @property
    def required_state(self) -> frozenset[str]:
        """State keys every stepped parameter has, whatever the options."""
        return frozenset(k.name for k in self.state if k.when is None and not k.sometimes)

    @property
    def optional_state(self) -> frozenset[str]:
        """State keys that depend on options, the parameter's shape or the run."""
        return frozenset(k.name for k in self.state) - self.required_state

    @property
    def step_is_counter(self) -> bool:
        """Whether ``step`` is torch's 0-dim counter tensor (a Python number in a checkpoint
        of this class then means torch < 1.12 saved it)."""
        step = self.key("step")
        return step is not None and step.kind == "scalar"

    def state_keys_for(self, group: Mapping[str, Any], ndim: int) -> frozenset[str]:
        """The state keys torch writes for a stepped parameter of ``ndim`` dimensions."""
        return frozenset(k.name for k in self.state if k.applies(group, ndim))


def _spec(name: str, defaults: Mapping[str, Any], *state: StateKey, **facts: Any) -> OptimizerSpec:
    return OptimizerSpec(name, dict(defaults), tuple(state), **facts)


_STEP = StateKey("step", "scalar")
_EXP_AVG = StateKey("exp_avg", "param")
_EXP_AVG_SQ = StateKey("exp_avg_sq", "param", second_moment=True)
_ADAM_STATE = (
    _STEP,
    _EXP_AVG,
    _EXP_AVG_SQ,
    StateKey("max_exp_avg_sq", "param", when="amsgrad", second_moment=True),
)
_ADAM_DEFAULTS = {
    "lr": 0.001,
    "betas": (0.9, 0.999),
    "eps": 1e-08,
    "weight_decay": 0,
    "amsgrad": False,
    "maximize": False,
    "foreach": None,
    "capturable": False,
    "differentiable": False,
    "fused": None,
    "decoupled_weight_decay": False,
}

# In the order of DESIGN.md's list of bundled optimizers.
SPECS: dict[str, OptimizerSpec] = {
    s.name: s
    for s in (
        _spec(
            "SGD",
            {
                "lr": 0.001,
                "momentum": 0,
                "dampening": 0,
                "weight_decay": 0,
                "nesterov": False,
                "maximize": False,
                "foreach": None,
                "differentiable": False,
                "fused": None,
            },
            StateKey("momentum_buffer", "param", when="momentum != 0"),
            picture="momentum_buffer",
        ),
        _spec("Adam", _ADAM_DEFAULTS, *_ADAM_STATE, picture="exp_avg_sq", adaptive=True),
        _spec(
            "AdamW",
            {**_ADAM_DEFAULTS, "weight_decay": 0.01, "decoupled_weight_decay": True},
            *_ADAM_STATE,
            picture="exp_avg_sq",
            adaptive=True,
        ),
        _spec(
            "Adagrad",
            {
                "lr": 0.01,
                "lr_decay": 0,
                "eps": 1e-10,
                "weight_decay": 0,
                "initial_accumulator_value": 0,
                "foreach": None,
                "maximize": False,
                "differentiable": False,
                "fused": None,
            },
            _STEP,
            StateKey("sum", "param", second_moment=True),
            picture="sum",
            adaptive=True,
        ),
        _spec(
            "Adadelta",
            {
                "lr": 1.0,
                "rho": 0.9,
                "eps": 1e-06,
                "weight_decay": 0,
                "maximize": False,
                "capturable": False,
                "foreach": None,
                "differentiable": False,
            },
            _STEP,
            StateKey("square_avg", "param", second_moment=True),
            StateKey("acc_delta", "param"),
            picture="square_avg",
            adaptive=True,
        ),
        _spec(
            "Adamax",
            {
                "lr": 0.002,
                "betas": (0.9, 0.999),
                "eps": 1e-08,
                "weight_decay": 0,
                "foreach": None,
                "maximize": False,
                "differentiable": False,
                "capturable": False,
            },
            _STEP,
            _EXP_AVG,
            StateKey("exp_inf", "param"),
            picture="exp_inf",
            adaptive=True,
        ),
        _spec(
            "ASGD",
            {
                "lr": 0.01,
                "lambd": 0.0001,
                "alpha": 0.75,
                "t0": 1000000.0,
                "weight_decay": 0,
                "foreach": None,
                "maximize": False,
                "differentiable": False,
                "capturable": False,
            },
            _STEP,
            StateKey("eta", "scalar"),
            StateKey("mu", "scalar"),
            StateKey("ax", "param"),
            picture="ax",
        ),
        _spec(
            "NAdam",
            {
                "lr": 0.002,
                "betas": (0.9, 0.999),
                "eps": 1e-08,
                "weight_decay": 0,
                "momentum_decay": 0.004,
                "decoupled_weight_decay": False,
                "maximize": False,
                "foreach": None,
                "capturable": False,
                "differentiable": False,
            },
            _STEP,
            StateKey("mu_product", "scalar"),
            _EXP_AVG,
            _EXP_AVG_SQ,
            picture="exp_avg_sq",
            adaptive=True,
        ),
        _spec(
            "RAdam",
            {
                "lr": 0.001,
                "betas": (0.9, 0.999),
                "eps": 1e-08,
                "weight_decay": 0,
                "maximize": False,
                "foreach": None,
                "capturable": False,
                "decoupled_weight_decay": False,
                "differentiable": False,
            },
            _STEP,
            _EXP_AVG,
            _EXP_AVG_SQ,
            picture="exp_avg_sq",
            adaptive=True,
        ),
        _spec(
            "RMSprop",
            {
                "lr": 0.01,
                "momentum": 0,
                "alpha": 0.99,
                "eps": 1e-08,
                "centered": False,
                "weight_decay": 0,
                "capturable": False,
                "foreach": None,
                "maximize": False,
                "differentiable": False,
            },
            _STEP,
            StateKey("square_avg", "param", second_moment=True),
            StateKey("momentum_buffer", "param", when="momentum != 0"),
            StateKey("grad_avg", "param", when="centered"),
            picture="square_avg",
            adaptive=True,
        ),
        _spec(
            "Rprop",
            {
                "lr": 0.01,
                "etas": (0.5, 1.2),
                "step_sizes": (1e-06, 50),
                "foreach": None,
                "maximize": False,
                "differentiable": False,
                "capturable": False,
            },
            _STEP,
            StateKey("prev", "param"),
            StateKey("step_size", "param"),
            adaptive=True,
        ),
        _spec(
            "SparseAdam",
            {"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-08, "maximize": False},
            StateKey("step", "number"),  # torch's SparseAdam counts in a Python int
            _EXP_AVG,
            _EXP_AVG_SQ,
            picture="exp_avg_sq",
            adaptive=True,
            gradients="sparse",
        ),
        _spec(
            "Adafactor",
            {
                "lr": 0.01,
                "beta2_decay": -0.8,
                "eps": (None, 0.001),
                "d": 1.0,
                "weight_decay": 0.0,
                "foreach": None,
                "maximize": False,
            },
            _STEP,
            StateKey("row_var", "row", when="ndim >= 2", second_moment=True),
            StateKey("col_var", "col", when="ndim >= 2", second_moment=True),
            StateKey("variance", "param", when="ndim < 2", second_moment=True),
            adaptive=True,
        ),
        _spec(
            "LBFGS",
            {
                "lr": 1,
                "max_iter": 20,
                "max_eval": 25,
                "tolerance_grad": 1e-07,
                "tolerance_change": 1e-09,
                "history_size": 100,
                "line_search_fn": None,
            },
            StateKey("func_evals", "number"),
            StateKey("n_iter", "number"),
            StateKey("d", "flat", sometimes=True),
            StateKey("t", "scalar_or_number", sometimes=True),
            StateKey("old_dirs", "flat_list", sometimes=True),
            StateKey("old_stps", "flat_list", sometimes=True),
            StateKey("ro", "scalar_list", sometimes=True),
            StateKey("H_diag", "scalar_or_number", sometimes=True),
            StateKey("prev_flat_grad", "flat", sometimes=True),
            StateKey("prev_loss", "number", sometimes=True),
            StateKey("al", "scalar_list", sometimes=True),
            gradients="closure",
            first_param_only=True,
        ),
        _spec(
            "Muon",
            {
                "lr": 0.001,
                "weight_decay": 0.1,
                "momentum": 0.95,
                "nesterov": True,
                "ns_coefficients": (3.4445, -4.775, 2.0315),
                "eps": 1e-07,
                "ns_steps": 5,
                "adjust_lr_fn": None,
            },
            StateKey("momentum_buffer", "param"),
            picture="momentum_buffer",
            matrices_only=True,
        ),
    )
}
"""Every ``torch.optim`` class by its name."""

SCHEDULER_GROUP_KEYS = frozenset(
    {"initial_lr", "max_lr", "min_lr", "max_momentum", "base_momentum", "swa_lr"}
)
"""Group keys that LR schedulers put into the optimizer's groups (every scheduler's
``initial_lr``; OneCycleLR's ``max_lr`` and ``min_lr``; OneCycleLR's and CyclicLR's
``max_momentum`` and ``base_momentum``; SWALR's ``swa_lr``): trained values, not the
optimizer's own hyperparameters."""


def _consensus() -> dict[str, StateKey]:
    """State keys whose kind every class that has them agrees on: what a state key means
    when the optimizer is unknown (``step`` is left out: SparseAdam counts in a Python int)."""
    kinds: dict[str, set[str]] = {}
    first: dict[str, StateKey] = {}
    for spec in SPECS.values():
        for key in spec.state:
            kinds.setdefault(key.name, set()).add(key.kind)
            first.setdefault(key.name, key)
    return {name: first[name] for name, found in kinds.items() if len(found) == 1}


_CONSENSUS = _consensus()


def spec_of(optimizer: str | None) -> OptimizerSpec | None:
    """The spec of a torch class name (``"AdamW"``; case-insensitive), ``None`` if unknown."""
    if optimizer is None:
        return None
    found = SPECS.get(optimizer)
    if found is None:
        found = next((s for n, s in SPECS.items() if n.lower() == optimizer.lower()), None)
    return found


def gradients_of(optimizer: str | None) -> Literal["dense", "sparse", "closure"]:
    """The gradients an optimizer class takes (:attr:`OptimizerSpec.gradients`; dense for an
    unknown one), as :mod:`optckpt.synthetic` draws them."""
    spec = spec_of(optimizer)
    return "dense" if spec is None else spec.gradients


def _state_key(optimizer: str | None, key: Any) -> StateKey | None:
    """What state ``key`` is: the optimizer's own declaration, else every class's agreement."""
    spec = spec_of(optimizer)
    found = spec.key(str(key)) if spec is not None else None
    return found if found is not None else _CONSENSUS.get(str(key))


def param_shaped_keys(optimizer: str | None = None) -> frozenset[str]:
    """The state keys whose tensors have their parameter's shape.

    Args:
        optimizer: a torch class name; ``None`` (or an unknown name) for the keys every
            torch class that has them keeps parameter-shaped.
    """
    spec = spec_of(optimizer)
    keys = spec.state if spec is not None else tuple(_CONSENSUS.values())
    return frozenset(k.name for k in keys if k.kind == "param")


def _shape(value: Any) -> tuple[int, ...] | None:
    """The shape of a tensor, or of anything that reports one (inspect's ``TensorInfo``)."""
    shape = getattr(value, "shape", None)
    return None if shape is None or isinstance(value, (list, tuple)) else tuple(shape)


def _param_like(optimizer: str | None, state: Any) -> tuple[tuple[int, ...], Any] | None:
    """The parameter's shape as its state tells it, and the tensor that told it."""
    if not isinstance(state, Mapping):
        return None
    row = col = None
    for key, value in state.items():
        declared = _state_key(optimizer, key)
        shape = _shape(value)
        if declared is None or shape is None:
            continue
        if declared.kind == "param":
            return shape, value
        if declared.kind == "row":
            row = (shape, value)
        elif declared.kind == "col":
            col = shape
    if row is not None and col is not None and len(row[0]) >= 2 and len(row[0]) == len(col):
        return (*row[0][:-1], col[-1]), row[1]
    return None


def param_shape_from_state(optimizer: str | None, state: Any) -> tuple[int, ...] | None:
    """The shape of the parameter a state belongs to, as the state tells it.

    From a parameter-shaped tensor (``exp_avg``, ``momentum_buffer``, Adafactor's
    ``variance``, ...), or from Adafactor's factored ``row_var`` and ``col_var``. ``None``
    when the state holds no such tensor (no state yet, scalars only, LBFGS's flat vectors).

    Args:
        optimizer: the torch class name when known (see :func:`param_shaped_keys`).
        state: one parameter's state, ``state_dict["state"][id]``; tensors, or anything with
            a ``shape``.
    """
    found = _param_like(optimizer, state)
    return None if found is None else found[0]


def param_dtype_from_state(optimizer: str | None, state: Any) -> Any:
    """The dtype of the tensor :func:`param_shape_from_state` reads (the parameter's dtype,
    as torch casts state to it), or ``None``."""
    found = _param_like(optimizer, state)
    return None if found is None else getattr(found[1], "dtype", None)


def flat_state(optimizer: str | None, state: Any) -> Any:
    """The first of the state's vectors over all the optimizer's parameters (LBFGS's ``d``,
    ``prev_flat_grad``), whose size is their total number of elements; ``None`` if none."""
    if not isinstance(state, Mapping):
        return None
    for key, value in state.items():
        declared = _state_key(optimizer, key)
        if declared is not None and declared.kind == "flat" and _shape(value) is not None:
            return value
    return None


def expected_state_shape(
    optimizer: str | None, key: Any, param_shape: tuple[int, ...], total_numel: int | None = None
) -> tuple[int, ...] | None:
    """The shape torch gives state ``key`` of a parameter of ``param_shape``.

    ``None`` when the key's shape does not follow from the parameter's: a Python number, a
    list, an unknown key, a flat LBFGS vector without ``total_numel``, and scalars (torch
    1.12 made a ``capturable`` step ``torch.zeros((1,))``, which later versions still load).

    Args:
        total_numel: the number of elements of all the optimizer's parameters (LBFGS).
    """
    declared = _state_key(optimizer, key)
    if declared is None:
        return None
    if declared.kind == "param":
        return tuple(param_shape)
    if declared.kind == "row" and len(param_shape) >= 2:
        return (*param_shape[:-1], 1)
    if declared.kind == "col" and len(param_shape) >= 2:
        return (*param_shape[:-2], 1, param_shape[-1])
    if declared.kind == "flat" and total_numel is not None:
        return (total_numel,)
    return None


def state_mismatches(
    optimizer: str | None,
    state: Any,
    param_shape: tuple[int, ...],
    total_numel: int | None = None,
) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """Each tensor of ``state`` whose shape is not the one torch gives it for a parameter of
    ``param_shape``: ``(key, shape, expected)``. LBFGS's history vectors count as flat ones."""
    if not isinstance(state, Mapping):
        return []
    wrong: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    for key, value in state.items():
        want = expected_state_shape(optimizer, key, param_shape, total_numel)
        declared = _state_key(optimizer, key)
        if declared is not None and declared.kind == "flat_list" and total_numel is not None:
            items = value if isinstance(value, (list, tuple)) else ()
            for item in items:
                shape = _shape(item)
                if shape is not None and shape != (total_numel,):
                    wrong.append((str(key), shape, (total_numel,)))
            continue
        shape = _shape(value)
        if want is not None and shape is not None and shape != want:
            wrong.append((str(key), shape, want))
    return wrong


def picture_order() -> tuple[str, ...]:
    """State keys worth picturing when the optimizer is unknown, most telling first: second
    moments (their square root is the scale of the recent gradients), then the others."""
    keys = [s.picture for s in SPECS.values() if s.picture is not None]
    ordered = dict.fromkeys(k for k in keys if _CONSENSUS[k].second_moment)
    ordered.update(dict.fromkeys(keys))
    return tuple(ordered)


def picture_label(key: str) -> str:
    """How a picture of state ``key`` is named: ``sqrt(mean(key))`` for a second moment,
    ``rms(key)`` otherwise."""
    declared = _CONSENSUS.get(key)
    if declared is not None and declared.second_moment:
        return f"sqrt(mean({key}))"
    return f"rms({key})"


def is_second_moment(key: str) -> bool:
    """Whether state ``key`` is a running average of squared gradients."""
    declared = _CONSENSUS.get(key)
    return declared is not None and declared.second_moment
