"""Names against real producers: every checkpoint here is written by torch itself.

``get_optimizer_state_dict`` (one process), FSDP1's full ``optim_state_dict`` and DDP (gloo,
world size 1, each in a process of its own: :mod:`producers`), a ``torch.compile`` model, a
weight-decay split without ``param_names``, and the same-shape case no alignment can decide.
Every remapped or converted file is loaded by torch (``Optimizer.load_state_dict`` or
``set_optimizer_state_dict``) into an optimizer built for the new model, a step runs, and
the carried state is bitwise equal, by name, to the state torch saved.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from checks import assert_bitwise_equal, assert_one_line_error, run
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

import optckpt
from optckpt.names import canonical

from .producers import Net, decay_split, train

PRODUCERS = Path(__file__).with_name("producers.py")
# New parameters have no state yet; torch's loader refuses that unless told not to be strict.
NEW_PARAMS_OK = StateDictOptions(strict=False)


def produce(kind: str, out: Path) -> Path:
    """Run a distributed producer in a process of its own (its process group dies with it)."""
    subprocess.run(
        [sys.executable, str(PRODUCERS), kind, str(out)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="module")
def produced(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("producers")
    return {
        kind: produce(kind, folder / f"{kind}.pt")
        for kind in ("fsdp", "ddp", "ddp-split", "ddp-named")
    }


def state_by_name(state_dict: dict[str, Any], names: dict[Any, str] | None = None) -> dict:
    """The per-parameter state of a saved state dict by FQN (wrapper prefixes stripped)."""
    if names is None:
        names = optckpt.names.name_parameters(state_dict).names
    return {canonical(names[pid]): s for pid, s in state_dict["state"].items()}


def live_state_by_name(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    by_param = {p: canonical(n) for n, p in model.named_parameters()}
    return {by_param[p]: dict(s) for p, s in optimizer.state.items()}


def assert_carried(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Every parameter the checkpoint had state for holds exactly that state in ``optimizer``,
    and the new ones have none."""
    live = live_state_by_name(model, optimizer)
    for name, state in live.items():
        assert name in saved, f"{name} has state it should not have"
        assert_bitwise_equal(state, dict(saved[name]), name)
    assert set(saved) <= {canonical(n) for n, _ in model.named_parameters()}
    assert set(live) == set(saved) & set(live)


def step_runs(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, optimizer, steps=1)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def new_model_and_layout(
    tmp_path: Path, *, split: bool = False
) -> tuple[nn.Module, torch.optim.Optimizer, Path]:
    """The next model (an extra layer), its fresh optimizer, and their layout file."""
    model = Net(extra=True)
    groups = decay_split(model.parameters()) if split else [{"params": list(model.parameters())}]
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    path = tmp_path / "new_layout.json"
    optckpt.save_layout(model, optimizer, path)
    return model, optimizer, path


def remap_json(path: Path, layout: Path, out: Path, *extra: Any) -> dict[str, Any]:
    result = run("remap", path, "--to", layout, "-o", out, "--json", *extra)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def resume_ok(path: Path, *extra: Any) -> dict[str, Any]:
    result = run("resume-step", path, "--check-torch", "--steps", 2, "--json", *extra)
    assert result.exit_code == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and report["params_from"].startswith("model weights")
    return report


# --------------------------------------------------------------------------- name-keyed state


def _trained_split(path: Path, *, named: bool) -> tuple[Net, torch.optim.Optimizer, Path]:
    """A Net trained by AdamW in weight-decay groups (with param_names where ``named``),
    saved to ``path`` with its weights."""
    model = Net()
    params = model.named_parameters() if named else model.parameters()
    optimizer = torch.optim.AdamW(decay_split(params), lr=1e-2)
    train(model, optimizer)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    return model, optimizer, path


