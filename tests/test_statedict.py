"""optckpt.statedict against the installed ``torch.optim.Optimizer``.

Every property test builds real torch optimizers on random layouts and checks that our pure
functions give what ``Optimizer.state_dict`` / ``Optimizer.load_state_dict`` give, never our
own earlier output. str/bytes values and namedtuples in the state are documented deviations
(torch garbles them) and are not generated here.
"""

from __future__ import annotations

import warnings
from collections import defaultdict, namedtuple
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from optckpt.errors import (
    GroupCountMismatchError,
    GroupSizeMismatchError,
    IncompatibleStateError,
)
from optckpt.statedict import (
    cast_state,
    cast_tree,
    cast_value,
    check_groups,
    group_of,
    is_optimizer_state_dict,
    map_ids,
    names_of,
    pack,
    param_ids,
    unpack,
)

PROPERTY = settings(max_examples=150, deadline=None)

FLOAT_DTYPES = [torch.float32, torch.float64, torch.bfloat16]
PARAM_DTYPES = [*FLOAT_DTYPES, torch.int64]
STATE_DTYPES = [*FLOAT_DTYPES, torch.int64, torch.bool]
SHAPES = [(), (3,), (2, 2)]
ABSENT = "absent"  # a group flag that is not set at all
# Devices besides the CPU: "meta" stands in for an accelerator everywhere; CUDA where there is one.
OTHER_DEVICES = ["meta", *(["cuda"] if torch.cuda.is_available() else [])]
DUPLICATE_WARNING = "optimizer contains a parameter group with duplicate parameters"


class Plain(torch.optim.Optimizer):
    """The smallest optimizer: its ``state`` is filled by the tests."""

    def __init__(self, params: Any, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": 0.0})


# --------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Layout:
    """Which parameter (by index) sits in each slot of each group.

    ``cross`` lists ``(group, param)`` pairs appended after construction: torch refuses a
    parameter in two groups at construction time, but packs such optimizers all the same.
    """

    groups: tuple[tuple[int, ...], ...]
    cross: tuple[tuple[int, int], ...]
    n_params: int

    def slots(self) -> list[list[int]]:
        out = [list(g) for g in self.groups]
        for g, p in self.cross:
            out[g].append(p)
        return out

    def first_group(self) -> dict[int, int]:
        found: dict[int, int] = {}
        for index, slots in enumerate(self.slots()):
            for p in slots:
                found.setdefault(p, index)
        return found


@st.composite
def layouts(draw: Any, max_groups: int = 4, max_size: int = 5, cross: bool = True) -> Layout:
    groups: list[tuple[int, ...]] = []
    n = 0
    for _ in range(draw(st.integers(1, max_groups))):
        slots: list[int] = []
        for _ in range(draw(st.integers(1, max_size))):
            if slots and draw(st.integers(0, 4)) == 0:
                slots.append(draw(st.sampled_from(slots)))  # repeated inside the group
            else:
                slots.append(n)
                n += 1
        groups.append(tuple(slots))
    extra: list[tuple[int, int]] = []
    if cross and len(groups) > 1 and draw(st.integers(0, 3)) == 0:
        g = draw(st.integers(1, len(groups) - 1))
        earlier = sorted({p for grp in groups[:g] for p in grp})
        extra.append((g, draw(st.sampled_from(earlier))))
    return Layout(tuple(groups), tuple(extra), n)


def make_param(dtype: torch.dtype, shape: tuple[int, ...], device: str = "cpu") -> torch.Tensor:
    if device == "meta":
        return torch.empty(shape, dtype=dtype, device="meta", requires_grad=dtype.is_floating_point)
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=dtype).to(device).requires_grad_()
    return torch.randint(-5, 5, shape, dtype=dtype).to(device)


