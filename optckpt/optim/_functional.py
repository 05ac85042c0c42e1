"""The blocks torch writes out again in each ``torch/optim/<name>.py`` functional, written once.

torch's optimizer modules repeat a few pieces nearly verbatim: the functional entry point's
check of the steps and its choice between ``_multi_tensor_<name>`` and
``_single_tensor_<name>`` (:func:`run_foreach_or_for_loop`), the assertions that open the
implementations (no autograd through foreach ops, no grad scaler outside the fused kernels),
the ``capturable`` device check, the opening of the for-loop steps (:func:`for_loop_tensors`),
the foreach paths' ``step`` increment and their L2 weight decay. Each helper here runs exactly
the ops of torch's inline block, in the same order, so a call in place of the block changes
no bit of any result (which ``tests/optim/test_parity.py`` checks against torch). The
class-side repetitions (the closure, ``__setstate__``, the ``_init_group`` loop, the ``step``
loop) are folded in :mod:`optckpt.optim.base` and :mod:`optckpt.optim._group_step`.
:func:`fused_step` is the loop torch's ``_fused_adam`` and ``_fused_adagrad`` share around
their ATen kernels.

What stays inline in each module is what differs between torch's optimizers, even where it
looks alike: the arithmetic of every implementation, and the order of ``maximize``,
``view_as_real`` and the step increment, which torch does not keep the same from one module
to the next (:func:`foreach_maximize_count_decay` is the one order three of them share).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeAlias

import torch
from torch import Tensor

from optckpt.optim.base import Hyper, default_to_fused_or_foreach, group_tensors_by_device_and_dtype

__all__ = [
    "TensorList",
    "check_capturable_devices",
    "check_foreach_not_differentiable",
    "check_no_grad_scale",
    "check_state_steps",
    "for_loop_tensors",
    "foreach_add_weight_decay",
    "foreach_maximize_count_decay",
    "fused_step",
    "increment_steps",
    "run_foreach_or_for_loop",
]

TensorList: TypeAlias = list[Tensor] | tuple[Tensor, ...]
"""A foreach op's tensor list: foreach ops take lists or tuples, and the out-of-place ones
return tuples."""


def check_state_steps(state_steps: Sequence[Any], name: str = "state_steps") -> None:
    """Refuse steps that are not tensors, as torch's functional entry points do.

    Args:
        state_steps: the list to check (NAdam checks its ``mu_products`` too).
        name: the argument's name in the message.

    Raises:
        RuntimeError: an entry is not a tensor (torch < 1.12 kept Python numbers).
    """
    if not all(isinstance(t, Tensor) for t in state_steps):
        raise RuntimeError(
            f"API has changed, `{name}` argument must contain a list of singleton tensors"
        )


def run_foreach_or_for_loop(
    multi_tensor: Callable[..., None],
    single_tensor: Callable[..., None],
    tensor_lists: Sequence[Sequence[Any]],
    foreach: bool | None,
    differentiable: bool,
    hyper: Mapping[str, Any],
) -> None:
    """Run ``multi_tensor`` or ``single_tensor`` on the lists, as torch's functional picks.

    The end of the functional entry point of each torch optimizer without a fused kernel:
    ``foreach`` as the group sets it; left ``None``, ``_default_to_fused_or_foreach`` decides:
    foreach for plain tensors on CUDA and the like, the for-loop on the CPU and whenever the
    step is differentiable.

    Args:
        multi_tensor: the ``_multi_tensor_<name>`` implementation.
        single_tensor: the ``_single_tensor_<name>`` implementation.
        tensor_lists: the parameters first, then the grads and the state lists, passed on in
            that order.
        foreach: the group's ``foreach``.
        differentiable: the group's ``differentiable``, passed on too.
        hyper: the implementation's other keywords.
    """
    if foreach is None:
        _, foreach = default_to_fused_or_foreach(tensor_lists[0], differentiable, use_fused=False)
    impl = multi_tensor if foreach else single_tensor
    impl(*tensor_lists, differentiable=differentiable, **hyper)


def for_loop_tensors(
    params: Sequence[Tensor], grads: Sequence[Tensor], maximize: bool, *state_lists: Sequence[Any]
) -> Iterator[tuple[Any, ...]]:
    """``(i, param, grad, *state)`` for each parameter, as torch's for-loop steps open.

    torch's ``_single_tensor_<name>`` loops start each iteration with ``grad = grads[i] if not
    maximize else -grads[i]`` and then pick the parameter's entry of each state list; this
    yields the same, the negation run as the iteration starts, after the ops of the one before.
    """
    for i, param in enumerate(params):
        grad = grads[i] if not maximize else -grads[i]
        yield (i, param, grad, *(values[i] for values in state_lists))


def check_foreach_not_differentiable(differentiable: bool) -> None:
    """Refuse a differentiable foreach step, as each torch ``_multi_tensor_*`` step does.

    Raises:
        AssertionError: ``differentiable`` is set; foreach ops have no autograd support.
    """
    if differentiable:
        raise AssertionError("_foreach ops don't support autograd")


def check_no_grad_scale(
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    message: str = "Expected grad_scale and found_inf to be None",
) -> None:
    """Refuse ``grad_scale`` or ``found_inf`` where torch's implementation does not unscale.

    torch asserts this at the top of each for-loop and foreach implementation of an optimizer
    that has a fused one (and of Adafactor, with its own ``message``): only the fused kernel
    unscales the grads itself, so ``torch.amp.GradScaler`` must have unscaled them before.

    Raises:
        AssertionError: either is set (torch's exception type).
    """
    if grad_scale is not None or found_inf is not None:
        raise AssertionError(message)


def check_capturable_devices(
    supported: Sequence[str],
    *tensor_lists: Sequence[Tensor],
    names: str = "params and state_steps",
) -> None:
    """Refuse a capturable step unless each parameter and its state share a supported device.

    torch asserts this at the top of each capturable foreach step and for each tensor of a
    capturable for-loop step (which passes one-element lists). The caller passes
    ``capturable_supported_devices(...)`` of its own module: torch lists XLA for some
    implementations and not for others, and tests patch the name module by module.

    Args:
        supported: the device types a capturable step may run on.
        tensor_lists: the parameters first, then the state lists to check against them.
        names: the lists as torch's message names them.

    Raises:
        AssertionError: a parameter is on an unsupported device type, or its state on another
            one (torch's exception type).
    """
    for tensors in zip(*tensor_lists, strict=True):
        device_type = tensors[0].device.type
        if device_type not in supported or any(t.device.type != device_type for t in tensors):
            raise AssertionError(
                f"If capturable=True, {names} must be on supported devices: {supported}."
            )


def increment_steps(device_state_steps: TensorList) -> None:
    """Add 1 to each step of a foreach bucket, as torch's ``_multi_tensor_*`` steps do.

    On the CPU torch adds a 0-dim CPU tensor it wraps once (the ``alpha`` picks that
    overload), rather than letting the foreach fallback wrap the number 1 for every tensor.
    """
    if device_state_steps[0].is_cpu:
        torch._foreach_add_(device_state_steps, torch.tensor(1.0, device="cpu"), alpha=1.0)
    else:
        torch._foreach_add_(device_state_steps, 1)


def foreach_add_weight_decay(
    device_grads: TensorList, device_params: TensorList, weight_decay: Hyper, maximize: bool
) -> TensorList:
    """The grads of a foreach bucket plus ``weight_decay`` times the parameters (L2 decay).

    With ``maximize`` the grads are already the negated copy the step made, so torch adds the
    decay to them in place; else into new tensors, leaving the parameters' ``.grad`` alone.
    """
    if maximize:
        torch._foreach_add_(device_grads, device_params, alpha=weight_decay)
        return device_grads
    return torch._foreach_add(device_grads, device_params, alpha=weight_decay)


def foreach_maximize_count_decay(
    device_grads: TensorList,
    device_params: TensorList,
    device_state_steps: TensorList,
    weight_decay: Hyper,
    maximize: bool,
) -> TensorList:
    """The grads of a foreach bucket negated with ``maximize``, the steps counted, then the L2
    decay added: the opening of Adagrad's, Adamax's and RMSprop's foreach steps, in that order.

    Returns the grads the rest of the step uses (a new list where negated or decayed).
    """
    if maximize:
        device_grads = torch._foreach_neg(device_grads)
    increment_steps(device_state_steps)
    if weight_decay != 0:
        device_grads = foreach_add_weight_decay(device_grads, device_params, weight_decay, maximize)
    return device_grads


def fused_step(
    kernel: Callable[..., Any],
    tensor_lists: list[list[Any]],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    lr: Hyper,
    **hyper: Any,
) -> None:
    """Run a fused ATen kernel per (device, dtype) bucket, with torch's bookkeeping around it.

    The loop of torch's ``_fused_adam`` and ``_fused_adagrad``: the bucket's steps (the last
    list) are counted before the kernel runs and the count is undone where the scaler's
    ``found_inf`` is set; ``grad_scale`` and ``found_inf`` are copied to each device once. A
    tensor ``lr`` off the CPU is copied to each device it is not on yet, and, as in torch,
    that copy is the ``lr`` of the buckets after it too; on the CPU it stays a scalar.

    Args:
        kernel: ``torch._fused_adam_`` and the like; it gets the bucket's lists in order,
            ``lr``, ``hyper``, and the device's ``grad_scale`` and ``found_inf``.
        tensor_lists: the kernel's tensor lists, ``state_steps`` last.
        grad_scale: set by ``torch.amp.GradScaler``, or ``None``.
        found_inf: set by ``torch.amp.GradScaler``, or ``None``.
        lr: the learning rate, a number or a 1-element tensor.
        hyper: the kernel's other keyword arguments.
    """
    grad_scales = {grad_scale.device: grad_scale} if grad_scale is not None else {}
    found_infs = {found_inf.device: found_inf} if found_inf is not None else {}
    lrs = {lr.device: lr} if isinstance(lr, Tensor) and str(lr.device) != "cpu" else None

    buckets = group_tensors_by_device_and_dtype(tensor_lists)
    for (device, _), (bucket, _) in buckets.items():
        device_state_steps = bucket[-1]
        device_grad_scale = (
            grad_scales.setdefault(device, grad_scale.to(device, non_blocking=True))
            if grad_scale is not None
            else None
        )
        device_found_inf = (
            found_infs.setdefault(device, found_inf.to(device, non_blocking=True))
            if found_inf is not None
            else None
        )
        if lrs is not None and device not in lrs:
            lrs[device] = lr.to(device=device, non_blocking=True)
            lr = lrs[device]
        torch._foreach_add_(device_state_steps, 1)
        kernel(*bucket, lr=lr, **hyper, grad_scale=device_grad_scale, found_inf=device_found_inf)
        if device_found_inf is not None:
            # Undo the step count where the scaler found infs.
            torch._foreach_sub_(device_state_steps, [device_found_inf] * len(device_state_steps))