def _dsd_checkpoint(tmp_path: Path) -> tuple[Net, torch.optim.Optimizer, Path]:
    model = Net()
    model.encoder[0].weight.requires_grad_(False)  # frozen: no state, not in the groups
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(decay_split(trainable), lr=1e-2)
    train(model, optimizer)
    path = tmp_path / "dsd.pt"
    osd = get_optimizer_state_dict(model, optimizer)  # one process: no process group needed
    torch.save({"model": model.state_dict(), "optimizer": osd}, path)
    return model, optimizer, path


def test_get_optimizer_state_dict_is_named_by_its_keys(tmp_path: Path) -> None:
    model, optimizer, path = _dsd_checkpoint(tmp_path)
    saved = torch.load(path, weights_only=True)["optimizer"]
    fqns = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(saved["state"]) == sorted(fqns)  # torch keyed it by FQN

    result = run("inspect", path, "--json")
    assert result.exit_code == 0, result.stderr
    (opt,) = json.loads(result.stdout)["optimizers"]
    assert opt["names_source"] == "keys"
    assert [p["id"] for p in opt["params"]] == [p["name"] for p in opt["params"]]
    assert sorted(p["name"] for p in opt["params"]) == sorted(fqns)
    text = run("inspect", path)
    assert "names from the state dict's keys" in text.stdout

    # resume-step without --from, stepping torch.optim alongside
    report = resume_ok(path)
    assert "by the state dict's keys" in report["params_from"]

    # diff by name against torch's own ID-keyed state dict of the same optimizer
    ids_file = tmp_path / "ids.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, ids_file)
    same = run("diff", path, ids_file, "--json")
    assert same.exit_code == 0, same.stdout + same.stderr
    assert json.loads(same.stdout)["pairs"][0]["match_by"] == "name"


def test_name_keyed_state_remaps_without_from_and_loads_with_set_optimizer_state_dict(
    tmp_path: Path,
) -> None:
    _, _, path = _dsd_checkpoint(tmp_path)
    saved = torch.load(path, weights_only=True)["optimizer"]
    model, optimizer, layout = new_model_and_layout(tmp_path, split=True)
    out = tmp_path / "out.pt"
    plan = remap_json(path, layout, out)
    assert plan["names_source"] == "keys" and plan["prefixes_stripped"] == []
    remapped = torch.load(out, weights_only=True)["optimizer"]
    # name-keyed in, name-keyed out: the new model's FQNs
    assert all(isinstance(n, str) for g in remapped["param_groups"] for n in g["params"])
    assert [n for g in remapped["param_groups"] for n in g["params"]] == [
        n for g in optckpt.layout_of(model, optimizer).groups for n in g["params"]
    ]
    set_optimizer_state_dict(model, optimizer, remapped, options=NEW_PARAMS_OK)
    assert_carried(model, optimizer, state_by_name(saved))
    step_runs(model, optimizer)


# --------------------------------------------------------------------------- convert --keying


def test_convert_keying_names_to_ids_loads_with_load_state_dict(tmp_path: Path) -> None:
    _, _, path = _dsd_checkpoint(tmp_path)
    saved = torch.load(path, weights_only=True)["optimizer"]
    out = tmp_path / "ids.pt"
    result = run("convert", path, "-o", out, "--keying", "ids")
    assert result.exit_code == 0, result.stderr
    assert "keyed 'optimizer' by ids" in result.stdout
    converted = torch.load(out, weights_only=True)["optimizer"]
    assert all(isinstance(i, int) for g in converted["param_groups"] for i in g["params"])

    model = Net()
    named = dict(model.named_parameters())
    groups = [[named[n] for n in g["param_names"]] for g in converted["param_groups"]]
    optimizer = torch.optim.AdamW([{"params": g} for g in groups], lr=0.5)
    optimizer.load_state_dict(converted)
    assert_carried(model, optimizer, state_by_name(saved))
    # the saved hyperparameters, and the names the groups list
    assert [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups] == [
        (1e-2, 0.1),
        (1e-2, 0.0),
    ]
    assert [g["param_names"] for g in optimizer.param_groups] == [
        g["params"] for g in saved["param_groups"]
    ]
    step_runs(model, optimizer)


