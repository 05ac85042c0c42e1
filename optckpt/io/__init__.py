"""Reading (and, for the writing commands, writing) checkpoint files."""

from optckpt.io.read import Checkpoint, load_checkpoint

__all__ = ["Checkpoint", "load_checkpoint"]