def build(
    layout: Layout,
    params: list[torch.Tensor],
    names: list[str] | None,
    lrs: list[float],
    flags: list[tuple[Any, Any]] | None = None,
) -> Plain:
    """A torch optimizer laid out as ``layout``, named when ``names`` is given."""
    groups = []
    for slots, lr in zip(layout.groups, lrs, strict=False):
        entries: list[Any] = [params[j] if names is None else (names[j], params[j]) for j in slots]
        groups.append({"params": entries, "lr": lr})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=DUPLICATE_WARNING)
        opt = Plain(groups)
    for g, j in layout.cross:
        opt.param_groups[g]["params"].append(params[j])
        if names is not None:
            opt.param_groups[g]["param_names"].append(names[j])
    for group, (fused, capturable) in zip(opt.param_groups, flags or [], strict=False):
        if fused != ABSENT:
            group["fused"] = fused
        if capturable != ABSENT:
            group["capturable"] = capturable
    return opt


# --------------------------------------------------------------------------- state values


@dataclass(frozen=True)
class TensorSpec:
    dtype: torch.dtype
    shape: tuple[int, ...]
    value: float = 0.0  # for 0-dim step tensors


tensor_specs = st.builds(TensorSpec, st.sampled_from(STATE_DTYPES), st.sampled_from(SHAPES))
step_specs = st.one_of(
    st.builds(
        TensorSpec,
        st.sampled_from([torch.float32, torch.float32, torch.float64, torch.int64]),
        st.just(()),
        st.integers(0, 1000).map(float),
    ),
    st.integers(0, 10**6),  # torch < 1.12 saved a Python number
    st.floats(0, 1e6, allow_nan=False),
)
leaves = st.one_of(tensor_specs, st.integers(-5, 5), st.floats(-2, 2, allow_nan=False), st.none())
nested = st.recursive(
    leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(st.sampled_from(["step", "m", "v"]), inner, max_size=3),
    ),
    max_leaves=6,
)
param_states = st.fixed_dictionaries(
    {},
    optional={
        "step": step_specs,
        "exp_avg": tensor_specs,
        "exp_avg_sq": tensor_specs,
        "count": st.integers(0, 100),
        "scale": st.floats(-1, 1, allow_nan=False),
        "nothing": st.none(),
        "inner": st.fixed_dictionaries(
            {}, optional={"step": step_specs, "m": tensor_specs, "k": st.integers(0, 9)}
        ),
        "buffers": nested,
    },
)
maybe_states = st.one_of(st.none(), param_states)  # None: the parameter has no state


