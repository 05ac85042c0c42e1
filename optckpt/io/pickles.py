"""Untrusted pickles, read without running them, and bounds on what they may build.

torch's weights-only unpickler (``torch/_weights_only_unpickler.py``) never imports what a
pickle names, but it trusts a pickle's size and shape; and a message about a refused file
must not import what it names either (importing ``this`` prints, importing a module from the
current folder runs it). This module never imports, resolves or calls anything a file names:

* :func:`scan_pickles` reads the opcodes of one or more consecutive pickles: the globals they
  name (``GLOBAL``, and ``STACK_GLOBAL`` by a heuristic), the first opcode torch's
  weights-only unpickler cannot run, and — by following the unpickler's stack with nesting
  depths in place of objects — how deep the objects it would build are. Hashing a tuple nested
  tens of thousands of levels deep (a dict key, a set member) crashes or stalls the
  interpreter inside torch's unpickler, so depth is refused before torch unpickles anything;
* :func:`check_tree` walks what was loaded (any format) without recursion and refuses
  reference cycles, nesting past :data:`MAX_NESTING`, structures that share themselves so
  often that a tree walk would never end, and tensors whose shape claims far more bytes than
  their storage holds (zero strides);
* :func:`why_dangerous` (in :mod:`optckpt.io.allowlist`, with torch's allow-list; re-exported
  here) says, by name alone, why a global must never be allowed.
"""

from __future__ import annotations

import io
import math
import mmap
import pickletools
import struct
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from optckpt.described import is_tensor, layout_name

# Re-exported: the allow/deny facts live in optckpt.io.allowlist.
from optckpt.io.allowlist import DATA_RECONSTRUCTORS as DATA_RECONSTRUCTORS
from optckpt.io.allowlist import torch_allowed_globals as torch_allowed_globals
from optckpt.io.allowlist import why_dangerous as why_dangerous

# A data.pkl (or the pickles of a legacy file) larger than this is refused: torch's pure-Python
# unpickler takes seconds and gigabytes per hundred MB of opcodes, and the pickle of even a
# 100,000-tensor training checkpoint is a few tens of MB (storages are stored apart).
MAX_PICKLE_BYTES = 256 * 2**20
# Containers nested deeper than this are refused. No checkpoint nests more than a few dozen
# levels; optckpt's tree walkers, copy.deepcopy and the pickler each use one to three Python
# frames per level, and this keeps them well inside the default recursion limit of 1000.
MAX_NESTING = 200
# Objects on the unpickler's stack at once: CPython's pickler batches containers by 1000
# items, so a real pickle holds a few thousand; ten million is a pickle built to exhaust memory.
MAX_STACK_ITEMS = 10_000_000
# A tree whose shared parts, unfolded, come to more nodes than this (and more than
# _MAX_UNFOLDING times the slots it really has) would keep a walker busy for ever.
MAX_UNFOLDED_NODES = 10_000_000
_MAX_UNFOLDING = 8
# A tensor may claim more bytes than its storage holds (an expanded view) by at most this
# much, and all tensors of a checkpoint by at most _MAX_TOTAL_EXCESS together: commands that
# copy or reduce a tensor materialise its logical size.
MAX_TENSOR_EXCESS_BYTES = 64 * 2**20
_MAX_TOTAL_EXCESS_BYTES = 2**30
# Bytes of a pickle that torch cannot run anyway, read only to name its globals in the message.
_NAMING_BUDGET = 16 * 2**20

# Every opcode pickle knows, by byte: names the one torch stops at.
_OPCODES = {ord(o.code): o for o in pickletools.opcodes}


class Refused(ValueError):
    """A pickle or loaded tree that is corrupt or past a bound; the message names no file."""


