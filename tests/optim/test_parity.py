"""Bundled optimizers against ``torch.optim``, step by step and bit for bit.

The table ``ROWS`` drives everything: one row per bundled optimizer, naming the torch class,
ours, the option sets to run (``configs``), the hyperparameters of the extra param groups, and
the constructor arguments torch rejects. Every config runs with each implementation
(``for-loop``, ``foreach``, ``fused``; ``only`` for an optimizer that has just one and no
``foreach`` argument) on float32, float64 and complex64 parameters, and once
more on float32 with no gaps in the gradients and also torch's default choice (``default``). A
combination torch refuses (a tensor ``lr`` with ``foreach``, ``capturable`` on the CPU, complex
parameters with ``fused``, ...) must be refused by ours with the same exception type, at the
same point (constructor or step). To cover a new optimizer, add a row.
"""

from __future__ import annotations

import copy
import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from checks import assert_bitwise_equal, changed_in_2_13

from optckpt.optim import SGD, Adam, AdamW, Optimizer, names

STEPS_BEFORE_CROSSLOAD = 3
STEPS_AFTER_CROSSLOAD = 3
IMPLS: dict[str, dict[str, Any]] = {
    "default": {},  # foreach=None, fused=None: torch's rule picks (the for-loop on the CPU)
    "for-loop": {"foreach": False},
    "foreach": {"foreach": True},
    "fused": {"fused": True},
    "only": {},  # no foreach or fused argument: the optimizer's one implementation
}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "complex64": torch.complex64}
NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
FUSED_ADAGRAD_CUDA = changed_in_2_13("no fused Adagrad on CUDA (refused at the first step)")


@dataclass(frozen=True)
class Row:
    """One bundled optimizer in the parity table.

    ``configs`` maps a test id to constructor keyword arguments (the defaults of group 0).
    ``groups`` holds the hyperparameters that groups 1 and 2 set for themselves. ``invalid``
    maps a test id to constructor arguments torch rejects. ``impls`` are the keys of ``IMPLS``
    the optimizer accepts. ``number_step``: the state has a ``step`` that torch < 1.12 saved
    as a Python number. ``number_state``: the state keys torch < 1.12 saved as Python numbers
    (``step``, and ASGD's ``eta`` and ``mu``). ``autograd``: arguments for a
    ``differentiable=True`` run whose tensor hyperparameters get gradients. Tensor values are
    copied for each optimizer built from them. ``load_casts_state``: torch's
    ``load_state_dict`` changes the state's dtypes (ASGD's ``eta`` and ``mu`` take the
    parameter's), so a cross-loaded optimizer is compared with torch's cross-loaded one, not
    with the live one. ``autograd_steps``: how many steps the ``autograd`` run takes (torch's
    differentiable Adamax cannot backpropagate through more than one). Rows may live in sibling
    modules, taken in with :func:`rows_from`. For optimizers that need more: ``groups=()``
    builds a single group (LBFGS takes no more); ``params(dtype)`` replaces
    :func:`make_params` (Muon takes 2-D parameters only); ``grad(dense, index, step)`` turns
    each seeded gradient into the one to set (SparseAdam's sparse ones); ``closure(params,
    step, gaps)`` gives the closure each step is called with (LBFGS needs one).
    """

    name: str
    torch_cls: type[torch.optim.Optimizer]
    ours: type[Optimizer]
    configs: dict[str, dict[str, Any]]
    groups: tuple[dict[str, Any], ...]
    invalid: dict[str, dict[str, Any]] = field(default_factory=dict)
    impls: tuple[str, ...] = ("default", "for-loop", "foreach", "fused")
    number_step: bool = False
    autograd: dict[str, Any] = field(default_factory=dict)
    number_state: tuple[str, ...] = ("step",)
    load_casts_state: bool = False
    autograd_steps: int = 3
    params: Callable[[torch.dtype], list[torch.Tensor]] | None = None
    grad: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None
    closure: Callable[[list[torch.Tensor], int, bool], Callable[[], Any]] | None = None


