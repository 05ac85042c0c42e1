"""optckpt.optim.base.Optimizer against ``torch.optim.Optimizer``: groups, hooks, state dicts.

Each behaviour is checked on every bundled optimizer (the registry) next to its torch class,
so the expected result is always torch's, never our own earlier output.
"""

from __future__ import annotations

import copy
import inspect
import pickle
import warnings
from typing import Any

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from optckpt.errors import ExitCode, GroupCountMismatchError, GroupSizeMismatchError
from optckpt.optim import Optimizer, UnknownOptimizerError, by_name, names
from optckpt.optim.base import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

PAIRS = [pytest.param(by_name(name), getattr(torch.optim, name), id=name) for name in names()]


def params(n: int = 3) -> list[torch.Tensor]:
    return [torch.randn(2, 3) for _ in range(n)]


def error_of(build: Any) -> type[BaseException] | None:
    try:
        build()
    except Exception as error:
        return type(error)
    return None


def assert_same_error(ours: Any, theirs: Any) -> None:
    expected = error_of(theirs)
    assert expected is not None, "torch accepts this"
    actual = error_of(ours)
    assert actual is not None and issubclass(actual, expected), f"{actual} vs {expected}"


# Three optimizers step differently, in torch as in optckpt: SparseAdam takes only sparse
# grads, LBFGS needs a closure (and takes one param group), Muon takes only 2-D parameters
# (``params()`` are 2-D). Some have no ``foreach`` or ``differentiable`` argument.


def takes(cls: type, argument: str) -> bool:
    """Whether the constructor of ``cls`` has a parameter called ``argument``."""
    return argument in inspect.signature(cls).parameters


def is_named(cls: type, name: str) -> bool:
    """Whether ``cls`` is, or subclasses, the optimizer class called ``name``."""
    return any(c.__name__ == name for c in cls.__mro__)


def grad_for(cls: type, grad: torch.Tensor) -> torch.Tensor:
    """``grad`` as ``cls`` steps it: sparse for SparseAdam, as it is for the others."""
    return grad.to_sparse() if is_named(cls, "SparseAdam") else grad


def with_closure(opt: Any) -> Any:
    """``opt``, on which a bare ``step()`` works even for LBFGS, which needs a closure.

    A step pre-hook passes LBFGS a closure (the sum of squares of the parameters, setting
    their grads) when the caller gives none.
    """
    if not is_named(type(opt), "LBFGS"):
        return opt

    def closure() -> float:
        ps = [p for group in opt.param_groups for p in group["params"]]
        for p in ps:
            p.grad = 2 * p
        return float(sum((p * p).sum() for p in ps))

    def pre_hook(o: Any, args: Any, kwargs: dict[str, Any]) -> Any:
        if len(args) > 1 or "closure" in kwargs:
            return None
        return args, {**kwargs, "closure": closure}

    opt.register_step_pre_hook(pre_hook)
    return opt


def assert_same_state_value(ours: Any, theirs: Any) -> None:
    """Tensors of one dtype and equal values, lists item by item, anything else equal.

    State is not all tensors: SparseAdam's ``step`` is an int, and LBFGS keeps ints, floats
    and lists of tensors.
    """
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, torch.Tensor) and ours.dtype == theirs.dtype
        assert torch.equal(ours, theirs)
    elif isinstance(theirs, list):
        assert isinstance(ours, list) and len(ours) == len(theirs)
        for a, b in zip(ours, theirs, strict=True):
            assert_same_state_value(a, b)
    else:
        assert type(ours) is type(theirs) and ours == theirs


# --- construction -------------------------------------------------------------------------------


@pytest.mark.parametrize(("ours", "theirs"), PAIRS)
@pytest.mark.parametrize(
    "bad_params",
    [
        pytest.param(lambda: torch.zeros(3), id="bare-tensor"),
        pytest.param(lambda: [], id="empty"),
        pytest.param(lambda: [{"params": set(params(2))}], id="set-in-group"),
        pytest.param(lambda: [torch.zeros(2, requires_grad=True) * 2], id="non-leaf"),
        pytest.param(lambda: [1.0, 2.0], id="not-tensors"),
        pytest.param(lambda: [("a", torch.zeros(2)), torch.zeros(2)], id="some-unnamed"),
        pytest.param(
            lambda: [{"params": [("a", torch.zeros(2))]}, {"params": [torch.zeros(2)]}],
            id="named-and-unnamed-groups",
        ),
    ],
)
def test_bad_params_raise_like_torch(ours: type, theirs: type, bad_params: Any) -> None:
    assert_same_error(lambda: ours(bad_params()), lambda: theirs(bad_params()))


