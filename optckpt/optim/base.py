"""optckpt's optimizer base class: ``torch.optim.Optimizer``'s semantics on optckpt's core.

:class:`Optimizer` reimplements the public behaviour of ``torch/optim/optimizer.py`` of the
installed torch (the reference; comments cite the torch behaviour each part mirrors), without
subclassing it: constructing and extending param groups, ``zero_grad``, the step, state-dict
and load-state-dict hooks, and ``state_dict`` / ``load_state_dict``, which go through
:func:`optckpt.statedict.pack` and :func:`optckpt.statedict.unpack`.

The module also holds the small helpers every bundled optimizer needs to lay out its state the
way torch does (:func:`scalar_tensor`, :func:`to_scalar`, ...), and the parts of every torch
optimizer class that torch writes out again in each: the closure (:func:`evaluate_closure`),
``__setstate__`` (declared by ``_GROUP_KEY_DEFAULTS`` and ``_NUMBER_STATE_KEYS``) and the loop
that opens ``_init_group`` (``Optimizer._params_with_grad``).

What is left out on purpose: ``torch.compile`` support (torch's ``is_compiling()`` branches
and dynamo graph breaks), TorchScript, and the profiler's ``_optimizer_step_code`` entry point.
The step still runs inside ``record_function("Optimizer.step#<Class>.step")`` like torch's.
Since these optimizers are not ``torch.optim.Optimizer`` instances, torch's LR schedulers
(which check ``isinstance``) refuse them; ``torch.amp.GradScaler`` works with them.
"""

from __future__ import annotations

import functools
import warnings
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import chain
from typing import Any, ClassVar, TypeAlias, TypeVar, cast

import torch
from torch.utils._foreach_utils import (
    _get_foreach_kernels_supported_devices,
    _get_fused_kernels_supported_devices,
    _group_tensors_by_device_and_dtype,
)
from torch.utils.hooks import RemovableHandle

from optckpt.statedict import StateDict, pack, unpack

__all__ = [
    "Hyper",
    "Optimizer",
    "ParamsT",
    "capturable_supported_devices",
    "check_betas",
    "check_lr",
    "check_non_negative",
    "default_to_fused_or_foreach",
    "device_dtype_check_for_fused",
    "evaluate_closure",
    "get_value",
    "group_tensors_by_device_and_dtype",
    "new_step",
    "register_optimizer_step_post_hook",
    "register_optimizer_step_pre_hook",
    "scalar_dtype",
    "scalar_tensor",
    "to_scalar",
    "use_grad_for_differentiable",
    "view_as_real",
]

ParamsT: TypeAlias = (
    Iterable[torch.Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, torch.Tensor]]
)
"""What optimizers accept as ``params``: tensors, ``named_parameters()`` pairs, or group dicts."""

Hyper: TypeAlias = Any
"""A hyperparameter inside a step: a Python number or a 0-dim tensor (a tensor ``lr``, ...).

``Any`` because torch's stubs type scalar arguments as numbers only, while its ops take 0-dim
tensors as well and the step must pass them on exactly as torch's own step does.
"""

Args: TypeAlias = tuple[Any, ...]
Kwargs: TypeAlias = dict[str, Any]
StepPreHook: TypeAlias = Callable[["Optimizer", Args, Kwargs], "tuple[Args, Kwargs] | None"]
StepPostHook: TypeAlias = Callable[["Optimizer", Args, Kwargs], None]
StateDictPreHook: TypeAlias = Callable[["Optimizer"], None]
StateDictPostHook: TypeAlias = Callable[["Optimizer", StateDict], "StateDict | None"]
LoadStateDictPreHook: TypeAlias = Callable[["Optimizer", StateDict], "StateDict | None"]
LoadStateDictPostHook: TypeAlias = Callable[["Optimizer"], None]

_F = TypeVar("_F", bound=Callable[..., Any])

