"""Attributes of a package loaded when first used (PEP 562), so that importing the package
does not import torch: the command line starts fast, and ``inspect`` never imports it."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_attributes"]


def lazy_attributes(package: str, where: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports each name from its module when
    first asked for.

    Args:
        package: the package's ``__name__``.
        where: each lazy name's module, relative to ``package`` (``"reader"``) or absolute
            (``"optckpt.layout"``).

    Returns:
        The function to assign to the package's ``__getattr__``; it raises
        :class:`AttributeError` for any other name, as Python does.
    """

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        full = module if module.startswith("optckpt.") else f"{package}.{module}"
        return getattr(importlib.import_module(full), name)

    return __getattr__