def materialize(spec: Any, device: str, gen: torch.Generator) -> Any:
    if isinstance(spec, TensorSpec):
        if spec.shape == () and spec.value:
            t = torch.tensor(spec.value, dtype=spec.dtype)
        elif spec.dtype.is_floating_point:
            t = torch.randn(spec.shape, generator=gen).to(spec.dtype)
        elif spec.dtype == torch.bool:
            t = torch.randint(0, 2, spec.shape, generator=gen).bool()
        else:
            t = torch.randint(-9, 9, spec.shape, generator=gen, dtype=spec.dtype)
        return t.to(device)
    if isinstance(spec, dict):
        return {k: materialize(v, device, gen) for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        return type(spec)(materialize(v, device, gen) for v in spec)
    return spec


# --------------------------------------------------------------------------- comparison


def snap(obj: Any) -> Any:
    """A pure-Python picture of ``obj``, deep, to tell whether a call mutated it."""
    if isinstance(obj, torch.Tensor):
        values = None if obj.is_meta else obj.detach().float().tolist()
        return ("T", id(obj), obj.dtype, str(obj.device), tuple(obj.shape), obj._version, values)
    if isinstance(obj, Mapping):
        return (type(obj), id(obj), [(snap(k), snap(v)) for k, v in obj.items()])
    if isinstance(obj, (list, tuple)):
        return (type(obj), id(obj), [snap(v) for v in obj])
    return (type(obj), obj)


def key_of(k: Any) -> Any:
    return ("tensor", id(k)) if isinstance(k, torch.Tensor) else ("key", type(k), k)


def assert_same(got: Any, ref: Any, saved: Any, path: str = "") -> None:
    """``got`` (ours) equals ``ref`` (torch's), both cast from ``saved``."""
    assert type(got) is type(ref), path
    if isinstance(ref, torch.Tensor):
        assert (got.dtype, got.device, got.shape) == (ref.dtype, ref.device, ref.shape), path
        if not ref.is_meta:
            assert torch.equal(got, ref), path
        # both return the saved tensor itself when it needs no cast, or both copy
        assert (got is saved) == (ref is saved), path
    elif isinstance(ref, dict):
        assert list(got) == list(ref), path
        for k in ref:
            assert_same(got[k], ref[k], saved[k], f"{path}[{k!r}]")
    elif isinstance(ref, (list, tuple)):
        assert len(got) == len(ref), path
        for i, (g, r, s) in enumerate(zip(got, ref, saved, strict=True)):
            assert_same(g, r, s, f"{path}[{i}]")
    else:
        assert got == ref, path


def assert_groups_same(got: list[dict[str, Any]], ref: list[dict[str, Any]]) -> None:
    assert len(got) == len(ref)
    for g, r in zip(got, ref, strict=True):
        assert list(g) == list(r)
        for k in r:
            if k == "params":
                assert [id(p) for p in g[k]] == [id(p) for p in r[k]]
            else:
                assert type(g[k]) is type(r[k]) and g[k] == r[k], k


def torch_ids(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> dict[int, Any]:
    """Param index -> the ID torch's own ``state_dict`` gives that parameter."""
    saved = opt.state
    opt.state = defaultdict(dict, {p: {"index": j} for j, p in enumerate(params)})
    try:
        sd = opt.state_dict()
    finally:
        opt.state = saved
    return {v["index"]: k for k, v in sd["state"].items()}


def outcome(fn: Any) -> tuple[Any, BaseException | None]:
    try:
        return fn(), None
    except Exception as exc:
        return None, exc


flag_pairs = st.tuples(
    st.sampled_from([ABSENT, None, False, True]), st.sampled_from([ABSENT, False, True])
)


# --------------------------------------------------------------------------- pack


@PROPERTY
@given(data=st.data())
def test_pack_matches_torch_state_dict(data: st.DataObject) -> None:
    layout = data.draw(layouts())
    n = layout.n_params
    dtypes = data.draw(st.lists(st.sampled_from(PARAM_DTYPES), min_size=n, max_size=n))
    params = [make_param(dt, (2,)) for dt in dtypes]
    names = [f"layer{j}.weight" for j in range(n)] if data.draw(st.booleans()) else None
    lrs = data.draw(st.lists(st.floats(0, 1), min_size=len(layout.groups), max_size=4))
    flags = data.draw(st.lists(flag_pairs, min_size=4, max_size=4))
    opt = build(layout, params, names, lrs, flags)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    specs = data.draw(st.lists(maybe_states, min_size=n, max_size=n))
    for p, spec in zip(params, specs, strict=True):
        if spec is not None:
            opt.state[p] = materialize(spec, "cpu", gen)
    if data.draw(st.booleans()):
        opt.state["global"] = {"calls": 3}  # a key that is not a tensor is kept as it is

    before = [snap(opt.param_groups), snap(opt.state)]
    ours = pack(opt.param_groups, opt.state)
    assert [snap(opt.param_groups), snap(opt.state)] == before
    ref = opt.state_dict()

    assert list(ours) == list(ref) == ["state", "param_groups"]
    assert [key_of(k) for k in ours["state"]] == [key_of(k) for k in ref["state"]]
    for k, v in ref["state"].items():
        assert ours["state"][k] is v
    assert len(ours["param_groups"]) == len(ref["param_groups"])
    for g, r in zip(ours["param_groups"], ref["param_groups"], strict=True):
        assert list(g) == list(r)
        assert g["params"] == r["params"]
        for k in r:
            if k != "params":
                assert g[k] is r[k], k  # shallow copy, as torch

    # the helpers read the same IDs torch gave each parameter
    ids = torch_ids(opt, params)
    in_order = [ids[j] for slots in layout.slots() for j in slots]
    assert param_ids(ref) == list(dict.fromkeys(in_order))
    assert sorted(param_ids(ref)) == sorted(ids.values())
    assert group_of(ref) == {ids[j]: g for j, g in layout.first_group().items()}
    assert names_of(ref) == ({} if names is None else {ids[j]: names[j] for j in range(n)})
    assert is_optimizer_state_dict(ref)


def test_pack_state_of_a_parameter_in_no_group() -> None:
    a, stray = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    opt = Plain([a])
    opt.state[stray]["m"] = torch.ones(3)
    with pytest.raises(KeyError):
        opt.state_dict()
    with pytest.raises(IncompatibleStateError, match=r"shape \[3\]"):
        pack(opt.param_groups, opt.state)


# --------------------------------------------------------------------------- unpack


@PROPERTY
@given(data=st.data())
def test_unpack_matches_torch_load_state_dict(data: st.DataObject) -> None:
    layout = data.draw(layouts())
    n, n_groups = layout.n_params, len(layout.groups)
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))

    # the saved side: a real torch state dict, then edited
    src_dtypes = data.draw(st.lists(st.sampled_from(PARAM_DTYPES), min_size=n, max_size=n))
    src_params = [make_param(dt, (2,)) for dt in src_dtypes]
    src_names = [f"src{j}" for j in range(n)] if data.draw(st.booleans()) else None
    src_lrs = data.draw(st.lists(st.floats(0, 1), min_size=n_groups, max_size=n_groups))
    flags = data.draw(st.lists(flag_pairs, min_size=n_groups, max_size=n_groups))
    src = build(layout, src_params, src_names, src_lrs, flags)
    state_device = data.draw(st.sampled_from(["cpu", "cpu", "cpu", *OTHER_DEVICES]))
    specs = data.draw(st.lists(maybe_states, min_size=n, max_size=n))
    for p, spec in zip(src_params, specs, strict=True):
        if spec is not None:
            src.state[p] = materialize(spec, state_device, gen)
    sd = src.state_dict()
    sd = {"state": dict(sd["state"]), "param_groups": sd["param_groups"]}

    listed = {i for g in sd["param_groups"] for i in g["params"]}
    total = sum(len(g["params"]) for g in sd["param_groups"])
    holes = sorted(set(range(total)) - listed)  # IDs left free by repeated parameters
    unmapped = [total + 7, "global", *holes[:1]]
    for key in data.draw(st.lists(st.sampled_from(unmapped), unique=True, max_size=3)):
        sd["state"][key] = materialize(data.draw(param_states), state_device, gen)
    for group in sd["param_groups"]:
        if "param_names" in group:
            edit = data.draw(st.sampled_from(["keep", "drop", "rename"]))
            if edit == "drop":
                del group["param_names"]
            elif edit == "rename":
                group["param_names"] = [f"renamed.{name}" for name in group["param_names"]]

    # the live side: two equivalent optimizers over the same fresh parameters
    live_dtypes = data.draw(st.lists(st.sampled_from(PARAM_DTYPES), min_size=n, max_size=n))
    devices = ["cpu", *OTHER_DEVICES] if state_device == "cpu" else [*OTHER_DEVICES, "cpu"]
    live_devices = data.draw(st.lists(st.sampled_from(devices), min_size=n, max_size=n))
    live_params = [
        make_param(dt, (2,), dev) for dt, dev in zip(live_dtypes, live_devices, strict=True)
    ]
    live_names = [f"live{j}" for j in range(n)] if data.draw(st.booleans()) else None
    live_lrs = [lr + 1.0 for lr in src_lrs]  # saved hyperparameters must win
    torch_opt = build(layout, live_params, live_names, live_lrs)
    our_live = build(layout, live_params, live_names, live_lrs).param_groups

    before = [snap(sd), snap(our_live)]
    ours, our_error = outcome(lambda: unpack(sd, our_live))
    assert [snap(sd), snap(our_live)] == before
    _, torch_error = outcome(lambda: torch_opt.load_state_dict(sd))
    event(f"torch: {type(torch_error).__name__}")
    if torch_error is not None:  # e.g. copying a meta tensor onto a CPU parameter
        assert type(our_error) is type(torch_error)
        return
    assert our_error is None, our_error
    state, groups = ours

    assert isinstance(state, defaultdict)
    assert [key_of(k) for k in state] == [key_of(k) for k in torch_opt.state]
    # same layout on both sides, so saved IDs and live parameters correspond one to one
    saved_id = {id(p): i for i, p in map_ids(sd["param_groups"], our_live).items()}
    for key, ref in torch_opt.state.items():
        saved_key = key
        if isinstance(key, torch.Tensor):
            saved_key = saved_id[id(key)]
        else:
            assert state[key] is sd["state"][key]  # unmapped state is kept as it is
        assert_same(state[key], ref, sd["state"][saved_key], repr(saved_key))

    assert_groups_same(groups, torch_opt.param_groups)
    for index, (group, saved) in enumerate(zip(groups, sd["param_groups"], strict=True)):
        assert group["lr"] == saved["lr"]
        assert group["params"] is our_live[index]["params"]
        if "param_names" in saved:
            assert group["param_names"] == saved["param_names"]
        elif live_names is not None:
            assert group["param_names"] == our_live[index]["param_names"]
        else:
            assert "param_names" not in group