def rows_from(module: str) -> list[Row]:
    """The ``ROWS`` of a sibling module, which imports ``Row`` from here (defined above)."""
    rows: list[Row] = importlib.import_module(module).ROWS
    return rows


ROWS = [
    Row(
        "SGD",
        torch.optim.SGD,
        SGD,
        configs={
            "plain": {"lr": 0.1},
            "momentum": {"lr": 0.1, "momentum": 0.9},
            "dampening-wd": {"lr": 0.05, "momentum": 0.8, "dampening": 0.3, "weight_decay": 0.1},
            "nesterov-maximize": {
                "lr": 0.1,
                "momentum": 0.9,
                "nesterov": True,
                "maximize": True,
                "weight_decay": 0.01,
            },
            "tensor-lr": {"lr": torch.tensor(0.07), "momentum": 0.5},
            "tensor-wd": {"lr": 0.1, "weight_decay": torch.tensor(0.2)},
            "differentiable": {"lr": 0.1, "momentum": 0.9, "differentiable": True},
        },
        groups=({"lr": 0.03, "weight_decay": 0.05}, {"momentum": 0.7, "dampening": 0.1}),
        invalid={
            "negative-lr": {"lr": -0.1},
            "tensor-lr-2-elements": {"lr": torch.tensor([0.1, 0.2])},
            "negative-momentum": {"momentum": -0.5},
            "negative-wd": {"weight_decay": -1e-4},
            "nesterov-without-momentum": {"nesterov": True},
            "nesterov-with-dampening": {"nesterov": True, "momentum": 0.9, "dampening": 0.1},
            "fused-and-foreach": {"fused": True, "foreach": True},
            "fused-and-differentiable": {"fused": True, "differentiable": True},
        },
        autograd={
            "lr": torch.tensor(0.1),
            "momentum": 0.9,
            "nesterov": True,
            "weight_decay": torch.tensor(0.05),
        },
    ),
    Row(
        "Adam",
        torch.optim.Adam,
        Adam,
        configs={
            "plain": {"lr": 0.01},
            "wd-amsgrad": {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True},
            "maximize-eps": {"lr": 0.02, "maximize": True, "eps": 1e-3, "weight_decay": 0.05},
            "decoupled": {"lr": 0.01, "weight_decay": 0.1, "decoupled_weight_decay": True},
            "betas": {"lr": 0.01, "betas": (0.5, 0.75)},
            "tensor-lr": {"lr": torch.tensor(0.01), "amsgrad": True},
            "tensor-betas": {"lr": 0.01, "betas": (torch.tensor(0.8), torch.tensor(0.9))},
            "differentiable": {"lr": 0.01, "weight_decay": 0.1, "differentiable": True},
            "differentiable-amsgrad": {"lr": 0.01, "amsgrad": True, "differentiable": True},
            "capturable": {"lr": 0.01, "capturable": True},
        },
        groups=({"lr": 0.003, "weight_decay": 0.02}, {"betas": (0.8, 0.99), "amsgrad": True}),
        invalid={
            "negative-lr": {"lr": -1e-3},
            "tensor-lr-2-elements": {"lr": torch.tensor([0.1, 0.2])},
            "tensor-lr-foreach": {"lr": torch.tensor(0.1), "foreach": True},
            "negative-eps": {"eps": -1e-8},
            "beta1-one": {"betas": (1.0, 0.999)},
            "beta2-negative": {"betas": (0.9, -0.1)},
            "betas-mixed": {"betas": (torch.tensor(0.9), 0.999)},
            "betas-ints": {"betas": (0, 0)},
            "tensor-betas-foreach": {
                "betas": (torch.tensor(0.9), torch.tensor(0.99)),
                "foreach": True,
            },
            "tensor-beta2-2-elements": {"betas": (torch.tensor(0.9), torch.tensor([0.9, 0.9]))},
            "negative-wd": {"weight_decay": -0.1},
            "fused-and-foreach": {"fused": True, "foreach": True},
            "fused-and-differentiable": {"fused": True, "differentiable": True},
        },
        number_step=True,
        autograd={
            "lr": torch.tensor(0.01),
            "betas": (torch.tensor(0.8), torch.tensor(0.9)),
            "weight_decay": torch.tensor(0.1),
        },
    ),
    Row(
        "AdamW",
        torch.optim.AdamW,
        AdamW,
        configs={
            "default-wd": {"lr": 0.01},
            "no-wd": {"lr": 0.01, "weight_decay": 0.0},
            "amsgrad-maximize": {"lr": 0.02, "amsgrad": True, "maximize": True},
            "tensor-lr": {"lr": torch.tensor(0.01), "weight_decay": 0.1},
            "differentiable": {"lr": 0.01, "amsgrad": True, "differentiable": True},
        },
        groups=({"lr": 0.004, "weight_decay": 0.3}, {"betas": (0.85, 0.95), "amsgrad": True}),
        invalid={
            "negative-lr": {"lr": -1e-3},
            "beta1-one": {"betas": (1.0, 0.999)},
            "negative-wd": {"weight_decay": -0.1},
            "tensor-lr-foreach": {"lr": torch.tensor(0.1), "foreach": True},
            "fused-and-foreach": {"fused": True, "foreach": True},
        },
        number_step=True,
        autograd={"lr": torch.tensor(0.01), "betas": (torch.tensor(0.8), torch.tensor(0.9))},
    ),
    *rows_from("rows_adagrad_family"),
    *rows_from("rows_adam_variants"),
    *rows_from("rows_special"),
]