# Like torch's module-level ``_global_optimizer_pre_hooks``: hooks run by every optckpt
# optimizer (torch's own global hooks stay torch's; they do not fire here).
_global_step_pre_hooks: OrderedDict[int, StepPreHook] = OrderedDict()
_global_step_post_hooks: OrderedDict[int, StepPostHook] = OrderedDict()

# torch's ``_foreach_supported_types``: a tensor subclass other than Parameter disables foreach.
_FOREACH_SUPPORTED_TYPES = (torch.Tensor, torch.nn.Parameter)


def register_optimizer_step_pre_hook(hook: StepPreHook) -> RemovableHandle:
    """Register a step pre-hook run by every optckpt optimizer, before its own pre-hooks.

    Mirrors ``torch.optim.optimizer.register_optimizer_step_pre_hook``. The hook is called as
    ``hook(optimizer, args, kwargs)`` and may return ``(new_args, new_kwargs)``.

    Returns:
        A handle whose ``remove()`` unregisters the hook.
    """
    handle = RemovableHandle(_global_step_pre_hooks)
    _global_step_pre_hooks[handle.id] = hook
    return handle


def register_optimizer_step_post_hook(hook: StepPostHook) -> RemovableHandle:
    """Register a step post-hook run by every optckpt optimizer, after its own post-hooks.

    Mirrors ``torch.optim.optimizer.register_optimizer_step_post_hook``.

    Returns:
        A handle whose ``remove()`` unregisters the hook.
    """
    handle = RemovableHandle(_global_step_post_hooks)
    _global_step_post_hooks[handle.id] = hook
    return handle


# --- helpers shared by the bundled optimizers -------------------------------------------------


def scalar_dtype(is_fused: bool | None = None) -> torch.dtype:
    """The dtype torch gives scalar state such as ``step`` (torch's ``_get_scalar_dtype``).

    float32 for fused optimizers, else float64 when the default dtype is float64, else float32.
    """
    if is_fused:
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def scalar_tensor(
    value: float, *, device: torch.device | str = "cpu", is_fused: bool | None = None
) -> torch.Tensor:
    """A 0-dim scalar state tensor (``step`` and the like) laid out as torch lays it out.

    torch's note [special device hosting for step]: ``step`` lives on the CPU unless the group
    is ``capturable`` or ``fused``; callers pass ``device=p.device`` in those cases.
    """
    return torch.tensor(float(value), dtype=scalar_dtype(is_fused), device=device)


def new_step(value: float, p: torch.Tensor, group: Mapping[str, Any]) -> torch.Tensor:
    """A new scalar state tensor (``step``, NAdam's ``mu_product``) for parameter ``p``.

    torch's note [special device hosting for step]: it stays on the CPU unless the group is
    ``capturable`` or ``fused``, whose kernels want it on the parameter's device (float32
    when fused).
    """
    fused = bool(group.get("fused"))
    if group.get("capturable") or fused:
        return scalar_tensor(value, device=p.device, is_fused=fused)
    return scalar_tensor(value)


def to_scalar(x: Any) -> Any:
    """Squeeze a 1-element tensor hyperparameter to 0-dim, leave anything else (``_to_scalar``)."""
    if isinstance(x, torch.Tensor) and x.dim() != 0:
        return x.squeeze()
    return x


def get_value(x: Any) -> Any:
    """A Python number from a tensor scalar, as torch's ``_get_value`` does in eager mode."""
    return x.item() if isinstance(x, torch.Tensor) else x


def check_non_negative(value: Any, message: str) -> None:
    """Refuse a negative (or NaN) hyperparameter as torch's constructors do.

    Args:
        value: the number, or a 1-element tensor.
        message: torch's message for it, without the value (``"Invalid epsilon value"``).

    Raises:
        ValueError: ``not value >= 0.0``; the message ends with ``: <value>``.
    """
    if not value >= 0.0:
        raise ValueError(f"{message}: {value}")