def test_convert_keying_ids_to_names_loads_with_set_optimizer_state_dict(tmp_path: Path) -> None:
    model, optimizer, path = _trained_split(tmp_path / "named.pt", named=True)
    out = tmp_path / "fqn.pt"
    result = run("convert", path, "-o", out, "--keying", "names")
    assert result.exit_code == 0, result.stderr
    converted = torch.load(out, weights_only=True)["optimizer"]
    # the same keys and groups as torch's own get_optimizer_state_dict
    theirs = get_optimizer_state_dict(model, optimizer)
    assert sorted(converted["state"]) == sorted(theirs["state"])
    assert [g["params"] for g in converted["param_groups"]] == [
        g["params"] for g in theirs["param_groups"]
    ]
    for name, state in theirs["state"].items():
        assert_bitwise_equal(converted["state"][name], state, name)

    new = Net()
    new_optimizer = torch.optim.AdamW(decay_split(new.named_parameters()), lr=0.5)
    set_optimizer_state_dict(new, new_optimizer, converted)
    assert_carried(new, new_optimizer, state_by_name(optimizer.state_dict()))
    step_runs(new, new_optimizer)

    # and back: names -> ids -> names is the identity
    back = tmp_path / "back.pt"
    assert run("convert", out, "-o", back, "--keying", "ids").exit_code == 0
    again = tmp_path / "again.pt"
    assert run("convert", back, "-o", again, "--keying", "names").exit_code == 0
    assert_bitwise_equal(torch.load(again, weights_only=True), torch.load(out, weights_only=True))


def test_convert_keying_names_recovers_names_from_the_weights(tmp_path: Path) -> None:
    model, optimizer, path = _trained_split(tmp_path / "unnamed.pt", named=False)
    out = tmp_path / "fqn.pt"
    assert run("convert", path, "-o", out, "--keying", "names").exit_code == 0
    converted = torch.load(out, weights_only=True)["optimizer"]
    theirs = get_optimizer_state_dict(model, optimizer)
    assert [g["params"] for g in converted["param_groups"]] == [
        g["params"] for g in theirs["param_groups"]
    ]
    assert_bitwise_equal({n: converted["state"][n] for n in theirs["state"]}, dict(theirs["state"]))
    # a bare ID-keyed state dict without names cannot be keyed by names
    bare = tmp_path / "bare.pt"
    torch.save(optimizer.state_dict(), bare)
    refused = run("convert", bare, "-o", tmp_path / "x.pt", "--keying", "names")
    assert refused.exit_code == 2
    assert_one_line_error(refused.stderr, "no param_names", "--from OLD_LAYOUT")
    assert not (tmp_path / "x.pt").exists()


# --------------------------------------------------------------------------- FSDP1


def test_fsdp1_full_optim_state_dict(produced: dict[str, Path], tmp_path: Path) -> None:
    path = produced["fsdp"]
    checkpoint = torch.load(path, weights_only=True)
    saved = checkpoint["optimizer"]
    fqns = [n for n, _ in Net().named_parameters()]
    assert sorted(saved["state"]) == sorted(fqns)  # FSDP keys the state by FQN
    assert list(checkpoint["model"]) == fqns

    result = run("inspect", path, "--json")
    (opt,) = json.loads(result.stdout)["optimizers"]
    assert opt["names_source"] == "keys"
    assert [p["name"] for p in opt["params"]] == fqns  # in the groups' order
    resume_ok(path)

    model, optimizer, layout = new_model_and_layout(tmp_path)
    out = tmp_path / "out.pt"
    plan = remap_json(path, layout, out)
    assert plan["groups"][0]["new"] == ["extra.weight", "extra.bias"]
    remapped = torch.load(out, weights_only=True)["optimizer"]
    set_optimizer_state_dict(model, optimizer, remapped, options=NEW_PARAMS_OK)
    assert_carried(model, optimizer, state_by_name(saved))
    step_runs(model, optimizer)

    # and into a plain (unwrapped) model's optimizer by ID
    ids = tmp_path / "ids.pt"
    assert run("convert", path, "-o", ids, "--keying", "ids").exit_code == 0
    plain = Net()
    plain_optimizer = torch.optim.AdamW(plain.parameters(), lr=0.5)
    plain_optimizer.load_state_dict(torch.load(ids, weights_only=True)["optimizer"])
    assert_carried(plain, plain_optimizer, state_by_name(saved))
    step_runs(plain, plain_optimizer)


