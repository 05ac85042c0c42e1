"""``convert --sanitize``: an old checkpoint with numpy values, an argparse.Namespace and paths
becomes one that ``torch.load(weights_only=True)`` reads with no allow-list, values equal."""

from __future__ import annotations

import argparse
import json
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from optckpt.sanitize import sanitize_tree
from tests.checks import assert_bitwise_equal, run
from tests.schedulers import trained

DTYPES = ("float32", "float64", "int64", "bool")


def _old_checkpoint(path: Path) -> dict[str, Any]:
    """What a training script of a few years ago saved: numpy metrics, its argparse
    arguments (with a path), a numpy history, beside the model and optimizer."""
    model, optimizer, scheduler = trained("StepLR")
    args = argparse.Namespace(
        lr=np.float32(0.1), out_dir=Path("/runs/exp1"), layers=[np.int64(3), np.int64(4)]
    )
    tree = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "args": args,
        "best_acc": np.float64(0.93),
        "epoch": np.int64(7),
        "converged": np.bool_(False),
        "history": np.linspace(0.0, 1.0, 5, dtype=np.float32),
        "labels": np.array(["cat", "dog"]),
    }
    torch.save(tree, path)
    return tree


def _allow_list(path: Path) -> list[str]:
    """Every global the file needs (torch lists the pickle's own; numpy's dtype classes are
    reached through numpy.dtype)."""
    names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    names += [f"numpy.dtypes.{type(np.dtype(t)).__name__}" for t in DTYPES]
    names.append(f"numpy.dtypes.{type(np.array(['cat']).dtype).__name__}")
    return [arg for name in names for arg in ("--allow-global", name)]


def test_sanitized_output_loads_weights_only_with_equal_values(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    tree = _old_checkpoint(path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # why it is needed
    out = tmp_path / "clean.pt"
    result = run("convert", path, *_allow_list(path), "--sanitize", "-o", out, "--json")
    assert result.exit_code == 0, result.output
    clean = torch.load(out, weights_only=True)  # no safe_globals, no allow-list
    assert clean["args"] == {
        "lr": float(np.float32(0.1)),
        "out_dir": "/runs/exp1",
        "layers": [3, 4],
    }
    assert type(clean["best_acc"]) is float and clean["best_acc"] == 0.93
    assert type(clean["epoch"]) is int and clean["epoch"] == 7
    assert clean["converged"] is False
    assert torch.equal(clean["history"], torch.from_numpy(tree["history"]))
    assert clean["history"].dtype == torch.float32
    assert clean["labels"] == ["cat", "dog"]
    for key in ("model", "optimizer", "scheduler"):
        assert_bitwise_equal(clean[key], tree[key])
    listed = {(s["key"], s["from"], s["to"]) for s in json.loads(result.stdout)["sanitized"]}
    assert listed == {
        ("args", "argparse.Namespace", "dict"),
        ("args.lr", "numpy.float32", "float"),
        ("args.out_dir", f"pathlib.{type(Path()).__name__}", "str"),
        ("args.layers.0", "numpy.int64", "int"),
        ("args.layers.1", "numpy.int64", "int"),
        ("best_acc", "numpy.float64", "float"),
        ("epoch", "numpy.int64", "int"),
        ("converged", "numpy.bool", "bool"),
        ("history", "numpy.ndarray[float32]", "torch.Tensor"),
        ("labels", "numpy.ndarray[<U3]", "list"),
    }


def test_without_sanitize_the_output_still_needs_the_allow_list(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    _old_checkpoint(path)
    out = tmp_path / "same.pt"
    result = run("convert", path, *_allow_list(path), "-o", out)
    assert result.exit_code == 0, result.output
    with pytest.raises(pickle.UnpicklingError):
        torch.load(out, weights_only=True)


def test_the_missing_dtype_class_is_named(tmp_path: Path) -> None:
    path = tmp_path / "old.pt"
    _old_checkpoint(path)
    own = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    result = run("inspect", path, *[a for n in own for a in ("--allow-global", n)])
    assert result.exit_code == 3
    assert "--allow-global numpy.dtypes." in result.stderr


def test_sanitize_keeps_what_is_plain_and_changes_no_input() -> None:
    weights: OrderedDict[str, Any] = OrderedDict(w=torch.ones(2), scale=np.float32(2.0))
    weights._metadata = {"": {"version": 1}}  # type: ignore[attr-defined]
    tree = {"model": weights, "plain": {"x": [1, 2.5, "a"]}}
    new, rewrites = sanitize_tree(tree)
    assert [r.key for r in rewrites] == ["model.scale"]
    assert type(weights["scale"]) is np.float32  # the input is not changed
    assert type(new["model"]) is OrderedDict and new["model"]._metadata == weights._metadata
    assert new["model"]["w"] is weights["w"] and new["plain"] is tree["plain"]
    assert sanitize_tree(tree["plain"]) == (tree["plain"], [])
