"""optckpt's own reimplementations of the torch optimizers, and the optimizer guesser.

Every bundled optimizer matches its ``torch.optim`` class of the installed torch: constructor
signature, defaults, validation (same exception types), param-group keys, state keys and
dtypes, ``state_dict()`` output, and steps bit for bit on the CPU (float32 and float64, with
``foreach`` on or off; ``fused=True`` runs torch's own fused ATen kernel).

Adding one (``optckpt/optim/sgd.py`` is the model, ``adam.py`` the one with a ``step`` state):

1. ``optckpt/optim/<name>.py`` with a subclass of :class:`~optckpt.optim.base.Optimizer`:
   ``__init__`` validates in torch's order and calls ``super().__init__``; what torch's
   ``__setstate__`` does is declared in ``_GROUP_KEY_DEFAULTS`` (the newer group keys) and
   ``_NUMBER_STATE_KEYS`` (state torch < 1.12 saved as Python numbers); ``_init_group``
   creates state lazily as torch does (the base's ``_params_with_grad`` is its opening loop).
   Where torch's ``step`` is the usual loop over groups (``_init_group``, then the
   functional), subclass :class:`~optckpt.optim._group_step.GroupStepOptimizer` and declare
   the state lists and the functional (``defaults`` and the step's keywords are built from the
   group keys that ``specs.SPECS`` declares, step 3); else write ``step``: it opens with
   :func:`~optckpt.optim.base.evaluate_closure`, is decorated with
   :func:`~optckpt.optim.base.use_grad_for_differentiable` (or ``torch.no_grad()`` where torch
   uses that) and gets the step hooks from the base class automatically.
2. Functions named as torch names them: ``_single_tensor_<name>``, ``_multi_tensor_<name>``
   (and ``_fused_<name>``) run torch's ops in torch's order, and ``<name>`` picks one as
   torch's functional API does, so that a torch upgrade diffs function by function against
   ``torch/optim/<name>.py``. Never call ``torch.optim`` code; the helpers in ``base`` mirror
   torch's private ones (``group_tensors_by_device_and_dtype``, ``to_scalar``, ...), and
   those in ``_functional`` the blocks torch repeats in every module (the capturable device
   check, the foreach step increment, ...).
3. Register the class in ``registry._BUNDLED`` and export it here; declare its facts (state
   keys and how their shapes follow the parameter's, group defaults, ...) in
   ``specs.SPECS``, which ``tests/optim/test_specs.py`` checks against ``torch.optim``.
4. Add a ``Row`` to ``ROWS`` in ``tests/optim/test_parity.py``: the torch class, ours, option
   sets, hyperparameters for two extra groups, the arguments torch rejects, and which
   implementations it has.
"""

from typing import TYPE_CHECKING

from optckpt.lazy import lazy_attributes
from optckpt.optim.guess import Guess, guess_optimizer

if TYPE_CHECKING:
    from optckpt.optim.adadelta import Adadelta
    from optckpt.optim.adafactor import Adafactor
    from optckpt.optim.adagrad import Adagrad
    from optckpt.optim.adam import Adam
    from optckpt.optim.adamax import Adamax
    from optckpt.optim.adamw import AdamW
    from optckpt.optim.asgd import ASGD
    from optckpt.optim.base import Optimizer
    from optckpt.optim.lbfgs import LBFGS
    from optckpt.optim.muon import Muon
    from optckpt.optim.nadam import NAdam
    from optckpt.optim.radam import RAdam
    from optckpt.optim.registry import UnknownOptimizerError, by_name, names
    from optckpt.optim.rmsprop import RMSprop
    from optckpt.optim.rprop import Rprop
    from optckpt.optim.sgd import SGD
    from optckpt.optim.sparse_adam import SparseAdam

# The optimizers import torch; the facts (specs) and the guess do not, and `optckpt inspect`
# reads only those. So the optimizers are imported when first used.
_LAZY = {
    "Adadelta": "adadelta",
    "Adafactor": "adafactor",
    "Adagrad": "adagrad",
    "Adam": "adam",
    "Adamax": "adamax",
    "AdamW": "adamw",
    "ASGD": "asgd",
    "Optimizer": "base",
    "LBFGS": "lbfgs",
    "Muon": "muon",
    "NAdam": "nadam",
    "RAdam": "radam",
    "UnknownOptimizerError": "registry",
    "by_name": "registry",
    "names": "registry",
    "RMSprop": "rmsprop",
    "Rprop": "rprop",
    "SGD": "sgd",
    "SparseAdam": "sparse_adam",
}


__getattr__ = lazy_attributes(__name__, _LAZY)

__all__ = [
    "ASGD",
    "LBFGS",
    "SGD",
    "Adadelta",
    "Adafactor",
    "Adagrad",
    "Adam",
    "AdamW",
    "Adamax",
    "Guess",
    "Muon",
    "NAdam",
    "Optimizer",
    "RAdam",
    "RMSprop",
    "Rprop",
    "SparseAdam",
    "UnknownOptimizerError",
    "by_name",
    "guess_optimizer",
    "names",
]
