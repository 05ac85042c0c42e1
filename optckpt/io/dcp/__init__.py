"""``torch.distributed.checkpoint`` folders: read safely, without a process group, and written
with torch's own ``FileSystemWriter`` (DESIGN.md, "Distributed checkpoints").

* :mod:`~optckpt.io.dcp.unpickle`: ``.metadata`` and the chunks' pickles, unpickled into
  optckpt's own records with nothing imported or called;
* :mod:`~optckpt.io.dcp.storage`: the ``.distcp`` files, memory-mapped; bytes entries and
  tensor chunks read in place;
* :mod:`~optckpt.io.dcp.tensors`: tensors made from their chunks (placeholders, real, or
  assembled only when written);
* :mod:`~optckpt.io.dcp.tree`: DCP's flat keys back into a tree, optimizers name-keyed;
* :mod:`~optckpt.io.dcp.reader`: :func:`read_dcp`.
"""

from pathlib import Path
from typing import TYPE_CHECKING

from optckpt.io.dcp.sharded import sharded_state_error
from optckpt.lazy import lazy_attributes

if TYPE_CHECKING:
    from optckpt.io.dcp.reader import DcpCheckpoint, TensorLayout, read_dcp

METADATA = ".metadata"


def is_dcp(path: str | Path) -> bool:
    """Whether ``path`` is a folder that ``torch.distributed.checkpoint`` wrote."""
    path = Path(path)
    return path.is_dir() and (path / METADATA).is_file()


# The reader imports torch; telling a DCP folder apart does not, nor does inspect's own path.
_LAZY = {"DcpCheckpoint", "TensorLayout", "read_dcp"}


__getattr__ = lazy_attributes(__name__, dict.fromkeys(_LAZY, "reader"))

__all__ = ["DcpCheckpoint", "TensorLayout", "is_dcp", "read_dcp", "sharded_state_error"]
