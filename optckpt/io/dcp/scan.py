"""Reading a pickle's opcodes without running them: the globals it names, how deep it nests.

Python's unpickler hashes dict keys and set items in C, recursively: a tuple nested a hundred
thousand levels deep used as a key overflows the C stack and kills the process. :func:`scan`
follows the unpickler's stack with each object replaced by its nesting depth (and each string
by its value, so that ``STACK_GLOBAL`` names its global exactly) and refuses a pickle before it
is unpickled. It reads every opcode of protocols 2 to 5 that Python's pickler writes; protocol
0's text opcodes, persistent IDs in text, extension codes and out-of-band buffers are refused
(no torch file has them).
"""

from __future__ import annotations

import struct
from typing import Any

from optckpt.io.pickles import MAX_NESTING, MAX_PICKLE_BYTES
from optckpt.io.unpickle import BadPickle as BadPickle  # re-exported: defined with the unpickler

_MARK = object()  # a MARK on the scan's stack


def _scan_error(what: str) -> BadPickle:
    return BadPickle(f"corrupt pickle ({what})")


# Opcodes that push one object with nothing inside it, by their argument's length (-n: a
# length prefix of n bytes, then that many bytes).
_ATOMS: dict[int, int] = {
    0x4E: 0, 0x88: 0, 0x89: 0,  # NONE, NEWTRUE, NEWFALSE
    0x4B: 1, 0x4D: 2, 0x4A: 4, 0x47: 8,  # BININT1, BININT2, BININT, BINFLOAT
    0x8A: -1, 0x8B: -4,  # LONG1, LONG4
    0x43: -1, 0x42: -4, 0x8E: -8, 0x96: -8,  # SHORT_BINBYTES, BINBYTES, BINBYTES8, BYTEARRAY8
    0x55: -1, 0x54: -4,  # SHORT_BINSTRING, BINSTRING
}  # fmt: skip
_STRINGS: dict[int, int] = {0x8C: 1, 0x58: 4, 0x8D: 8}  # SHORT_BINUNICODE, BINUNICODE(8)
_LENGTH = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}