@dataclass
class PickleScan:
    """What :func:`scan_pickles` read.

    Attributes:
        globals: every ``module.name`` the pickles name, in order of first appearance, with
            Python 2 names mapped as torch maps them (``__builtin__`` → ``builtins``).
        unsupported: the first opcode torch's weights-only unpickler cannot run (torch stops
            there), or ``None``.
        end: the offset just past the last pickle read.
    """

    globals: list[str] = field(default_factory=list)
    unsupported: str | None = None
    end: int = 0


def scan_pickles(data: bytes | mmap.mmap, count: int = 1) -> PickleScan:
    """Read ``count`` consecutive pickles from the start of ``data`` without running them.

    A legacy torch file is five pickles in a row (magic number, protocol version, system
    info, the object, storage keys) followed by raw storage bytes; a zip's ``data.pkl`` is one.
    Reading stops after the pickle that holds an opcode torch cannot run, since torch never
    reads past it.

    Args:
        data: the bytes (or a read-only memory map of the file).
        count: how many pickles to read.

    Returns:
        The :class:`PickleScan`.

    Raises:
        Refused: a truncated or corrupt pickle, pickles together larger than
            :data:`MAX_PICKLE_BYTES`, nesting deeper than :data:`MAX_NESTING`, or more than
            :data:`MAX_STACK_ITEMS` objects on the stack at once.
    """
    scan = PickleScan()
    names: dict[str, None] = {}  # ordered set
    pos = 0
    limit = min(len(data), MAX_PICKLE_BYTES)
    for _ in range(count):
        start = pos
        pos, unsupported = _simulate(data, pos, limit, names)
        if unsupported is not None:
            scan.unsupported = unsupported
            _name_globals(data, start, names)
            break
    scan.globals = list(names)
    scan.end = pos
    return scan


