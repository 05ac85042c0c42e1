"""optckpt.names and optckpt.alignment: sources of names, the alignment, prefixes, keyings.

Expected names come from the torch modules and optimizers themselves (``named_parameters()``,
``param_groups``) or, for the alignment, from counting every possible assignment by brute
force; never from an earlier optckpt result. Real producers (FSDP, DDP, torch.compile,
``get_optimizer_state_dict``) are in ``tests/real/test_names_real.py``.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from checks import TiedNet, saved_model_state
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import optckpt
from optckpt.alignment import Ambiguous, NoFit, Unsure, align
from optckpt.errors import IncompatibleStateError, UsageError
from optckpt.layout import layout_from_model_state
from optckpt.names import (
    AmbiguousNamesError,
    NameSources,
    Naming,
    canonical,
    is_name_keyed,
    match_names,
    name_parameters,
    rekey,
    to_id_keyed,
    to_name_keyed,
)
from optckpt.pairing import pair_parameters

PROPERTY = settings(max_examples=150, deadline=None)


def _sequential() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 3))


def _stepped(groups: Any, cls: type = torch.optim.Adam) -> torch.optim.Optimizer:
    optimizer = cls(groups, lr=0.01)
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    optimizer.step()
    return optimizer


# --------------------------------------------------------------------------- sources


def test_names_from_param_names() -> None:
    model = _sequential()
    naming = name_parameters(_stepped(model.named_parameters()).state_dict())
    assert naming.source == "param_names" and naming.describe() == "param_names"
    assert list(naming.names.values()) == [n for n, _ in model.named_parameters()]


def test_names_from_the_keys_of_a_name_keyed_state_dict() -> None:
    sd = {"state": {"b.w": {}}, "param_groups": [{"params": ["a.w", "b.w"], "lr": 1}]}
    assert is_name_keyed(sd)
    naming = name_parameters(sd, model_state={"x": torch.zeros(1)})  # keys come first
    assert (naming.names, naming.source) == ({"a.w": "a.w", "b.w": "b.w"}, "keys")
    assert not is_name_keyed({"state": {}, "param_groups": [{"params": [0, 1]}]})
    assert not is_name_keyed({"state": {}, "param_groups": [{"params": []}]})


def test_names_from_model_state_with_buffers_tied_weights_and_frozen_params(tmp_path: Path) -> None:
    model = TiedNet()
    model.norm.requires_grad_(False)  # frozen params the optimizer leaves out
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    sd = _stepped([p for _, p in trainable]).state_dict()
    model_state = saved_model_state(model, tmp_path / "m.pt")
    naming = name_parameters(sd, model_state=model_state, where="m.pt")
    assert naming.source == "recovered"
    assert naming.describe() == "the model weights in m.pt, aligned by shape and order"
    assert list(naming.names.values()) == [n for n, _ in trainable]


def test_tied_weights_count_once(tmp_path: Path) -> None:
    # Three equal shapes in the state dict, two parameters: only dedup makes it unique.
    model = nn.Sequential(
        nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
    )
    model[1].weight = model[0].weight
    sd = _stepped(list(model.parameters())).state_dict()
    names = name_parameters(sd, model_state=saved_model_state(model, tmp_path / "m.pt")).names
    assert list(names.values()) == ["0.weight", "2.weight"]


def test_ambiguous_alignment_is_refused_naming_the_parameters(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    model[0].requires_grad_(False)  # which two of the three layers were trained?
    sd = _stepped([p for p in model.parameters() if p.requires_grad]).state_dict()
    with pytest.raises(
        AmbiguousNamesError,
        match=r"more than one way: ID 0 could be 0\.weight or 1\.weight.*--from",
    ) as info:
        name_parameters(sd, model_state=saved_model_state(model, tmp_path / "m.pt"))
    assert isinstance(info.value, UsageError)  # exit 2


def test_a_frozen_and_a_trained_vector_of_one_shape_are_refused() -> None:
    # The example: a[4] frozen, b[4] trained, no param_names.
    model_state = {"a": torch.zeros(4), "b": torch.zeros(4)}
    sd = {"state": {0: {"exp_avg": torch.zeros(4)}}, "param_groups": [{"params": [0]}]}
    with pytest.raises(AmbiguousNamesError, match="ID 0 could be a or b"):
        name_parameters(sd, model_state=model_state)


def test_alignment_that_does_not_exist_is_incompatible() -> None:
    model = _sequential()
    sd = _stepped(list(model.parameters())).state_dict()
    other = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3))
    with pytest.raises(
        IncompatibleStateError,
        match=r"6 parameter IDs \(group sizes \[6\]\) do not fit the 4 parameters .*"
        r"more IDs \(6\) than parameters \(4\)",
    ):
        name_parameters(sd, model_state=other.state_dict())
    wrong_shape = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 2))
    with pytest.raises(IncompatibleStateError, match=r"with the shape of ID 4's state \[3, 6\]"):
        name_parameters(sd, model_state=wrong_shape.state_dict())


class _Gan(nn.Module):
    """Two parts of one module, one optimizer each (as a Lightning GAN has them)."""

    def __init__(self) -> None:
        super().__init__()
        self.generator = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
        self.discriminator = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 1))


def _sources(model: nn.Module, *optimizers: torch.optim.Optimizer, path: Path) -> list[Any]:
    """Each optimizer's state dict and what a file holding all of them offers to name it."""
    model_state = saved_model_state(model, path)
    sds = [o.state_dict() for o in optimizers]
    return [(sd, NameSources(model_state, tuple(o for o in sds if o is not sd))) for sd in sds]


