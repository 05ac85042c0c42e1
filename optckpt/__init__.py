"""optckpt: inspect, diff, remap, move and convert PyTorch optimizer checkpoints.

The Python API is loaded lazily (``import optckpt`` does not import torch), so the command
line starts fast:

* ``optckpt.remap(state_dict, to=layout, source=None, rename=[...])`` -> ``(state_dict, plan)``
* ``optckpt.layout_of(model, optimizer)``, ``optckpt.save_layout(model, optimizer, path)``,
  ``optckpt.load_layout(path)``
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "remap": ("optckpt.remapping", "remap"),
    "layout_of": ("optckpt.layout", "layout_of"),
    "save_layout": ("optckpt.layout", "save_layout"),
    "load_layout": ("optckpt.layout", "load_layout"),
    "Layout": ("optckpt.layout", "Layout"),
}

__all__ = ["Layout", "__version__", "layout_of", "load_layout", "remap", "save_layout"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'optckpt' has no attribute {name!r}")