# --- the harness ----------------------------------------------------------------------------


def fresh(value: Any) -> Any:
    """A copy of constructor arguments, so that no two optimizers share a tensor hyperparameter."""
    return copy.deepcopy(value)


def make_params(dtype: torch.dtype) -> list[torch.Tensor]:
    """Small parameters of several shapes (a 0-dim one too), plus one of another dtype.

    The odd one out makes foreach and fused split the group into two (device, dtype) buckets.
    """
    other = torch.float64 if dtype == torch.float32 else torch.float32
    shapes = [(4, 3), (5,), (2, 2, 3), (3,), (), (2, 5), (6,)]
    params = [torch.randn(shape, dtype=dtype) for shape in shapes]
    params.insert(2, torch.randn(3, 2, dtype=other))
    return params


def grouped(row: Row, params: list[torch.Tensor]) -> list[dict[str, Any]]:
    """Three groups: the first takes the defaults, the others set hyperparameters of their own.

    One group for a row with ``groups=()``.
    """
    if not row.groups:
        return [{"params": params}]
    extra1, extra2 = fresh(row.groups)
    return [
        {"params": params[:4]},
        {"params": params[4:6], **extra1},
        {"params": params[6:], **extra2},
    ]


def set_grads(
    params: list[torch.Tensor],
    step: int,
    *,
    gaps: bool = True,
    to_grad: Callable[[torch.Tensor, int, int], torch.Tensor] | None = None,
) -> None:
    """Seeded gradients for ``step``, the same for every list of equal parameters.

    With ``gaps``, some parameters get no grad on some steps (so some start their state late)
    and the last never gets one; without, every parameter gets one every step. ``to_grad``
    (a row's ``grad``) turns each into the gradient to set, given its index and the step.
    """
    generator = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        grad = torch.randn(p.shape, dtype=p.dtype, generator=generator)
        skip = gaps and ((step + i) % 3 == 0 or i == len(params) - 1)
        if to_grad is not None and not skip:
            grad = to_grad(grad, i, step)
        p.grad = None if skip else grad.to(p.device)


def take_step(row: Row, optimizer: Any, step: int, *, gaps: bool) -> Any:
    """``optimizer.step()``, with the row's closure for ``step`` if it has one."""
    if row.closure is None:
        return optimizer.step()
    return optimizer.step(row.closure(all_params(optimizer), step, gaps))


def assert_same_run(ours: Optimizer, theirs: torch.optim.Optimizer, where: str) -> None:
    """Parameters and state dicts bit-identical."""
    for i, (a, b) in enumerate(zip(all_params(ours), all_params(theirs), strict=True)):
        assert_bitwise_equal(a, b, f"{where}: param {i}")
    assert_bitwise_equal(ours.state_dict(), theirs.state_dict(), f"{where}: state_dict")


