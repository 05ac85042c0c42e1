"""CLI paths of remap: exit codes, stdout, the one-line stderr, the writing rules.

Checkpoints are made here by real ``torch.optim`` optimizers; results are loaded into
``torch.optim`` optimizers built for the new model and compared with the old optimizer's
state per parameter name.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from checks import assert_one_line_error, two_optimizers
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

import optckpt
from optckpt.cli.app import app

FIXTURES = Path(__file__).resolve().parent.parent.parent / "fixtures"
runner = CliRunner()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _model(head: int = 4, extra: bool = False) -> nn.Module:
    layers = [nn.Linear(3, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, head)]
    return (
        nn.Sequential(*layers, nn.ReLU(), nn.Linear(head, 2)) if extra else nn.Sequential(*layers)
    )


def _train(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(5, 3)).pow(2).mean().backward()
        optimizer.step()


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, dict[str, Any]]:
    return {n: copy.deepcopy(dict(optimizer.state[p])) for n, p in model.named_parameters()}


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a
    )


@pytest.fixture
def ckpt(tmp_path: Path) -> tuple[Path, dict[str, dict[str, Any]]]:
    """An id-only AdamW training file with the model weights, and the state per name."""
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    _train(model, optimizer)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3}, path)
    return path, _snapshot(model, optimizer)


@pytest.fixture
def new_layout(tmp_path: Path) -> Path:
    model = _model(extra=True)
    optckpt.save_layout(
        model, torch.optim.AdamW(model.parameters(), lr=1e-2), tmp_path / "new.json"
    )
    return tmp_path / "new.json"


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------- success


def test_dry_run_prints_the_plan_and_writes_nothing(
    ckpt: tuple[Path, Any], new_layout: Path, tmp_path: Path
) -> None:
    path, _ = ckpt
    before = _files(tmp_path)
    result = runner.invoke(app, ["remap", str(path), "--to", str(new_layout), "--dry-run"])
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == (
        "source names from the model weights in the checkpoint, aligned by shape and order"
    )
    assert "hyperparameters from" in lines[1]
    assert lines[3].split() == [
        *("0", "│", "6", "│", "0", "│", "2", "│", "0", "│"),
        *("source", "group", "0"),
    ]
    assert "group 0 new (no state): 5.weight, 5.bias" in result.stdout
    assert (  # the checkpoint's trained weight_decay is kept over the fresh optimizer's
        "kept the checkpoint's trained values where the layout differs: 0.weight_decay 0.1 "
        "(layout 0.01); take the layout's with --hyperparams layout or --set N.KEY=VALUE"
    ) in result.stdout
    assert "wrote" not in result.stdout
    assert _files(tmp_path) == before


def test_json_plan(ckpt: tuple[Path, Any], new_layout: Path, tmp_path: Path) -> None:
    path, _ = ckpt
    result = runner.invoke(
        app, ["remap", str(path), "--to", str(new_layout), "--dry-run", "--json"]
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert (data["key"], data["out"], data["names_source"]) == (
        "optimizer",
        None,
        "recovered",
    )
    [group] = data["groups"]
    assert group["carried"] == [n for n, _ in _model().named_parameters()]
    assert group["new"] == ["5.weight", "5.bias"]
    assert group["hyperparams"]["betas"] == [0.9, 0.999]
    assert data["dropped"] == [] and data["warnings"] == []

    out = tmp_path / "out.pt"
    written = runner.invoke(
        app, ["remap", str(path), "--to", str(new_layout), "-o", str(out), "--json"]
    )
    assert written.exit_code == 0, written.stderr
    assert json.loads(written.stdout)["out"] == str(out)
    assert out.exists()


def test_write_then_torch_loads_it(
    ckpt: tuple[Path, Any], new_layout: Path, tmp_path: Path
) -> None:
    path, before = ckpt
    sha = _sha(path)
    out = tmp_path / "out.pt"
    result = runner.invoke(app, ["remap", str(path), "--to", str(new_layout), "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.rstrip().endswith(f"wrote {out}")
    assert _sha(path) == sha
    saved = torch.load(out, weights_only=True)
    assert saved["epoch"] == 3 and "3.weight" in saved["model"]
    model = _model(extra=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    optimizer.load_state_dict(saved["optimizer"])
    for name, p in model.named_parameters():
        if name in before:
            assert _same(optimizer.state[p], before[name]), name
        else:
            assert not optimizer.state.get(p)
    _train(model, optimizer)


def test_group_rules_with_json_values_on_a_model_state_dict(
    ckpt: tuple[Path, Any], tmp_path: Path
) -> None:
    path, before = ckpt
    model = _model()
    torch.save(model.state_dict(), tmp_path / "new_model.pt")
    out = tmp_path / "out.pt"
    rule = r"\.bias$|^1\.:weight_decay=0,betas=[0.8,0.95],foreach=false"
    args = [
        "remap",
        str(path),
        "--to",
        str(tmp_path / "new_model.pt"),
        "--group",
        rule,
        "-o",
        str(out),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    # values written in a --group rule are asked for: they win over the checkpoint's
    assert "group 1 weight_decay: 0.1 -> 0 (--group)" in result.stdout
    assert "group 1 betas: (0.9, 0.999) -> (0.8, 0.95) (--group)" in result.stdout
    assert "group 1 foreach: None -> False (--group)" in result.stdout
    groups = torch.load(out, weights_only=True)["optimizer"]["param_groups"]
    assert groups[0]["param_names"] == ["0.weight", "3.weight"]
    assert groups[1]["param_names"] == ["0.bias", "1.weight", "1.bias", "3.bias"]
    assert (groups[0]["weight_decay"], groups[0]["betas"]) == (0.1, (0.9, 0.999))
    assert groups[1]["weight_decay"] == 0 and groups[1]["foreach"] is False
    assert groups[1]["betas"] == (0.8, 0.95)  # a JSON list, kept as torch keeps betas
    assert groups[1]["lr"] == 1e-2  # not in the rule: from the source group

    named = dict(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [named[n] for n in g["param_names"]]} for g in groups], lr=0.5
    )
    optimizer.load_state_dict(torch.load(out, weights_only=True)["optimizer"])
    for name, p in named.items():
        assert _same(optimizer.state[p], before[name]), name
    _train(model, optimizer)


def test_rename_and_from_layout_on_a_bare_checkpoint(tmp_path: Path) -> None:
    old = nn.ModuleDict({"enc": nn.Linear(3, 4), "head": nn.Linear(4, 2)})
    optimizer = torch.optim.SGD(old.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        optimizer.zero_grad()
        old["head"](old["enc"](torch.randn(2, 3))).sum().backward()
        optimizer.step()
    before = _snapshot(old, optimizer)
    torch.save(optimizer.state_dict(), tmp_path / "bare.pt")
    optckpt.save_layout(old, optimizer, tmp_path / "old.json")
    new = nn.ModuleDict({"encoder": nn.Linear(3, 4), "head": nn.Linear(4, 2)})
    optckpt.save_layout(new, None, tmp_path / "new.json")
    args = [
        "remap",
        str(tmp_path / "bare.pt"),
        "--to",
        str(tmp_path / "new.json"),
        "--from",
        str(tmp_path / "old.json"),
    ]
    result = runner.invoke(
        app, [*args, "--rename", r"^enc\.=encoder.", "-o", str(tmp_path / "out.pt")]
    )
    assert result.exit_code == 0, result.stderr
    assert "source names from the --from layout" in result.stdout
    assert (
        "group 0 renamed: enc.weight -> encoder.weight, enc.bias -> encoder.bias" in result.stdout
    )
    new_optimizer = torch.optim.SGD(new.parameters(), lr=0.1, momentum=0.9)
    new_optimizer.load_state_dict(torch.load(tmp_path / "out.pt", weights_only=True))
    for name, p in new.named_parameters():
        assert _same(new_optimizer.state[p], before[name.replace("encoder.", "enc.")]), name

    # without the rule the encoder is new and the old one dropped
    plain = runner.invoke(app, [*args, "--dry-run"])
    assert plain.exit_code == 0, plain.stderr
    assert "group 0 new (no state): encoder.weight, encoder.bias" in plain.stdout
    assert "dropped: enc.weight, enc.bias" in plain.stdout


def test_disagreeing_source_groups_merge_with_the_changes_listed(tmp_path: Path) -> None:
    model = _model()
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": [(n, p) for n, p in named if p.dim() > 1], "weight_decay": 0.1},
            {"params": [(n, p) for n, p in named if p.dim() <= 1], "weight_decay": 0.0},
        ],
        lr=1e-2,
    )
    _train(model, optimizer)
    torch.save(optimizer.state_dict(), tmp_path / "named.pt")
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    result = runner.invoke(
        app,
        ["remap", str(tmp_path / "named.pt"), "--to", str(tmp_path / "weights.pt"), "--dry-run"],
    )
    assert result.exit_code == 0, result.stderr
    assert "source names from param_names" in result.stdout
    assert "source group 1 (merged with 0)" in result.stdout  # 4 of the 6 came from group 1
    assert (
        "group 0 weight_decay: 0.1 -> 0.0 (merged groups 0, 1: the 2 parameter(s) from group 0 "
        "take group 1's value (4 parameter(s)))" in result.stdout
    )


def test_reset_mismatched(ckpt: tuple[Path, Any], tmp_path: Path) -> None:
    path, before = ckpt
    model = _model(head=5)
    optckpt.save_layout(model, None, tmp_path / "wide.json")
    out = tmp_path / "out.pt"
    args = [
        "remap",
        str(path),
        "--to",
        str(tmp_path / "wide.json"),
        "--reset-mismatched",
        "-o",
        str(out),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert "group 0 reset (shape changed): 3.weight, 3.bias" in result.stdout
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    optimizer.load_state_dict(torch.load(out, weights_only=True)["optimizer"])
    for name, p in model.named_parameters():
        if name.startswith("3."):
            assert not optimizer.state.get(p)
        else:
            assert _same(optimizer.state[p], before[name]), name
    _train(model, optimizer)


def test_key_picks_one_of_several_optimizers(tmp_path: Path) -> None:
    model = _model()
    torch.save({"optimizer_states": two_optimizers(model, _train)}, tmp_path / "two.ckpt")
    optckpt.save_layout(model, None, tmp_path / "same.json")
    args = ["remap", str(tmp_path / "two.ckpt"), "--to", str(tmp_path / "same.json"), "--dry-run"]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2
    assert_one_line_error(refused.stderr, "'optimizer_states.0', 'optimizer_states.1'", "--key")
    chosen = runner.invoke(app, [*args, "--key", "optimizer_states.1", "--json"])
    assert chosen.exit_code == 0, chosen.stderr
    assert json.loads(chosen.stdout)["key"] == "optimizer_states.1"


def test_a_prefix_that_matches_nothing_warns_and_brackets_print_as_they_are(tmp_path: Path) -> None:
    wrapped = nn.Module()
    wrapped.module = _model()  # DistributedDataParallel's names: module.0.weight, ...
    optimizer = torch.optim.AdamW(wrapped.parameters(), lr=1e-2)
    _train(wrapped.module, optimizer)
    torch.save(
        {"model": wrapped.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "ddp.pt"
    )
    new = nn.ModuleDict({"body": _model(), "head[cls]": nn.Linear(4, 2)})
    optckpt.save_layout(new, None, tmp_path / "new.json")
    out = tmp_path / "run[1]" / "out.pt"
    out.parent.mkdir()
    args = ["remap", str(tmp_path / "ddp.pt"), "--to", str(tmp_path / "new.json")]

    plain = runner.invoke(app, [*args, "--dry-run"])
    assert plain.exit_code == 0, plain.stderr
    assert "warning: no parameter kept its state" in plain.stdout
    assert "not even without wrapper prefixes" in plain.stdout  # module. was tried
    assert "--rename 'REGEX=REPLACEMENT'" in plain.stdout

    renamed = runner.invoke(app, [*args, "--rename", r"^module\.=body.", "-o", str(out)])
    assert renamed.exit_code == 0, renamed.stderr
    assert "warning" not in renamed.stdout
    assert "group 0 new (no state): head[cls].weight, head[cls].bias" in renamed.stdout
    assert renamed.stdout.rstrip().endswith(f"wrote {out}")
    groups = torch.load(out, weights_only=True)["optimizer"]["param_groups"]
    assert groups[0]["param_names"] == [n for n, _ in new.named_parameters()]


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--group", "([bad:lr=1"], "bad regex"),
        (["--group", "weight lr=1"], "expected 'REGEX:key=value,...'"),
        (["--rename", "(bad=x"], "bad regex"),
        (["--rename", "no-equals"], "expected 'REGEX=REPLACEMENT'"),
        (["--rename", r"^0\.=3."], "--rename maps both '0.weight' and '3.weight' to '3.weight'"),
    ],
)
def test_bad_rules_exit_2(
    ckpt: tuple[Path, Any], new_layout: Path, tmp_path: Path, extra: list[str], needle: str
) -> None:
    path, _ = ckpt
    torch.save(_model().state_dict(), tmp_path / "weights.pt")
    to = tmp_path / "weights.pt" if extra[0] == "--group" else new_layout
    result = runner.invoke(
        app, ["remap", str(path), "--to", str(to), *extra, "-o", str(tmp_path / "o.pt")]
    )
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, needle)
    assert result.stdout == ""
    assert not (tmp_path / "o.pt").exists()


def test_group_with_a_json_layout_exit_2(ckpt: tuple[Path, Any], new_layout: Path) -> None:
    path, _ = ckpt
    result = runner.invoke(
        app, ["remap", str(path), "--to", str(new_layout), "--group", "x:lr=1", "--dry-run"]
    )
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, "a JSON layout has its own groups")


def test_dry_run_with_output_and_no_output(
    ckpt: tuple[Path, Any], new_layout: Path, tmp_path: Path
) -> None:
    path, _ = ckpt
    both = runner.invoke(
        app,
        ["remap", str(path), "--to", str(new_layout), "--dry-run", "-o", str(tmp_path / "o.pt")],
    )
    assert both.exit_code == 2
    assert_one_line_error(both.stderr, "--dry-run writes nothing")
    assert not (tmp_path / "o.pt").exists()
    neither = runner.invoke(app, ["remap", str(path), "--to", str(new_layout)])
    assert neither.exit_code == 2
    assert_one_line_error(neither.stderr, "give -o OUT, or --dry-run")


def test_output_is_the_input(ckpt: tuple[Path, Any], new_layout: Path) -> None:
    path, _ = ckpt
    sha = _sha(path)
    result = runner.invoke(app, ["remap", str(path), "--to", str(new_layout), "-o", str(path)])
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, "is the input")
    link = path.with_name("link.pt")
    os.link(path, link)
    linked = runner.invoke(
        app, ["remap", str(path), "--to", str(new_layout), "-o", str(link), "--force"]
    )
    assert linked.exit_code == 2
    assert_one_line_error(linked.stderr, "is the input")
    assert _sha(path) == sha


def test_existing_output_needs_force(
    ckpt: tuple[Path, Any], new_layout: Path, tmp_path: Path
) -> None:
    path, _ = ckpt
    existing = tmp_path / "taken.pt"
    existing.write_bytes(b"precious")
    args = ["remap", str(path), "--to", str(new_layout), "-o", str(existing)]
    refused = runner.invoke(app, args)
    assert refused.exit_code == 2
    assert_one_line_error(refused.stderr, "exists; pass --force")
    assert existing.read_bytes() == b"precious"
    forced = runner.invoke(app, [*args, "--force"])
    assert forced.exit_code == 0, forced.stderr
    assert torch.load(existing, weights_only=True)["epoch"] == 3


def test_unreadable_input_exit_3(ckpt: tuple[Path, Any], new_layout: Path, tmp_path: Path) -> None:
    path, _ = ckpt
    missing = runner.invoke(
        app,
        ["remap", str(tmp_path / "nope.pt"), "--to", str(new_layout), "-o", str(tmp_path / "o.pt")],
    )
    assert missing.exit_code == 3
    assert_one_line_error(missing.stderr, "no such file")
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(path.read_bytes()[:400])
    cut = runner.invoke(
        app, ["remap", str(truncated), "--to", str(new_layout), "-o", str(tmp_path / "o.pt")]
    )
    assert cut.exit_code == 3
    assert_one_line_error(cut.stderr, "truncated")
    assert _files(tmp_path) == sorted(["ckpt.pt", "new.json", "cut.pt"])


def test_bad_layouts(ckpt: tuple[Path, Any], tmp_path: Path) -> None:
    path, _ = ckpt
    (tmp_path / "broken.json").write_text(
        '{"params": {"w": {"shape": [2]}}, "groups": [{"params": ["v"]}]}'
    )
    broken = runner.invoke(
        app, ["remap", str(path), "--to", str(tmp_path / "broken.json"), "--dry-run"]
    )
    assert broken.exit_code == 2
    assert_one_line_error(broken.stderr, "'v', which is not in params")
    save_file(_model().state_dict(), tmp_path / "model.safetensors")
    plain = runner.invoke(
        app, ["remap", str(path), "--to", str(tmp_path / "model.safetensors"), "--dry-run"]
    )
    assert plain.exit_code == 2
    assert_one_line_error(plain.stderr, "sorted by name", "save_layout")
    missing = runner.invoke(
        app, ["remap", str(path), "--to", str(tmp_path / "none.json"), "--dry-run"]
    )
    assert missing.exit_code == 3
    assert_one_line_error(missing.stderr, "no such file")


def test_shape_change_exit_4_names_both_shapes(ckpt: tuple[Path, Any], tmp_path: Path) -> None:
    path, _ = ckpt
    optckpt.save_layout(_model(head=5), None, tmp_path / "wide.json")
    result = runner.invoke(
        app, ["remap", str(path), "--to", str(tmp_path / "wide.json"), "-o", str(tmp_path / "o.pt")]
    )
    assert result.exit_code == 4
    assert_one_line_error(
        result.stderr,
        "3.weight: [4, 6] in the checkpoint, [5, 6] in the layout",
        "3.bias: [4] in the checkpoint, [5] in the layout",
        "--reset-mismatched",
    )
    assert result.stdout == ""
    assert not (tmp_path / "o.pt").exists()


def test_no_names_no_weights_no_from_exit_2(tmp_path: Path, new_layout: Path) -> None:
    model = _model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train(model, optimizer)
    torch.save({"optimizer": optimizer.state_dict(), "epoch": 1}, tmp_path / "bare.pt")
    result = runner.invoke(
        app,
        ["remap", str(tmp_path / "bare.pt"), "--to", str(new_layout), "-o", str(tmp_path / "o.pt")],
    )
    assert result.exit_code == 2
    assert_one_line_error(
        result.stderr, "no param_names", "no model state dict", "--from OLD_LAYOUT"
    )
    assert not (tmp_path / "o.pt").exists()


def test_ambiguous_names_exit_2(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3))
    model[1].requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(2, 3)).sum().backward()
        optimizer.step()
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "c.pt"
    )
    optckpt.save_layout(model, optimizer, tmp_path / "old.json")
    model[1].requires_grad_(True)
    optckpt.save_layout(model, None, tmp_path / "all.json")  # the new run trains every layer
    args = ["remap", str(tmp_path / "c.pt"), "--to", str(tmp_path / "all.json"), "--dry-run"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, "more than one way", "--from OLD_LAYOUT")
    assert result.stdout == ""

    named = runner.invoke(app, [*args, "--from", str(tmp_path / "old.json"), "--json"])
    assert named.exit_code == 0, named.stderr
    [group] = json.loads(named.stdout)["groups"]
    assert group["carried"] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert group["new"] == ["1.weight", "1.bias"]

    wrong = runner.invoke(app, [*args, "--from", str(tmp_path / "all.json")])
    assert wrong.exit_code == 2
    assert_one_line_error(
        wrong.stderr, "--from layout has groups of [6] parameters, the checkpoint [4]"
    )


def test_hugging_face_folder(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-2"
    shutil.copytree(FIXTURES / "hf_trainer" / "checkpoint-2", folder)
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 4))
    optckpt.save_layout(model, None, tmp_path / "old.json")
    optckpt.save_layout(nn.Sequential(*model, nn.Linear(4, 2)), None, tmp_path / "new.json")
    to = ["--to", str(tmp_path / "new.json")]

    written = runner.invoke(app, ["remap", str(folder), *to, "-o", str(tmp_path / "o.pt")])
    assert written.exit_code == 2
    assert_one_line_error(written.stderr, "a training folder is written as a folder")
    # model.safetensors is sorted by name, so it does not name the IDs
    dry = runner.invoke(app, ["remap", str(folder), *to, "--dry-run"])
    assert dry.exit_code == 2
    assert_one_line_error(dry.stderr, "--from OLD_LAYOUT")
    named = runner.invoke(
        app,
        ["remap", str(folder), *to, "--from", str(tmp_path / "old.json"), "--dry-run", "--json"],
    )
    assert named.exit_code == 0, named.stderr
    assert json.loads(named.stdout)["key"] == "optimizer.pt"
    inside = runner.invoke(
        app,
        [
            "remap",
            str(folder / "optimizer.pt"),
            *to,
            "--from",
            str(tmp_path / "old.json"),
            "-o",
            str(tmp_path / "o.pt"),
        ],
    )
    assert inside.exit_code == 0, inside.stderr
    assert "group 0 new (no state): 4.weight, 4.bias" in inside.stdout
    assert _files(tmp_path) == ["checkpoint-2", "new.json", "o.pt", "old.json"]
