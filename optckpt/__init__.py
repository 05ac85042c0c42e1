"""optckpt: inspect, diff, remap, move and convert PyTorch optimizer checkpoints."""

__version__ = "0.1.0"