def same_outcome(ours: Callable[[], Any], theirs: Callable[[], Any]) -> bool:
    """Run both; if torch raises, ours must raise the same type (or a subclass). True if ok."""
    try:
        theirs()
    except Exception as expected:
        with pytest.raises(type(expected)):
            ours()
        return False
    ours()
    return True


def all_params(optimizer: Any) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def clone_params(optimizer: Any) -> list[torch.Tensor]:
    return [p.detach().clone() for p in all_params(optimizer)]


def cases(
    rows: list[Row] = ROWS,
    *,
    impls: tuple[str, ...] = tuple(IMPLS),
    dtypes: tuple[str, ...] = tuple(DTYPES),
) -> list[Any]:
    """The grid row x config x implementation x dtype, as pytest params with readable ids."""
    return [
        pytest.param(row, config, impl, dtype, id=f"{row.name}-{config}-{impl}-{dtype}")
        for row in rows
        for config in row.configs
        for impl in impls
        if impl in row.impls
        for dtype in dtypes
    ]


def build(cls: type, params: list[torch.Tensor], row: Row, kwargs: dict[str, Any]) -> Any:
    return cls(grouped(row, params), **fresh(kwargs))


def run_against_torch(
    row: Row, kwargs: dict[str, Any], dtype: torch.dtype, *, gaps: bool, device: str = "cpu"
) -> None:
    """Step ours and torch's in lockstep; halfway, cross-load the states and go on with four.

    After every step the parameters and state dicts of each pair must be bit-identical. If
    torch refuses the construction or a step, ours must refuse it with the same exception type.
    The parameters (and so the gradients and state) live on ``device``.
    """
    theirs_params = [p.to(device) for p in (row.params or make_params)(dtype)]
    ours_params = [p.clone() for p in theirs_params]
    built: dict[str, Any] = {}
    if not same_outcome(
        lambda: built.setdefault("ours", build(row.ours, ours_params, row, kwargs)),
        lambda: built.setdefault("theirs", build(row.torch_cls, theirs_params, row, kwargs)),
    ):
        return
    ours, theirs = built["ours"], built["theirs"]
    assert_same_run(ours, theirs, "after construction")

    pairs = [(ours, theirs)]
    extras: list[Any] = []
    for step in range(1, STEPS_BEFORE_CROSSLOAD + STEPS_AFTER_CROSSLOAD + 1):
        if step == STEPS_BEFORE_CROSSLOAD + 1:
            # Cross-load on copies of the parameters: torch's state into ours, ours into torch.
            ours2 = build(row.ours, clone_params(theirs), row, kwargs)
            ours2.load_state_dict(copy.deepcopy(theirs.state_dict()))
            theirs2 = build(row.torch_cls, clone_params(ours), row, kwargs)
            theirs2.load_state_dict(copy.deepcopy(ours.state_dict()))
            # Both loaded the same state (ours and theirs are bit-identical here).
            pairs += (
                [(ours2, theirs2)] if row.load_casts_state else [(ours2, theirs), (ours, theirs2)]
            )
            extras += [ours2, theirs2]
            for a, b in pairs:
                assert_same_run(a, b, "after cross-loading")

        for optimizer in (ours, theirs, *extras):
            set_grads(all_params(optimizer), step, gaps=gaps, to_grad=row.grad)
        # A step torch refuses (capturable on the CPU, ...) must be refused by ours too.
        if not same_outcome(
            functools.partial(take_step, row, ours, step, gaps=gaps),
            functools.partial(take_step, row, theirs, step, gaps=gaps),
        ):
            assert_same_run(ours, theirs, f"after the refused step {step}")
            return
        for optimizer in extras:
            take_step(row, optimizer, step, gaps=gaps)
        for a, b in pairs:
            assert_same_run(a, b, f"after step {step}")


# --- the tests ----------------------------------------------------------------------------------


def test_table_covers_the_registry() -> None:
    assert [row.name for row in ROWS] == names()
    for row in ROWS:
        assert row.torch_cls.__name__ == row.ours.__name__ == row.name


