"""Optimizers outside torch.optim, and torch.optim's own odd one out (SparseAdam's int step).

transformers is not installed here: its Adafactor is rebuilt from its source
(``real/transformers_adafactor.py``), so the state dicts below are the ones it writes. A state
with keys no ``torch.optim`` class writes must be an unknown optimizer with its keys named and
no candidates, and no "saved by torch < 1.12" warning: its Python-number ``step`` is its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from checks import assert_one_line_error
from torch import nn
from typer.testing import CliRunner

from optckpt.cli.app import app
from optckpt.inspect import inspect_checkpoint
from real.transformers_adafactor import stepped_state_dict

runner = CliRunner()


def _saved(tmp_path: Path, optimizer: dict[str, Any]) -> Path:
    torch.save({"optimizer": optimizer}, tmp_path / "ckpt.pt")
    return tmp_path / "ckpt.pt"


def test_inspect_names_transformers_adafactor_unknown_with_its_keys(tmp_path: Path) -> None:
    path = _saved(tmp_path, stepped_state_dict(beta1=0.9))
    (opt,) = inspect_checkpoint(path).optimizers
    assert (opt.guess.name, opt.guess.candidates) == (None, ())
    assert opt.guess.reason == (
        "state keys RMS, exp_avg, exp_avg_sq, exp_avg_sq_col, exp_avg_sq_row, step fit no "
        "torch.optim class"
    )
    assert all(isinstance(p.state["step"], int) for p in opt.params)
    assert not any("Python number" in w for w in opt.warnings)  # its int step is no old torch's

    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 0, result.stderr
    assert "unknown optimizer (state keys RMS, exp_avg, exp_avg_sq" in result.stdout
    assert "Python number" not in result.stdout
    data = json.loads(runner.invoke(app, ["inspect", str(path), "--json"]).stdout)
    (found,) = data["optimizers"]
    assert (found["optimizer"], found["optimizer_guess"]["candidates"]) == (None, [])


def test_resume_step_refuses_transformers_adafactor_with_no_candidates(tmp_path: Path) -> None:
    path = _saved(tmp_path, stepped_state_dict())
    result = runner.invoke(app, ["resume-step", str(path)])
    assert result.exit_code == 4, result.stdout
    assert_one_line_error(
        result.stderr,
        "cannot tell which optimizer saved this state (state keys RMS, exp_avg_sq, "
        "exp_avg_sq_col, exp_avg_sq_row, step fit no torch.optim class; candidates: none)",
    )


def test_sparse_adams_int_step_is_no_legacy_warning_but_adams_is(tmp_path: Path) -> None:
    model = nn.Embedding(10, 3, sparse=True)
    optimizer = torch.optim.SparseAdam(model.parameters())
    model(torch.tensor([1, 2, 3])).sum().backward()
    optimizer.step()
    sparse = optimizer.state_dict()
    assert isinstance(sparse["state"][0]["step"], int)  # torch's SparseAdam counts in an int
    (opt,) = inspect_checkpoint(_saved(tmp_path, sparse)).optimizers
    assert opt.guess.name == "SparseAdam" and opt.warnings == []

    dense = nn.Linear(3, 2)
    adam = torch.optim.Adam(dense.parameters())
    dense(torch.randn(4, 3)).sum().backward()
    adam.step()
    old = adam.state_dict()
    for state in old["state"].values():
        state["step"] = int(state["step"])  # as torch < 1.12 saved it
    (opt,) = inspect_checkpoint(_saved(tmp_path, old)).optimizers
    assert [w for w in opt.warnings if "Python number" in w] == [
        "2 parameters store step as a Python number (saved by torch < 1.12); torch still loads "
        "it and turns it into a tensor"
    ]
