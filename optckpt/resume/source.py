"""What a resume step reads: the checkpoint, the optimizer state dict in it, the model weights,
and owned copies of the state (the optimizers step in place; the input stays mapped)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from optckpt.errors import UsageError
from optckpt.io import load_checkpoint
from optckpt.io.pages import FileRanges, release
from optckpt.layout import find_model_state, model_state_of, sorted_by_name
from optckpt.locate import Located, select_one, select_optimizers
from optckpt.names import FROM_HINT, sources_of
from optckpt.resume.parameters import Params, Unnamed, params_from_weights, seeded_params


def _owned(value: Any, ranges: Any = None) -> Any:
    """``value`` with every tensor copied (dicts, lists and tuples rebuilt around them).

    With ``ranges`` (a :class:`~optckpt.io.pages.FileRanges`), the mapped pages of each
    tensor are let go once it is copied, so the input is never resident in full.
    """
    if isinstance(value, torch.Tensor):
        copy = value.clone()
        if ranges is not None:
            ranges.drop(value.data_ptr(), value.numel() * value.element_size())
        return copy
    if isinstance(value, Mapping):
        return {k: _owned(v, ranges) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_owned(v, ranges) for v in value]
        return items if isinstance(value, list) else tuple(items)
    return value


@dataclass
class Source:
    """What a run reads: the checkpoint, the optimizer state dict in it, the model weights.

    ``mapped`` collects the files read, whose memory-mapped pages may be released (nothing
    ever writes into them: the optimizers step copies, see :meth:`owned`).
    """

    path: Path
    key: str | None
    model: Path | None
    seed: int
    allow_globals: tuple[str, ...]
    layout: Any | None = None  # --from: the Layout the checkpoint was saved with
    mapped: list[Path] = field(default_factory=list)
    _model_checkpoint: Any = None  # the --model checkpoint, once read

    def read(self) -> tuple[Any, Any]:
        """A fresh read of the checkpoint and the one optimizer state dict located in it."""
        checkpoint = load_checkpoint(self.path, allow_globals=self.allow_globals)
        self.mapped.extend(checkpoint.sources)
        return checkpoint, select_one(checkpoint.root, self.key)

    def read_every(self, *, only_one: bool = False) -> tuple[Any, list[Located]]:
        """The checkpoint and the optimizer state dict at ``key``, or every one in it (with
        ``only_one``, the only one: several and no ``key`` are refused, listed)."""
        checkpoint = load_checkpoint(self.path, allow_globals=self.allow_globals)
        self.mapped.extend(checkpoint.sources)
        if only_one:
            return checkpoint, [select_one(checkpoint.root, self.key)]
        return checkpoint, select_optimizers(checkpoint.root, self.key)

    def weights(self, checkpoint: Any) -> tuple[Mapping[str, torch.Tensor] | None, str]:
        """The model weights (of the checkpoint, or of ``--model``) and where they are."""
        if self.model is None:
            return model_state_of(checkpoint), str(self.path)
        model_checkpoint = load_checkpoint(self.model, allow_globals=self.allow_globals)
        self._model_checkpoint = model_checkpoint
        self.mapped.extend(model_checkpoint.sources)
        weights = find_model_state(model_checkpoint.root)
        if weights is None:
            raise UsageError(f"--model {self.model}: holds no model state dict")
        return weights, str(self.model)

    def _folder_weights(self, folder: Path) -> tuple[Mapping[str, torch.Tensor] | None, str]:
        """The weights a Hugging Face folder keeps next to its optimizer (``model.safetensors``,
        else ``pytorch_model.bin``, read safely), and where they are."""
        from optckpt.hf_names import WEIGHT_FILES

        for name in WEIGHT_FILES:
            if (folder / name).is_file():
                found = load_checkpoint(folder / name, allow_globals=self.allow_globals)
                self.mapped.extend(found.sources)
                return find_model_state(found.root), str(folder / name)
        return None, ""

    def parameters(self, checkpoint: Any, state_dict: Mapping[str, Any]) -> Params:
        """The parameters to load ``state_dict`` onto (see :func:`params_from_weights`,
        :func:`seeded_params`).

        Weights sorted by name (a plain safetensors ``--model``, a Trainer folder's
        ``model.safetensors``) are matched by name only: the names come from the state dict,
        ``--from``, or the folder's model config (:mod:`optckpt.names`). Without names, a
        folder's weights are left out (stand-ins, and a note says why); ``--model`` is an
        error.

        Raises:
            UsageError: ``--model`` sorted by name, and nothing names the parameters.
        """
        sources = sources_of(checkpoint, state_dict)
        weights, where = self.weights(checkpoint)
        ordered = True
        if self.model is not None:
            model_checkpoint = self._model_checkpoint
            ordered = model_checkpoint is None or not sorted_by_name(model_checkpoint)
        elif weights is None and sources.config_folder is not None:
            weights, where = self._folder_weights(sources.config_folder)
            ordered = False
        if weights is None:
            return seeded_params(state_dict, self.seed, self.layout, sources)
        try:
            params = params_from_weights(state_dict, weights, where, self.layout, sources, ordered)
        except Unnamed as e:  # weights sorted by name, and no names to match them with
            if self.model is not None:
                raise UsageError(
                    f"--model {where}: a safetensors file keeps its tensors sorted by name, "
                    "not in the model's order, so the optimizer's parameter IDs can be matched "
                    "to it by name only, and nothing names them"
                    + "".join(f"; {note}" for note in e.notes)
                    + f"; {FROM_HINT}"
                ) from None
            seeded = seeded_params(state_dict, self.seed, self.layout, sources)
            seeded.notes.append(f"{where} not used: the parameters have no names to match it by")
            return seeded
        release(self.mapped)  # the weights are copied: their mapped pages can go
        return params

    def owned(self, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        """``state_dict`` with its state copied: the optimizers step it in place, and nothing
        may ever write into the mapped input (see :mod:`optckpt.io.pages`)."""
        with FileRanges(self.mapped) as ranges:
            return {**state_dict, "state": _owned(state_dict["state"], ranges)}