def _simulate(
    data: bytes | mmap.mmap, pos: int, limit: int, names: dict[str, None]
) -> tuple[int, str | None]:
    """Follow torch's weights-only unpickler over one pickle, with each object replaced by
    its nesting depth (0 for anything that holds nothing). The opcodes handled are exactly
    those ``Unpickler.load`` in ``torch/_weights_only_unpickler.py`` runs; it stops at any
    other, and so does this.

    Tuples are immutable, so their depth is exact; a list or dict that grows after it was
    memoized may be deeper than its memo entry says, which :func:`check_tree` catches after
    loading (only tuples are hashed while unpickling).

    Returns:
        The offset after the pickle's STOP and ``None``, or, at the first opcode torch
        cannot run, that opcode's offset and name.
    """
    stack: list[int] = []
    marks: list[list[int]] = []
    memo: dict[int, int] = {}  # only entries deeper than 0
    push = stack.append
    unpack_from = struct.unpack_from
    deepest = MAX_NESTING
    size = len(data)
    # One comparison per opcode covers the end of data, the size bound and the periodic
    # check of the stack's size.
    every = 1 << 20
    check_at = min(limit, pos + every)
    try:
        while True:
            if pos >= check_at:
                if pos >= limit:  # limit is the end of data, or the bound before it
                    if limit == size:
                        raise Refused("truncated pickle (it ends before its STOP opcode)")
                    raise Refused(
                        f"its pickle is larger than {MAX_PICKLE_BYTES // 2**20} MiB, "
                        "the most optckpt reads"
                    )
                if len(stack) + sum(map(len, marks)) > MAX_STACK_ITEMS:
                    raise Refused(f"its pickle holds more than {MAX_STACK_ITEMS:,} objects at once")
                check_at = min(limit, pos + every)
            op = data[pos]
            pos += 1
            # In order of how often torch.save writes them (the chain is the hot loop). A
            # memo slot written again keeps the deeper of its depths: that can only
            # overstate a depth, and CPython's pickler never reuses a slot.
            if op == 0x72:  # LONG_BINPUT
                depth = stack[-1]
                if depth:
                    memo[unpack_from("<I", data, pos)[0]] = depth
                pos += 4
            elif op == 0x68:  # BINGET
                push(memo.get(data[pos], 0))
                pos += 1
            elif op == 0x4B:  # BININT1
                push(0)
                pos += 1
            elif op == 0x28:  # MARK
                marks.append(stack)
                if len(marks) > deepest:
                    raise Refused(_too_deep())
                stack = []
                push = stack.append
            elif op == 0x74:  # TUPLE
                depth = max(stack, default=0) + 1
                stack = marks.pop()
                push = stack.append
                if depth > deepest:
                    raise Refused(_too_deep())
                push(depth)
            elif op == 0x52:  # REDUCE: the result holds what its arguments held
                args = stack.pop()
                stack[-1] = args
            elif op == 0x85:  # TUPLE1
                depth = stack[-1] + 1
                if depth > deepest:
                    raise Refused(_too_deep())
                stack[-1] = depth
            elif op in (0x29, 0x5D, 0x7D, 0x8F):  # EMPTY_TUPLE, EMPTY_LIST, EMPTY_DICT, EMPTY_SET
                push(1)
            elif op == 0x58:  # BINUNICODE
                pos += 4 + unpack_from("<I", data, pos)[0]
                push(0)
            elif op == 0x51:  # BINPERSID: a storage
                stack[-1] = 0
            elif op in (0x89, 0x88, 0x4E):  # NEWFALSE, NEWTRUE, NONE
                push(0)
            elif op == 0x6A:  # LONG_BINGET
                push(memo.get(unpack_from("<I", data, pos)[0], 0))
                pos += 4
            elif op in (0x4D, 0x4A, 0x47):  # BININT2, BININT, BINFLOAT
                pos += 2 if op == 0x4D else 4 if op == 0x4A else 8
                push(0)
            elif op in (0x75, 0x65):  # SETITEMS, APPENDS
                depth = max(stack, default=-1) + 1
                stack = marks.pop()
                push = stack.append
                if depth > deepest:
                    raise Refused(_too_deep())
                if depth > stack[-1]:  # an empty stack is corrupt here, as for torch
                    stack[-1] = depth
            elif op == 0x71:  # BINPUT
                depth = stack[-1]
                if depth:
                    memo[data[pos]] = depth
                pos += 1
            elif op in (0x73, 0x61):  # SETITEM (key, value), APPEND (value)
                depth = stack.pop()
                if op == 0x73:
                    depth = max(depth, stack.pop())
                depth += 1
                if depth > deepest:
                    raise Refused(_too_deep())
                if depth > stack[-1]:
                    stack[-1] = depth
            elif op in (0x86, 0x87):  # TUPLE2, TUPLE3
                depth = stack.pop()
                if op == 0x87:
                    depth = max(depth, stack.pop())
                depth = max(depth, stack[-1]) + 1
                if depth > deepest:
                    raise Refused(_too_deep())
                stack[-1] = depth
            elif op == 0x62:  # BUILD: the object takes in its state
                state = stack.pop()
                if state > stack[-1]:
                    stack[-1] = state
            elif op == 0x81:  # NEWOBJ
                args = stack.pop()
                stack[-1] = args
            elif op == 0x63:  # GLOBAL
                pos = _read_global(data, pos, names)
                push(0)
            elif op in (0x8A, 0x55):  # LONG1, SHORT_BINSTRING: a length byte, then data
                pos += 1 + data[pos]
                push(0)
            elif op == 0x80:  # PROTO
                pos += 1
            elif op == 0x2E:  # STOP
                stack.pop()
                return pos, None
            else:
                opcode = _OPCODES.get(op)
                if opcode is None:
                    raise Refused(f"corrupt pickle (unknown opcode 0x{op:02x} at offset {pos - 1})")
                return pos - 1, opcode.name
    except (IndexError, KeyError, struct.error) as e:
        raise Refused("truncated or corrupt pickle") from e


def _too_deep() -> str:
    return f"its pickle nests containers more than {MAX_NESTING} levels deep"


