"""Which globals a checkpoint's pickle may name: torch's allow-list and optckpt's deny-list.

Facts about names, decided without importing anything a file names:

* :func:`torch_allowed_globals` is what torch's weights-only unpickler allows without being
  told, plus what ``torch.serialization.add_safe_globals`` added;
* :func:`why_dangerous` says, by name alone, why a global must never be allowed (it runs
  programs, opens files, imports code, ...), even with ``--allow-global``;
* :data:`DATA_RECONSTRUCTORS` are the functions (numpy's) that rebuild plain data and that
  ``--allow-global`` lets through besides classes;
* :func:`resolve_globals` imports what ``--allow-global`` names (the user's word, never the
  file's), once each name is found not dangerous.

Reading a pickle's opcodes for the globals it names is :mod:`optckpt.io.pickles`, which
re-exports these names.
"""

from __future__ import annotations

import importlib
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections.abc import Iterable
from typing import Any

from optckpt.errors import UsageError


def torch_allowed_globals() -> frozenset[str]:
    """The names torch's weights-only unpickler allows without being told (``torch.Size``,
    the dtypes, the tensor rebuild functions, ...) and those added with
    ``torch.serialization.add_safe_globals``.

    torch has no public function for its default list; ``_get_allowed_globals`` is what
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` compares against, and
    ``tests/test_torch_zip.py`` fails if a torch upgrade changes it (it is wrapped in
    :mod:`optckpt.io.torch_zip`).
    """
    import torch

    from optckpt.io.torch_zip import weights_only_allowed_globals

    allowed = weights_only_allowed_globals()
    for entry in torch.serialization.get_safe_globals():
        if isinstance(entry, tuple):
            allowed.add(entry[1])
        else:
            allowed.add(f"{entry.__module__}.{entry.__qualname__}")
    return frozenset(allowed)


# Globals that no checkpoint may name, even with --allow-global, by the reason why. A name is
# caught when it is one of these or inside one (``os`` catches ``os.path.join``).
_WHY: dict[str, tuple[str, ...]] = {
    "runs programs or signals processes": (
        "os", "posix", "nt", "subprocess", "_posixsubprocess", "pty", "signal",
        "multiprocessing", "torch.multiprocessing", "threading", "_thread", "concurrent",
        "pydoc", "distutils", "setuptools", "pip", "ensurepip", "venv",
        "torch.utils.collect_env",
    ),
    "opens, reads or changes files": (
        "shutil", "tempfile", "io", "_io", "codecs", "fileinput", "mmap", "zipfile", "tarfile",
        "sqlite3", "dbm", "torch.from_file", "torch.save", "torch.serialization.save",
        "numpy.save", "numpy.savez", "numpy.savez_compressed", "numpy.savetxt",
        "numpy.memmap", "numpy.fromfile", "numpy.loadtxt", "numpy.genfromtxt",
        "numpy.lib.format",
    ),
    "imports or runs code": (
        "sys", "importlib", "imp", "pkgutil", "zipimport", "runpy", "code", "codeop", "pdb",
        "bdb", "trace", "timeit", "doctest", "cProfile", "profile", "gc", "site", "atexit",
        "ctypes", "_ctypes", "cffi", "torch.hub", "torch.ops", "torch._C", "torch.jit",
        "torch.compile", "torch._dynamo", "torch._inductor", "torch.fx", "torch.package",
        "torch.utils.cpp_extension", "torch.library", "torch.distributed.rpc",
        "logging.config", "numpy.ctypeslib", "numpy.f2py", "numpy.testing", "numpy.distutils",
    ),
    "unpickles more data, which can run code": (
        "pickle", "_pickle", "marshal", "shelve", "dill", "cloudpickle", "joblib",
        "torch.load", "torch.serialization.load", "numpy.load", "numpy.lib.npyio", "yaml",
        "jsonpickle", "pandas.read_pickle", "pandas.io.pickle",
    ),
    "opens network connections": (
        "socket", "_socket", "ssl", "http", "urllib", "ftplib", "smtplib", "telnetlib",
        "asyncio", "webbrowser", "requests", "xmlrpc", "torch.utils.model_zoo",
    ),
    "calls or builds other functions, which can run code": (
        "functools.partial", "functools.partialmethod", "functools.reduce",
        "operator.attrgetter", "operator.methodcaller", "operator.itemgetter", "operator.call",
        "types.FunctionType", "types.LambdaType", "types.CodeType", "types.MethodType",
        "types.BuiltinFunctionType", "types.BuiltinMethodType", "copy", "copyreg",
        "numpy.vectorize", "numpy.frompyfunc",
    ),
}  # fmt: skip
_REASONS = {name: why for why, names in _WHY.items() for name in names}
# The builtins a data structure may be made of; every other builtin (eval, exec, getattr,
# open, __import__, ...) is a function, and refused.
_DATA_BUILTINS = frozenset(
    {"set", "frozenset", "dict", "list", "tuple", "int", "float", "complex", "bool", "str",
     "bytes", "bytearray", "slice", "range"}
)  # fmt: skip