@pytest.mark.parametrize(
    ("row", "config", "impl", "dtype"), cases(impls=("for-loop", "foreach", "fused", "only"))
)
def test_steps_and_cross_loading_match_torch(row: Row, config: str, impl: str, dtype: str) -> None:
    run_against_torch(row, {**row.configs[config], **IMPLS[impl]}, DTYPES[dtype], gaps=True)


@pytest.mark.parametrize(("row", "config", "impl", "dtype"), cases(dtypes=("float32",)))
def test_steps_with_every_grad_present_match_torch(
    row: Row, config: str, impl: str, dtype: str
) -> None:
    """No gaps: the paths where every state exists (and fused SGD, which needs that) run on."""
    run_against_torch(row, {**row.configs[config], **IMPLS[impl]}, DTYPES[dtype], gaps=False)


@pytest.mark.parametrize(
    ("row", "config", "impl", "dtype"),
    cases(
        [row for row in ROWS if row.number_step], impls=("for-loop", "fused"), dtypes=("float32",)
    ),
)
def test_old_checkpoint_with_number_steps_loads_like_torch(
    row: Row, config: str, impl: str, dtype: str
) -> None:
    """A state dict whose ``step`` is a Python number (torch < 1.12) loads and steps like torch's."""
    # The checkpoint: two steps of a plain for-loop run, then every step made an int.
    plain = {
        k: v for k, v in row.configs[config].items() if k not in ("capturable", "differentiable")
    }
    source = build(row.torch_cls, make_params(DTYPES[dtype]), row, {**plain, "foreach": False})
    for step in (1, 2):
        set_grads(all_params(source), step)
        source.step()
    old = copy.deepcopy(source.state_dict())
    for param_state in old["state"].values():
        for key in row.number_state:
            value = param_state[key].item()
            param_state[key] = int(value) if key == "step" else value

    kwargs = {**row.configs[config], **IMPLS[impl]}
    built: dict[str, Any] = {}
    if not same_outcome(
        lambda: built.setdefault("ours", build(row.ours, clone_params(source), row, kwargs)),
        lambda: built.setdefault("theirs", build(row.torch_cls, clone_params(source), row, kwargs)),
    ):
        return
    ours, theirs = built["ours"], built["theirs"]
    theirs.load_state_dict(copy.deepcopy(old))
    ours.load_state_dict(copy.deepcopy(old))
    assert_same_run(ours, theirs, "after loading")
    for step in (3, 4):
        for optimizer in (ours, theirs):
            set_grads(all_params(optimizer), step)
        if not same_outcome(ours.step, theirs.step):
            assert_same_run(ours, theirs, f"after the refused step {step}")
            return
        assert_same_run(ours, theirs, f"after step {step}")


@pytest.mark.parametrize(
    ("row", "kwargs"),
    [
        pytest.param(row, kwargs, id=f"{row.name}-{key}")
        for row in ROWS
        for key, kwargs in row.invalid.items()
    ],
)
def test_invalid_arguments_raise_like_torch(row: Row, kwargs: dict[str, Any]) -> None:
    with pytest.raises(Exception) as expected:
        row.torch_cls([torch.zeros(2, 2)], **fresh(kwargs))  # 2-D, the only shape Muon takes
    with pytest.raises(type(expected.value)):
        row.ours([torch.zeros(2, 2)], **fresh(kwargs))


