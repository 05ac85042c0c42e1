"""The training state around the optimizer: LR schedulers, GradScalers, trainer counters.

Found by shape (:mod:`~optckpt.companions.find`, with the scheduler class guessed from its
keys, :mod:`~optckpt.companions.kinds`), summarized (:mod:`~optckpt.companions.summary`) and
checked against the optimizer they drive (:mod:`~optckpt.companions.checks`) for ``inspect``
(:mod:`~optckpt.companions.report`). Every module here is plain Python, without torch, so
``inspect`` can show companions on its torch-free path.
"""

from optckpt.companions.find import Companion, find_in_folder, find_in_tree
from optckpt.companions.kinds import guess_scheduler, is_scaler_state, is_scheduler_state
from optckpt.companions.report import (
    CompanionReport,
    checkpoint_companions,
    find_companions,
    report_companion,
    report_companions,
)

__all__ = [
    "Companion",
    "CompanionReport",
    "checkpoint_companions",
    "find_companions",
    "find_in_folder",
    "find_in_tree",
    "guess_scheduler",
    "is_scaler_state",
    "is_scheduler_state",
    "report_companion",
    "report_companions",
]
