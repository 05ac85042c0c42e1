"""The one JSON form of every value optckpt reports (inspect, diff, remap, resume-step, the
companions): plain Python, torch-free (tensors are recognised by duck typing), non-finite
floats as DESIGN's strings."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from typing import Any

from optckpt.described import dtype_name, is_tensor

__all__ = ["jsonable"]


def jsonable(value: Any) -> Any:
    """A JSON-safe form of a hyperparameter or state value.

    Tuples become lists, 0-dim tensors numbers, other tensors their shape/dtype/device, and
    non-finite floats the strings ``"nan"``, ``"inf"``, ``"-inf"`` (JSON has no such numbers),
    a ``Counter`` (MultiStepLR's milestones) its elements sorted, each repeated as counted.
    """
    if isinstance(value, Counter):
        return sorted(jsonable(v) for v in value.elements())
    if is_tensor(value):
        if value.dim() == 0 and value.device.type != "meta":
            return jsonable(value.item())
        return {
            "shape": list(value.shape),
            "dtype": dtype_name(value.dtype),
            "device": str(value.device),
        }
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return repr(value)