@pytest.mark.parametrize(("ours", "theirs"), PAIRS)
def test_empty_params_message_is_torchs(ours: type, theirs: type) -> None:
    with pytest.raises(ValueError, match=r"^optimizer got an empty parameter list$"):
        ours([])


@pytest.mark.parametrize(("ours", "theirs"), PAIRS)
def test_a_top_level_set_is_accepted_like_torch(ours: type, theirs: type) -> None:
    """torch lists ``params`` before checking, so only a set inside a group dict is refused."""
    ps = set(params(2))
    assert len(theirs(ps).param_groups[0]["params"]) == 2
    assert len(ours(ps).param_groups[0]["params"]) == 2


@pytest.mark.parametrize(("ours", "theirs"), PAIRS)
def test_parameter_in_two_groups_raises_like_torch(ours: type, theirs: type) -> None:
    p = torch.zeros(2)
    groups = [{"params": [p]}, {"params": [torch.zeros(1), p]}]
    assert_same_error(lambda: ours(copy.copy(groups)), lambda: theirs(copy.copy(groups)))
    with pytest.raises(ValueError, match="more than one parameter group"):
        ours([{"params": [p]}, {"params": [p]}])


@pytest.mark.parametrize(("ours", "theirs"), PAIRS)
def test_duplicate_in_a_group_warns_like_torch(ours: type, theirs: type) -> None:
    p = torch.zeros(2, 2)
    for cls in (theirs, ours):
        with pytest.warns(UserWarning, match="duplicate parameters"):
            cls([p, p])


@pytest.mark.parametrize(("ours", "theirs"), PAIRS)
def test_non_leaf_is_accepted_when_differentiable(ours: type, theirs: type) -> None:
    p = torch.zeros(2, requires_grad=True) * 2
    if not takes(theirs, "differentiable"):
        # Without a differentiable mode a non-leaf is always refused.
        assert_same_error(lambda: ours([p]), lambda: theirs([p]))
        return
    assert len(ours([p], differentiable=True).param_groups[0]["params"]) == 1
    theirs([p], differentiable=True)


@pytest.mark.parametrize(("ours", "theirs"), PAIRS)
def test_groups_and_defaults_are_torchs(ours: type, theirs: type) -> None:
    """Same keys in the same order, defaults filled with setdefault, never overriding."""
    ps = params(3)

    def groups() -> list[dict[str, Any]]:
        return [{"params": ps[:1]}, {"params": (p for p in ps[1:]), "lr": 0.5, "foreach": True}]

    if error_of(lambda: theirs(groups())) is None:
        a, b = ours(groups()), theirs(groups())
    else:
        # LBFGS refuses a second group at construction, but takes one added later.
        assert_same_error(lambda: ours(groups()), lambda: theirs(groups()))
        a, b = ours(groups()[:1]), theirs(groups()[:1])
        for opt in (a, b):
            opt.add_param_group(groups()[1])
    assert a.defaults == b.defaults
    assert list(a.defaults) == list(b.defaults)
    for group_a, group_b in zip(a.param_groups, b.param_groups, strict=True):
        assert list(group_a) == list(group_b)
        assert {k: v for k, v in group_a.items() if k != "params"} == {
            k: v for k, v in group_b.items() if k != "params"
        }
        assert [id(p) for p in group_a["params"]] == [id(p) for p in group_b["params"]]
    assert a.param_groups[1]["lr"] == 0.5 and a.param_groups[1]["foreach"] is True
    assert repr(a) == repr(b)


@pytest.mark.parametrize(("ours", "theirs"), PAIRS)
def test_signature_is_torchs(ours: type, theirs: type) -> None:
    """Same parameter names, kinds (positional or keyword-only, as torch has them: ASGD's and
    RMSprop's flags are positional) and defaults, in the same order."""

    def shape(cls: type) -> list[tuple[str, Any, Any]]:
        parameters = inspect.signature(cls).parameters.values()
        return [(p.name, p.kind, p.default) for p in parameters]

    assert shape(ours) == shape(theirs)


@pytest.mark.parametrize(("ours", "theirs"), PAIRS)
def test_a_subclass_keeps_torchs_defaults(ours: type, theirs: type) -> None:
    """A user's subclass, which the specs do not name, builds torch's defaults in its order."""

    class Sub(ours):  # type: ignore[misc, valid-type]
        pass

    assert list(Sub(params()).defaults.items()) == list(theirs(params()).defaults.items())


