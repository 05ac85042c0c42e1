"""Optimizer state that only a process group can read: sharded tensors saved with torch.save."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from optckpt.errors import UnsafeCheckpointError

# Modules whose classes make up sharded tensors: DTensor with its placements, spec and
# device mesh (FSDP2, tensor parallelism), and FSDP1's ShardedTensor.
_SHARDED = (
    "torch.distributed.tensor.",
    "torch.distributed._tensor.",
    "torch.distributed._shard.sharded_tensor.",
    "torch.distributed.device_mesh.",
)


def sharded_state_error(path: Path, names: Iterable[str]) -> UnsafeCheckpointError | None:
    """The error for a torch file whose pickle names sharded tensors (``DTensor``,
    ``ShardedTensor``), or ``None``; ``names`` are the globals the pickle names.

    ``opt.state_dict()`` of an FSDP2 model holds this rank's shard of every tensor, as
    ``DTensor``\\ s tied to a device mesh and its process group: no ``--allow-global`` makes
    that a whole optimizer state offline, so the message says how to save a readable one.
    """
    sharded = [n for n in names if n.startswith(_SHARDED)]
    if not sharded:
        return None
    kind = "ShardedTensor" if any("sharded_tensor" in n for n in sharded) else "DTensor"
    return UnsafeCheckpointError(
        f"{path}: holds sharded tensors ({kind}: one rank's shard of each, as opt.state_dict() "
        "of an FSDP2 or tensor-parallel model returns them), which cannot be read without the "
        "process group that saved them; save a readable checkpoint instead: on every rank "
        "get_optimizer_state_dict(model, optimizer, options=StateDictOptions("
        "full_state_dict=True, cpu_offload=True)) from torch.distributed.checkpoint.state_dict, "
        "then torch.save on rank 0; or save a DCP folder with torch.distributed.checkpoint.save, "
        "which optckpt reads",
        sharded,
    )