def _read_global(data: bytes | mmap.mmap, pos: int, names: dict[str, None]) -> int:
    """Record the ``module.name`` of a GLOBAL opcode's two lines; the offset after them."""
    first = data.find(b"\n", pos, pos + 1024)
    second = data.find(b"\n", first + 1, first + 1025) if first >= 0 else -1
    if second < 0:
        raise Refused("corrupt pickle (a GLOBAL name runs past 1024 bytes)")
    _add_global(names, _text(data[pos:first]), _text(data[first + 1 : second]))
    return second + 1


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "backslashreplace")


def _add_global(names: dict[str, None], module: str, name: str) -> None:
    # The same Python 2 renames torch's _read_global_instruction applies.
    if (module, name) in NAME_MAPPING:
        module, name = NAME_MAPPING[(module, name)]
    elif module in IMPORT_MAPPING:
        module = IMPORT_MAPPING[module]
    names.setdefault(f"{module}.{name}", None)


_STRING_OPCODES = frozenset(
    {"UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "STRING", "BINSTRING",
     "SHORT_BINSTRING"}
)  # fmt: skip
_NO_PUSH_OPCODES = frozenset({"MARK", "FRAME", "PROTO", "PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"})


def _name_globals(data: bytes | mmap.mmap, start: int, names: dict[str, None]) -> None:
    """Add the globals of a pickle that torch cannot run (protocol 4's STACK_GLOBAL, ...),
    for the message only: torch stops at the first such opcode, so nothing after it is ever
    loaded. Reads at most :data:`_NAMING_BUDGET` bytes and stops quietly at corrupt data.

    ``STACK_GLOBAL`` takes its module and name from the stack; like torch's
    ``get_globals_in_pkl`` this does not model the stack, but takes the last two strings
    pushed, literally or from the memo.
    """
    stream: Any = data if isinstance(data, mmap.mmap) else io.BytesIO(data)
    stream.seek(start)
    recent: list[str | None] = [None, None]
    strings: dict[int, str] = {}  # memo index -> string, for the strings that were memoized
    memo_size = 0
    try:
        for opcode, arg, pos in pickletools.genops(stream):
            if pos is not None and pos - start > _NAMING_BUDGET:
                return
            kind = opcode.name
            if kind == "GLOBAL":
                module, _, name = str(arg).partition(" ")
                _add_global(names, module, name)
            elif kind == "STACK_GLOBAL":
                pushed_module, pushed_name = recent[-2], recent[-1]
                if pushed_module is not None and pushed_name is not None:
                    _add_global(names, pushed_module, pushed_name)
            if kind in _STRING_OPCODES:
                recent.append(arg if isinstance(arg, str) else None)
            elif kind in ("GET", "BINGET", "LONG_BINGET"):
                recent.append(strings.get(arg) if isinstance(arg, int) else None)
            elif kind in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                index = memo_size if kind == "MEMOIZE" else arg
                memo_size += 1
                if isinstance(index, int) and recent[-1] is not None and len(strings) < 100_000:
                    strings[index] = recent[-1]
            elif kind not in _NO_PUSH_OPCODES:
                recent.append(None)
            del recent[:-2]
    except (ValueError, struct.error, UnicodeDecodeError):
        return


# --------------------------------------------------------------------------- loaded trees


def _is_container(value: Any) -> bool:
    return isinstance(value, (Mapping, list, tuple, set, frozenset))


def _items(node: Any) -> Iterator[tuple[Any, Any]]:
    if isinstance(node, Mapping):
        return iter(node.items())
    if isinstance(node, (set, frozenset)):
        return (("{}", v) for v in node)
    return enumerate(node)