# --------------------------------------------------------------------------- wrapper prefixes


def _compiled_checkpoint(tmp_path: Path, *, named: bool) -> tuple[nn.Module, Any, Path]:
    compiled = torch.compile(Net(), backend="eager")  # no C compiler needed
    params = compiled.named_parameters() if named else compiled.parameters()
    optimizer = torch.optim.AdamW(list(params), lr=1e-2)
    train(compiled, optimizer)
    path = tmp_path / f"compiled{'-named' if named else ''}.pt"
    torch.save({"model": compiled.state_dict(), "optimizer": optimizer.state_dict()}, path)
    return compiled, optimizer, path


@pytest.mark.parametrize("named", [False, True], ids=["unnamed", "param_names"])
def test_torch_compile_prefix_is_stripped(tmp_path: Path, named: bool) -> None:
    compiled, _, path = _compiled_checkpoint(tmp_path, named=named)
    weights = torch.load(path, weights_only=True)["model"]
    assert all(k.startswith("_orig_mod.") for k in weights)
    model, new_optimizer, layout = new_model_and_layout(tmp_path)
    out = tmp_path / "out.pt"
    plan = remap_json(path, layout, out)
    assert plan["names_source"] == ("param_names" if named else "recovered")
    assert plan["prefixes_stripped"] == ["_orig_mod."]
    assert plan["groups"][0]["carried"] == [n for n, _ in Net().named_parameters()]
    remapped = torch.load(out, weights_only=True)["optimizer"]
    assert remapped["param_groups"][0]["param_names"] == [  # the target layout's names
        n for n, _ in model.named_parameters()
    ]
    new_optimizer.load_state_dict(remapped)
    saved = torch.load(path, weights_only=True)["optimizer"]
    names = {i: n for i, (n, _) in enumerate(compiled.named_parameters())}
    assert_carried(model, new_optimizer, state_by_name(saved, names))
    step_runs(model, new_optimizer)

    text = run("remap", path, "--to", layout, "--dry-run")
    assert "wrapper prefixes stripped to match names: _orig_mod." in text.stdout
    resume_ok(path)


def test_diff_strips_the_compile_prefix(tmp_path: Path) -> None:
    compiled, optimizer, path = _compiled_checkpoint(tmp_path, named=True)
    fqn = tmp_path / "fqn.pt"
    # torch's own name-keyed form drops _orig_mod. (its _get_fqns)
    theirs = get_optimizer_state_dict(compiled, optimizer)
    assert all(not k.startswith("_orig_mod.") for k in theirs["state"])
    torch.save({"optimizer": theirs}, fqn)
    result = run("diff", path, fqn, "--json")
    assert result.exit_code == 0, result.stdout
    (pair,) = json.loads(result.stdout)["pairs"]
    assert (pair["match_by"], pair["prefixes_stripped"]) == ("name", ["_orig_mod."])
    # a changed moment is reported under its name
    theirs["state"]["head.bias"]["exp_avg"].add_(1.0)
    torch.save({"optimizer": theirs}, fqn)
    changed = run("diff", path, fqn, "--json")
    assert changed.exit_code == 1
    wheres = [d["where"] for d in json.loads(changed.stdout)["pairs"][0]["differences"]]
    assert wheres == ["_orig_mod.head.bias.exp_avg"]
    text = run("diff", path, fqn)
    assert "wrapper prefixes stripped to match names: _orig_mod." in text.stdout
    # resume-step finds the name-keyed state's parameters in the compiled model's weights
    both = tmp_path / "both.pt"
    torch.save({"model": compiled.state_dict(), "optimizer": theirs}, both)
    report = resume_ok(both)
    assert "keys (name-keyed), wrapper prefixes _orig_mod. stripped" in report["params_from"]


