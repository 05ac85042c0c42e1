"""One pipeline for every command that writes a checkpoint.

``move``, ``convert``, ``remap``, ``regenerate`` and ``resume-step -o`` all go through the same
steps, each a small function here:

1. **validate the output** — :func:`prepare_output` (or :func:`plan_rewrite`, which also
   carries what the rewrite reads): ``-o`` checked once, with every input the command reads
   (:func:`~optckpt.io.write.check_output`), its kind decided — all before anything is
   read;
2. **load** — :meth:`Rewrite.load`, the one way in (:func:`optckpt.io.load_checkpoint`);
3. **select** — :meth:`Rewrite.select` / :meth:`Rewrite.select_one` (``--key``);
4. **replace** — the command's own work: it changes the loaded tree in place (the file is
   mapped copy-on-write, never written back) and keeps its
   :attr:`~optckpt.io.Checkpoint.placement` in step (:mod:`optckpt.devices`);
5. **save** — :func:`save` (:meth:`Rewrite.save`), atomically, with progress: the caller's
   :data:`~optckpt.io.write.ProgressStart` is told the bytes to write when writing starts,
   and the callback it returns each write.

Output kinds: an :class:`Output` names its kind, and :func:`save` dispatches on it through
:data:`KINDS` (how a kind's output is checked, and how it is written). Files are ``"pt"`` and
``"safetensors"``; ``"dcp"`` is a torch.distributed.checkpoint folder
(:mod:`optckpt.io.dcp.writer`), for the commands that rewrite a checkpoint (``dcp=True``: all
but ``regenerate``; ``move`` and ``remap`` from a DCP folder only), chosen by
:func:`kind_for`. ``"folder"`` is a training folder (a Trainer ``checkpoint-N/``, an
Accelerate ``save_state`` folder; an output folder stands for its newest ``checkpoint-N``):
the checkpoint to rewrite is one, so the output is one too, its optimizer files rewritten in
their own names and formats and every other file carried over
(:mod:`optckpt.io.folder_writer`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from optckpt.described import DescribedTensor
from optckpt.errors import UsageError
from optckpt.io.dcp import is_dcp
from optckpt.io.dcp.writer import check_output_folder, wants_dcp, write_dcp
from optckpt.io.folder_writer import check_training_folder_output, write_training_folder
from optckpt.io.folders import resolve_folder
from optckpt.io.read import Checkpoint, load_checkpoint
from optckpt.io.safetensors_format.writer import check_storable
from optckpt.io.write import ProgressStart, check_output, format_for, save_checkpoint, tensor_bytes
from optckpt.io.zip_writer import writable
from optckpt.locate import KeyPath, Located, select_one, select_optimizers, tensor_paths

if TYPE_CHECKING:
    import torch

__all__ = [
    "KINDS",
    "Kind",
    "Output",
    "Rewrite",
    "kind_for",
    "plan_rewrite",
    "prepare_output",
    "save",
]


class _Check(Protocol):
    def __call__(self, out: Path, inputs: Iterable[object], *, force: bool) -> None: ...


@dataclass(frozen=True)
class _Write:
    """What a kind's writer is given: the tree, where and as what, the device to record for
    each tensor by key path, the memory-mapped files it was read from, and the per-write
    progress callback."""

    tree: Any
    output: Output
    placement: Mapping[KeyPath, str]
    sources: Sequence[Path]
    progress: Callable[[int], None] | None


@dataclass(frozen=True)
class Kind:
    """How one kind of output is checked before anything is read, and written at the end.

    Attributes:
        check: ``check(out, inputs, force=force)``; raises when ``out`` may not be written.
        write: ``write(job)``; atomic.
    """

    check: _Check
    write: Callable[[_Write], None]


def _write_file(job: _Write) -> None:
    save_checkpoint(
        job.tree,
        job.output.path,
        job.output.kind,
        progress=job.progress,
        sources=job.sources,
        placement=job.placement,
    )


def _write_dcp(job: _Write) -> None:
    # DCP records no devices, and torch's writer reports no progress
    write_dcp(job.tree, job.output.path, sources=job.sources)


def _write_folder(job: _Write) -> None:
    output = job.output
    assert output.folder is not None  # prepare_output sets it for this kind
    write_training_folder(
        job.tree,
        output.path,
        output.folder,
        job.placement,
        job.sources,
        job.progress,
        link=output.link,
    )


KINDS: dict[str, Kind] = {
    "pt": Kind(check_output, _write_file),
    "safetensors": Kind(check_output, _write_file),
    "dcp": Kind(check_output_folder, _write_dcp),
    "folder": Kind(check_training_folder_output, _write_folder),
}
"""Every output kind, by the name :func:`kind_for` gives it."""


def kind_for(out: str | Path, requested: str | None = None, *, dcp: bool = False) -> str:
    """The kind of output ``-o out`` asks for: ``requested`` (``--format``) if given, else
    from ``out`` (see :func:`~optckpt.io.write.format_for`); with ``dcp``, a DCP folder for
    ``--format dcp`` or an ``out`` that ends in ``/`` or is a folder (pass ``out`` as typed:
    ``Path`` drops the ``/``).

    Raises:
        UsageError: an unknown ``requested`` kind.
    """
    if dcp and wants_dcp(out, requested):
        return "dcp"
    return format_for(Path(out), requested)


@dataclass(frozen=True)
class Output:
    """Where a writing command writes, and as what; made by :func:`prepare_output` only.

    Attributes:
        path: the ``-o`` path.
        kind: its entry in :data:`KINDS`.
        folder: for ``"folder"``, the checkpoint folder rewritten (whose other files are
            carried over).
        link: for ``"folder"``, carry the other files as hard links (``--link``), not as
            copies of their own.
    """

    path: Path
    kind: str
    folder: Path | None = None
    link: bool = False

    def refuse_unstorable(self, tensors: Iterable[tuple[str, torch.dtype]]) -> None:
        """Refuse now, not after the work, tensors this kind cannot hold (``(name, dtype)``).

        Raises:
            UsageError: a dtype safetensors has no name for.
        """
        if self.kind == "safetensors":
            check_storable(tensors)


def prepare_output(
    out: str | Path,
    *,
    force: bool,
    inputs: Iterable[object] = (),
    kind: str | None = None,
    rewrites: str | Path | None = None,
    command: str = "optckpt",
    dcp: bool = False,
    link: bool = False,
) -> Output:
    """Check, once and before anything is read, that ``out`` may be written; decide its kind.

    Args:
        out: the ``-o`` path.
        force: replace an existing output.
        inputs: every other file the command reads (layouts, ``--model``); entries that are
            not paths (``None``, an in-memory layout) are skipped.
        kind: the kind asked for (``--format``); else from the extension of ``out``.
        rewrites: the checkpoint the command rewrites. A training folder (not DCP) makes the
            output a folder of the same files (kind ``"folder"``); an output folder stands
            for its newest ``checkpoint-N`` (:func:`~optckpt.io.folders.resolve_folder`).
        command: the command's name, for messages.
        dcp: whether ``out`` may be a DCP folder (see :func:`kind_for`): every command
            that rewrites a checkpoint reads and writes them; ``regenerate`` does not.
        link: a training folder's other files are hard-linked, not copied
            (:func:`~optckpt.io.folder_writer.write_training_folder`).

    Raises:
        UsageError: an unknown kind, or one asked of a training folder; an output that is an
            input or exists without ``force`` (see :func:`~optckpt.io.write.check_output`).
        UnwritableOutputError: the output's folder cannot be written.
    """
    path = Path(out)
    sources = [rewrites, *inputs] if rewrites is not None else list(inputs)
    if rewrites is not None and Path(rewrites).is_dir() and not is_dcp(rewrites):
        if kind is not None:
            raise UsageError(
                f"--format {kind}: {command} writes a training folder as a folder of the same "
                "files, each optimizer file in the format its library loads (torch.load reads "
                "optimizer.pt and optimizer.bin); to write one file, name one optimizer file "
                f"of {rewrites} as the input"
            )
        folder = resolve_folder(rewrites).path
        check_training_folder_output(path, [*sources, folder], force=force)
        return Output(path, "folder", folder, link)
    output = Output(path, kind_for(out, kind, dcp=dcp))
    KINDS[output.kind].check(path, sources, force=force)
    return output


def save(
    output: Output,
    tree: Any,
    *,
    placement: Mapping[KeyPath, str] | None = None,
    sources: Iterable[str | Path] = (),
    progress: ProgressStart | None = None,
) -> None:
    """Write ``tree`` as ``output`` says, atomically (the last step of every rewrite).

    Args:
        output: from :func:`prepare_output`.
        tree: the checkpoint; may hold :class:`~optckpt.io.torch_format.Deferred` casts.
        placement: the device to record for each tensor, by key path (a checkpoint's
            :attr:`~optckpt.io.Checkpoint.placement`); others record where they are.
        sources: memory-mapped files the tree was read from (copied in the kernel, their
            pages released as they go).
        progress: told the bytes to write when writing starts; the callback it returns is
            told each write.
    """
    per_write = progress(tensor_bytes(tree)) if progress is not None else None
    job = _Write(tree, output, placement or {}, [Path(s) for s in sources], per_write)
    KINDS[output.kind].write(job)


@dataclass(frozen=True)
class Rewrite:
    """One checkpoint file to rewrite, its options checked once by :func:`plan_rewrite`.

    Attributes:
        source: the checkpoint file or DCP folder.
        output: where it goes; ``None`` for a dry run, which writes nothing.
        key: the key path of the optimizer state dict to change (``--key``), or ``None``.
        allow_globals: pickle globals to let through while reading.
    """

    source: Path
    output: Output | None
    key: str | None = None
    allow_globals: tuple[str, ...] = ()

    def load(self, *, read: bool = False, describe: bool = False) -> Checkpoint:
        """Read the checkpoint (see :func:`optckpt.io.load_checkpoint`). A DCP folder's
        tensors are placeholders (shape and dtype) until :meth:`save` writes them, or, with
        ``read`` (a command that computes on their values, not only casts them: ``move`` to
        a device other than the CPU), read now. A command that casts a placeholder asks
        the checkpoint for one of the cast (:meth:`~optckpt.io.Checkpoint.later`): ``move
        --dtype`` and ``remap`` stream as ``convert`` does.

        ``describe`` (a command that only moves tensors from file to file: ``convert`` to
        a ``.pt`` or safetensors file) reads the file without torch where it can
        (:mod:`optckpt.io.structure`): the writer then copies each storage's bytes from the
        file. What the output cannot take as described is read with torch instead: for
        safetensors, a tensor that is not one contiguous run of bytes (its bytes must be
        gathered); for ``.pt``, what :func:`optckpt.io.zip_writer.writable` refuses. A DCP
        folder likewise (:func:`~optckpt.io.dcp.describe.describe_dcp` with ``data``): a
        tensor saved as row chunks is copied chunk by chunk; one saved otherwise
        (compressed, split on another dimension) makes the whole folder take the torch
        path."""
        if is_dcp(self.source):
            if describe and not read:  # every tensor where its bytes are, else None
                from optckpt.io.dcp.describe import describe_dcp

                found = describe_dcp(self.source, allow_globals=self.allow_globals, data=True)
                if found is not None and self._takes_described(found.root):
                    return found
            from optckpt.io.dcp.reader import read_dcp

            tensors: Literal["load", "meta"] = "load" if read else "meta"
            return read_dcp(self.source, allow_globals=self.allow_globals, tensors=tensors)
        if describe:
            checkpoint = load_checkpoint(
                self.source, allow_globals=self.allow_globals, describe=True
            )
            if self._takes_described(checkpoint.root):
                return checkpoint
        return load_checkpoint(self.source, allow_globals=self.allow_globals)

    def _takes_described(self, tree: Any) -> bool:
        """Whether the output can be written from ``tree`` as described (see :meth:`load`)."""
        if self.output is not None and self.output.kind == "pt":
            return writable(tree)
        return all(
            not isinstance(t, DescribedTensor) or t.is_contiguous() for _, t in tensor_paths(tree)
        )

    def refuse_file_to_dcp(self, command: str) -> None:
        """Refuse, before anything is read, a DCP output from a checkpoint file: DCP keeps
        optimizer state keyed by names, which ``convert`` recovers (``move`` and ``remap``
        keep the input's keying).

        Raises:
            UsageError: a DCP output and a file input.
        """
        if self.output is not None and self.output.kind == "dcp" and not is_dcp(self.source):
            raise UsageError(
                f"{command} writes a DCP folder from a DCP folder only; "
                f"`optckpt convert {self.source} -o OUT/` makes one from a file"
            )

    def select(self, checkpoint: Checkpoint) -> list[Located]:
        """The optimizer state dict at ``key``, or every one (see
        :func:`~optckpt.locate.select_optimizers`)."""
        return select_optimizers(checkpoint.root, self.key)

    def select_one(self, checkpoint: Checkpoint) -> Located:
        """The one optimizer state dict to change (see :func:`~optckpt.locate.select_one`)."""
        return select_one(checkpoint.root, self.key)

    def save(self, checkpoint: Checkpoint, progress: ProgressStart | None = None) -> None:
        """Write the changed checkpoint with its placement (see :func:`save`).

        Raises:
            UsageError: a dry run (no output) has nothing to write to.
        """
        if self.output is None:
            raise ValueError("a dry run has no output to write")
        root = checkpoint.root
        resolved = getattr(checkpoint, "resolved", None)  # a DcpCheckpoint's
        if resolved is not None:
            # Every writer (files, and torch's DCP writer through optckpt's planner) makes
            # each placeholder's tensor only when it writes it (a sharded one assembled then,
            # cast then where the command cast it), so memory stays at the largest tensor.
            root = resolved(root, lazy=True)
        save(
            self.output,
            root,
            placement=checkpoint.placement,
            sources=checkpoint.sources,
            progress=progress,
        )


def plan_rewrite(
    path: str | Path,
    out: str | Path | None,
    *,
    command: str,
    force: bool = False,
    kind: str | None = None,
    inputs: Iterable[object] = (),
    key: str | None = None,
    allow_globals: Iterable[str] = (),
    link: bool = False,
) -> Rewrite:
    """Check a rewrite's output (:func:`prepare_output`) and carry its options.

    Args:
        path: the checkpoint file to rewrite.
        out: the output; ``None`` for a dry run (nothing checked, nothing written).
        command: the command's name, for messages.
        force, kind, inputs, link: as :func:`prepare_output` takes them (with ``dcp``:
            every rewriting command reads and writes DCP folders).
        key: the key path of the optimizer state dict to change.
        allow_globals: pickle globals to let through while reading.

    Raises:
        UsageError, UnwritableOutputError: as :func:`prepare_output` raises them.
    """
    output = None
    if out is not None:
        output = prepare_output(
            out,
            force=force,
            inputs=inputs,
            kind=kind,
            rewrites=path,
            command=command,
            dcp=True,
            link=link,
        )
    return Rewrite(Path(path), output, key, tuple(allow_globals))
