"""CLI paths of regenerate and resume-step: exit codes, stdout, the one-line stderr."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from checks import RESUME_CHECKS, assert_one_line_error, save_tree
from typer.testing import CliRunner

from optckpt.cli.app import app

FIXTURES = Path(__file__).resolve().parent.parent.parent / "fixtures"
runner = CliRunner()

LAYOUT = {
    "params": {"enc.weight": {"shape": [6, 3]}, "enc.bias": {"shape": [6]}},
    "groups": [
        {"params": ["enc.weight"], "weight_decay": 0.01},
        {"params": ["enc.bias"], "weight_decay": 0.0},
    ],
}


def _layout(tmp_path: Path) -> Path:
    path = tmp_path / "layout.json"
    path.write_text(json.dumps(LAYOUT))
    return path


def _regenerate_argv(
    tmp_path: Path, name: str, *extra: str, optimizer: str = "adamw", layout: Path | None = None
) -> list[str]:
    """``regenerate --optimizer OPTIMIZER --layout LAYOUT -o tmp_path/NAME EXTRA...``."""
    where = _layout(tmp_path) if layout is None else layout
    return [
        "regenerate",
        "--optimizer",
        optimizer,
        "--layout",
        str(where),
        "-o",
        str(tmp_path / name),
        *extra,
    ]


def _regenerate(
    tmp_path: Path, name: str, *extra: str, optimizer: str = "adamw", layout: Path | None = None
) -> Any:
    return runner.invoke(
        app, _regenerate_argv(tmp_path, name, *extra, optimizer=optimizer, layout=layout)
    )


def test_regenerate_twice_gives_checkpoints_diff_calls_identical(tmp_path: Path) -> None:
    for name in ("a.pt", "b.safetensors"):
        result = _regenerate(tmp_path, name, "--steps", "3", "--seed", "11", "--set", "lr=3e-4")
        assert result.exit_code == 0, result.output
        assert result.stdout.startswith(f"wrote {tmp_path / name}: model and optimizer, AdamW")
    same = runner.invoke(app, ["diff", str(tmp_path / "a.pt"), str(tmp_path / "b.safetensors")])
    assert same.exit_code == 0, same.output
    other = _regenerate(tmp_path, "c.pt", "--steps", "3", "--seed", "12", "--set", "lr=3e-4")
    assert other.exit_code == 0
    differ = runner.invoke(app, ["diff", str(tmp_path / "a.pt"), str(tmp_path / "c.pt")])
    assert differ.exit_code == 1


def test_regenerate_json(tmp_path: Path) -> None:
    result = _regenerate(tmp_path, "a.pt", "--json", "--set", "1.lr=1e-5", "--bare", "--no-names")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["optimizer"] == "AdamW" and data["bare"] is True and data["num_params"] == 2
    assert [g["lr"] for g in data["groups"]] == [0.001, 1e-5]
    saved = torch.load(tmp_path / "a.pt", weights_only=True)
    assert set(saved) == {"state", "param_groups"}
    assert "param_names" not in saved["param_groups"][0]


def test_regenerate_notes_dropped_layout_keys_on_stderr(tmp_path: Path) -> None:
    result = _regenerate(tmp_path, "r.pt", optimizer="rprop")
    assert result.exit_code == 0, result.output
    assert result.stderr == (
        "note: layout hyperparameters Rprop does not have were left out: weight_decay\n"
    )
    assert "note:" not in result.stdout
    as_json = _regenerate(tmp_path, "j.pt", "--json", optimizer="rprop")
    assert as_json.exit_code == 0, as_json.output
    assert as_json.stderr == ""
    assert json.loads(as_json.stdout)["notes"] == [
        "layout hyperparameters Rprop does not have were left out: weight_decay"
    ]


@pytest.mark.parametrize(
    ("args", "code", "needles"),
    [
        (["--optimizer", "adamww"], 4, ["unknown optimizer 'adamww'", "did you mean AdamW"]),
        (["--optimizer", "adamw", "--set", "lr"], 2, ["expected KEY=VALUE"]),
        (["--optimizer", "adamw", "--set", "momentum=0.9"], 2, ["AdamW has no such"]),
        (["--optimizer", "adamw", "--set", "lr=-1.0"], 4, ["Invalid learning rate"]),
        (["--optimizer", "adamw", "--set", "5.lr=1"], 2, ["the layout has 2 group(s)"]),
        (["--optimizer", "muon"], 4, ["Muon refuses this layout"]),
    ],
)
def test_regenerate_errors(tmp_path: Path, args: list[str], code: int, needles: list[str]) -> None:
    out = tmp_path / "out.pt"
    result = runner.invoke(
        app, ["regenerate", "--layout", str(_layout(tmp_path)), "-o", str(out), *args]
    )
    assert result.exit_code == code, result.output
    assert_one_line_error(result.stderr, *needles)
    assert not out.exists()


def test_regenerate_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    assert _regenerate(tmp_path, "a.pt").exit_code == 0
    again = _regenerate(tmp_path, "a.pt")
    assert again.exit_code == 2
    assert_one_line_error(again.stderr, "exists", "--force")
    assert _regenerate(tmp_path, "a.pt", "--force").exit_code == 0


def test_regenerate_missing_layout_is_unreadable(tmp_path: Path) -> None:
    result = _regenerate(tmp_path, "o.pt", optimizer="sgd", layout=tmp_path / "nope.pt")
    assert result.exit_code == 3
    assert_one_line_error(result.stderr, "no such file")


def test_resume_step_passes_on_a_fixture(tmp_path: Path) -> None:
    result = runner.invoke(app, ["resume-step", str(FIXTURES / "adamw_train.pt"), "--check-torch"])
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{FIXTURES / 'adamw_train.pt'} at 'optimizer': AdamW (guessed")
    for name in [*RESUME_CHECKS, "matches_torch"]:
        assert any(line.split()[:3] == ["pass", "│", name] for line in lines), name
    assert lines[-1] == "ok"


def test_resume_step_json(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["resume-step", str(FIXTURES / "lightning.ckpt"), "--json", "--steps", "2"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] is True and data["key"] == "optimizer_states.0" and data["steps"] == 2
    # the fixture's StepLR beside the optimizer adds the companions' check
    assert [c["name"] for c in data["checks"]] == [*RESUME_CHECKS, "companions agree"]
    assert all(c["ok"] is True for c in data["checks"])


def _planted_nan(tmp_path: Path) -> Path:
    checkpoint = torch.load(FIXTURES / "adamw_train.pt", weights_only=True)
    checkpoint["optimizer"]["state"][2]["exp_avg_sq"][0] = float("nan")
    return save_tree(tmp_path / "nan.pt", **checkpoint)


def test_resume_step_exits_1_when_a_check_fails(tmp_path: Path) -> None:
    path = _planted_nan(tmp_path)
    result = runner.invoke(app, ["resume-step", str(path)])
    assert result.exit_code == 1
    assert any(
        line.split()[:3] == ["FAIL", "│", "finite_before"] for line in result.stdout.splitlines()
    )
    assert result.stdout.splitlines()[-1] == "resume-step failed"
    as_json = runner.invoke(app, ["resume-step", str(path), "--json"])
    assert as_json.exit_code == 1
    # strict JSON: the NaN update size of the broken group is "nan", as in every --json
    data = json.loads(as_json.stdout, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert data["ok"] is False
    assert data["groups"][1]["update_rms"] == "nan"
    failed = [c["name"] for c in data["checks"] if c["ok"] is False]
    assert failed == ["finite_before", "finite_after"]


def test_resume_step_writes_after_the_steps(tmp_path: Path) -> None:
    out = tmp_path / "after.pt"
    result = runner.invoke(
        app, ["resume-step", str(FIXTURES / "adamw_train.pt"), "--steps", "2", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.stdout
    saved = torch.load(out, weights_only=True)
    assert {float(s["step"]) for s in saved["optimizer"]["state"].values()} == {5.0}
    assert saved["epoch"] == 3  # the rest of the file is kept
    again = runner.invoke(app, ["resume-step", str(out), "--check-torch"])
    assert again.exit_code == 0, again.output


@pytest.mark.parametrize(
    ("args", "code", "needles"),
    [
        (["missing.pt"], 3, ["no such file"]),
        ([str(FIXTURES / "unsafe_namespace.pt")], 3, ["argparse.Namespace"]),
        ([str(FIXTURES / "adamw_train.pt"), "--optimizer", "nope"], 4, ["unknown optimizer"]),
        (
            [str(FIXTURES / "adamw_train.pt"), "--atol", "1e-3"],
            2,
            ["--atol applies to --check-torch"],
        ),
        ([str(FIXTURES / "adamw_train.pt"), "--steps", "0"], 2, []),
        ([str(FIXTURES / "adamw_train.pt"), "--key", "model"], 2, ["not an optimizer state dict"]),
        ([str(FIXTURES / "adamw_train.pt"), "-o", str(FIXTURES / "adamw_train.pt")], 2, ["input"]),
    ],
)
def test_resume_step_errors(args: list[str], code: int, needles: list[str]) -> None:
    result = runner.invoke(app, ["resume-step", *args])
    assert result.exit_code == code, result.output
    if needles:
        assert_one_line_error(result.stderr, *needles)


def test_resume_step_group_size_mismatch_exits_4_with_the_remap_hint(tmp_path: Path) -> None:
    checkpoint = torch.load(FIXTURES / "lightning.ckpt", weights_only=True)
    del checkpoint["state_dict"]["3.bias"]  # the optimizer was saved for a bigger model
    path = tmp_path / "mismatch.ckpt"
    torch.save(checkpoint, path)
    result = runner.invoke(app, ["resume-step", str(path)])
    assert result.exit_code == 4
    assert_one_line_error(
        result.stderr,
        "6 parameter IDs",
        "do not fit the 5 parameters",
        "optckpt remap",
        "--dry-run",
    )


def _readme_ci_snippet() -> str:
    readme = (FIXTURES.parent / "README.md").read_text()
    start = readme.index("```bash\n#!/usr/bin/env bash", readme.index("In a CI pipeline"))
    return readme[start + len("```bash\n") : readme.index("```", start + 3)]


def test_the_readme_ci_snippet_fails_the_pipeline_only_when_resume_step_fails(
    tmp_path: Path,
) -> None:
    script = tmp_path / "ci.sh"
    script.write_text(_readme_ci_snippet())
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    good = subprocess.run(
        ["bash", str(script)],
        env={**env, "CKPT": str(FIXTURES / "adamw_train.pt")},
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert good.returncode == 0, good.stderr
    assert json.loads((tmp_path / "resume-report.json").read_text())["ok"] is True
    bad = subprocess.run(
        ["bash", str(script)],
        env={**env, "CKPT": str(_planted_nan(tmp_path))},
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1
    assert "does not resume" in bad.stderr and "finite_before" in bad.stderr


def test_seed_out_of_range_is_a_usage_error(tmp_path: Path) -> None:
    for command in (
        ["resume-step", str(FIXTURES / "adamw_train.pt")],
        _regenerate_argv(tmp_path, "o.pt", optimizer="sgd"),
    ):
        result = runner.invoke(app, [*command, "--seed", str(2**64 - 1)])
        assert result.exit_code == 2, result.output
        assert "Traceback" not in result.output


def test_regenerate_json_writes_non_finite_numbers_as_strings(tmp_path: Path) -> None:
    """The one non-finite policy of every --json (DESIGN.md): "nan", "inf", "-inf"."""
    result = _regenerate(tmp_path, "a.pt", "--json", "--set", "eps=inf")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert data["groups"][0]["eps"] == "inf"
    assert data["notes"] == []


def _two_optimizers(tmp_path: Path) -> Path:
    """Two torch.optim state dicts in one file (a GAN's), the second with a NaN planted."""
    gen, disc = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
    opt_g = torch.optim.Adam(gen.parameters())
    opt_d = torch.optim.RMSprop(disc.parameters())
    disc(gen(torch.randn(4, 3))).sum().backward()
    opt_g.step()
    opt_d.step()
    disc_state = opt_d.state_dict()
    disc_state["state"][0]["square_avg"][0, 0] = float("nan")
    return save_tree(tmp_path / "gan.pt", gen=opt_g.state_dict(), disc=disc_state)


def test_resume_step_checks_every_optimizer_without_key(tmp_path: Path) -> None:
    path = _two_optimizers(tmp_path)
    result = runner.invoke(app, ["resume-step", str(path)])
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith(str(path))] == [
        f"{path} at 'gen'",
        f"{path} at 'disc'",
    ]
    assert lines[-1] == "resume-step failed at 'disc'"
    data = json.loads(runner.invoke(app, ["resume-step", str(path), "--json"]).stdout)
    assert data["ok"] is False
    assert [(r["key"], r["ok"]) for r in data["results"]] == [("gen", True), ("disc", False)]
    only_gen = runner.invoke(app, ["resume-step", str(path), "--key", "gen"])
    assert only_gen.exit_code == 0 and only_gen.stdout.splitlines()[-1] == "ok"


def test_remap_asks_for_key_once_listing_them(tmp_path: Path) -> None:
    path = _two_optimizers(tmp_path)
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps({"params": {"w": {"shape": [2, 3]}}}))
    result = runner.invoke(app, ["remap", str(path), "--to", str(layout), "--dry-run"])
    assert result.exit_code == 2
    assert_one_line_error(result.stderr, "several optimizer state dicts ('gen', 'disc')", "--key")
