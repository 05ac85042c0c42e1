"""fixtures/: the manifest lists every fixture, and its regenerate entries are reproducible."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from types import ModuleType

import pytest
import torch
from checks import assert_bitwise_equal
from typer.testing import CliRunner

from optckpt.cli.app import app
from optckpt.io import load_checkpoint

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
MADE_WITH = json.loads((FIXTURES / "manifest.json").read_text())["torch"]
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())["fixtures"]
# Rebuilt bit for bit only under the torch that made them (CPU randn's last bits change
# between versions: seen with 2.11 against fixtures made with 2.13).
SAME_TORCH = pytest.mark.skipif(
    torch.__version__.split("+")[0] != MADE_WITH,
    reason=f"fixtures were made with torch {MADE_WITH}; rebuilds under another differ in the last bits",
)
NOT_FIXTURES = {"README.md", "make_fixtures.py", "manifest.json"}


def test_the_manifest_lists_exactly_the_fixtures() -> None:
    listed = {entry["path"] for entry in MANIFEST}
    on_disk = {
        str(p.relative_to(FIXTURES))
        for p in FIXTURES.rglob("*")
        if p.is_file()
        and p.name not in NOT_FIXTURES
        and p.parts[len(FIXTURES.parts)] not in ("layouts", "hf_trainer")
    } | {"hf_trainer/checkpoint-2"}
    assert listed == on_disk
    assert all(("regenerate" in e) != ("function" in e) for e in MANIFEST)


def _make_fixtures(folder: Path) -> ModuleType:
    """fixtures/make_fixtures.py of ``folder``, imported as a module."""
    spec = importlib.util.spec_from_file_location("make_fixtures", folder / "make_fixtures.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@SAME_TORCH
@pytest.mark.parametrize(
    "entry", [e for e in MANIFEST if "regenerate" in e], ids=lambda e: e["path"]
)
def test_regenerate_entries_rebuild_the_committed_fixture(
    entry: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(FIXTURES)  # manifest paths are relative to fixtures/
    runs = []
    for run in ("first", "second"):
        out = tmp_path / run / Path(entry["path"]).name
        out.parent.mkdir()
        result = CliRunner().invoke(app, ["regenerate", *entry["regenerate"], "-o", str(out)])
        assert result.exit_code == 0, result.output
        runs.append(out)
    # On one machine a rebuild is exact: every tensor of both runs, model weights included.
    assert_bitwise_equal(load_checkpoint(runs[0]).root, load_checkpoint(runs[1]).root)
    # Against the committed file, perhaps made on another machine, CPU kernels (vector width,
    # fused multiply-add) may change the last bits of stepped values, and steps carry them on.
    committed = FIXTURES / entry["path"]
    assert _make_fixtures(FIXTURES).verdict(committed, runs[0], []) in ("same", "close")


@SAME_TORCH
def test_make_fixtures_check_reports_a_fixture_that_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    copy = tmp_path / "fixtures"
    shutil.copytree(FIXTURES, copy)
    make_fixtures = _make_fixtures(copy)
    entries = [e for e in MANIFEST if e["path"] in ("regenerated/adam.pt", "regenerated/sgd.pt")]
    monkeypatch.chdir(copy)
    assert make_fixtures.check(entries) == 0
    # the committed adam.pt now holds another seed's run: --check must name it
    changed = next(e for e in entries if e["path"] == "regenerated/adam.pt")
    make_fixtures.build({"regenerate": [*changed["regenerate"][:-1], "1"]}, copy / changed["path"])
    capsys.readouterr()
    assert make_fixtures.check(entries) == 1
    assert capsys.readouterr().out.splitlines() == [
        "same  regenerated/sgd.pt",
        "DIFFERS  regenerated/adam.pt",
    ]
    # a model weight alone changed (the optimizer state, all optckpt diff sees, is the same)
    sgd = copy / "regenerated/sgd.pt"
    checkpoint = torch.load(sgd, weights_only=True)
    checkpoint["model"]["3.bias"][0] += 1
    torch.save(checkpoint, sgd)
    assert make_fixtures.check(entries[:1]) == 1
    assert capsys.readouterr().out.splitlines() == ["DIFFERS  regenerated/sgd.pt"]