def check_lr(lr: Any, message: str = "Invalid learning rate") -> None:
    """torch's first checks of ``lr``: a tensor must hold one element, and it is not negative.

    Raises:
        ValueError: a tensor with more than one element, or a negative (or NaN) ``lr``.
    """
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    check_non_negative(lr, message)


def check_betas(betas: Sequence[Any]) -> None:
    """Refuse a first or second beta outside [0, 1), as torch's Adam family does.

    Raises:
        ValueError: the first beta out of range (checked first), or the second.
    """
    for index in (0, 1):
        if not 0.0 <= betas[index] < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}: {betas[index]}")


def evaluate_closure(closure: Callable[[], Any] | None) -> Any:
    """The closure's loss, evaluated with grad enabled; ``None`` without a closure.

    Every torch optimizer's ``step`` opens with this block (``loss = None; if closure is not
    None: with torch.enable_grad(): loss = closure()``): the closure recomputes the loss and
    its gradients even though the step itself runs under ``no_grad``.
    """
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def capturable_supported_devices(supports_xla: bool = True) -> list[str]:
    """Device types where ``capturable=True`` may step (``_get_capturable_supported_devices``)."""
    devices = ["cuda", "xpu", "hpu", torch._C._get_privateuse1_backend_name()]
    if supports_xla:
        devices.append("xla")
    return devices


def default_to_fused_or_foreach(
    params: Sequence[torch.Tensor | None], differentiable: bool, use_fused: bool = False
) -> tuple[bool, bool]:
    """Pick ``(fused, foreach)`` when the user set neither (``_default_to_fused_or_foreach``).

    foreach is chosen only when every tensor is a plain tensor or Parameter on a device with
    foreach kernels (CUDA and the like, not the CPU); ``differentiable`` rules both out.
    """
    if differentiable:
        return False, False
    fused_devices = _get_fused_kernels_supported_devices()
    foreach_devices = _get_foreach_kernels_supported_devices()
    fused = use_fused and all(
        p is None
        or (
            type(p) in _FOREACH_SUPPORTED_TYPES
            and p.device.type in fused_devices
            and torch.is_floating_point(p)
        )
        for p in params
    )
    foreach = not fused and all(
        p is None or (type(p) in _FOREACH_SUPPORTED_TYPES and p.device.type in foreach_devices)
        for p in params
    )
    return fused, foreach


def device_dtype_check_for_fused(p: torch.Tensor, cuda_unsupported: bool = False) -> None:
    """Raise ``RuntimeError`` unless ``p`` fits fused kernels (torch's same-named check)."""
    devices = _get_fused_kernels_supported_devices()
    if cuda_unsupported:
        devices.remove("cuda")
    if not (p.device.type in devices and torch.is_floating_point(p)):
        raise RuntimeError(
            "`fused=True` requires all the params to be floating point Tensors of "
            f"supported devices: {devices} but {p.dtype} and {p.device.type}"
        )


def view_as_real(params: list[torch.Tensor], *state_and_grads: list[torch.Tensor]) -> None:
    """Replace complex tensors in the lists by their real views, in place (``_view_as_real``)."""
    for i, p in enumerate(params):
        if torch.is_complex(p):
            params[i] = torch.view_as_real(params[i])
            for s in state_and_grads:
                s[i] = torch.view_as_real(s[i])


def group_tensors_by_device_and_dtype(
    tensorlistlist: list[list[Any]], with_indices: bool = False
) -> dict[tuple[torch.device, torch.dtype], tuple[list[Any], list[int]]]:
    """Split parallel tensor lists by (device, dtype) for foreach ops, exactly as torch does.

    Returns ``{(device, dtype): (lists, indices)}``; ``indices`` are positions in the input
    lists (filled only with ``with_indices``). Entries of the lists other than the first may be
    ``None``.
    """
    buckets: dict[tuple[torch.device, torch.dtype], tuple[list[Any], list[int]]]
    buckets = _group_tensors_by_device_and_dtype(tensorlistlist, with_indices)
    return buckets