@pytest.mark.parametrize("kind", ["ddp", "ddp-split", "ddp-named"])
def test_ddp_module_prefix_is_stripped(
    produced: dict[str, Path], tmp_path: Path, kind: str
) -> None:
    path = produced[kind]
    checkpoint = torch.load(path, weights_only=True)
    assert all(k.startswith("module.") for k in checkpoint["model"])
    split = kind == "ddp-split"
    model, optimizer, layout = new_model_and_layout(tmp_path, split=split)
    out = tmp_path / "out.pt"
    plan = remap_json(path, layout, out)
    assert plan["prefixes_stripped"] == ["module."]
    assert plan["names_source"] == ("param_names" if kind == "ddp-named" else "recovered")
    optimizer.load_state_dict(torch.load(out, weights_only=True)["optimizer"])
    saved = checkpoint["optimizer"]
    names = optckpt.names.name_parameters(saved, model_state=checkpoint["model"]).names
    assert_carried(model, optimizer, state_by_name(saved, names))
    if split:  # the trained decay of each group is kept
        assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    step_runs(model, optimizer)
    report = resume_ok(path)
    assert "wrapper prefixes" not in report["params_from"]  # the weights carry the prefix too


# --------------------------------------------------------------------------- weight-decay split


def test_weight_decay_split_without_param_names(tmp_path: Path) -> None:
    old, optimizer, path = _trained_split(tmp_path / "split.pt", named=False)
    truth = {
        i: n
        for i, n in enumerate(
            [n for n, p in old.named_parameters() if p.dim() >= 2]
            + [n for n, p in old.named_parameters() if p.dim() < 2]
        )
    }
    (opt,) = json.loads(run("inspect", path, "--json").stdout)["optimizers"]
    assert opt["names_source"] == "recovered"
    assert {p["id"]: p["name"] for p in opt["params"]} == truth
    resume_ok(path)

    model, new_optimizer, layout = new_model_and_layout(tmp_path, split=True)
    out = tmp_path / "out.pt"
    plan = remap_json(path, layout, out)
    assert plan["names_source"] == "recovered"
    new_optimizer.load_state_dict(torch.load(out, weights_only=True)["optimizer"])
    assert_carried(model, new_optimizer, state_by_name(optimizer.state_dict(), truth))
    step_runs(model, new_optimizer)

    # diff against the same state named by param_names: paired by name, identical
    named = tmp_path / "named.pt"
    assert run("convert", path, "-o", named, "--keying", "names").exit_code == 0
    result = run("diff", path, named, "--json")
    assert result.exit_code == 0, result.stdout
    assert json.loads(result.stdout)["pairs"][0]["match_by"] == "name"


# --------------------------------------------------------------------------- refusals