@pytest.mark.parametrize(("ours", "theirs"), PAIRS)
def test_named_parameters_record_param_names(ours: type, theirs: type) -> None:
    # No biases: Muon takes only 2-D parameters.
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 2, bias=False), torch.nn.Linear(2, 1, bias=False)
    )
    a, b = ours(model.named_parameters()), theirs(model.named_parameters())
    assert a.param_groups[0]["param_names"] == ["0.weight", "1.weight"]
    assert a.state_dict()["param_groups"] == b.state_dict()["param_groups"]

    named = dict(model.named_parameters())
    a.add_param_group({"params": [("extra", torch.zeros(2))]})
    assert a.param_groups[1]["param_names"] == ["extra"]
    with pytest.raises(ValueError, match="without names"):
        a.add_param_group({"params": [torch.zeros(2)]})
    assert named["0.weight"] is a.param_groups[0]["params"][0]


@pytest.mark.parametrize(("ours", "theirs"), PAIRS)
def test_add_param_group_like_torch(ours: type, theirs: type) -> None:
    ps = params(3)
    a, b = ours(ps[:1], lr=0.1), theirs(ps[:1], lr=0.1)
    for opt in (a, b):
        opt.add_param_group({"params": ps[1], "lr": 0.2})
    assert a.param_groups[1]["params"] == [ps[1]]
    assert {k: v for k, v in a.param_groups[1].items() if k != "params"} == {
        k: v for k, v in b.param_groups[1].items() if k != "params"
    }
    assert_same_error(lambda: a.add_param_group([ps[2]]), lambda: b.add_param_group([ps[2]]))
    assert_same_error(
        lambda: a.add_param_group({"params": [ps[0]]}),
        lambda: b.add_param_group({"params": [ps[0]]}),
    )


def test_base_step_is_abstract() -> None:
    with pytest.raises(NotImplementedError):
        Optimizer([torch.zeros(2)], {"lr": 0.1}).step()


# --- zero_grad ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("ours", "theirs"), PAIRS)
@pytest.mark.parametrize("foreach", [False, True])
def test_zero_grad(ours: type, theirs: type, foreach: bool) -> None:
    ps = params(3)
    if takes(theirs, "foreach"):
        opt = ours(ps, foreach=foreach)
    elif foreach:
        # No foreach argument: ours refuses it, as torch does.
        assert_same_error(lambda: ours(ps, foreach=True), lambda: theirs(ps, foreach=True))
        return
    else:
        opt = ours(ps)
    for p in ps:
        p.grad = torch.ones_like(p)
    ps[2].grad = None
    grads = [p.grad for p in ps]
    opt.zero_grad(set_to_none=False)
    assert ps[0].grad is grads[0] and torch.equal(ps[0].grad, torch.zeros(2, 3))
    assert ps[2].grad is None
    opt.zero_grad()
    assert all(p.grad is None for p in ps)


# --- hooks --------------------------------------------------------------------------------------


def stepped(cls: type) -> tuple[Any, list[torch.Tensor]]:
    """An optimizer of ``cls`` over two parameters with grads, ready for a bare ``step()``."""
    ps = params(2)
    for p in ps:
        p.grad = grad_for(cls, torch.ones_like(p))
    return with_closure(cls(ps, lr=0.1)), ps


@pytest.mark.parametrize(("ours", "theirs"), PAIRS)
def test_step_hooks_run_in_torchs_order(ours: type, theirs: type) -> None:
    calls: list[str] = []
    opt, _ = stepped(ours)
    handles = [
        register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global-pre")),
        register_optimizer_step_post_hook(lambda o, a, k: calls.append("global-post")),
    ]
    try:
        handles += [
            opt.register_step_pre_hook(lambda o, a, k: calls.append("pre")),
            opt.register_step_post_hook(lambda o, a, k: calls.append("post")),
        ]
        opt.step()
        assert calls == ["global-pre", "pre", "post", "global-post"]
    finally:
        for handle in handles:
            handle.remove()
    calls.clear()
    opt.step()
    assert calls == []


@pytest.mark.parametrize(("ours", "theirs"), PAIRS)
def test_step_pre_hook_can_replace_arguments(ours: type, theirs: type) -> None:
    opt, _ = stepped(ours)
    seen: list[Any] = []
    opt.register_step_pre_hook(lambda o, a, k: ((o,), {"closure": lambda: 42.0}))
    opt.register_step_post_hook(lambda o, a, k: seen.append(k["closure"]()))
    assert opt.step() == 42.0
    assert seen == [42.0]

    bad, _ = stepped(ours)
    bad.register_step_pre_hook(lambda o, a, k: "nonsense")
    reference, _ = stepped(theirs)
    reference.register_step_pre_hook(lambda o, a, k: "nonsense")
    assert_same_error(bad.step, reference.step)