def use_grad_for_differentiable(step: _F) -> _F:
    """Run ``step`` with autograd on only when the optimizer is ``differentiable``.

    Mirrors torch's ``_use_grad_for_differentiable`` (without its dynamo graph breaks): the
    grad mode is ``defaults["differentiable"]`` during the step and restored afterwards.
    """

    @functools.wraps(step)
    def wrapper(self: Optimizer, *args: Any, **kwargs: Any) -> Any:
        with torch.set_grad_enabled(bool(self.defaults["differentiable"])):
            return step(self, *args, **kwargs)

    return cast(_F, wrapper)


def _with_step_hooks(step: _F) -> _F:
    """Wrap a subclass's ``step`` like torch's ``profile_hook_step``.

    Pre-hooks run global first, then the instance's; a pre-hook may return ``(args, kwargs)``
    to replace the arguments. Post-hooks run the instance's first, then the global ones.
    """

    @functools.wraps(step)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        self = cast(Optimizer, args[0])
        with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
            for pre_hook in chain(
                _global_step_pre_hooks.values(), self._optimizer_step_pre_hooks.values()
            ):
                result = pre_hook(self, args, kwargs)
                if result is not None:
                    if isinstance(result, tuple) and len(result) == 2:
                        args, kwargs = result
                    else:
                        raise RuntimeError(
                            f"{step} must return None or a tuple of (new_args, new_kwargs), "
                            f"but got {result}."
                        )
            out = step(*args, **kwargs)
            for post_hook in chain(
                self._optimizer_step_post_hooks.values(), _global_step_post_hooks.values()
            ):
                post_hook(self, args, kwargs)
            return out

    wrapper._optckpt_hooked = True  # type: ignore[attr-defined]
    return cast(_F, wrapper)


# --- the base class ------------------------------------------------------------------------------


def _stream_is_capturing(device_type: str) -> bool:
    """Whether the accelerator's current stream is capturing a graph.

    ``torch.Stream.is_capturing`` is new in torch 2.13; before, each backend module had its
    own ``is_current_stream_capturing``.
    """
    is_capturing = getattr(torch.accelerator.current_stream(), "is_capturing", None)
    if is_capturing is not None:
        return bool(is_capturing())
    backend_check = getattr(getattr(torch, device_type), "is_current_stream_capturing", None)
    return bool(backend_check()) if backend_check is not None else False


