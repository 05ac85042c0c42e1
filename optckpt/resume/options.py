"""What a resume step takes besides the checkpoint: ``resume-step``'s flags as one record,
checked once and then carried (torch's ``StateDictOptions`` is the model)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optckpt.errors import UsageError
from optckpt.seeds import check_seed


@dataclass(frozen=True)
class ResumeOptions:
    """The options of :func:`~optckpt.resume.resume_step` and
    :func:`~optckpt.resume.resume_each`.

    Attributes:
        key: the key path of the optimizer state dict, when the file holds several.
        optimizer: the bundled optimizer's name; guessed from the state when ``None``.
        model: a file with the model weights, when the checkpoint has none.
        steps: steps to take (1 or more).
        seed: seeds the gradients (and stand-in parameters); see :mod:`optckpt.synthetic`.
        check_torch: take the same steps with ``torch.optim`` and compare.
        atol: with ``check_torch``, accept differences up to ``atol`` instead of bitwise.
        out: write the checkpoint after the steps here (only when every check passed).
        force: overwrite ``out``.
        link: a training folder's other files are hard-linked into ``out``, not copied.
        allow_globals: pickle globals to let through (see :func:`optckpt.io.load_checkpoint`).
        from_layout: the layout the checkpoint was saved with (``--from``: a path or a
            :class:`~optckpt.layout.Layout`), to name the IDs of a state dict without
            ``param_names`` (see :mod:`optckpt.names`).
    """

    key: str | None = None
    optimizer: str | None = None
    model: str | Path | None = None
    steps: int = 1
    seed: int = 0
    check_torch: bool = False
    atol: float | None = None
    out: str | Path | None = None
    force: bool = False
    link: bool = False
    allow_globals: Iterable[str] = ()
    from_layout: str | Path | Any | None = None

    def check(self) -> None:
        """Refuse options out of range, before anything is read.

        Raises:
            UsageError: names the option and what it takes.
        """
        if self.steps < 1:
            raise UsageError(f"--steps must be 1 or more, not {self.steps}")
        check_seed(self.seed)
        if self.atol is not None and not self.check_torch:
            raise UsageError("--atol applies to --check-torch")
        if self.atol is not None and not self.atol >= 0:
            raise UsageError(f"--atol must be 0 or more, not {self.atol}")