@PROPERTY
@given(
    param_dtype=st.sampled_from(PARAM_DTYPES),
    param_device=st.sampled_from(["cpu", *OTHER_DEVICES]),
    value_dtype=st.sampled_from([*STATE_DTYPES, torch.int32]),
    value_device=st.sampled_from(["cpu", "cpu", *OTHER_DEVICES]),
    key=st.sampled_from(["step", "exp_avg", None, 0]),
    flags=flag_pairs,
)
def test_cast_value_matches_torch_policy(
    param_dtype: torch.dtype,
    param_device: str,
    value_dtype: torch.dtype,
    value_device: str,
    key: Any,
    flags: tuple[Any, Any],
) -> None:
    param = make_param(param_dtype, (2,), param_device)
    value = materialize(TensorSpec(value_dtype, (2,)), value_device, torch.Generator())
    group: dict[str, Any] = {"params": [0]}
    if flags[0] != ABSENT:
        group["fused"] = flags[0]
    if flags[1] != ABSENT:
        group["capturable"] = flags[1]
    policy = torch.optim.Optimizer._process_value_according_to_param_policy
    ref, ref_error = outcome(lambda: policy(param, value, 0, [group], key))
    placed = any(flag not in (ABSENT, None, False) for flag in flags)
    got, error = outcome(lambda: cast_value(param, value, key=key, fused_or_capturable=placed))
    assert type(error) is type(ref_error)
    if ref_error is None:
        assert_same(got, ref, value)
    via_state, state_error = outcome(
        lambda: cast_state(param, {key: value}, param_id=0, saved_groups=[group])
    )
    assert type(state_error) is type(ref_error)
    if ref_error is None:
        assert_same(via_state, {key: ref}, {key: value})