def check_tree(root: Any) -> None:
    """Refuse a loaded checkpoint that a walker over it would choke on, before any does.

    Walks iteratively (no recursion), visiting each container once: containers are keyed by
    ``id()`` only for this walk, while ``root`` keeps every one of them alive.

    Raises:
        Refused: a reference cycle; nesting deeper than :data:`MAX_NESTING`; shared parts
            that, unfolded, come to more than :data:`MAX_UNFOLDED_NODES` nodes; a tensor
            whose shape claims absurdly many elements, or more bytes than its storage holds
            by over :data:`MAX_TENSOR_EXCESS_BYTES` (a zero-stride view; storages are what
            the file holds, so this is what makes a 10^12 x 10^12 view safe to report on).
    """
    if not _is_container(root):
        if is_tensor(root):
            _check_tensor(root, "the root", 0)
        return
    done: dict[int, tuple[int, int]] = {}  # container id -> (height, nodes unfolded)
    open_ids: dict[int, int] = {}  # containers being walked -> length of their key path
    tensors: set[int] = set()
    path: list[str] = []
    slots = 0
    excess = 0
    # Each frame: the container, its remaining items, height so far, nodes unfolded so far.
    frames: list[list[Any]] = [[root, _items(root), 0, 1]]
    open_ids[id(root)] = 0
    while frames:
        frame = frames[-1]
        for key, child in frame[1]:
            slots += 1
            if _is_container(child):
                known = done.get(id(child))
                if known is None:
                    if id(child) in open_ids:
                        outer = ".".join(path[: open_ids[id(child)]]) or "the root"
                        raise Refused(
                            f"the container at {outer} contains itself, at "
                            f"{_where(path, key)} (a reference cycle)"
                        )
                    if len(frames) >= MAX_NESTING:
                        raise Refused(
                            f"the container at {_where(path, key)} is nested more than {MAX_NESTING} levels deep"
                        )
                    path.append(str(key))
                    open_ids[id(child)] = len(path)
                    frames.append([child, _items(child), 0, 1])
                    break
                height, nodes = known
            else:
                height, nodes = 0, 1
                if is_tensor(child) and id(child) not in tensors:
                    tensors.add(id(child))
                    excess = _check_tensor(child, _where(path, key), excess)
            frame[2] = max(frame[2], height)
            frame[3] += nodes
        else:
            frames.pop()
            node = frame[0]
            del open_ids[id(node)]
            summary = (frame[2] + 1, frame[3])
            done[id(node)] = summary
            if frames:
                path.pop()
                parent = frames[-1]
                parent[2] = max(parent[2], summary[0])
                parent[3] += summary[1]
    height, nodes = done[id(root)]
    if height > MAX_NESTING:
        raise Refused(f"it nests containers {height} levels deep (the most is {MAX_NESTING})")
    if nodes > MAX_UNFOLDED_NODES and nodes > _MAX_UNFOLDING * (slots + 1):
        raise Refused(
            f"it shares containers so often that walking it would visit {_count(nodes)} nodes"
        )


def _where(path: list[str], key: Any) -> str:
    return ".".join([*path, str(key)])


def _count(n: int) -> str:
    return f"{n:,}" if n < 10**15 else f"about 10^{int(math.log10(n))}"


def _check_tensor(tensor: Any, where: str, excess: int) -> int:
    """Check one tensor's claimed size against its storage; the running excess after it."""
    try:
        shape = list(tensor.shape)
        numel = math.prod(shape)  # Python ints: no overflow, unlike tensor.numel()
        if numel > 2**62:
            raise Refused(f"tensor at {where} claims {_count(numel)} elements")
        if layout_name(tensor) != "strided":
            return excess  # sparse and other layouts keep their data in strided parts
        claimed = numel * tensor.element_size()
        held = tensor.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return excess  # a tensor kind without sizes or a storage (nested, functional)
    over = claimed - held
    if over > MAX_TENSOR_EXCESS_BYTES:
        raise Refused(
            f"tensor at {where} of shape {shape} claims {_count(claimed)} bytes "
            f"but its storage holds {_count(held)} (zero or overlapping strides)"
        )
    if over > 0:
        excess += over
        if excess > _MAX_TOTAL_EXCESS_BYTES:
            raise Refused(
                f"its tensors claim {_count(excess)} bytes more than their storages hold "
                "(zero or overlapping strides)"
            )
    return excess