@pytest.mark.parametrize(("ours", "theirs"), PAIRS)
def test_step_hooks_wrap_subclass_steps_once(ours: type, theirs: type) -> None:
    class Sub(ours):  # type: ignore[misc, valid-type]
        pass

    calls: list[str] = []
    opt, _ = stepped(Sub)
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.step()
    assert calls == ["pre"]


@pytest.mark.parametrize(("ours", "theirs"), PAIRS)
def test_state_dict_hooks_like_torch(ours: type, theirs: type) -> None:
    results = []
    for cls in (ours, theirs):
        opt, _ = stepped(cls)
        opt.step()
        calls: list[str] = []
        opt.register_state_dict_pre_hook(lambda o, calls=calls: calls.append("pre-1"))
        opt.register_state_dict_pre_hook(lambda o, calls=calls: calls.append("pre-0"), prepend=True)
        opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
        handle = opt.register_state_dict_post_hook(
            lambda o, sd, calls=calls: calls.append(sorted(sd)), prepend=True
        )
        sd = opt.state_dict()
        first_calls = list(calls)
        handle.remove()
        results.append((first_calls, sorted(sd), sorted(opt.state_dict())))
    assert results[0] == results[1]
    assert results[0][0] == ["pre-0", "pre-1", ["param_groups", "state"]]


@pytest.mark.parametrize(("ours", "theirs"), PAIRS)
def test_load_state_dict_hooks_like_torch(ours: type, theirs: type) -> None:
    source, _ = stepped(theirs)
    source.step()
    saved = source.state_dict()
    for cls in (ours, theirs):
        opt, _ = stepped(cls)
        calls: list[Any] = []

        def pre(o: Any, sd: dict[str, Any], calls: list[Any] = calls) -> dict[str, Any]:
            calls.append(sd is saved)  # a shallow copy, not the caller's dict
            changed = copy.deepcopy(sd)
            changed["param_groups"][0]["lr"] = 0.5
            return changed

        opt.register_load_state_dict_pre_hook(pre)
        opt.register_load_state_dict_pre_hook(lambda o, sd, c=calls: c.append("first"), True)
        opt.register_load_state_dict_post_hook(lambda o, c=calls: c.append(o.param_groups[0]["lr"]))
        opt.load_state_dict(saved)
        assert calls == ["first", False, 0.5]
    assert saved["param_groups"][0]["lr"] == 0.1


# --- state dicts --------------------------------------------------------------------------------


@pytest.mark.parametrize(("ours", "theirs"), PAIRS)
def test_load_state_dict_errors_are_torchs_types_and_better(ours: type, theirs: type) -> None:
    source, _ = stepped(theirs)
    source.step()
    saved = source.state_dict()
    one_group, _ = stepped(ours)
    with pytest.raises(GroupSizeMismatchError, match="param group 0 has 2 parameters"):
        ours(params(3)).load_state_dict(saved)
    two_groups = ours(params(1))
    two_groups.add_param_group({"params": params(1)})  # LBFGS takes a second group only so
    with pytest.raises(GroupCountMismatchError):
        two_groups.load_state_dict(saved)
    assert issubclass(GroupSizeMismatchError, ValueError)
    one_group.load_state_dict(saved)


@pytest.mark.parametrize(("ours", "theirs"), PAIRS)
def test_load_state_dict_keeps_the_callers_dict_and_casts_like_torch(
    ours: type, theirs: type
) -> None:
    source, _ = stepped(theirs)
    source.step()
    saved = source.state_dict()
    before = copy.deepcopy(saved)
    targets = [[p.double() for p in params(2)] for _ in range(2)]
    a, b = ours(targets[0]), theirs(targets[1])
    a.load_state_dict(saved)
    b.load_state_dict(saved)
    assert saved.keys() == before.keys() and saved["param_groups"] == before["param_groups"]
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for pid, state in sb["state"].items():
        for key, value in state.items():
            assert_same_state_value(sa["state"][pid][key], value)


@pytest.mark.parametrize(("ours", "theirs"), PAIRS)
def test_pickle_round_trip(ours: type, theirs: type) -> None:
    opt, _ = stepped(ours)
    opt.register_step_pre_hook(print)
    opt.step()
    copy_ = pickle.loads(pickle.dumps(opt))
    assert len(copy_._optimizer_step_pre_hooks) == 0
    # Unpickling sets defaults["differentiable"] (False) where it was missing, as torch does.
    reference, _ = stepped(theirs)
    assert copy_.defaults == pickle.loads(pickle.dumps(reference)).defaults
    assert sorted(copy_.state_dict()["state"]) == sorted(opt.state_dict()["state"])


