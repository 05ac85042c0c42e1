"""optckpt.io.rewrite: the pipeline every writing command goes through.

Each command is tested on its own (test_move, test_convert, test_remap, test_regenerate,
test_resume); here: the output checked once with every input, the folder refusal said once,
the kind chosen and dispatched, and one progress protocol for every command.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from checks import RecordedProgress
from torch import nn

from optckpt.convert import convert_checkpoint
from optckpt.errors import UsageError
from optckpt.io import load_checkpoint
from optckpt.io.rewrite import KINDS, kind_for, plan_rewrite, prepare_output, save
from optckpt.io.torch_format import Deferred
from optckpt.io.write import tensor_bytes
from optckpt.move import move_checkpoint
from optckpt.remapping import remap_checkpoint
from optckpt.resume import ResumeOptions, resume_step

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def test_kinds_from_the_output() -> None:
    assert kind_for("a.pt") == kind_for("a.ckpt") == "pt"
    assert kind_for("a.safetensors") == "safetensors"
    assert kind_for("a.safetensors", "pt") == "pt"
    assert kind_for("out/") == "pt"  # a folder only for the commands that write DCP
    assert kind_for("out/", dcp=True) == kind_for("x.pt", "dcp", dcp=True) == "dcp"
    with pytest.raises(UsageError, match="unknown format 'zip'"):
        kind_for("a.pt", "zip")
    assert set(KINDS) == {"pt", "safetensors", "dcp", "folder"}


def test_the_output_is_checked_with_every_input(tmp_path: Path) -> None:
    layout = tmp_path / "layout.json"
    layout.write_text("{}")
    with pytest.raises(UsageError, match="is the input"):
        prepare_output(layout, force=True, inputs=[None, layout], command="remap")
    with pytest.raises(UsageError, match="exists; pass --force"):
        prepare_output(layout, force=False, inputs=[], command="remap")
    output = prepare_output(tmp_path / "new.safetensors", force=False, inputs=[layout])
    assert (output.path, output.kind) == (tmp_path / "new.safetensors", "safetensors")


@pytest.mark.parametrize("command", ["move", "remap", "resume-step"])
def test_a_folder_to_rewrite_is_written_as_a_folder(tmp_path: Path, command: str) -> None:
    folder = tmp_path / "checkpoint-7"
    folder.mkdir()
    output = prepare_output(tmp_path / "out", force=False, rewrites=folder, command=command)
    assert (output.path, output.kind, output.folder) == (tmp_path / "out", "folder", folder)
    run = tmp_path / "run"  # an output_dir: its newest checkpoint-N is the folder rewritten
    (run / "checkpoint-3").mkdir(parents=True)
    (run / "checkpoint-12").mkdir()
    output = prepare_output(tmp_path / "out", force=False, rewrites=run, command=command)
    assert output.folder == run / "checkpoint-12"


def test_every_writing_command_writes_a_folder_alike(tmp_path: Path) -> None:
    """A folder with one optimizer file: each command writes a folder of the same files."""
    folder = tmp_path / "checkpoint-7"
    folder.mkdir()
    torch.save(torch.load(FIXTURES / "adamw_train.pt", weights_only=True), folder / "optimizer.pt")
    (folder / "scheduler.pt").write_bytes(b"carried")
    weights = tmp_path / "weights.pt"  # a model state dict is a layout
    torch.save(torch.load(folder / "optimizer.pt", weights_only=True)["model"], weights)
    for verb, call in (
        ("move", lambda out: move_checkpoint(folder, out, device="cpu")),
        ("convert", lambda out: convert_checkpoint(folder, out)),
        ("remap", lambda out: remap_checkpoint(folder, weights, out)),
        ("resume-step", lambda out: resume_step(folder, ResumeOptions(out=out))),
    ):
        out = tmp_path / verb
        call(out)
        assert sorted(p.name for p in out.iterdir()) == ["optimizer.pt", "scheduler.pt"], verb
        assert (out / "scheduler.pt").read_bytes() == b"carried", verb
        # a copy of its own: saving into the output never writes into the input
        assert (out / "scheduler.pt").stat().st_ino != (folder / "scheduler.pt").stat().st_ino
        assert load_checkpoint(out).root["optimizer.pt"]["epoch"] == 3, verb


def test_a_dry_run_reads_and_writes_nothing(tmp_path: Path) -> None:
    job = plan_rewrite(FIXTURES / "adamw_train.pt", None, command="remap")
    assert job.output is None
    checkpoint = job.load()
    assert job.select_one(checkpoint).key == "optimizer"
    with pytest.raises(ValueError, match="dry run"):
        job.save(checkpoint)


def test_save_writes_the_kind_and_reports_progress(tmp_path: Path) -> None:
    source = torch.arange(8.0)
    tree = {"w": source, "cast": Deferred(source, torch.float64), "n": 1}
    assert tensor_bytes(tree) == 8 * 4 + 8 * 8  # casts made when written count as theirs
    for name in ("t.pt", "t.safetensors"):
        progress = RecordedProgress()
        output = prepare_output(tmp_path / name, force=False)
        save(output, tree, progress=progress)
        assert progress.started == [tensor_bytes(tree)]
        assert sum(progress.written) >= tensor_bytes(tree)
        back = load_checkpoint(tmp_path / name).root
        assert back["cast"].dtype == torch.float64 and back["n"] == 1


@pytest.mark.parametrize(
    "command", ["move", "convert", "remap", "regenerate", "resume-step", "dcp"]
)
def test_one_progress_protocol_for_every_writing_command(tmp_path: Path, command: str) -> None:
    """Each is told the bytes to write when writing starts, then every write (DCP: torch's
    writer reports none, and is told only the total)."""
    progress = RecordedProgress()
    source, out = FIXTURES / "adamw_train.pt", tmp_path / "out.pt"
    layout = tmp_path / "layout.json"
    if command == "move":
        move_checkpoint(source, out, device="cpu", dtype="bfloat16", progress=progress)
    elif command == "convert":
        convert_checkpoint(source, out, fmt="safetensors", progress=progress)
    elif command == "remap":
        weights = tmp_path / "weights.pt"  # a model state dict is a layout
        torch.save(torch.load(source, weights_only=True)["model"], weights)
        remap_checkpoint(source, weights, out, progress=progress)
    elif command == "regenerate":
        from optckpt.regenerate import regenerate_checkpoint

        layout.write_text(json.dumps({"params": {"w": {"shape": [4, 4]}}}))
        regenerate_checkpoint("adam", layout, out, progress=progress)
    elif command == "resume-step":
        assert resume_step(source, ResumeOptions(out=out), progress=progress).ok
    else:
        out = tmp_path / "dcp"
        convert_checkpoint(source, f"{out}/", progress=progress)
    (total,) = progress.started
    assert total > 0
    assert command == "dcp" or sum(progress.written) >= total


def _model_and_optimizer(path: Path) -> dict[str, Any]:
    """A checkpoint whose model state dict is what torch makes: an OrderedDict whose
    ``_metadata`` gives each module's version (BatchNorm's is 2)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(torch.randn(5, 3)).square().sum().backward()
    opt.step()
    saved = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    torch.save(saved, path)
    return saved


