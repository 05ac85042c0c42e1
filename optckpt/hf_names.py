"""Names for a Hugging Face Trainer folder: its model built from ``config.json``, without weights.

A Trainer's optimizer has two groups (weight decay, no weight decay) without ``param_names``,
and the folder's ``model.safetensors`` keeps its tensors sorted by name, so neither names the
parameters. :func:`config_model` builds the model the folder's ``config.json`` describes on the
meta device (no weights are read or allocated, nothing is downloaded) with the installed
``transformers``, and returns its ``named_parameters()`` in order (a tied weight once, as
``named_parameters()`` yields it) and the groups ``Trainer.create_optimizer`` builds from them:
the parameters ``Trainer.get_decay_parameter_names`` lists, then the others, each in model order.
:mod:`optckpt.names` accepts them only where every state shape fits (names source
``"model config"``).

Nothing a config names is ever run: a config with ``auto_map`` (custom code, which
``trust_remote_code=True`` would import) gets no names, and only model classes that
``transformers`` itself maps to the config's ``model_type`` are built. ``transformers`` is
imported only here, and only when a folder with a ``config.json`` needs names (importing it
takes seconds); without it, :func:`config_model` says how to install it.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "CONFIG_FILE",
    "INSTALL_HINT",
    "WEIGHT_FILES",
    "ModelParams",
    "NoNames",
    "config_model",
    "from_model",
]

CONFIG_FILE = "config.json"
# The files save_pretrained writes the weights to (unsharded), safetensors first.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INSTALL_HINT = "pip install 'optckpt[hf]'"
_MAX_CONFIG_BYTES = 16 << 20  # a config.json is kilobytes; refuse to parse a huge one


def max_parameters(ids: int) -> int:
    """The most parameters a model built to name ``ids`` parameter IDs may register before
    building stops: a Trainer's optimizer holds every trainable parameter, so a model that
    names them has not many more (frozen ones); a hostile ``config.json``
    (``num_hidden_layers: 10**9``) would otherwise build for hours, tens of seconds per
    100,000 parameters even on the meta device."""
    return 8 * ids + 4096


Shape = tuple[int, ...]


@dataclass(frozen=True)
class ModelParams:
    """A model's parameters as ``named_parameters()`` yields them, and its optimizer's groups.

    Attributes:
        params: ``(name, shape)`` in ``named_parameters()`` order.
        groups: the names of each param group its trainer builds, each in model order
            (Trainer: the weight-decay parameters, then the others).
        where: what it was built from, in words (for reports).
    """

    params: tuple[tuple[str, Shape], ...]
    groups: tuple[tuple[str, ...], ...]
    where: str


_cache: dict[tuple[str, int, int, int], tuple[ModelParams | None, str | None]] = {}


def config_model(folder: Path, ids: int) -> tuple[ModelParams | None, str | None]:
    """The model of ``folder/config.json`` and its Trainer groups, or why there is none.

    Args:
        folder: the checkpoint folder.
        ids: how many parameter IDs the names are for (bounds the model built:
            :func:`max_parameters`).

    Returns:
        ``(params, None)``, or ``(None, note)`` saying why not (no transformers, custom code,
        an unknown model class, a config transformers cannot build); ``(None, None)`` when
        the folder has no ``config.json``.
    """
    config = folder / CONFIG_FILE
    try:
        stat = config.stat()
    except OSError:
        return None, None
    key = (str(config.resolve()), stat.st_mtime_ns, stat.st_size, max_parameters(ids))
    if key not in _cache:
        _cache[key] = _build(config, stat.st_size, ids)
    return _cache[key]


def _build(config: Path, size: int, ids: int) -> tuple[ModelParams | None, str | None]:
    unnamed = f"{config} describes the model, but its parameters stay unnamed"
    if size > _MAX_CONFIG_BYTES:
        return None, f"{unnamed}: the file is {size} bytes, too large for a config"
    try:
        data = json.loads(config.read_bytes())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        return None, f"{unnamed}: cannot read it ({type(e).__name__})"
    if not isinstance(data, dict):
        return None, f"{unnamed}: not a JSON object"
    if "auto_map" in data:
        # trust_remote_code=True would import the code auto_map names; optckpt never does.
        return None, (
            f"{unnamed}: it names custom model code (auto_map), which optckpt never runs; "
            "name them with --from OLD_LAYOUT"
        )
    try:
        import transformers  # noqa: F401  (seconds to import: only here, only when needed)
    except ImportError:
        return None, (
            f"{config} describes the model: with transformers installed "
            f"(`{INSTALL_HINT}`), optckpt names the parameters from it"
        )
    except Exception as e:  # an installed transformers that fails to import (a broken env)
        return None, f"{unnamed}: transformers failed to import ({type(e).__name__}: {e})"
    model_type, architectures = data.get("model_type"), data.get("architectures")
    if not isinstance(architectures, list) or not architectures:
        return None, f"{unnamed}: it names no model class (architectures)"
    arch = architectures[0]
    with _quiet():
        cls, why = _model_class(model_type, arch)
        if cls is None:
            return None, f"{unnamed}: {why}"
        try:
            where = f"{config} ({arch}, built without weights)"
            return _params(cls, data, str(model_type), where, max_parameters(ids)), None
        except _TooLarge:
            return None, (
                f"{unnamed}: the model it describes has over {max_parameters(ids)} "
                f"parameters, too many to be the one of {ids} parameter IDs (building stopped)"
            )
        except Exception as e:  # transformers' own failure on a config it cannot build
            detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            return None, f"{unnamed}: transformers cannot build {arch} from it ({detail})"


def _model_class(model_type: Any, arch: Any) -> tuple[Any, str]:
    """The model class ``arch`` of transformers, only where transformers maps ``model_type``
    to it (so nothing but transformers' own model classes is ever looked up)."""
    from transformers.models.auto import configuration_auto, modeling_auto

    if not isinstance(model_type, str) or model_type not in configuration_auto.CONFIG_MAPPING:
        return None, f"transformers {_version()} knows no model_type {model_type!r}"
    known: set[str] = set()
    for name in dir(modeling_auto):
        mapping = getattr(modeling_auto, name)
        if name.endswith("_MAPPING_NAMES") and isinstance(mapping, dict):
            found = mapping.get(model_type)
            known.update([found] if isinstance(found, str) else found or ())
    if not isinstance(arch, str) or arch not in known:
        return None, f"transformers {_version()} has no model class {arch!r} for {model_type!r}"
    import transformers

    try:
        return getattr(transformers, arch), ""
    except Exception as e:  # in transformers' auto mappings, but not importable
        return None, f"transformers {_version()} cannot import its model class {arch!r} ({e})"


class _TooLarge(Exception):
    """A model registered more parameters than :func:`max_parameters` allows."""


@contextmanager
def _at_most(limit: int) -> Iterator[None]:
    """Raise :class:`_TooLarge` in a model's ``__init__`` once it registers its
    ``limit + 1``-th parameter (torch's global parameter registration hook)."""
    from torch.nn.modules.module import register_module_parameter_registration_hook

    count = 0

    def counted(module: Any, name: str, param: Any) -> None:
        nonlocal count
        count += 1
        if count > limit:
            raise _TooLarge

    handle = register_module_parameter_registration_hook(counted)
    try:
        yield
    finally:
        handle.remove()


def _params(cls: Any, data: dict[str, Any], model_type: str, where: str, limit: int) -> ModelParams:
    import torch
    from transformers import Trainer
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config = CONFIG_MAPPING[model_type].from_dict(data)
    with torch.device("meta"), _at_most(limit):  # shapes only: no memory, no initialisation
        model = cls(config)
    params = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    # The rule of the installed Trainer itself (its create_optimizer: decay parameters in
    # model order, then the rest). get_decay_parameter_names reads only the model; an
    # instance made without __init__ holds no training state.
    decay = set(Trainer.__new__(Trainer).get_decay_parameter_names(model))
    groups = (
        tuple(n for n, _ in params if n in decay),
        tuple(n for n, _ in params if n not in decay),
    )
    return ModelParams(tuple(params), groups, where)


class NoNames(Exception):
    """A model's parameters do not name a state dict's IDs (the message says why)."""


def from_model(state_dict: Mapping[str, Any], model: ModelParams) -> tuple[dict[Any, str], str]:
    """Names for every ID from a model's ``named_parameters()`` (:mod:`optckpt.hf_names`),
    and how they were matched.

    First its trainer's groups: with as many groups as the state dict, each group's IDs are
    aligned with that group's parameters (:func:`optckpt.alignment.align`: equal sizes fit
    only in order, with every state shape equal; fewer IDs, as with frozen parameters, must
    fit in one way only). Failing that, all groups are aligned with the parameters in model
    order, each group a subsequence, as :func:`optckpt.names.recover` aligns them with weights.

    Raises:
        NoNames: no assignment fits, or more than one does.
    """
    from optckpt.alignment import Ambiguous, NoFit, Unsure, align
    from optckpt.fqn import _listed
    from optckpt.names import group_ids, id_shapes

    groups = group_ids(state_dict)
    shapes = id_shapes(state_dict, groups)
    shape_of = dict(model.params)
    if len(groups) == len(model.groups):
        try:
            found: dict[Any, str] = {}
            for own, members in zip(groups, model.groups):
                positions = align([own], shapes, [shape_of[n] for n in members])
                found.update({pid: members[positions[pid]] for pid in own})
            return found, "named_parameters() in the Trainer's weight-decay groups"
        except (NoFit, Ambiguous, Unsure):
            pass  # grouped some other way: try model order alone
    names = [n for n, _ in model.params]
    ids = f"the {len(shapes)} parameter IDs (group sizes {[len(g) for g in groups]})"
    built = f"the {len(names)} parameters of the model built from {model.where}"
    try:
        positions = align(groups, shapes, [s for _, s in model.params])
    except NoFit as e:
        raise NoNames(f"{ids} do not fit {built} by shape in model order: {e.reason}") from None
    except Ambiguous as e:
        shown = [f"ID {pid} could be {names[a]} or {names[b]}" for pid, a, b in e.choices]
        raise NoNames(f"{ids} fit {built} in more than one way: {_listed(shown, 4)}") from None
    except Unsure as e:
        raise NoNames(
            f"cannot prove that {ids} fit {built} in only one way (IDs "
            f"{_listed(map(str, e.open_ids))} left open)"
        ) from None
    found = {pid: names[positions[pid]] for own in groups for pid in own}
    return found, "named_parameters() aligned by shape"


def _version() -> str:
    import transformers

    return str(transformers.__version__)


@contextmanager
def _quiet() -> Iterator[None]:
    """transformers' logging and Python warnings silenced (its config validation warns about
    token ids outside a tiny vocabulary, for instance): optckpt's report is the output."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity(40)  # logging.ERROR
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.set_verbosity(level)