# Functions that rebuild plain data and nothing else: numpy's array and scalar reconstructors,
# which old checkpoints holding numpy values name (torch's documentation suggests allowing
# them). --allow-global otherwise lets only classes through.
DATA_RECONSTRUCTORS = frozenset(
    {
        f"numpy.{core}.multiarray.{name}"
        for core in ("core", "_core")
        for name in ("_reconstruct", "scalar")
    }
)


def why_dangerous(name: str) -> str | None:
    """Why the global ``module.name`` can run code and must never be allowed, or ``None``.

    Decided from the name alone, so nothing is imported to decide. ``None`` does not make a
    global safe: it means only that optckpt knows no reason to refuse it.
    """
    module, _, attribute = name.partition(".")
    if (module, attribute) in NAME_MAPPING:
        module, attribute = NAME_MAPPING[(module, attribute)]
    elif module in IMPORT_MAPPING:
        module = IMPORT_MAPPING[module]
    parts = [module, *attribute.split(".")]
    if parts[0] == "builtins":
        if len(parts) == 2 and parts[1] in _DATA_BUILTINS:
            return None
        return "it is a builtin function, and builtins such as eval, exec and open run code"
    if any(p.startswith("__") and p.endswith("__") and len(p) > 4 for p in parts[1:]):
        return "it names a special attribute, which reaches into objects and code"
    for end in range(len(parts), 0, -1):
        why = _REASONS.get(".".join(parts[:end]))
        if why:
            return f"{'.'.join(parts[:end])} {why}"
    return None


def resolve_globals(names: Iterable[str]) -> list[Any]:
    """Import each ``module.Name`` so it can be allow-listed for ``weights_only`` loading.

    A name that can run code (see :func:`optckpt.io.pickles.why_dangerous`) is refused by its
    name, before its module is imported.

    Raises:
        UsageError: a name that is not ``module.attribute``, is dangerous, or cannot be
            imported.
    """
    found = []
    for name in names:
        module_name, _, attr = name.rpartition(".")
        if not module_name:
            raise UsageError(f"--allow-global wants MODULE.NAME, got {name!r}")
        # What torch allows already (its defaults, add_safe_globals) is torch's call.
        why = None if name in torch_allowed_globals() else why_dangerous(name)
        if why:
            raise UsageError(
                f"--allow-global {name}: refused, because {why}; "
                "optckpt never lets a checkpoint call it"
            )
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as e:
            raise UsageError(f"--allow-global {name}: cannot import it ({e})") from e
        if name not in torch_allowed_globals() and name not in DATA_RECONSTRUCTORS:
            _check_allowable(name, obj)
        # Allow-list under the name the pickle uses, which may differ from __qualname__.
        found.append((obj, name))
    return found


def _check_allowable(name: str, obj: Any) -> None:
    """Refuse what ``name`` turned out to be: a function or other non-class (a pickle calls
    what it names, so a function can do anything: ``bz2._builtin_open`` is ``open``,
    ``torch.utils.collect_env.run`` runs a shell), or a class whose own name is dangerous
    (an alias of one that :func:`~optckpt.io.pickles.why_dangerous` refuses)."""
    if not isinstance(obj, type):
        raise UsageError(
            f"--allow-global {name}: refused, because it is a {type(obj).__name__}, not a "
            "class; a checkpoint calls what it names, and optckpt lets only classes through"
        )
    canonical = f"{obj.__module__}.{obj.__qualname__}"
    why = why_dangerous(canonical)
    if why:
        raise UsageError(
            f"--allow-global {name}: refused, because it is {canonical} and {why}; "
            "optckpt never lets a checkpoint call it"
        )