class Optimizer:
    """Base class of optckpt's optimizers, with ``torch.optim.Optimizer``'s semantics.

    A subclass passes its ``defaults`` to ``__init__``, fills missing group keys and converts
    old state in ``__setstate__``, and implements ``step``; the step hooks are wrapped around
    that ``step`` automatically.

    Args:
        params: an iterable of tensors, of ``(name, tensor)`` pairs (``named_parameters()``),
            or of dicts defining parameter groups. Use ordered collections: a group's
            ``params`` may not be a ``set``, whose order changes between runs (like torch,
            a bare top-level set is turned into a list before that check, and accepted).
        defaults: the default hyperparameters, used where a group does not set its own.

    Raises:
        TypeError: ``params`` is a single tensor, a group's ``params`` is a ``set``, or
            something in it is not a tensor.
        ValueError: ``params`` is empty, a tensor is not a leaf, or a parameter is in two groups.
    """

    _optimizer_step_pre_hooks: OrderedDict[int, StepPreHook]
    _optimizer_step_post_hooks: OrderedDict[int, StepPostHook]
    _optimizer_state_dict_pre_hooks: OrderedDict[int, StateDictPreHook]
    _optimizer_state_dict_post_hooks: OrderedDict[int, StateDictPostHook]
    _optimizer_load_state_dict_pre_hooks: OrderedDict[int, LoadStateDictPreHook]
    _optimizer_load_state_dict_post_hooks: OrderedDict[int, LoadStateDictPostHook]

    _HOOK_DICTS = (
        "_optimizer_step_pre_hooks",
        "_optimizer_step_post_hooks",
        "_optimizer_state_dict_pre_hooks",
        "_optimizer_state_dict_post_hooks",
        "_optimizer_load_state_dict_pre_hooks",
        "_optimizer_load_state_dict_post_hooks",
    )

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # torch patches ``cls.step`` with ``profile_hook_step`` on first construction; wrapping
        # each class's own ``step`` once, at class creation, gives the same result.
        super().__init_subclass__(**kwargs)
        step = cls.__dict__.get("step")
        if step is not None and not getattr(step, "_optckpt_hooked", False):
            cls.step = _with_step_hooks(step)  # type: ignore[method-assign]

    def __init__(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        self.defaults = defaults
        for name in self._HOOK_DICTS:
            setattr(self, name, OrderedDict())

        if isinstance(params, torch.Tensor):
            raise TypeError(
                "params argument given to the optimizer should be an iterable of Tensors "
                "or dicts, but got " + torch.typename(params)
            )

        self.state: defaultdict[Any, dict[str, Any]] = defaultdict(dict)
        self.param_groups: list[dict[str, Any]] = []

        param_groups = list(params)
        if len(param_groups) == 0:
            raise ValueError("optimizer got an empty parameter list")
        # torch looks at the first item only: a list of tensors (or of name/tensor pairs) is
        # one group.
        if not isinstance(param_groups[0], dict):
            param_groups = [{"params": param_groups}]
        for param_group in param_groups:
            self.add_param_group(cast("dict[str, Any]", param_group))

        # torch's poor man's TORCH_WARN_ONCE for the capturable warning.
        self._warned_capturable_if_run_uncaptured = True

    def __getstate__(self) -> dict[str, Any]:
        """What pickling keeps: ``defaults``, ``state`` and ``param_groups`` (hooks are dropped)."""
        return {"defaults": self.defaults, "state": self.state, "param_groups": self.param_groups}

    # What every torch optimizer's ``__setstate__`` does after ``Optimizer.__setstate__``,
    # declared by each subclass instead of written out again: the group keys that older
    # checkpoints lack, with the value ``setdefault`` gives each (in torch's order), and the
    # state entries torch < 1.12 saved as Python numbers (made tensors by
    # ``_number_state_to_tensor``).
    _GROUP_KEY_DEFAULTS: ClassVar[Mapping[str, Any]] = {}
    _NUMBER_STATE_KEYS: ClassVar[tuple[str, ...]] = ()

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Install ``state``, ``param_groups`` (and ``defaults`` when unpickling).

        ``load_state_dict`` ends here too. Then, group by group as torch's optimizers do, the
        keys of ``_GROUP_KEY_DEFAULTS`` missing from the group are filled in and the group's
        number state of ``_NUMBER_STATE_KEYS`` becomes tensors. A subclass that does more
        (AdamW, Adagrad) overrides this and calls ``super().__setstate__(state)`` first.
        """
        self.__dict__.update(state)
        for name in self._HOOK_DICTS:
            if name not in self.__dict__:
                setattr(self, name, OrderedDict())
        self.defaults.setdefault("differentiable", False)
        for group in self.param_groups:
            for key, default in self._GROUP_KEY_DEFAULTS.items():
                group.setdefault(key, default)
            for p in group["params"]:
                p_state = self.state.get(p, {})
                if len(p_state) == 0:
                    continue
                for key in self._NUMBER_STATE_KEYS:
                    if not torch.is_tensor(p_state[key]):
                        p_state[key] = self._number_state_to_tensor(key, p_state[key], p, group)

    def _number_state_to_tensor(
        self, key: str, value: Any, p: torch.Tensor, group: Mapping[str, Any]
    ) -> torch.Tensor:
        """The tensor that replaces state ``key`` of ``p``, saved as a Python number.

        torch's usual conversion: the tensor a fresh step would hold (:func:`new_step`: on
        the CPU unless the group is ``capturable`` or ``fused``).
        """
        return new_step(float(value), p, group)

    def __repr__(self) -> str:
        # torch's layout: a blank line between groups, hyperparameters sorted by name.
        text = type(self).__name__ + " ("
        for i, group in enumerate(self.param_groups):
            text += f"\nParameter Group {i}\n"
            text += "".join(
                f"    {key}: {group[key]}\n" for key in sorted(group) if key != "params"
            )
        return text + ")"

    # --- groups -------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group of parameters, with optional hyperparameters of its own.

        Missing hyperparameters are filled from ``defaults`` (``setdefault``: a value the group
        sets is never replaced). ``(name, tensor)`` pairs set the group's ``param_names``.

        Args:
            param_group: ``{"params": tensors or (name, tensor) pairs, ...hyperparameters}``;
                it is changed in place and appended, as torch does.

        Raises:
            TypeError: ``param_group`` is not a dict, its ``params`` is a ``set``, or holds
                something not a tensor.
            ValueError: a tensor is not a leaf (unless ``differentiable``), only some params
                are named, named and unnamed groups are mixed, or a parameter is already in
                another group.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")

        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError(
                "optimizer parameters need to be organized in ordered collections, but the "
                "ordering of tensors in sets will change between runs. Please use a list instead."
            )
        else:
            params = list(params)

        # named_parameters() pairs: torch tests for a tuple, and needs all or none named.
        tensors = [p[1] if isinstance(p, tuple) else p for p in params]
        names = [p[0] for p in params if isinstance(p, tuple)]
        param_group["params"] = tensors
        if names:
            if len(names) != len(tensors):
                raise ValueError(
                    "all optimizer params should be with/without names. "
                    "Some param names are missing"
                )
            param_group["param_names"] = names

        for param in tensors:
            if not isinstance(param, torch.Tensor):
                raise TypeError(
                    "optimizer can only optimize Tensors, but one of the params is "
                    + torch.typename(param)
                )
            if not self.defaults.get("differentiable", None) and not (
                param.is_leaf or param.retains_grad
            ):
                raise ValueError("can't optimize a non-leaf Tensor")

        for name, default in self.defaults.items():
            param_group.setdefault(name, default)

        if len(tensors) != len(set(tensors)):
            warnings.warn(
                "optimizer contains a parameter group with duplicate parameters; in future, "
                "this will cause an error; see github.com/pytorch/pytorch/issues/40967 for "
                "more information",
                stacklevel=3,
            )

        seen: set[torch.Tensor] = set()
        for group in self.param_groups:
            seen.update(group["params"])
            if ("param_names" in param_group) != ("param_names" in group):
                which = "with names" if "param_names" in param_group else "without names"
                raise ValueError(
                    "all optimizer param groups should be with/without names. "
                    f"cannot add param group {which} to the optimizer"
                )
        if not seen.isdisjoint(tensors):
            raise ValueError("some parameters appear in more than one parameter group")

        self.param_groups.append(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of every parameter, as torch's ``zero_grad`` does.

        Args:
            set_to_none: set ``.grad`` to ``None`` (default) instead of filling it with zeros.
                With zeros, a foreach or fused optimizer zeroes dense grads with one
                ``_foreach_zero_`` call per device and dtype.
        """
        foreach = self.defaults.get("foreach", False) or self.defaults.get("fused", False)
        by_device_dtype: defaultdict[Any, defaultdict[Any, list[torch.Tensor]]] = defaultdict(
            lambda: defaultdict(list)
        )
        with torch.autograd.profiler.record_function(
            f"Optimizer.zero_grad#{type(self).__name__}.zero_grad"
        ):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    if set_to_none:
                        p.grad = None
                        continue
                    if p.grad.grad_fn is not None:
                        p.grad.detach_()
                    else:
                        p.grad.requires_grad_(False)
                    if not foreach or p.grad.is_sparse:
                        p.grad.zero_()
                    else:
                        by_device_dtype[p.grad.device][p.grad.dtype].append(p.grad)
            for per_dtype in by_device_dtype.values():
                for grads in per_dtype.values():
                    torch._foreach_zero_(grads)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Take one optimization step; subclasses implement it.

        Args:
            closure: re-evaluates the model and returns the loss; optional for most optimizers.
                It runs with grad enabled (:func:`evaluate_closure`), before the update.

        Returns:
            The closure's loss, or ``None``.
        """
        raise NotImplementedError

    # --- state dicts ----------------------------------------------------------------------------

    def state_dict(self) -> StateDict:
        """The optimizer's state as ``torch.optim.Optimizer.state_dict()`` returns it.

        ``{"state": {id: {...}}, "param_groups": [{..., "params": [id, ...]}]}`` with integer
        IDs in order of appearance (see :func:`optckpt.statedict.pack`). Tensors are not
        copied. State-dict pre-hooks run first; a post-hook may return a replacement.
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = pack(self.param_groups, self.state)
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: StateDict) -> None:
        """Load a state dict saved by this optimizer or by the same ``torch.optim`` class.

        Saved hyperparameters replace the live ones; saved state is cast to each parameter's
        dtype and device (``step`` excepted; see :func:`optckpt.statedict.cast_value`). The
        caller's dict is not modified. Load-state-dict pre-hooks get a shallow copy and may
        return a replacement; post-hooks run after loading.

        Raises:
            GroupCountMismatchError, GroupSizeMismatchError: the groups do not fit; both are
                ``ValueError``, as torch's errors are.
        """
        # torch: "shallow copy, to be consistent with module API".
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        state, param_groups = unpack(state_dict, self.param_groups)
        self.__setstate__({"state": state, "param_groups": param_groups})
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    # --- hook registration ----------------------------------------------------------------------

    @staticmethod
    def _register(
        hooks: OrderedDict[int, Any], hook: Any, prepend: bool = False
    ) -> RemovableHandle:
        handle = RemovableHandle(hooks)
        hooks[handle.id] = hook
        if prepend:
            hooks.move_to_end(handle.id, last=False)
        return handle

    def register_step_pre_hook(self, hook: StepPreHook) -> RemovableHandle:
        """Register ``hook(optimizer, args, kwargs) -> None | (args, kwargs)`` to run before a step.

        Returns:
            A handle whose ``remove()`` unregisters the hook.
        """
        return self._register(self._optimizer_step_pre_hooks, hook)

    def register_step_post_hook(self, hook: StepPostHook) -> RemovableHandle:
        """Register ``hook(optimizer, args, kwargs) -> None`` to run after ``step``.

        Returns:
            A handle whose ``remove()`` unregisters the hook.
        """
        return self._register(self._optimizer_step_post_hooks, hook)

    def register_state_dict_pre_hook(
        self, hook: StateDictPreHook, prepend: bool = False
    ) -> RemovableHandle:
        """Register ``hook(optimizer) -> None`` to run before ``state_dict``.

        With ``prepend`` it runs before the hooks already registered, else after them (as for
        every state-dict and load-state-dict hook below). Returns a handle whose ``remove()``
        unregisters the hook.
        """
        return self._register(self._optimizer_state_dict_pre_hooks, hook, prepend)

    def register_state_dict_post_hook(
        self, hook: StateDictPostHook, prepend: bool = False
    ) -> RemovableHandle:
        """Register ``hook(optimizer, state_dict) -> None | state_dict`` to run after state_dict().

        The hook may change the state dict in place or return a new one; ``prepend`` and the
        handle returned are as in :meth:`register_state_dict_pre_hook`.
        """
        return self._register(self._optimizer_state_dict_post_hooks, hook, prepend)

    def register_load_state_dict_pre_hook(
        self, hook: LoadStateDictPreHook, prepend: bool = False
    ) -> RemovableHandle:
        """Register ``hook(optimizer, state_dict) -> None | state_dict`` to run before loading.

        The hook gets a shallow copy of the caller's state dict and may change it in place or
        return the one to load; ``prepend`` and the handle returned are as in
        :meth:`register_state_dict_pre_hook`.
        """
        return self._register(self._optimizer_load_state_dict_pre_hooks, hook, prepend)

    def register_load_state_dict_post_hook(
        self, hook: LoadStateDictPostHook, prepend: bool = False
    ) -> RemovableHandle:
        """Register ``hook(optimizer) -> None`` to run after ``load_state_dict``.

        ``prepend`` and the handle returned are as in :meth:`register_state_dict_pre_hook`.
        """
        return self._register(self._optimizer_load_state_dict_post_hooks, hook, prepend)

    # --- for subclasses -------------------------------------------------------------------------

    def _init_fused(self, differentiable: bool, foreach: bool | None) -> None:
        """What torch's constructors do for ``fused=True`` (Adam, AdamW, Adagrad, SGD).

        Refuse ``differentiable`` and ``foreach`` with it (in that order), and set the flag
        ``torch.amp.GradScaler`` reads: the fused step unscales the grads itself, so the
        scaler leaves them scaled and sets ``grad_scale`` and ``found_inf`` on the optimizer.

        Raises:
            RuntimeError: ``differentiable`` or ``foreach`` is set too.
        """
        if differentiable:
            raise RuntimeError("`fused` does not support `differentiable`")
        if foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        self._step_supports_amp_scaling = True

    def _params_with_grad(
        self,
        group: Mapping[str, Any],
        params_with_grad: list[torch.Tensor],
        grads: list[torch.Tensor],
        sparse_error: str,
        complex_error: str | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]:
        """Each parameter of ``group`` that has a grad, with the grad and the parameter's state.

        The loop that opens torch's ``_init_group`` of the optimizers without sparse support:
        a parameter without a grad is skipped; a complex one raises ``RuntimeError`` with
        ``complex_error`` where given (Adafactor, Muon); one with a sparse grad raises it with
        ``sparse_error``. Otherwise the parameter and its grad are appended to the lists
        before they are yielded; the caller creates missing state and lists it.
        """
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if complex_error is not None and torch.is_complex(p):
                raise RuntimeError(complex_error)
            if grad.is_sparse:
                raise RuntimeError(sparse_error)
            params_with_grad.append(p)
            grads.append(grad)
            yield p, grad, self.state[p]

    def _accelerator_graph_capture_health_check(self) -> None:
        """Refuse to be captured in a CUDA/XPU graph unless every group is ``capturable``.

        Mirrors torch's check of the same name (used by Adam and AdamW); a no-op without an
        accelerator.
        """
        accelerator = torch.accelerator.current_accelerator(check_available=True)
        if not accelerator or accelerator.type not in {"cuda", "xpu"}:
            return
        capturing = _stream_is_capturing(accelerator.type)

        # Read lazily, in torch's order: Adafactor's groups have no "capturable" key, which
        # torch only reads while capturing (KeyError) or before the warning was given.
        def all_capturable() -> bool:
            return all(group["capturable"] for group in self.param_groups)

        if capturing and not all_capturable():
            raise RuntimeError(
                f"Attempting {accelerator.type.upper()} graph capture of step() for an "
                f"instance of {type(self).__name__} but param_groups' capturable is False."
            )
        warned = getattr(self, "_warned_capturable_if_run_uncaptured", False)
        if not warned and all_capturable() and not capturing:
            warnings.warn(
                "This instance was constructed with capturable=True or some of all the "
                "param_groups came with capturable=True, but step() is running without "
                f"{accelerator.type.upper()} graph capture. If you never intend to "
                "graph-capture this instance, capturable=True can impair performance, and "
                "you should set capturable=False.",
                stacklevel=2,
            )
            self._warned_capturable_if_run_uncaptured = True