class TwoVectors(nn.Module):
    """A frozen ``a[4]`` and a trained ``b[4]``: one group of one [4] parameter fits both."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(4), requires_grad=False)
        self.b = nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.a * x + self.b * x).sum(dim=-1, keepdim=True)


def test_the_same_shape_case_is_refused_by_every_command(tmp_path: Path) -> None:
    model = TwoVectors()
    optimizer = torch.optim.Adam([model.b], lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(3, 4)).pow(2).mean().backward()
        optimizer.step()
    path = tmp_path / "ambiguous.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    layout = tmp_path / "layout.json"
    optckpt.save_layout(model, optimizer, layout)
    named = tmp_path / "named.pt"
    named_optimizer = torch.optim.Adam(
        [("b", model.b)], lr=1e-2
    )  # the same state, with param_names
    named_optimizer.load_state_dict(optimizer.state_dict())
    torch.save({"optimizer": named_optimizer.state_dict()}, named)
    needles = ("more than one way", "ID 0 could be a or b")

    shown = run("inspect", path, "--json")  # inspect shows IDs, with a warning
    assert shown.exit_code == 0
    (opt,) = json.loads(shown.stdout)["optimizers"]
    assert opt["names_source"] is None and opt["params"][0]["name"] is None
    assert any(all(n in w for n in needles) for w in opt["warnings"])

    for args, flag in (
        (["remap", path, "--to", layout, "--dry-run"], "--from OLD_LAYOUT"),
        (["resume-step", path], "--from OLD_LAYOUT"),
        (["diff", path, named], "--from-a OLD_LAYOUT"),
        (["diff", named, path], "--from-b OLD_LAYOUT"),
        (["convert", path, "-o", tmp_path / "x.pt", "--keying", "names"], "--from OLD_LAYOUT"),
    ):
        refused = run(*args)
        assert refused.exit_code == 2, (args, refused.stdout, refused.stderr)
        assert_one_line_error(refused.stderr, *needles, flag)
    assert not (tmp_path / "x.pt").exists()

    # named by --from, every command works, and resume-step steps b, not a
    assert run("remap", path, "--to", layout, "--from", layout, "--dry-run").exit_code == 0
    assert run("diff", path, named, "--from-a", layout).exit_code == 0
    out = tmp_path / "stepped.pt"
    result = run("resume-step", path, "--from", layout, "--check-torch", "-o", out)
    assert result.exit_code == 0, result.stdout + result.stderr
    stepped = torch.load(out, weights_only=True)["model"]
    assert torch.equal(stepped["a"], model.a) and not torch.equal(stepped["b"], model.b)


# --------------------------------------------------------------------------- scale

_SCALE = """
import sys, torch
from optckpt.names import AmbiguousNamesError, name_parameters
layers = 5000  # 20,000 parameters: weight (4, 4), bias, norm weight, norm bias
model = {}
for i in range(layers):
    model[f"l{i}.weight"] = torch.zeros(4, 4)
    model[f"l{i}.bias"] = torch.zeros(4)
    model[f"n{i}.weight"] = torch.zeros(4)
    model[f"n{i}.bias"] = torch.zeros(4)
names = list(model)
decay = [i for i, n in enumerate(names) if model[n].dim() == 2]
rest = [i for i, n in enumerate(names) if model[n].dim() == 1]
ids = decay + rest
state = {j: {"exp_avg": torch.zeros(model[names[i]].shape)} for j, i in enumerate(ids)}
split = {"state": state, "param_groups": [
    {"params": list(range(len(decay)))}, {"params": list(range(len(decay), len(ids)))}]}
got = name_parameters(split, model_state=model)
assert got.source == "recovered"
assert [got.names[j] for j in range(len(ids))] == [names[i] for i in ids]
# one group with the first layer frozen: many same-shape parameters could swap
frozen = {"state": {j: {"exp_avg": torch.zeros(model[names[i]].shape)} for j, i in
          enumerate(range(4, len(names)))}, "param_groups": [{"params": list(range(len(names) - 4))}]}
try:
    name_parameters(frozen, model_state=model)
except AmbiguousNamesError as e:
    assert "more than one way" in str(e)
else:
    raise AssertionError("not refused")
print("done")
"""


def test_recovering_20000_names_is_not_quadratic(tmp_path: Path) -> None:
    # Under an address-space limit a 20k x 20k table (3.2 GB) cannot be built; no timing
    # assertion, only an upper bound on the wait.
    limit = "import resource; resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
    result = subprocess.run(
        [sys.executable, "-c", limit + _SCALE],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "done"
