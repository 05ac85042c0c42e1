"""``optckpt inspect`` through typer's CliRunner: exit codes, stdout, stderr, for each path.

CliRunner (click >= 8.2) keeps stderr apart: ``result.stdout`` is the data, ``result.stderr``
the error line; ``result.output`` interleaves both.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from checks import run
from typer.testing import Result

import optckpt

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"

# fixture -> (key path of its optimizer, the class make_fixtures.py trains it with)
FIXTURE_OPTIMIZERS = {
    "adamw_train.pt": ("optimizer", "AdamW"),
    "adamw_train.safetensors": ("optimizer", "AdamW"),
    "sgd_momentum_bare.pt": ("", "SGD"),
    "lightning.ckpt": ("optimizer_states.0", "Adam"),
    "hf_trainer/checkpoint-2": ("optimizer.pt", "AdamW"),
    "legacy_adam.pt": ("", "Adam"),
    "cuda_adam.pt": ("optimizer", "Adam"),
}


def assert_error_line(result: Result, code: int, *needles: str) -> str:
    assert result.exit_code == code, result.output
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


def check_schema(obj: Any) -> None:
    """The ``inspect --json`` object of DESIGN.md (extra keys allowed)."""
    assert set(obj) >= {"path", "format", "optimizers"}
    assert obj["format"] in {"torch", "torch-legacy", "safetensors", "dcp"}
    for opt in obj["optimizers"]:
        assert set(opt) >= {"key", "optimizer", "param_groups", "params", "totals", "warnings"}
        for group in opt["param_groups"]:
            assert set(group) >= {"index", "num_params", "hyperparams"}
        for param in opt["params"]:
            assert set(param) >= {"id", "name", "group", "state"}
            for value in param["state"].values():
                if isinstance(value, dict):
                    assert set(value) == {"shape", "dtype", "device"}
                else:
                    assert isinstance(value, (int, float))
        assert set(opt["totals"]) >= {"params", "params_with_state", "numel", "bytes"}
        assert isinstance(opt["warnings"], list)


def _hash(path: Path) -> dict[str, str]:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# --------------------------------------------------------------------------- success


@pytest.mark.parametrize("relative", list(FIXTURE_OPTIMIZERS))
def test_inspect_every_fixture(relative: str) -> None:
    key, optimizer = FIXTURE_OPTIMIZERS[relative]
    path = FIXTURES / relative
    before = _hash(path)
    result = run("inspect", path)
    assert result.exit_code == 0, result.output
    where = f"optimizer at '{key}'" if key else "optimizer at the top level"
    assert where in result.stdout
    assert f": {optimizer}\n" in result.stdout
    assert str(path) in result.stdout
    assert result.stderr == ""
    assert _hash(path) == before


@pytest.mark.parametrize("relative", list(FIXTURE_OPTIMIZERS))
def test_json_of_every_fixture(relative: str) -> None:
    key, optimizer = FIXTURE_OPTIMIZERS[relative]
    path = FIXTURES / relative
    result = run("inspect", path, "--json")
    assert result.exit_code == 0, result.output
    obj = json.loads(result.stdout)
    check_schema(obj)
    assert obj["path"] == str(path)
    assert [(o["key"], o["optimizer"]) for o in obj["optimizers"]] == [(key, optimizer)]
    assert obj["format"] == (
        "safetensors"
        if relative.endswith(".safetensors")
        else "torch-legacy"
        if relative.startswith("legacy")
        else "torch"
    )


def test_json_counts_match_the_file() -> None:
    result = run("inspect", FIXTURES / "lightning.ckpt", "--json")
    (opt,) = json.loads(result.stdout)["optimizers"]
    sd = torch.load(FIXTURES / "lightning.ckpt", weights_only=True)["optimizer_states"][0]
    tensors = [t for s in sd["state"].values() for t in s.values()]
    assert opt["totals"]["numel"] == sum(t.numel() for t in tensors)
    assert opt["totals"]["bytes"] == sum(t.numel() * t.element_size() for t in tensors)
    assert opt["totals"]["params"] == len(sd["param_groups"][0]["params"])


def test_stats_shows_values_and_the_bar_view() -> None:
    result = run("inspect", FIXTURES / "adamw_train.pt", "--stats")
    assert result.exit_code == 0, result.output
    assert "state values" in result.stdout
    assert "sqrt(mean(exp_avg_sq)) per parameter (log scale)" in result.stdout
    bars = [line for line in result.stdout.splitlines() if "█" in line]
    assert len(bars) == 6  # one per parameter of the recipe's model
    assert any(line.startswith("0.weight ") for line in bars)


def test_stats_json_is_strict_json() -> None:
    result = run("inspect", FIXTURES / "sgd_momentum_bare.pt", "--stats", "--json")
    assert result.exit_code == 0
    obj = json.loads(result.stdout, parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert all("stats" in p for p in obj["optimizers"][0]["params"])


def test_key_selects_one_optimizer() -> None:
    result = run("inspect", FIXTURES / "lightning.ckpt", "--key", "optimizer_states.0", "--json")
    assert result.exit_code == 0
    assert [o["key"] for o in json.loads(result.stdout)["optimizers"]] == ["optimizer_states.0"]


def test_legacy_warning_is_reported() -> None:
    result = run("inspect", FIXTURES / "legacy_adam.pt")
    assert result.exit_code == 0
    assert "step as a Python number" in result.output


def test_allow_global_loads_the_unsafe_file() -> None:
    path = FIXTURES / "unsafe_namespace.pt"
    result = run("inspect", path, "--allow-global", "argparse.Namespace")
    assert result.exit_code == 0, result.output
    assert "optimizer at 'optimizer': SGD" in result.stdout


def test_version() -> None:
    result = run("--version")
    assert result.exit_code == 0
    assert result.stdout == f"optckpt {optckpt.__version__}\n"


def test_no_arguments_shows_help() -> None:
    result = run()
    assert "inspect" in result.output and "Usage" in result.output


# --------------------------------------------------------------------------- errors


def test_unsafe_pickle() -> None:
    result = run("inspect", FIXTURES / "unsafe_namespace.pt")
    assert_error_line(result, 3, "argparse.Namespace", "--allow-global argparse.Namespace")


def test_missing_file(tmp_path: Path) -> None:
    assert_error_line(run("inspect", tmp_path / "nope.pt"), 3, str(tmp_path / "nope.pt"))


@pytest.mark.parametrize("name", ["adamw_train.pt", "legacy_adam.pt", "adamw_train.safetensors"])
def test_truncated_file(tmp_path: Path, name: str) -> None:
    data = (FIXTURES / name).read_bytes()
    for cut in (len(data) // 2, 1000, 30):
        path = tmp_path / f"{cut}-{name}"
        path.write_bytes(data[:cut])
        assert_error_line(run("inspect", path), 3, str(path))


def test_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("not a checkpoint\n")
    assert_error_line(run("inspect", path), 3, "not a checkpoint")


def test_checkpoint_without_optimizer(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save({"model": torch.nn.Linear(2, 2).state_dict(), "epoch": 1}, path)
    assert_error_line(run("inspect", path), 3, "no optimizer state dict", "model", "epoch")


def test_folder_without_optimizer(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert_error_line(run("inspect", tmp_path), 3, "no optimizer file", "config.json")


def test_key_that_does_not_exist() -> None:
    result = run("inspect", FIXTURES / "lightning.ckpt", "--key", "optimizer")
    assert_error_line(result, 2, "'optimizer'", "'optimizer_states.0'")


def test_key_to_something_else() -> None:
    result = run("inspect", FIXTURES / "adamw_train.pt", "--key", "model")
    assert_error_line(result, 2, "not an optimizer state dict", "'optimizer'")


@pytest.mark.parametrize("name", ["Namespace", "argparse.Nope", "no_such_module_xyz.Thing"])
def test_bad_allow_global(name: str) -> None:
    result = run("inspect", FIXTURES / "unsafe_namespace.pt", "--allow-global", name)
    assert_error_line(result, 2, name)


def test_unknown_option() -> None:
    result = run("inspect", FIXTURES / "adamw_train.pt", "--frobnicate")
    assert result.exit_code == 2
    assert "--frobnicate" in result.stderr
    assert result.stdout == ""


def test_unknown_command() -> None:
    assert run("frobnicate").exit_code == 2


def test_debug_shows_the_traceback() -> None:
    result = run("inspect", FIXTURES / "unsafe_namespace.pt", env={"OPTCKPT_DEBUG": "1"})
    assert result.exit_code == 3
    assert "Traceback" in result.stderr
    assert "UnsafeCheckpointError" in result.stderr
    assert result.stderr.rstrip().splitlines()[-1].startswith("error: ")


def test_inspect_does_not_modify_an_unsafe_input() -> None:
    path = FIXTURES / "unsafe_namespace.pt"
    before = _hash(path)
    run("inspect", path)
    run("inspect", path, "--allow-global", "argparse.Namespace", "--stats")
    assert _hash(path) == before


# --------------------------------------------------------------------------- as a program


def _python(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("OPTCKPT_DEBUG", None)
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_python_dash_m_help() -> None:
    done = _python("-m", "optckpt", "--help")
    assert done.returncode == 0, done.stderr
    assert "inspect" in done.stdout


def test_python_dash_m_exit_code_and_stderr() -> None:
    done = _python("-m", "optckpt", "inspect", str(FIXTURES / "unsafe_namespace.pt"))
    assert done.returncode == 3
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")


def test_help_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from optckpt.cli.app import app\n"
        "for args in (['--help'], ['inspect', '--help'], ['--version']):\n"
        "    assert CliRunner().invoke(app, args).exit_code == 0\n"
        "print('torch' in sys.modules)\n"
    )
    done = _python("-c", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_trainer_output_folder_reads_its_newest_checkpoint() -> None:
    # fixtures/hf_trainer is a Trainer output_dir: no optimizer file, one checkpoint-2/
    run_dir = FIXTURES / "hf_trainer"
    result = run("inspect", run_dir, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["path"] == str(run_dir / "checkpoint-2")
    assert [o["key"] for o in data["optimizers"]] == ["optimizer.pt"]
    assert any(str(run_dir / "checkpoint-2") in note for note in data["notes"])
    text = run("inspect", run_dir)
    assert text.exit_code == 0
    assert text.stdout.startswith(str(run_dir / "checkpoint-2"))
    assert text.stderr.startswith("note: ") and "newest checkpoint-N" in text.stderr