def tensors_in(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors_in(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors_in(v)]
    return []


@pytest.mark.parametrize("row", [pytest.param(row, id=row.name) for row in ROWS if row.autograd])
def test_differentiable_steps_give_torchs_gradients(row: Row) -> None:
    """With ``differentiable=True``, gradients through the steps (3 by default) match torch's."""
    results = []
    for cls in (row.ours, row.torch_cls):
        torch.manual_seed(0)
        leaves = [
            torch.randn(shape, dtype=torch.float64, requires_grad=True) for shape in [(3, 2), (4,)]
        ]
        kwargs = fresh(row.autograd)
        hyper = tensors_in(kwargs)
        for t in hyper:
            t.data = t.data.double()
            t.requires_grad_(True)
        params = [leaf.clone() for leaf in leaves]  # non-leaves, allowed when differentiable
        optimizer = cls(params, differentiable=True, **kwargs)
        for step in range(1, row.autograd_steps + 1):
            set_grads(params, step, gaps=False)
            optimizer.step()
        loss = sum((p * p).sum() for p in params)
        results.append((params, torch.autograd.grad(loss, leaves + hyper)))
    (ours_params, ours_grads), (theirs_params, theirs_grads) = results
    assert_bitwise_equal(list(ours_params), list(theirs_params), "params")
    assert_bitwise_equal(list(ours_grads), list(theirs_grads), "gradients")


@pytest.mark.parametrize(
    ("row", "device"),
    [
        pytest.param(
            row,
            device,
            id=f"{row.name}-{device}",
            marks=[NEEDS_CUDA, *([FUSED_ADAGRAD_CUDA] if row.name == "Adagrad" else [])]
            if device == "cuda"
            else [],
        )
        for row in ROWS
        if "fused" in row.impls
        for device in ("cpu", "cuda")
    ],
)
def test_fused_steps_under_grad_scaler_match_torch(row: Row, device: str) -> None:
    """GradScaler hands fused optimizers its scale: the first steps overflow and are skipped,
    the scale backs off, and the later steps update, the same way as torch's."""
    runs = []
    for cls in (row.ours, row.torch_cls):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3).to(device)
        start = model.weight.detach().clone()
        optimizer = cls(model.parameters(), lr=0.01, fused=True)
        scaler = torch.amp.GradScaler(
            device, init_scale=2.0**100, backoff_factor=2.0**-8, growth_interval=100
        )
        for _ in range(6):
            optimizer.zero_grad()
            # Large enough that the first two scaled grads overflow, not the later ones.
            inputs = 1e6 * torch.randn(5, 4)
            scaler.scale(model(inputs.to(device)).pow(2).sum()).backward()
            scaler.step(optimizer)
            scaler.update()
        assert not torch.equal(model.weight, start)  # some steps did update
        runs.append((optimizer, scaler.get_scale()))
    (ours, ours_scale), (theirs, theirs_scale) = runs
    assert ours_scale == theirs_scale < 2.0**100  # overflows backed the scale off
    assert_same_run(ours, theirs, "after six scaled steps")


def test_adamw_keeps_decoupled_weight_decay_when_loading_adam_state() -> None:
    """torch's AdamW.__setstate__ forces decoupled_weight_decay, even for Adam's state."""
    source = torch.optim.Adam(make_params(torch.float32), weight_decay=0.1)
    set_grads(all_params(source), 1)
    source.step()
    saved = source.state_dict()
    assert saved["param_groups"][0]["decoupled_weight_decay"] is False
    ours = AdamW(clone_params(source))
    theirs = torch.optim.AdamW(clone_params(source))
    ours.load_state_dict(copy.deepcopy(saved))
    theirs.load_state_dict(copy.deepcopy(saved))
    assert ours.param_groups[0]["decoupled_weight_decay"] is True
    assert_same_run(ours, theirs, "after loading Adam's state into AdamW")


@pytest.mark.parametrize(
    ("row", "impl"), [pytest.param(r, i, id=f"{r.name}-{i}") for r in ROWS for i in r.impls]
)
def test_sparse_grads_like_torch(row: Row, impl: str) -> None:
    """Sparse gradients: stepped where torch steps them (plain SGD), refused where it refuses."""
    runs = []
    for cls in (row.ours, row.torch_cls):
        weight = torch.arange(12.0).reshape(4, 3)
        weight.grad = torch.sparse_coo_tensor(
            [[0, 2]], torch.ones(2, 3), (4, 3), check_invariants=True
        )
        runs.append((cls([weight], lr=0.5, **IMPLS[impl]), weight))
    (ours, ours_weight), (theirs, theirs_weight) = runs
    if same_outcome(ours.step, theirs.step):
        assert_bitwise_equal(ours_weight, theirs_weight, "weight")
        assert not torch.equal(theirs_weight, torch.arange(12.0).reshape(4, 3))


