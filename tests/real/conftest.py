"""Checkpoints written by the real training libraries, made once per test session.

The three producers of :mod:`real.training` run at once, each in a process of its own, the
first time a test asks for one of them. Tests read these files and folders and must not change
them (optckpt never writes its input; tests that write take ``-o`` under their own
``tmp_path``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from .training import produce


@dataclass(frozen=True)
class TrainingOutputs:
    """Where each library wrote.

    Attributes:
        trainer: a transformers ``Trainer`` ``output_dir`` with ``checkpoint-1/`` and
            ``checkpoint-2/``.
        accelerate: an ``Accelerator.save_state`` folder of two models and two optimizers.
        lightning: a Lightning ``.ckpt`` with two optimizers and a StepLR.
    """

    trainer: Path
    accelerate: Path
    lightning: Path


@pytest.fixture(scope="session")
def training_outputs(tmp_path_factory: pytest.TempPathFactory) -> TrainingOutputs:
    root = tmp_path_factory.mktemp("training")
    outputs = TrainingOutputs(root / "trainer", root / "accelerate", root / "gan.ckpt")
    produce(
        [
            ("trainer", outputs.trainer),
            ("accelerate", outputs.accelerate),
            ("lightning", outputs.lightning),
        ]
    )
    return outputs
