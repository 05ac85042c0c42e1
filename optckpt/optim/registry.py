"""The bundled optimizers by name: ``by_name("adamw")`` is :class:`~optckpt.optim.AdamW`.

To bundle a new optimizer, import its class here and add it to ``_BUNDLED``; names are the
torch class names (``SGD``, ``AdamW``) and are looked up case-insensitively.
"""

from __future__ import annotations

import difflib
from typing import Any

from optckpt.errors import IncompatibleStateError
from optckpt.optim.adadelta import Adadelta
from optckpt.optim.adafactor import Adafactor
from optckpt.optim.adagrad import Adagrad
from optckpt.optim.adam import Adam
from optckpt.optim.adamax import Adamax
from optckpt.optim.adamw import AdamW
from optckpt.optim.asgd import ASGD
from optckpt.optim.base import Optimizer
from optckpt.optim.lbfgs import LBFGS
from optckpt.optim.muon import Muon
from optckpt.optim.nadam import NAdam
from optckpt.optim.radam import RAdam
from optckpt.optim.rmsprop import RMSprop
from optckpt.optim.rprop import Rprop
from optckpt.optim.sgd import SGD
from optckpt.optim.sparse_adam import SparseAdam
from optckpt.optim.specs import spec_of

__all__ = ["UnknownOptimizerError", "by_name", "defaults", "names"]

# In the order of DESIGN.md's list of bundled optimizers.
_BUNDLED: tuple[type[Optimizer], ...] = (
    SGD,
    Adam,
    AdamW,
    Adagrad,
    Adadelta,
    Adamax,
    ASGD,
    NAdam,
    RAdam,
    RMSprop,
    Rprop,
    SparseAdam,
    Adafactor,
    LBFGS,
    Muon,
)
_BY_LOWER_NAME: dict[str, type[Optimizer]] = {cls.__name__.lower(): cls for cls in _BUNDLED}


class UnknownOptimizerError(IncompatibleStateError):
    """No bundled optimizer has the requested name (exit code 4, as any incompatible state)."""


def names() -> list[str]:
    """The bundled optimizers' names, spelled as torch spells the classes (``"AdamW"``)."""
    return [cls.__name__ for cls in _BUNDLED]


def by_name(name: str) -> type[Optimizer]:
    """The bundled optimizer class called ``name``, case-insensitively.

    Args:
        name: a torch optimizer class name, such as ``"adamw"`` or ``"SGD"``.

    Returns:
        The optckpt class, e.g. :class:`optckpt.optim.AdamW`.

    Raises:
        UnknownOptimizerError: no bundled optimizer has that name; the message lists the known
            names and the closest match.
    """
    found = _BY_LOWER_NAME.get(name.strip().lower())
    if found is not None:
        return found
    close = difflib.get_close_matches(name.strip().lower(), list(_BY_LOWER_NAME), n=1)
    hint = f"; did you mean {_BY_LOWER_NAME[close[0]].__name__}?" if close else ""
    raise UnknownOptimizerError(f"unknown optimizer {name!r}{hint} (known: {', '.join(names())})")


def defaults(cls: type[Optimizer]) -> dict[str, Any]:
    """The default hyperparameters of a bundled optimizer class: the keys of its groups
    (from :mod:`optckpt.optim.specs`)."""
    spec = spec_of(cls.__name__)
    if spec is None:
        raise UnknownOptimizerError(f"{cls.__name__} is not a torch.optim class")
    return dict(spec.defaults)