def test_cast_tree_gives_each_tensor_its_path_and_rebuilds_containers() -> None:
    """The one recursion every cast goes through (cast_state, move, remap): dicts with their
    keys, lists and tuples with indices (torch casts their items with no key), strings kept."""
    from optckpt.statedict import key_of as policy_key

    Pair = namedtuple("Pair", "x y")
    t = torch.zeros(1)
    tree = {"step": t, "hist": [t, (t,)], "pair": Pair(t, "s"), "name": "abc", "n": 1}
    seen: list[tuple[Any, ...]] = []

    def cast(tensor: torch.Tensor, path: tuple[Any, ...]) -> torch.Tensor:
        seen.append(path)
        return tensor + 1

    out = cast_tree(tree, cast)
    assert seen == [("step",), ("hist", 0), ("hist", 1, 0), ("pair", 0)]
    assert [policy_key(p) for p in seen] == ["step", 0, 0, 0]  # only a dict key is ever "step"
    assert isinstance(out["hist"][1], tuple) and isinstance(out["pair"], Pair)
    assert out["pair"].y == "s" and out["name"] == "abc" and out["n"] == 1
    assert float(out["hist"][1][0]) == 1.0 and float(t) == 0.0  # not mutated
    assert cast_tree(t, lambda x, path: path) == ()
    assert policy_key(()) is None