layouts = st.lists(st.integers(min_value=1, max_value=3), min_size=1, max_size=3).flatmap(
    lambda sizes: st.tuples(
        st.just(sizes),
        st.lists(st.booleans(), min_size=sum(sizes), max_size=sum(sizes)),
        st.sampled_from(names()),
    )
)


@settings(max_examples=30, deadline=None)
@given(layouts)
def test_state_dict_matches_torch_on_random_layouts(
    layout: tuple[list[int], list[bool], str],
) -> None:
    """Group layouts and grad masks at random: the same state dict, before and after a reload."""
    sizes, has_grad, name = layout
    assume(name != "LBFGS" or len(sizes) == 1)
    ps = [torch.randn(2, 2) for _ in range(sum(sizes))]
    for p, flag in zip(ps, has_grad, strict=True):
        p.grad = grad_for(by_name(name), torch.randn(2, 2)) if flag else None
    qs = [p.clone() for p in ps]
    for q, p in zip(qs, ps, strict=True):
        q.grad = None if p.grad is None else p.grad.clone()

    def groups(tensors: list[torch.Tensor]) -> list[dict[str, Any]]:
        out, start = [], 0
        for i, size in enumerate(sizes):
            out.append({"params": tensors[start : start + size], "lr": 0.1 * (i + 1)})
            start += size
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = by_name(name)(groups(ps)), getattr(torch.optim, name)(groups(qs))
    with_closure(a).step()
    with_closure(b).step()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert list(sa["state"]) == list(sb["state"])
    for pid in sb["state"]:
        for key, value in sb["state"][pid].items():
            assert_same_state_value(sa["state"][pid][key], value)
    a.load_state_dict(copy.deepcopy(sb))
    assert a.state_dict()["param_groups"] == sb["param_groups"]


# --- the registry -------------------------------------------------------------------------------


def test_registry_names_and_lookup() -> None:
    # DESIGN.md's order (optimizers being added may be missing yet); the first three are in.
    design_order = "SGD Adam AdamW Adagrad Adadelta Adamax ASGD NAdam RAdam RMSprop Rprop"
    design_order += " SparseAdam Adafactor LBFGS Muon"
    assert names()[:3] == ["SGD", "Adam", "AdamW"]
    assert names() == [name for name in design_order.split() if name in names()]
    for name in names():
        assert by_name(name).__name__ == name
        assert by_name(name.lower()) is by_name(name.upper()) is by_name(name)
    assert by_name("adamw").__name__ == "AdamW"


def test_unknown_name_is_an_incompatible_state_error() -> None:
    with pytest.raises(UnknownOptimizerError, match=r"did you mean Adam.*known: SGD, Adam, AdamW"):
        by_name("adamm")
    with pytest.raises(UnknownOptimizerError) as info:
        by_name("lion")
    assert info.value.exit_code == ExitCode.INCOMPATIBLE == 4
    assert "did you mean" not in str(info.value)


# --- graph capture check ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["adam", "adafactor"])
@pytest.mark.parametrize("stream_api", [True, False])
@pytest.mark.parametrize("capturing", [True, False])
def test_graph_capture_check_with_and_without_stream_is_capturing(
    monkeypatch: pytest.MonkeyPatch, stream_api: bool, capturing: bool, name: str
) -> None:
    """As if on a CUDA machine: torch >= 2.13 asks the stream, older torch asks torch.cuda.

    A step being captured without ``capturable`` is refused as torch refuses it; otherwise
    the step runs (torch 2.11's ``torch.Stream`` has no ``is_capturing``: no AttributeError).
    Adafactor's groups have no ``capturable`` key: torch reads it only while capturing.
    """
    stream = type("Stream", (), {"is_capturing": lambda self: capturing} if stream_api else {})()
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda **_: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "current_stream", lambda *_: stream)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
    param = torch.zeros(3, requires_grad=True)
    param.grad = torch.ones(3)
    optimizer = by_name(name)([param], lr=0.1)
    if capturing:
        # Adam refuses a capture without capturable; Adafactor has no such key to read
        expected = {"adam": RuntimeError, "adafactor": KeyError}[name]
        if stream_api:  # what torch >= 2.13 (installed here) does in the same place
            theirs = getattr(torch.optim, type(optimizer).__name__)([param.detach().clone()])
            with pytest.raises(expected):
                theirs._accelerator_graph_capture_health_check()
        with pytest.raises(expected):
            optimizer.step()
    else:
        optimizer.step()
        assert torch.all(param < 0)