def test_each_of_several_optimizers_is_named_together_with_the_others(tmp_path: Path) -> None:
    model = _Gan()
    opt_g = _stepped(list(model.generator.parameters()))
    opt_d = _stepped(list(model.discriminator.parameters()), torch.optim.SGD)
    (sd_g, with_d), (sd_d, with_g) = _sources(model, opt_g, opt_d, path=tmp_path / "gan.pt")
    # Alone, the discriminator's first IDs fit the generator's layers as well.
    with pytest.raises(AmbiguousNamesError, match=r"ID 0 could be generator\.0\.weight"):
        name_parameters(sd_d, model_state=with_g.model_state)
    for sd, sources, part in ((sd_g, with_d, "generator"), (sd_d, with_g, "discriminator")):
        naming = name_parameters(sd, sources=sources, where="gan.pt")
        assert naming.source == "recovered"
        truth = [f"{part}.{n}" for n, _ in getattr(model, part).named_parameters()]
        assert list(naming.names.values()) == truth
    assert naming.describe().endswith("together with the file's 1 other optimizer(s)")


@pytest.mark.parametrize("relative", [False, True])
def test_a_sibling_with_param_names(tmp_path: Path, relative: bool) -> None:
    # Named by the model's FQNs, it takes its parameters out; named relative to its part
    # (self.generator.named_parameters()), it joins the alignment as an unnamed one does.
    model = _Gan()
    generator = model.generator if relative else model
    named = [(n, p) for n, p in generator.named_parameters() if relative or "generator" in n]
    opt_g = _stepped(named)
    opt_d = _stepped(list(model.discriminator.parameters()))
    _, (sd_d, with_g) = _sources(model, opt_g, opt_d, path=tmp_path / "gan.pt")
    assert opt_g.state_dict()["param_groups"][0]["param_names"][0] == (
        "0.weight" if relative else "generator.0.weight"
    )
    names = name_parameters(sd_d, sources=with_g).names
    assert list(names.values()) == [
        f"discriminator.{n}" for n, _ in model.discriminator.named_parameters()
    ]


