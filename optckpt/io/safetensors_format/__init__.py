"""optckpt's safetensors layout for whole checkpoints, and a zero-copy reader.

safetensors stores a flat ``{name: tensor}`` map plus string metadata. A checkpoint is a tree
(dicts, lists, tuples, numbers, strings, tensors), so optckpt stores:

* every tensor under a readable name: its key path, with optimizer state named the way
  torch.distributed.checkpoint flattens it, ``<key path>.state.<param name or ID>.<state key>``;
* the tree itself as JSON in the metadata key ``optckpt.tree``, each tensor replaced by
  ``{"__tensor__": name}``. Values JSON cannot hold exactly are tagged: tuples
  (``__tuple__``), dicts with non-string keys (``__dict__``: a list of pairs), non-finite floats
  (``__float__``), ``torch.dtype`` (``__dtype__``) and ``torch.device`` (``__device__``).

The names are for people and other tools; reading uses only the tree, so dotted parameter
names never have to be split back.

Reading parses the header itself and maps the file with ``mmap`` (copy-on-write), so tensors
are views of the file that cost no memory until their values are read, like
``torch.load(mmap=True)``. A file is untrusted input: every header field is checked, by
safetensors' own rules, before any tensor is made (:func:`read_header`), and each tag of the
tree decodes only to a value of its own kind (:class:`_TreeDecoder`); anything else is one
:class:`~optckpt.errors.UnreadableCheckpointError` naming the file and the entry.
"""

from typing import TYPE_CHECKING

from optckpt.io.safetensors_format.header import looks_like_safetensors, read_header
from optckpt.io.safetensors_format.tree import DEVICES_KEY, TREE_KEY, VERSION, VERSION_KEY
from optckpt.lazy import lazy_attributes

if TYPE_CHECKING:
    from optckpt.io.safetensors_format.reader import load_tensors, read_safetensors
    from optckpt.io.safetensors_format.writer import check_storable, write_safetensors

# Imported when first used: they import torch, and reading a header does not need it.
_LAZY = {
    "load_tensors": "reader",
    "read_safetensors": "reader",
    "check_storable": "writer",
    "write_safetensors": "writer",
}


__getattr__ = lazy_attributes(__name__, _LAZY)

__all__ = [
    "DEVICES_KEY",
    "TREE_KEY",
    "VERSION",
    "VERSION_KEY",
    "check_storable",
    "load_tensors",
    "looks_like_safetensors",
    "read_header",
    "read_safetensors",
    "write_safetensors",
]
