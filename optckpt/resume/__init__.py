"""Take a verified resume step: load a checkpoint's optimizer state, step it, check it.

:func:`resume_step` rebuilds the parameters (from the model weights in the checkpoint or a
``--model`` file, matched by the names :mod:`optckpt.names` gives: the keys of a name-keyed
state dict, ``param_names``, a ``--from`` layout, or an alignment with the weights that must
be the only one possible; seeded stand-ins with the state's shapes when there are no
weights), loads the state into the
bundled optimizer through optckpt's core, takes N steps on seeded synthetic gradients
(:mod:`optckpt.synthetic`), and reports each check. With ``check_torch`` the same steps are
taken by the matching ``torch.optim`` class from a fresh read of the same checkpoint, and
the two results are compared. :func:`resume_each` does it for every optimizer state dict of
a checkpoint that holds several (an Accelerate folder of two models, a Lightning GAN).
"""

from __future__ import annotations

from optckpt.resume.options import ResumeOptions
from optckpt.resume.report import Check, GroupUpdate, ResumeReport, ResumeRun
from optckpt.resume.step import resume_each, resume_step

__all__ = [
    "Check",
    "GroupUpdate",
    "ResumeOptions",
    "ResumeReport",
    "ResumeRun",
    "resume_each",
    "resume_step",
]
