"""optckpt.optim.specs against every optimizer class of the installed ``torch.optim``.

Each class is built on parameters of shapes [3, 4], [5] and [2, 3, 4] (Muon, which takes
matrices only, on [3, 4] and [5, 2]), stepped twice by torch itself, and its spec must predict
exactly the state keys torch wrote for each parameter, each value's shape (or kind), and the
group keys and defaults torch has. A torch upgrade that adds a class, a state key or a group
key fails here until the spec knows it.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from checks import TORCH_CLASSES

from optckpt.optim import by_name
from optckpt.optim.registry import defaults
from optckpt.optim.specs import (
    SPECS,
    OptimizerSpec,
    expected_state_shape,
    param_dtype_from_state,
    param_shape_from_state,
    param_shaped_keys,
    picture_label,
    picture_order,
    spec_of,
    state_mismatches,
)

SHAPES = [(3, 4), (5,), (2, 3, 4)]
MATRICES = [(3, 4), (5, 2)]

# Options that make torch write each optional state key at least once.
OPTIONS: dict[str, list[dict[str, Any]]] = {
    "SGD": [{}, {"momentum": 0.9}, {"momentum": 0.9, "nesterov": True}],
    "Adam": [{}, {"amsgrad": True}],
    "AdamW": [{}, {"amsgrad": True}],
    "RMSprop": [{}, {"momentum": 0.5}, {"centered": True}, {"momentum": 0.5, "centered": True}],
    "LBFGS": [{}, {"history_size": 3, "max_iter": 4}, {"line_search_fn": "strong_wolfe"}],
    "Adagrad": [{}, {"initial_accumulator_value": 0.1}],
}


def _cases() -> list[tuple[str, dict[str, Any]]]:
    return [(name, kw) for name in sorted(TORCH_CLASSES) for kw in OPTIONS.get(name, [{}])]


def _stepped(
    name: str, steps: int = 2, device: str = "cpu", **kwargs: Any
) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    spec = SPECS[name]
    generator = torch.Generator().manual_seed(0)
    shapes = MATRICES if spec.matrices_only else SHAPES
    params = [torch.randn(s, generator=generator).to(device).requires_grad_() for s in shapes]
    targets = [torch.randn(s, generator=generator).to(device) for s in shapes]
    optimizer = TORCH_CLASSES[name](params, **kwargs)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = sum(((p - t) ** 2).sum() for p, t in zip(params, targets, strict=True))
        assert isinstance(loss, torch.Tensor)
        loss.backward()
        if spec.gradients == "sparse":
            for p in params:
                assert p.grad is not None
                p.grad = p.grad.to_sparse()
        return loss

    for _ in range(steps):
        if spec.gradients == "closure":
            optimizer.step(closure)  # type: ignore[arg-type]
        else:
            closure()
            optimizer.step()
    return optimizer, params


def _fits(kind: str, value: Any, shape: tuple[int, ...], total: int) -> bool:
    """Whether ``value`` is what a state key of ``kind`` holds for a parameter of ``shape``."""
    tensor = isinstance(value, torch.Tensor)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "param":
        return tensor and tuple(value.shape) == shape
    if kind == "row":
        return tensor and tuple(value.shape) == (*shape[:-1], 1)
    if kind == "col":
        return tensor and tuple(value.shape) == (*shape[:-2], 1, shape[-1])
    if kind == "scalar":
        return tensor and value.dim() == 0
    if kind == "number":
        return number
    if kind == "scalar_or_number":
        return number or (tensor and value.dim() == 0)
    if kind == "flat":
        return tensor and tuple(value.shape) == (total,)
    if kind == "flat_list":
        return isinstance(value, list) and all(
            isinstance(v, torch.Tensor) and tuple(v.shape) == (total,) for v in value
        )
    if kind == "scalar_list":
        return isinstance(value, list) and all(
            v is None or (isinstance(v, torch.Tensor) and v.dim() == 0) for v in value
        )
    raise AssertionError(f"unknown kind {kind}")


def test_there_is_a_spec_for_every_torch_optimizer() -> None:
    assert set(SPECS) == set(TORCH_CLASSES)


@pytest.mark.parametrize("name", sorted(TORCH_CLASSES))
def test_group_keys_and_defaults_are_torchs(name: str) -> None:
    spec = SPECS[name]
    optimizer, _ = _stepped(name, steps=0)
    assert list(spec.defaults) == list(optimizer.defaults)  # torch's order too
    assert dict(spec.defaults) == optimizer.defaults
    assert set(optimizer.state_dict()["param_groups"][0]) - {"params"} == spec.group_keys
    # the bundled class has them too, and the registry reads them from the spec
    bundled = by_name(name)
    assert defaults(bundled) == optimizer.defaults
    params = [torch.zeros(s) for s in (MATRICES if spec.matrices_only else SHAPES)]
    assert bundled(params).defaults == optimizer.defaults  # type: ignore[call-arg]


# Implementations only CUDA runs (capturable and fused steps): the same state keys and shapes.
CUDA_OPTIONS: dict[str, list[dict[str, Any]]] = {
    **{
        name: [{"capturable": True}]
        for name in ("Adadelta", "Adamax", "ASGD", "NAdam", "RAdam", "RMSprop", "Rprop")
    },
    "Adam": [{"capturable": True}, {"fused": True}, {"fused": True, "amsgrad": True}],
    "AdamW": [{"capturable": True}, {"fused": True}],
    "SGD": [{"fused": True, "momentum": 0.9}],
    "Adagrad": [{"fused": True}],
}
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _device_cases() -> list[Any]:
    cpu = [pytest.param(name, kw, "cpu") for name, kw in _cases()]
    cuda = [
        pytest.param(name, kw, "cuda", marks=NEEDS_CUDA)
        for name, options in sorted(CUDA_OPTIONS.items())
        for kw in options
    ]
    return cpu + cuda


@pytest.mark.parametrize(("name", "kwargs", "device"), _device_cases())
def test_spec_predicts_exactly_the_state_torch_writes(
    name: str, kwargs: dict[str, Any], device: str
) -> None:
    spec = SPECS[name]
    try:
        optimizer, params = _stepped(name, device=device, **kwargs)
    except RuntimeError as e:
        # a fused kernel this torch lacks on the device (torch 2.11's fused Adagrad is
        # CPU-only; 2.13's runs on CUDA): no state to predict
        if device == "cpu" or "`fused=True` requires" not in str(e):
            raise
        pytest.skip(f"torch {torch.__version__}: {name} {kwargs} not on {device}")
    saved = optimizer.state_dict()
    group = saved["param_groups"][0]
    total = sum(p.numel() for p in params)
    for pid, p in enumerate(params):
        shape = tuple(p.shape)
        state = saved["state"].get(pid, {})
        if spec.first_param_only and pid > 0:
            assert state == {}, f"{name} keeps its state under the first parameter only"
            continue
        assert set(state) == spec.state_keys_for(group, p.dim()), (name, shape)
        for key, value in state.items():
            declared = spec.key(key)
            assert declared is not None
            assert _fits(declared.kind, value, shape, total), (name, key, shape)
            want = expected_state_shape(name, key, shape, total)
            if want is not None:
                assert tuple(value.shape) == want, (name, key)
        assert state_mismatches(name, state, shape, total) == []
        has_shape = any(spec.key(k).kind in ("param", "row", "col") for k in state)  # type: ignore[union-attr]
        assert param_shape_from_state(name, state) == (shape if has_shape else None)
        # without the class name too: every key whose meaning all classes agree on
        assert param_shape_from_state(None, state) == (shape if has_shape else None)
        if has_shape:
            assert param_dtype_from_state(name, state) == p.dtype
        if "step" in state:
            assert spec.step_is_counter == isinstance(state["step"], torch.Tensor)


@pytest.mark.parametrize("name", sorted(TORCH_CLASSES))
def test_required_state_is_written_by_every_stepped_parameter(name: str) -> None:
    spec = SPECS[name]
    optimizer, _ = _stepped(name, steps=1)
    for state in optimizer.state_dict()["state"].values():
        assert spec.required_state <= set(state) <= spec.required_state | spec.optional_state


def test_adafactor_factors_a_0_dim_and_a_4_dim_parameter_as_torch_does() -> None:
    params = [torch.randn(()).requires_grad_(), torch.randn(2, 2, 3, 5).requires_grad_()]
    optimizer = torch.optim.Adafactor(params)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    saved = optimizer.state_dict()["state"]
    assert set(saved[0]) == SPECS["Adafactor"].state_keys_for({}, 0) == {"step", "variance"}
    assert param_shape_from_state("Adafactor", saved[0]) == ()
    assert tuple(saved[1]["row_var"].shape) == expected_state_shape(
        "Adafactor", "row_var", (2, 2, 3, 5)
    )
    assert tuple(saved[1]["col_var"].shape) == expected_state_shape(
        "Adafactor", "col_var", (2, 2, 3, 5)
    )
    assert param_shape_from_state(None, saved[1]) == (2, 2, 3, 5)


def test_a_changed_shape_is_a_mismatch_for_every_kind_of_state() -> None:
    adafactor, _ = _stepped("Adafactor")
    state = adafactor.state_dict()["state"][0]  # a [3, 4] parameter
    assert state_mismatches("Adafactor", state, (3, 5)) == [("col_var", (1, 4), (1, 5))]
    assert {k for k, _, _ in state_mismatches("Adafactor", state, (4, 4))} == {"row_var"}
    lbfgs, params = _stepped("LBFGS")
    total = sum(p.numel() for p in params)
    wrong = state_mismatches("LBFGS", lbfgs.state_dict()["state"][0], (3, 4), total + 1)
    assert {k for k, _, _ in wrong} == {"d", "prev_flat_grad", "old_dirs", "old_stps"}
    adam, _ = _stepped("Adam")
    assert state_mismatches("Adam", adam.state_dict()["state"][1], (6,)) == [
        ("exp_avg", (5,), (6,)),
        ("exp_avg_sq", (5,), (6,)),
    ]


def test_a_torch_1_12_capturable_step_of_shape_1_is_no_mismatch() -> None:
    # torch 1.12 created a capturable step as torch.zeros((1,)); it still loads.
    state = {"step": torch.zeros(1), "exp_avg": torch.zeros(5), "exp_avg_sq": torch.zeros(5)}
    assert state_mismatches("Adam", state, (5,)) == []


def test_unknown_optimizers_and_keys() -> None:
    assert spec_of("adamw") is SPECS["AdamW"] and spec_of("Nope") is None and spec_of(None) is None
    # transformers' Adafactor (src/transformers/optimization.py): its keys are no torch class's
    state = {
        "step": 2,
        "exp_avg_sq_row": torch.zeros(3),
        "exp_avg_sq_col": torch.zeros(4),
        "RMS": torch.tensor(0.5),
    }
    assert param_shape_from_state(None, state) is None
    assert state_mismatches(None, state, (7, 7)) == []
    assert param_shape_from_state(None, {"exp_avg": torch.zeros(3, 4), "RMS": 0}) == (3, 4)


def test_param_shaped_keys() -> None:
    assert param_shaped_keys("Adafactor") == {"variance"}
    assert param_shaped_keys("LBFGS") == frozenset()
    every = param_shaped_keys()
    assert {"exp_avg", "exp_avg_sq", "momentum_buffer", "variance", "ax", "step_size"} <= every
    assert "step" not in every and "d" not in every


@pytest.mark.parametrize("spec", list(SPECS.values()), ids=list(SPECS))
def test_pictures_are_state_keys_of_their_class(spec: OptimizerSpec) -> None:
    if spec.picture is not None:
        assert spec.key(spec.picture) is not None
        assert spec.picture in picture_order()


def test_picture_labels() -> None:
    assert picture_label("exp_avg_sq") == "sqrt(mean(exp_avg_sq))"
    assert picture_label("sum") == "sqrt(mean(sum))"
    assert picture_label("momentum_buffer") == "rms(momentum_buffer)"
    assert picture_label("banana") == "rms(banana)"
    assert picture_order()[:3] == ("exp_avg_sq", "sum", "square_avg")