@pytest.fixture
def float64_default() -> Any:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize(
    ("row", "config", "impl", "dtype"),
    cases(
        [row for row in ROWS if row.number_step], impls=("for-loop", "fused"), dtypes=("float64",)
    ),
)
def test_step_dtype_follows_a_float64_default_like_torch(
    row: Row, config: str, impl: str, dtype: str
) -> None:
    """torch's ``_get_scalar_dtype``: a float64 ``step`` under a float64 default, unless fused."""
    run_against_torch(row, {**row.configs[config], **IMPLS[impl]}, DTYPES[dtype], gaps=True)


# --- on a GPU -------------------------------------------------------------------------------------


def cuda_cases(cases: list[Any]) -> list[Any]:
    """``cases`` where CUDA is available; else one skipped placeholder, not hundreds of skips.

    Fused Adagrad on CUDA is new in torch 2.13 (older torch refuses it; ours follows 2.13).
    """
    if not torch.cuda.is_available():
        return [pytest.param(None, None, None, None, marks=NEEDS_CUDA, id="no-cuda")]
    return [
        pytest.param(*case.values, id=case.id, marks=[*case.marks, FUSED_ADAGRAD_CUDA])
        if _fused_adagrad_that_constructs(case.values[0], case.values[1], case.values[2])
        else case
        for case in cases
    ]


def _fused_adagrad_that_constructs(row: Row, config: str, impl: str) -> bool:
    """Fused Adagrad that every torch builds (fused with differentiable is refused by all)."""
    return (
        row.name == "Adagrad" and impl == "fused" and not row.configs[config].get("differentiable")
    )


def capturable_cases() -> list[Any]:
    """Every capturable config, with the implementations that have a capturable path."""
    return [
        pytest.param(row, config, impl, "float32", id=f"{row.name}-{config}-{impl}")
        for row in ROWS
        for config, kwargs in row.configs.items()
        if kwargs.get("capturable")
        for impl in ("for-loop", "foreach")
        if impl in row.impls
    ]


@pytest.mark.parametrize(
    ("row", "config", "impl", "dtype"),
    cuda_cases(
        cases(impls=("for-loop", "foreach", "fused", "only"), dtypes=("float32", "float64"))
    ),
)
def test_steps_and_cross_loading_match_torch_on_cuda(
    row: Row, config: str, impl: str, dtype: str
) -> None:
    """The same lockstep run with CUDA parameters: torch's CUDA kernels (foreach, fused, the
    capturable paths that only run there) against ours, bit for bit."""
    kwargs = {**row.configs[config], **IMPLS[impl]}
    run_against_torch(row, kwargs, DTYPES[dtype], gaps=True, device="cuda")


@pytest.mark.parametrize(("row", "config", "impl", "dtype"), cuda_cases(capturable_cases()))
def test_capturable_under_cuda_graph_replay_matches_torch(
    row: Row, config: str, impl: str, dtype: str
) -> None:
    """A capturable optimizer's step captured in a CUDA graph and replayed, as torch's is."""
    kwargs = {**row.configs[config], **IMPLS[impl]}
    runs = []
    for cls in (row.ours, row.torch_cls):
        torch.manual_seed(0)  # the same parameters for both
        params = [p.cuda() for p in (row.params or make_params)(DTYPES[dtype])]
        params = [p for p in params if p.dtype == DTYPES[dtype]]  # one bucket
        optimizer = build(cls, params, row, kwargs)
        set_grads(params, 1, gaps=False)
        optimizer.step()  # the state exists before capture, as torch's docs require
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up steps on a side stream
                optimizer.step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            optimizer.step()
        captured = [p.grad for p in params]
        for step in range(2, 5):
            set_grads(params, step, gaps=False)
            for p, grad in zip(params, captured, strict=True):
                grad.copy_(p.grad)  # the graph reads the captured gradient tensors
                p.grad = grad
            graph.replay()
        torch.cuda.synchronize()
        runs.append(optimizer)
    ours, theirs = runs
    assert_same_run(ours, theirs, "after graph replays")
