"""The ``__init__`` tail and the ``step`` that torch writes out again in each optimizer class.

torch's Adam, Adamax, RMSprop, ... build ``defaults`` by restating every constructor argument,
and share one ``step``: run the closure, then for each param group make empty lists, fill them
with ``self._init_group(group, ...)`` and call the module's functional (``adam``,
``adamax``, ...) with the lists and the group's hyperparameters as keywords.
:class:`GroupStepOptimizer` does both once, from what is declared for each class:

- the group's hyperparameters, in torch's order, are those :mod:`optckpt.optim.specs`
  declares for the class (or for the bundled class it extends): ``defaults`` holds the
  constructor's arguments of those names (the constructor passes its ``locals()`` to
  ``GroupStepOptimizer.__init__``), and the step passes each to the functional as a
  keyword of the same name, except the ``_NOT_STEP_KEYS``, and the ``_SPLIT_KEYS``, whose two
  values are passed as two keywords (``betas`` as ``beta1`` and ``beta2``).
- ``_STATE_KEYS``: the state key that each list after ``params`` and ``grads`` holds, one
  entry per parameter, in the order the functional takes the lists.
- ``_FLAGS``: the keywords that ``_init_group`` returns (``has_complex``; a tuple of them
  where it returns more than one).
- ``_GRAD_SCALER``: the functional takes ``grad_scale`` and ``found_inf`` (set on the
  optimizer by ``torch.amp.GradScaler``), as the fused ones do.
- ``_CAPTURE_CHECK``: the step opens with torch's graph-capture health check.
- ``_functional``: the functional itself.

Each class declares these after its ``__init__``, beside its ``__setstate__`` declarations.

``_init_group(group, params, grads, *state_lists)`` appends every parameter of the group
that has a grad, its grad and its state to the lists, creating the state on first use, and
returns the flags. By default it is torch's usual one: ``_SPARSE_ERROR`` for a sparse grad,
the state made by ``_init_state`` (``step``, then zeros for the other keys), and whether any
parameter is complex; a class whose torch ``_init_group`` does more has its own.

Lists of names are strings of names separated by spaces, as ``namedtuple`` takes its fields:
one line each, where a tuple of strings would take a line a name.

No update is computed here: the functionals run torch's ops in torch's order, and new state is
made as torch makes it, in torch's key order.
The optimizers whose step is not this loop (SparseAdam, LBFGS, Adafactor, Muon) keep their own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from optckpt.optim.base import (
    Optimizer,
    ParamsT,
    device_dtype_check_for_fused,
    evaluate_closure,
    new_step,
    use_grad_for_differentiable,
)
from optckpt.optim.specs import SPECS

__all__ = ["GroupStepOptimizer", "newer_group_keys"]

# The value torch's ``__setstate__`` gives each group key that older checkpoints lack (the same
# in every optimizer that has the key, except SGD's ``fused``).
_NEWER_KEY_VALUES: Mapping[str, Any] = {
    "foreach": None,
    "maximize": False,
    "differentiable": False,
    "capturable": False,
    "fused": None,
    "amsgrad": False,
    "decoupled_weight_decay": False,
    "nesterov": False,
    "centered": False,
    "momentum": 0,
}


def newer_group_keys(keys: str, **values: Any) -> dict[str, Any]:
    """A class's ``_GROUP_KEY_DEFAULTS``: ``keys`` (names separated by spaces) in torch's
    ``setdefault`` order, each with the value torch gives it, then ``values`` where a class
    gives another one."""
    return {key: _NEWER_KEY_VALUES[key] for key in keys.split()} | values


class GroupStepOptimizer(Optimizer):
    """An optimizer whose ``defaults`` and ``step`` follow from its declarations (module doc).

    Args:
        params: tensors, ``named_parameters()`` pairs, or param-group dicts.
        arguments: the subclass constructor's ``locals()``; ``defaults`` takes the value of
            each group key from it, in torch's order.
    """

    _NOT_STEP_KEYS: ClassVar[str] = ""
    _SPLIT_KEYS: ClassVar[Mapping[str, str]] = {"betas": "beta1 beta2"}
    _STATE_KEYS: ClassVar[str]
    _SPARSE_ERROR: ClassVar[str]
    _FLAGS: ClassVar[str] = "has_complex"
    _GRAD_SCALER: ClassVar[bool] = False
    _CAPTURE_CHECK: ClassVar[bool] = True
    _functional: ClassVar[Callable[..., None]]

    def __init__(self, params: ParamsT, arguments: Mapping[str, Any]) -> None:
        super().__init__(params, {key: arguments[key] for key in self._group_keys()})

    @classmethod
    def _group_keys(cls) -> list[str]:
        """The group's keys in torch's order, as the spec of the class declares them (of the
        first bundled class in its MRO, for a subclass of one)."""
        for klass in cls.__mro__:
            spec = SPECS.get(klass.__name__)
            if spec is not None:
                return list(spec.defaults)
        raise TypeError(f"no optimizer spec declares the group keys of {cls.__name__}")

    def _step_keywords(self, group: Mapping[str, Any]) -> dict[str, Any]:
        """The functional's keywords from ``group`` (read before ``_init_group``, as torch
        unpacks ``betas`` before it), and the scaler's tensors where it takes them."""
        keywords: dict[str, Any] = {}
        for key in self._group_keys():
            if key in self._NOT_STEP_KEYS.split():
                continue
            if key in self._SPLIT_KEYS:
                first, second = group[key]
                keywords.update(zip(self._SPLIT_KEYS[key].split(), (first, second)))
            else:
                keywords[key] = group[key]
        if self._GRAD_SCALER:
            keywords["grad_scale"] = getattr(self, "grad_scale", None)
            keywords["found_inf"] = getattr(self, "found_inf", None)
        return keywords

    def _usual_init_group(
        self,
        group: Mapping[str, Any],
        params_with_grad: list[Tensor],
        grads: list[Tensor],
        *state_lists: list[Tensor],
    ) -> bool:
        """torch's usual ``_init_group`` (see the module doc); returns whether any parameter
        is complex."""
        for p, grad, state in self._params_with_grad(
            group, params_with_grad, grads, self._SPARSE_ERROR
        ):
            if len(state) == 0:
                self._init_state(p, grad, state, group)
            for key, values in zip(self._STATE_KEYS.split(), state_lists, strict=True):
                values.append(state[key])
        return any(torch.is_complex(p) for p in params_with_grad)

    # A class attribute, not a method, so that a class's own _init_group may name its lists.
    _init_group: Callable[..., Any] = _usual_init_group

    def _init_state(
        self, p: Tensor, grad: Tensor, state: dict[str, Any], group: Mapping[str, Any]
    ) -> None:
        """The first state of ``p``, in torch's key order: ``step`` (:func:`new_step`), then
        zeros like ``p`` for the other ``_STATE_KEYS``, in their order."""
        state["step"] = new_step(0.0, p, group)
        for key in self._STATE_KEYS.split():
            if key != "step":
                state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _check_fused_once(self, p: Tensor, group: Mapping[str, Any]) -> None:
        """SGD's and Adagrad's fused device and dtype check: of the first parameter with a grad
        in a ``fused`` group, once per optimizer (torch's ``_need_device_dtype_check_for_fused``,
        which their constructors set when ``fused``)."""
        if group["fused"] and getattr(self, "_need_device_dtype_check_for_fused", True):
            device_dtype_check_for_fused(p)
            self._need_device_dtype_check_for_fused = False

    def _after_group_step(self, group: Mapping[str, Any], lists: tuple[list[Any], ...]) -> None:
        """What the class does after the functional ran on ``group`` (SGD stores its new
        momentum buffers); nothing by default."""

    @use_grad_for_differentiable
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one optimization step over every param group.

        Args:
            closure: re-evaluates the model and returns the loss; optional. It runs with
                grad enabled (:func:`~optckpt.optim.base.evaluate_closure`), before the update.

        Returns:
            The closure's loss, or ``None``.
        """
        if self._CAPTURE_CHECK:
            self._accelerator_graph_capture_health_check()
        loss = evaluate_closure(closure)
        for group in self.param_groups:
            keywords = self._step_keywords(group)
            # params (params_with_grad in most of torch's steps), grads, then the state lists.
            lists: tuple[list[Any], ...] = tuple(
                [] for _ in range(2 + len(self._STATE_KEYS.split()))
            )
            flags = self._init_group(group, *lists)
            names = self._FLAGS.split()
            keywords.update(zip(names, flags if len(names) > 1 else (flags,)))
            self._functional(*lists, **keywords)
            self._after_group_step(group, lists)
        return loss
