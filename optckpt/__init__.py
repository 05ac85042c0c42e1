"""optckpt: inspect, diff, remap, move and convert PyTorch optimizer checkpoints.

The Python API is loaded lazily (``import optckpt`` does not import torch), so the command
line starts fast:

* ``optckpt.remap(state_dict, to=layout, source=None, rename=[...])`` -> ``(state_dict, plan)``
* ``optckpt.layout_of(model, optimizer)``, ``optckpt.save_layout(model, optimizer, path)``,
  ``optckpt.load_layout(path)``
"""

from __future__ import annotations

from optckpt.lazy import lazy_attributes

__version__ = "0.1.0"

_LAZY = {
    "remap": "optckpt.remapping",
    "layout_of": "optckpt.layout",
    "save_layout": "optckpt.layout",
    "load_layout": "optckpt.layout",
    "Layout": "optckpt.layout",
}

__all__ = ["Layout", "__version__", "layout_of", "load_layout", "remap", "save_layout"]


__getattr__ = lazy_attributes(__name__, _LAZY)
