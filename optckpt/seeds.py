"""The seeds ``regenerate --seed`` and ``resume-step --seed`` take, declared once.

Without torch, so that the command line can bound its ``--seed`` options at import time and
``optckpt --help`` stays instant; :mod:`optckpt.synthetic` draws from these seeds.
"""

from __future__ import annotations

from optckpt.errors import UsageError

MAX_SEED = 2**64 - 2
"""The largest seed: the gradients' generator is seeded with ``seed + 1``, below 2**64."""


def check_seed(seed: int) -> int:
    """``seed`` if it is one :mod:`optckpt.synthetic` can draw from.

    Raises:
        UsageError: below 0 or above :data:`MAX_SEED`.
    """
    if not 0 <= seed <= MAX_SEED:
        raise UsageError(f"--seed must be between 0 and {MAX_SEED}, not {seed}")
    return seed