@pytest.mark.parametrize(
    "command",
    ["move", "move --all-tensors", "convert", "convert --keying names", "remap", "resume-step"],
)
def test_every_writing_command_keeps_ordered_dicts_and_their_metadata(
    tmp_path: Path, command: str
) -> None:
    source = tmp_path / "in.pt"
    model_state = _model_and_optimizer(source)["model"]
    assert type(model_state) is OrderedDict and model_state._metadata  # what torch makes
    out = tmp_path / "out.safetensors"
    if command.startswith("move"):
        move_checkpoint(source, out, dtype="float64", all_tensors="--all" in command)
    elif command.startswith("convert"):
        convert_checkpoint(source, out, keying="names" if "keying" in command else None)
    elif command == "remap":
        weights = tmp_path / "weights.pt"
        torch.save(model_state, weights)
        remap_checkpoint(source, weights, out)
    else:
        assert resume_step(source, ResumeOptions(out=out)).ok
    back = tmp_path / "back.pt"  # and through .pt again: safetensors -> pt keeps them too
    convert_checkpoint(out, back)
    for written in (load_checkpoint(out).root, torch.load(back, weights_only=True)):
        assert type(written["model"]) is OrderedDict
        assert written["model"]._metadata == model_state._metadata
        assert list(written["model"]) == list(model_state)