def test_several_optimizers_that_could_swap_are_refused(tmp_path: Path) -> None:
    # Two optimizers over two layers of one shape: either could hold either layer.
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    first = _stepped(list(model[0].parameters()))
    second = _stepped(list(model[1].parameters()), torch.optim.SGD)
    (sd, sources), _ = _sources(model, first, second, path=tmp_path / "m.pt")
    with pytest.raises(
        AmbiguousNamesError,
        match=r"more than one way: ID 0 could be 0\.weight or 1\.weight.*; aligned together with "
        r"the file's 1 other optimizer\(s\), each parameter in one optimizer, they do not fit",
    ):
        name_parameters(sd, sources=sources)


def test_no_source_of_names_is_unnamed() -> None:
    sd = _stepped(list(_sequential().parameters())).state_dict()
    assert name_parameters(sd) == Naming()
    assert Naming().describe() == "nothing (unnamed)"


def test_names_from_a_from_layout_and_its_checks() -> None:
    model = _sequential()
    sd = _stepped(list(model.parameters())).state_dict()
    naming = name_parameters(sd, layout=optckpt.layout_of(model))
    assert naming.source == "layout" and naming.describe() == "the --from layout"
    assert list(naming.names.values()) == [n for n, _ in model.named_parameters()]
    two_groups = layout_from_model_state(model.state_dict(), ["bias$:weight_decay=0"])
    with pytest.raises(UsageError, match=r"groups of \[3, 3\] parameters, the checkpoint \[6\]"):
        name_parameters(sd, layout=two_groups)
    swapped = optckpt.layout_of(model)
    order = swapped.groups[0]["params"]
    order[0], order[1] = order[1], order[0]  # 0.bias where the checkpoint has 0.weight
    with pytest.raises(UsageError, match=r"0\.bias is \[6\] there, the state of ID 0 \[6, 4\]"):
        name_parameters(sd, layout=swapped)


def test_weight_decay_groups_in_any_order_are_recovered() -> None:
    model = _sequential()
    named = list(model.named_parameters())
    decay = [(n, p) for n, p in named if p.dim() >= 2]
    no_decay = [(n, p) for n, p in named if p.dim() < 2]
    for groups in ([decay, no_decay], [no_decay, decay]):
        sd = _stepped([{"params": [p for _, p in g]} for g in groups]).state_dict()
        names = name_parameters(sd, model_state=model.state_dict()).names
        assert list(names.values()) == [n for g in groups for n, _ in g]


# --------------------------------------------------------------------------- the alignment


def _count(
    groups: list[list[int]], shapes: dict[int, Any], model: list[Any]
) -> list[dict[int, int]]:
    """Up to two assignments, by trying every choice of positions for every group."""
    found: list[dict[int, int]] = []

    def place(index: int, used: frozenset[int], chosen: dict[int, int]) -> None:
        if len(found) == 2:
            return
        if index == len(groups):
            found.append(dict(chosen))
            return
        ids = groups[index]
        free = [p for p in range(len(model)) if p not in used]
        for combo in itertools.combinations(free, len(ids)):
            if all(shapes[i] is None or shapes[i] == model[p] for i, p in zip(ids, combo)):
                place(index + 1, used | set(combo), {**chosen, **dict(zip(ids, combo))})

    place(0, frozenset(), {})
    return found


# groups (IDs), the state's shape by ID (None: no state), the model's parameter shapes
Problem = tuple[list[list[int]], dict[int, Any], list[Any]]


