"""Every writing command on the folders real training libraries write, each output resumed by
the library that wrote the input (issue 15: folders in, folders out).

The commands run once per module through the CLI, on the session's Trainer ``output_dir``
(read as its newest ``checkpoint-N``) and Accelerate ``save_state`` folder (two optimizers):
``convert`` of the Trainer run; ``move --dtype bfloat16`` of the Accelerate folder; ``remap``
of one of its optimizers then ``resume-step -o`` (both optimizers, no ``--key``) on that; and
``resume-step -o`` of the Lightning GAN (two optimizers in one ``.ckpt``, each stepping its
own modules' weights).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from checks import assert_bitwise_equal, folder_digests
from typer.testing import CliRunner, Result

from optckpt.cli.app import app

from .conftest import TrainingOutputs
from .training import resume

pytestmark = pytest.mark.slow

runner = CliRunner()


@dataclass(frozen=True)
class Written:
    """What the commands wrote, what they printed, and the inputs' digests before."""

    trainer: Path  # convert of the Trainer output_dir
    moved: Path  # move --dtype bfloat16 of the Accelerate folder
    stepped: Path  # remap of optimizer_1.bin, then resume-step -o of both optimizers
    gan: Path  # resume-step -o of the Lightning GAN's two optimizers
    results: dict[str, Result]
    before: dict[str, dict[str, str]]


def _ok(result: Result) -> Result:
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def written(training_outputs: TrainingOutputs, tmp_path_factory: pytest.TempPathFactory) -> Written:
    inputs = {"trainer": training_outputs.trainer, "accelerate": training_outputs.accelerate}
    before = {name: folder_digests(path) for name, path in inputs.items()}
    before["lightning"] = folder_digests(training_outputs.lightning)
    out = tmp_path_factory.mktemp("written")
    layout = out / "linear.json"  # the second model of the Accelerate run: nn.Linear(2, 3)
    layout.write_text(json.dumps({"params": {"weight": {"shape": [3, 2]}, "bias": {"shape": [3]}}}))
    acc = str(training_outputs.accelerate)
    remap = ["--key", "optimizer_1.bin", "--from", str(layout), "--to", str(layout)]
    results = {
        "convert": runner.invoke(
            app, ["convert", str(training_outputs.trainer), "-o", str(out / "trainer"), "--json"]
        ),
        "move": runner.invoke(
            app, ["move", acc, "--dtype", "bfloat16", "--link", "-o", str(out / "moved")]
        ),
        "remap": runner.invoke(app, ["remap", acc, *remap, "-o", str(out / "remapped")]),
    }
    results["resume-step"] = runner.invoke(
        app, ["resume-step", str(out / "remapped"), "--json", "-o", str(out / "stepped")]
    )
    results["resume-step gan"] = runner.invoke(
        app, ["resume-step", str(training_outputs.lightning), "-o", str(out / "gan.ckpt")]
    )
    return Written(
        out / "trainer", out / "moved", out / "stepped", out / "gan.ckpt", results, before
    )


def test_each_command_writes_a_folder(written: Written, training_outputs: TrainingOutputs) -> None:
    for result in written.results.values():
        _ok(result)
    converted = json.loads(written.results["convert"].stdout)
    newest = training_outputs.trainer / "checkpoint-2"
    assert converted["format"] == "folder" and any(str(newest) in n for n in converted["notes"])
    stepped = json.loads(written.results["resume-step"].stdout)
    keys = [(r["key"], r["ok"]) for r in stepped["results"]]
    assert keys == [("optimizer.bin", True), ("optimizer_1.bin", True)]
    for folder, source, linked in (
        (written.trainer, newest, False),
        (written.moved, training_outputs.accelerate, True),  # --link
        (written.stepped, training_outputs.accelerate, False),
    ):
        names = {p.name for p in source.iterdir()}
        assert {p.name for p in folder.iterdir()} == names
        for name in names - {"optimizer.pt", "optimizer.bin", "optimizer_1.bin"}:
            # carried over as copies of their own, or with --link as hard links (tmp_path is
            # one file system)
            assert (folder / name).read_bytes() == (source / name).read_bytes(), name
            same_file = (folder / name).stat().st_ino == (source / name).stat().st_ino
            assert same_file == linked, name


def test_every_optimizer_of_the_gan_steps_its_own_weights(
    written: Written, training_outputs: TrainingOutputs
) -> None:
    lines = _ok(written.results["resume-step gan"]).stdout.splitlines()
    assert lines[-1] == "ok"
    before = torch.load(training_outputs.lightning, weights_only=False)["state_dict"]
    after = torch.load(written.gan, weights_only=False)["state_dict"]
    moved = {name.split(".")[0] for name in before if not torch.equal(before[name], after[name])}
    assert moved == {"generator", "discriminator"}


def test_remap_of_one_optimizer_keeps_the_other_as_it_was(
    written: Written, training_outputs: TrainingOutputs
) -> None:
    # remap --key optimizer_1.bin rewrites every optimizer file of the folder (each as
    # torch.save writes it): optimizer.bin, not remapped, must load as the input's did;
    # optimizer_1.bin, remapped from the layout to itself, keeps its state (its groups gain
    # the layout's param_names)
    remapped = written.stepped.parent / "remapped"

    def load(folder: Path, name: str) -> dict:
        return torch.load(folder / name, weights_only=True)

    assert_bitwise_equal(
        load(remapped, "optimizer.bin"), load(training_outputs.accelerate, "optimizer.bin")
    )
    assert_bitwise_equal(
        load(remapped, "optimizer_1.bin")["state"],
        load(training_outputs.accelerate, "optimizer_1.bin")["state"],
    )


def test_the_inputs_are_untouched(written: Written, training_outputs: TrainingOutputs) -> None:
    assert folder_digests(training_outputs.trainer) == written.before["trainer"]
    assert folder_digests(training_outputs.accelerate) == written.before["accelerate"]
    assert folder_digests(training_outputs.lightning) == written.before["lightning"]


@pytest.mark.parametrize(
    ("kind", "which"),
    [
        ("trainer", "trainer"),
        ("accelerate", "moved"),
        ("accelerate", "stepped"),
        ("lightning", "gan"),
    ],
)
def test_the_library_resumes_what_optckpt_wrote(written: Written, kind: str, which: str) -> None:
    result = resume(kind, getattr(written, which))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("resumed")