# --------------------------------------------------------------------------- mismatches


@PROPERTY
@given(
    saved=layouts(max_groups=3, max_size=3, cross=False),
    live=layouts(max_groups=3, max_size=3, cross=False),
)
def test_group_mismatch_raises_where_torch_raises(saved: Layout, live: Layout) -> None:
    saved_params = [make_param(torch.float32, ()) for _ in range(saved.n_params)]
    sd = build(saved, saved_params, None, [0.1] * 4).state_dict()
    live_params = [make_param(torch.float32, ()) for _ in range(live.n_params)]
    torch_opt = build(live, live_params, None, [0.1] * 4)
    _, torch_error = outcome(lambda: torch_opt.load_state_dict(sd))
    _, error = outcome(lambda: unpack(sd, build(live, live_params, None, [0.1] * 4).param_groups))
    _, check_error = outcome(lambda: check_groups(sd["param_groups"], torch_opt.param_groups))
    event(f"ours: {type(error).__name__}")
    assert type(check_error) is type(error)
    if torch_error is None:
        assert error is None
        return
    assert type(torch_error) is ValueError
    assert isinstance(error, ValueError)
    saved_sizes = [len(g) for g in saved.groups]
    live_sizes = [len(g) for g in live.groups]
    message = str(error)
    if len(saved_sizes) != len(live_sizes):
        assert isinstance(error, GroupCountMismatchError)
        assert f"{len(saved_sizes)} param groups" in message
        assert f"optimizer has {len(live_sizes)}" in message
    else:
        assert isinstance(error, GroupSizeMismatchError)
        for i, (s, n) in enumerate(zip(saved_sizes, live_sizes, strict=True)):
            text = f"param group {i} has {s} parameters in the checkpoint but {n} in the optimizer"
            assert (text in message) == (s != n)
    assert "optckpt remap" in message and "--dry-run" in message


def named(*names: str) -> list[tuple[str, torch.Tensor]]:
    return [(name, torch.zeros(2, requires_grad=True)) for name in names]


def test_size_mismatch_message_names_the_parameters() -> None:
    src = Plain([{"params": named("a")}, {"params": named("enc.w", "enc.b", "head.w")}])
    live = Plain([{"params": named("a")}, {"params": named("enc.w", "dec.w")}])
    with pytest.raises(ValueError, match="doesn't match the size"):
        Plain([{"params": named("a")}, {"params": named("enc.w", "dec.w")}]).load_state_dict(
            src.state_dict()
        )
    with pytest.raises(GroupSizeMismatchError) as info:
        unpack(src.state_dict(), live.param_groups)
    message = str(info.value)
    assert "param group 1 has 3 parameters in the checkpoint but 2 in the optimizer" in message
    assert "param group 0" not in message
    assert "only in the optimizer: dec.w" in message
    assert "only in the checkpoint: enc.b, head.w" in message
    assert "optckpt remap" in message and "--dry-run" in message


def test_size_mismatch_message_with_names_on_one_side() -> None:
    src = Plain(named("enc.w", "enc.b"))
    live = Plain([torch.zeros(2, requires_grad=True)])
    with pytest.raises(GroupSizeMismatchError) as info:
        unpack(src.state_dict(), live.param_groups)
    message = str(info.value)
    assert "param group 0 has 2 parameters in the checkpoint but 1 in the optimizer" in message
    assert "checkpoint has enc.w, enc.b" in message