def scan(data: bytes) -> list[str]:
    """Read a pickle's opcodes without running them: the globals it names, in order.

    Follows the unpickler's stack with each object replaced by how deeply it nests (a string
    by its value, so that ``STACK_GLOBAL`` names its global exactly).

    Raises:
        BadPickle: corrupt or truncated, larger than :data:`MAX_PICKLE_BYTES`, nesting deeper
            than :data:`MAX_NESTING`, or an opcode no pickler of a torch checkpoint writes
            (protocol 0's text opcodes, persistent IDs, extension codes, out-of-band buffers).
    """
    if len(data) > MAX_PICKLE_BYTES:
        raise BadPickle(f"its pickle is larger than {MAX_PICKLE_BYTES // 2**20} MiB")
    names: dict[str, None] = {}
    stack: list[Any] = []  # depth (int), string (str) or _MARK
    memo: dict[int, Any] = {}
    pos, end = 0, len(data)

    def depth(item: Any) -> int:
        return 0 if isinstance(item, str) else item

    def pop_mark() -> list[Any]:
        nonlocal stack
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is _MARK:
                items = stack[i + 1 :]
                del stack[i:]
                return items
        raise _scan_error("no MARK")

    def push(value: int) -> None:
        if value > MAX_NESTING:
            raise BadPickle(f"its pickle nests containers more than {MAX_NESTING} levels deep")
        stack.append(value)

    try:
        while True:
            if pos >= end:
                raise _scan_error("it ends before its STOP opcode")
            op = data[pos]
            pos += 1
            if op in _ATOMS:
                n = _ATOMS[op]
                if n < 0:
                    (length,) = struct.unpack_from(_LENGTH[-n], data, pos)
                    n = -n + length
                pos += n
                stack.append(0)
            elif op in _STRINGS:
                width = _STRINGS[op]
                (length,) = struct.unpack_from(_LENGTH[width], data, pos)
                pos += width
                raw = data[pos : pos + length]
                if len(raw) != length:
                    raise _scan_error("a string runs past its end")
                stack.append(raw.decode("utf-8", "surrogatepass"))
                pos += length
            elif op == 0x94:  # MEMOIZE
                memo[len(memo)] = stack[-1]
            elif op in (0x71, 0x72):  # BINPUT, LONG_BINPUT
                width = 1 if op == 0x71 else 4
                memo[struct.unpack_from(_LENGTH[width], data, pos)[0]] = stack[-1]
                pos += width
            elif op in (0x68, 0x6A):  # BINGET, LONG_BINGET
                width = 1 if op == 0x68 else 4
                stack.append(memo[struct.unpack_from(_LENGTH[width], data, pos)[0]])
                pos += width
            elif op == 0x28:  # MARK
                stack.append(_MARK)
            elif op in (0x29, 0x5D, 0x7D, 0x8F):  # EMPTY_TUPLE, _LIST, _DICT, _SET
                stack.append(1)
            elif op in (0x85, 0x86, 0x87):  # TUPLE1, TUPLE2, TUPLE3
                n = op - 0x84
                items = stack[-n:]
                if len(items) != n or _MARK in items:
                    raise _scan_error("a tuple of missing items")
                del stack[-n:]
                push(max(map(depth, items)) + 1)
            elif op in (0x74, 0x6C, 0x64, 0x91):  # TUPLE, LIST, DICT, FROZENSET
                push(max(map(depth, pop_mark()), default=0) + 1)
            elif op in (0x61, 0x73):  # APPEND, SETITEM
                n = 1 if op == 0x61 else 2
                items = stack[-n:]
                del stack[-n:]
                stack[-1] = max(depth(stack[-1]), max(map(depth, items)) + 1)
                if stack[-1] > MAX_NESTING:
                    push(stack.pop())
            elif op in (0x65, 0x75, 0x90):  # APPENDS, SETITEMS, ADDITEMS
                items = pop_mark()
                stack[-1] = max(depth(stack[-1]), max(map(depth, items), default=0) + 1)
                if stack[-1] > MAX_NESTING:
                    push(stack.pop())
            elif op in (0x52, 0x81):  # REDUCE, NEWOBJ: the result holds what its arguments do
                args = stack.pop()
                stack[-1] = depth(args)
            elif op == 0x51:  # BINPERSID: a storage of a torch.save file
                stack[-1] = 0
            elif op == 0x92:  # NEWOBJ_EX
                kwargs, args = stack.pop(), stack.pop()
                stack[-1] = max(depth(args), depth(kwargs))
            elif op == 0x62:  # BUILD
                state = stack.pop()
                stack[-1] = max(depth(stack[-1]), depth(state))
            elif op == 0x93:  # STACK_GLOBAL
                name, module = stack.pop(), stack.pop()
                if not (isinstance(module, str) and isinstance(name, str)):
                    raise _scan_error("STACK_GLOBAL of something other than two strings")
                names.setdefault(f"{module}.{name}", None)
                stack.append(0)
            elif op == 0x63:  # GLOBAL: "module\nname\n"
                first = data.index(b"\n", pos, pos + 1024)
                second = data.index(b"\n", first + 1, first + 1025)
                module = data[pos:first].decode("utf-8", "backslashreplace")
                name = data[first + 1 : second].decode("utf-8", "backslashreplace")
                names.setdefault(f"{module}.{name}", None)
                pos = second + 1
                stack.append(0)
            elif op == 0x30:  # POP
                stack.pop()
            elif op == 0x31:  # POP_MARK
                pop_mark()
            elif op == 0x32:  # DUP
                stack.append(stack[-1])
            elif op == 0x80:  # PROTO
                pos += 1
            elif op == 0x95:  # FRAME
                pos += 8
            elif op == 0x2E:  # STOP
                return list(names)
            else:
                raise BadPickle(f"its pickle uses opcode 0x{op:02x}, which torch never writes")
    except (IndexError, KeyError, struct.error, ValueError) as e:
        if isinstance(e, BadPickle):
            raise
        raise _scan_error("truncated, or an opcode without its arguments") from e
