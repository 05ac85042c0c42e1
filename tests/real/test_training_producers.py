"""The training-library producers themselves: each writes what its library documents, and
resumes from it (so the resume checks that other tests run on optckpt's output can fail)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import TrainingOutputs
from .training import resume

pytestmark = pytest.mark.slow


def test_trainer_writes_a_checkpoint_per_step(training_outputs: TrainingOutputs) -> None:
    folders = sorted(p.name for p in training_outputs.trainer.iterdir())
    assert folders == ["checkpoint-1", "checkpoint-2"]
    names = {p.name for p in (training_outputs.trainer / "checkpoint-2").iterdir()}
    assert {"optimizer.pt", "scheduler.pt", "model.safetensors", "trainer_state.json"} <= names


def test_accelerate_writes_one_file_per_optimizer(training_outputs: TrainingOutputs) -> None:
    names = {p.name for p in training_outputs.accelerate.iterdir()}
    assert {"optimizer.bin", "optimizer_1.bin", "model.safetensors", "model_1.safetensors"} <= names


@pytest.mark.parametrize("kind", ["trainer", "accelerate", "lightning"])
def test_each_library_resumes_its_own_output(training_outputs: TrainingOutputs, kind: str) -> None:
    path = {
        "trainer": training_outputs.trainer / "checkpoint-2",
        "accelerate": training_outputs.accelerate,
        "lightning": training_outputs.lightning,
    }[kind]
    result = resume(kind, path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("resumed")


def test_resume_fails_on_a_broken_checkpoint(
    training_outputs: TrainingOutputs, tmp_path: Path
) -> None:
    # The resume check can fail: an accelerate folder without its second optimizer.
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(training_outputs.accelerate, broken)
    (broken / "optimizer_1.bin").unlink()
    assert resume("accelerate", broken).returncode != 0