def test_count_mismatch_message() -> None:
    src = Plain([{"params": named("a")}, {"params": named("b")}])
    live = Plain(named("a"))
    with pytest.raises(ValueError, match="different number of parameter groups"):
        Plain(named("a")).load_state_dict(src.state_dict())
    with pytest.raises(GroupCountMismatchError) as info:
        unpack(src.state_dict(), live.param_groups)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "checkpoint has 2 param groups but the optimizer has 1" in message
    assert "optckpt remap" in message and "--dry-run" in message


# --------------------------------------------------------------------------- targeted rules


def load_both(
    sd: dict[str, Any], params: list[Any], **group: Any
) -> tuple[defaultdict[Any, Any], defaultdict[Any, Any]]:
    """(ours, torch's) state after loading ``sd`` into one group of ``params``."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=DUPLICATE_WARNING)
        torch_opt, ours_opt = Plain([{"params": params}]), Plain([{"params": params}])
    for opt in (torch_opt, ours_opt):
        opt.param_groups[0].update(group)
    torch_opt.load_state_dict(sd)
    state, _ = unpack(sd, ours_opt.param_groups)
    return state, torch_opt.state


def test_repeated_parameter_takes_its_last_position_and_leaves_holes() -> None:
    a, b, c = (torch.zeros(2, requires_grad=True) for _ in range(3))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=DUPLICATE_WARNING)
        opt = Plain([{"params": [a, b, a]}, {"params": [c]}])
    opt.param_groups[1]["params"].append(a)  # a later group reuses the earlier group's ID
    opt.state[a]["m"] = torch.ones(2)
    ref = opt.state_dict()
    assert [g["params"] for g in ref["param_groups"]] == [[2, 1, 2], [3, 2]]
    assert list(ref["state"]) == [2]
    ours = pack(opt.param_groups, opt.state)
    assert [g["params"] for g in ours["param_groups"]] == [[2, 1, 2], [3, 2]]
    assert list(ours["state"]) == [2]
    assert param_ids(ref) == [2, 1, 3]  # ID 0 is a hole
    assert group_of(ref) == {2: 0, 1: 0, 3: 1}


def test_repeated_id_maps_to_the_later_parameter() -> None:
    x, y, z = (torch.zeros(2, requires_grad=True) for _ in range(3))
    saved = {
        "state": {2: {"m": torch.ones(2)}, 0: {"m": torch.ones(1)}},
        "param_groups": [{"lr": 0.5, "weight_decay": 0.0, "params": [2, 1, 2]}],
    }
    assert map_ids(saved["param_groups"], [{"params": [x, y, z]}]) == {2: z, 1: y}
    state, ref = load_both(saved, [x, y, z])
    assert [key_of(k) for k in state] == [key_of(k) for k in ref] == [key_of(z), key_of(0)]
    assert state[0] is saved["state"][0] and ref[0] is saved["state"][0]


@pytest.mark.parametrize(
    ("fused", "capturable", "placed"),
    [
        (ABSENT, ABSENT, False),
        (None, False, False),
        (False, False, False),
        (True, ABSENT, True),
        (ABSENT, True, True),
        (None, True, True),
    ],
)
@pytest.mark.parametrize("step_dtype", [torch.float32, torch.float64])
def test_step_is_cast_only_when_fused_or_capturable(
    fused: Any, capturable: Any, placed: bool, step_dtype: torch.dtype
) -> None:
    param = make_param(torch.float64, (2,), "meta")
    step, exp_avg = torch.tensor(3.0, dtype=step_dtype), torch.ones(2)
    group = {k: v for k, v in (("fused", fused), ("capturable", capturable)) if v != ABSENT}
    saved = {
        "state": {0: {"step": step, "exp_avg": exp_avg}},
        "param_groups": [{"lr": 0.1, "weight_decay": 0.0, "params": [0], **group}],
    }
    state, ref = load_both(saved, [param])
    assert_same(state[param], ref[param], saved["state"][0])
    got = state[param]["step"]
    if placed:
        assert (got.dtype, got.device.type) == (torch.float32, "meta")
    else:
        assert got is step
    assert (state[param]["exp_avg"].dtype, state[param]["exp_avg"].device.type) == (
        torch.float64,
        "meta",
    )


def test_float64_param_casts_state_but_not_step() -> None:
    param = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    step, exp_avg = torch.tensor(5.0), torch.ones(2, dtype=torch.float32)
    saved = {
        "state": {0: {"step": step, "exp_avg": exp_avg, "inner": {"step": step}}},
        "param_groups": [{"lr": 0.1, "weight_decay": 0.0, "params": [0]}],
    }
    state, ref = load_both(saved, [param])
    assert_same(state[param], ref[param], saved["state"][0])
    assert state[param]["exp_avg"].dtype == torch.float64
    assert state[param]["step"] is step and step.dtype == torch.float32
    assert state[param]["inner"]["step"] is step  # a nested `step` key is a step too


@pytest.mark.parametrize("device", ["cpu", *OTHER_DEVICES])
def test_integer_param_changes_only_the_device(device: str) -> None:
    param = make_param(torch.int64, (2,), device)
    f32, bf16 = torch.ones(2), torch.ones(2, dtype=torch.bfloat16)
    saved = {
        "state": {0: {"a": f32, "b": [bf16]}},
        "param_groups": [{"lr": 0.1, "weight_decay": 0.0, "params": [0]}],
    }
    state, ref = load_both(saved, [param])
    assert_same(state[param], ref[param], saved["state"][0])
    a, (b,) = state[param]["a"], state[param]["b"]
    assert (a.dtype, a.device.type, b.dtype, b.device.type) == (
        torch.float32,
        device,
        torch.bfloat16,
        device,
    )
    assert (a is f32) == (device == "cpu")


@pytest.mark.parametrize("step", [7, 7.0])
@pytest.mark.parametrize("fused", [False, True])
def test_python_number_step_passes_through(step: float, fused: bool) -> None:
    param = make_param(torch.float32, (2,), "meta")
    saved = {
        "state": {0: {"step": step, "exp_avg": torch.ones(2)}},
        "param_groups": [{"lr": 0.1, "weight_decay": 0.0, "params": [0], "fused": fused}],
    }
    state, ref = load_both(saved, [param])
    assert_same(state[param], ref[param], saved["state"][0])
    assert type(state[param]["step"]) is type(step) and state[param]["step"] == step


def test_is_optimizer_state_dict() -> None:
    assert is_optimizer_state_dict(Plain(named("a")).state_dict())
    assert is_optimizer_state_dict({"state": {}, "param_groups": [{"params": []}]})
    assert not is_optimizer_state_dict([])
    assert not is_optimizer_state_dict({"state": {}})
    assert not is_optimizer_state_dict({"state": [], "param_groups": []})
    assert not is_optimizer_state_dict({"state": {}, "param_groups": [{"lr": 0.1}]})
    assert not is_optimizer_state_dict({"state": {}, "param_groups": [{"params": 3}]})
    assert not is_optimizer_state_dict({"state": {}, "param_groups": {"params": []}})


def test_names_of_skips_groups_without_usable_names() -> None:
    sd = {
        "state": {},
        "param_groups": [
            {"params": [0, 1], "param_names": ["a", "b"]},
            {"params": [2]},  # no names
            {"params": [3, 4], "param_names": ["only-one"]},  # wrong length: ignored
            {"params": [1, 5], "param_names": ["b-again", "c"]},  # the first name of 1 wins
        ],
    }
    assert names_of(sd) == {0: "a", 1: "b", 5: "c"}
    assert param_ids(sd) == [0, 1, 2, 3, 4, 5]
    assert group_of(sd) == {0: 0, 1: 0, 2: 1, 3: 2, 4: 2, 5: 3}