@st.composite
def _problems(draw: st.DrawFn) -> Problem:
    """A model of random shapes, a random subset held by random groups (each in model order,
    interleaved), some IDs without state, sometimes a state of a shape the model lacks."""
    kinds = draw(st.sampled_from([[(2,)], [(2,), (3,)], [(2,), (3,), (2, 3)]]))
    model = draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=7))
    held = draw(st.lists(st.booleans(), min_size=len(model), max_size=len(model)))
    count = draw(st.integers(1, 3))
    owner = draw(st.lists(st.integers(0, count - 1), min_size=len(model), max_size=len(model)))
    stateful = draw(st.lists(st.booleans(), min_size=len(model), max_size=len(model)))
    groups: list[list[int]] = [[] for _ in range(count)]
    shapes: dict[int, Any] = {}
    for position in range(len(model)):
        if held[position]:
            pid = len(shapes)
            groups[owner[position]].append(pid)
            shapes[pid] = model[position] if stateful[position] else None
    if shapes and draw(st.booleans()) and draw(st.booleans()):
        shapes[draw(st.sampled_from(sorted(shapes)))] = (9,)  # fits nothing
    return groups, shapes, model


@PROPERTY
@given(_problems())
def test_align_is_exact_on_small_problems(problem: Problem) -> None:
    groups, shapes, model = problem
    assignments = _count(groups, shapes, model)
    if not assignments:
        with pytest.raises(NoFit):
            align(groups, shapes, model)
    elif len(assignments) == 1:
        assert align(groups, shapes, model) == assignments[0]
    else:
        with pytest.raises(Ambiguous) as info:
            align(groups, shapes, model)
        for pid, a, b in info.value.choices:  # two real positions for each ID named
            assert a != b and all(shapes[pid] in (None, model[p]) for p in (a, b))


@PROPERTY
@given(_problems())
def test_align_without_search_is_never_wrong(problem: Problem) -> None:
    # With the rounds and the search cut short it may refuse more, but never answer wrongly.
    groups, shapes, model = problem
    assignments = _count(groups, shapes, model)
    try:
        found = align(groups, shapes, model, max_rounds=1, budget=0)
    except Unsure:
        return
    except Ambiguous:
        assert len(assignments) == 2
    except NoFit:
        assert not assignments
    else:
        assert assignments == [found]


def test_unsure_is_a_refusal_that_names_the_open_ids() -> None:
    # unique (b takes the t, so a takes the s), but only the second round shows it
    with pytest.raises(Unsure) as info:
        align([[0], [1]], {0: None, 1: ("t",)}, [("s",), ("t",)], max_rounds=1, budget=0)
    assert info.value.open_ids == [0]
    assert align([[0], [1]], {0: None, 1: ("t",)}, [("s",), ("t",)]) == {0: 0, 1: 1}
    model_state = {"s": torch.zeros(2), "t": torch.zeros(3)}
    sd = {
        "state": {1: {"exp_avg": torch.zeros(3)}},
        "param_groups": [{"params": [0]}, {"params": [1]}],
    }
    assert name_parameters(sd, model_state=model_state).names == {0: "s", 1: "t"}


# --------------------------------------------------------------------------- wrapper prefixes


def test_canonical_strips_what_torchs_get_fqns_strips() -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.checkpoint.state_dict import _get_fqns

    inner = _sequential()
    inner[0] = checkpoint_wrapper(inner[0])
    model = torch.compile(inner, backend="eager")
    names = [n for n, _ in model.named_parameters()]
    assert names[0] == "_orig_mod.0._checkpoint_wrapped_module.weight"
    for name in names:  # torch's private function, checked here on each torch upgrade
        assert {canonical(name)} == _get_fqns(model, name)
    assert canonical("module._orig_mod.encoder.weight") == "encoder.weight"
    assert canonical("layers.0._fsdp_wrapped_module.mlp.weight") == "layers.0.mlp.weight"
    assert canonical("encoder.module.weight") == "encoder.module.weight"  # not a DDP prefix
    assert canonical("module") == "module"


def test_match_names_strips_prefixes_only_where_needed() -> None:
    exact = match_names(["a.w", "b.w"], ["b.w", "a.w"])
    assert exact.found == {"a.w": "a.w", "b.w": "b.w"} and exact.stripped == []
    compiled = match_names(["a.w", "b.w"], ["_orig_mod.a.w", "_orig_mod.b.w", "c.w"])
    assert compiled.found == {"a.w": "_orig_mod.a.w", "b.w": "_orig_mod.b.w"}
    assert compiled.stripped == ["_orig_mod."]
    both = match_names(["module.x", "_orig_mod.y"], ["x", "y"])
    assert both.stripped == ["_orig_mod.", "module."]
    # module.x and x both present: the leftover is not guessed
    unsure = match_names(["x.w"], ["module.x.w", "_orig_mod.x.w"])
    assert unsure.found == {} and unsure.stripped == []


# --------------------------------------------------------------------------- keyings


def test_to_name_keyed_and_back_follow_torchs_numbering() -> None:
    sd = {
        "state": {0: {"s": 1}, 2: {"s": 3}, 7: {"s": "orphan"}},
        "param_groups": [
            {"lr": 1, "params": [0, 1]},
            {"lr": 2, "params": [2, 0]},  # 0 again: it keeps group 0's ID, as torch does
        ],
    }
    names = {0: "_orig_mod.a", 1: "b", 2: "c"}
    keyed = to_name_keyed(sd, names)
    assert keyed == {
        "state": {"a": {"s": 1}, "c": {"s": 3}, 7: {"s": "orphan"}},
        "param_groups": [{"lr": 1, "params": ["a", "b"]}, {"lr": 2, "params": ["c", "a"]}],
    }
    assert to_name_keyed(sd, names, strip=False)["param_groups"][0]["params"][0] == "_orig_mod.a"
    back = to_id_keyed(keyed)
    assert back["param_groups"] == [
        {"lr": 1, "param_names": ["a", "b"], "params": [0, 1]},
        {"lr": 2, "param_names": ["c", "a"], "params": [2, 0]},
    ]
    assert back["state"] == {0: {"s": 1}, 2: {"s": 3}, 7: {"s": "orphan"}}
    with pytest.raises(UsageError, match=r"'_orig_mod\.a' and 'a' have the same FQN 'a'"):
        to_name_keyed(sd, {0: "_orig_mod.a", 1: "a", 2: "c"})
    with pytest.raises(UsageError, match=r"no name for parameter ID\(s\) 2"):
        to_name_keyed(sd, {0: "a", 1: "b"})


def test_rekey_leaves_what_is_already_keyed_so() -> None:
    ids = _stepped(_sequential().named_parameters()).state_dict()
    assert rekey(ids, "ids") is ids
    names = rekey(ids, "names")
    assert is_name_keyed(names) and rekey(names, "names") is names
    assert rekey(names, "ids")["param_groups"] == ids["param_groups"]
    with pytest.raises(UsageError, match="--keying 'fqn': expected ids or names"):
        rekey(ids, "fqn")


# --------------------------------------------------------------------------- pairing (diff)


def test_pairing_by_name_position_and_id() -> None:
    model = _sequential()
    named = _stepped(model.named_parameters()).state_dict()
    unnamed = _stepped(list(model.parameters())).state_dict()
    assert pair_parameters(named, named).by == "name"
    assert pair_parameters(unnamed, unnamed).by == "id"  # no recovery: torch's own pairing
    by_weights = pair_parameters(named, unnamed, model_states=(None, model.state_dict()))
    assert by_weights.by == "name"
    assert by_weights.labels[0] == by_weights.labels[1]
    by_position = pair_parameters(named, unnamed)  # B has no weights: the n-th is the n-th
    assert by_position.by == "position"
    assert list(by_position.labels[1].values()) == [n for n, _ in model.named_parameters()]
    keyed = rekey(named, "names")
    compiled = {
        **named,
        "param_groups": [
            {**g, "param_names": [f"_orig_mod.{n}" for n in g["param_names"]]}
            for g in named["param_groups"]
        ],
    }
    stripped = pair_parameters(compiled, keyed)
    assert (stripped.by, stripped.stripped) == ("name", ["_orig_mod."])
    assert list(stripped.labels[1].values()) == list(stripped.labels[0].values())
