"""Regular expressions from the command line, run with a time budget.

``--rename REGEX=REPL`` (remap) and ``--group REGEX:...`` (remap, regenerate) are applied to
parameter names, which come from the checkpoint. A pattern such as ``(a|aa)+$`` backtracks
exponentially on a long enough name, and Python's :mod:`re` cannot be interrupted, so these
patterns are compiled with the `regex <https://pypi.org/project/regex/>`_ package (the same
syntax as :mod:`re`: its ``VERSION0`` is the default) and every application runs under its
``timeout``: :data:`SECONDS_PER_NAME` per name, :data:`SECONDS_IN_ALL` for a whole command.
Past either, the command stops with a :class:`~optckpt.errors.UsageError` (exit 2) that names
the rule and the name.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import regex

from optckpt.errors import UsageError

__all__ = [
    "SECONDS_IN_ALL",
    "SECONDS_PER_NAME",
    "Pattern",
    "apply_renames",
    "compile_pattern",
    "parse_rename",
]

SECONDS_PER_NAME = 1.0
"""Time one pattern may take on one name (a real one takes microseconds)."""

SECONDS_IN_ALL = 30.0
"""Time one pattern may take over every name of a checkpoint together."""


@dataclass
class Pattern:
    """A compiled command-line pattern that refuses to run for ever.

    Attributes:
        option: the option it came from (``--rename``, ``--group``), for messages.
        rule: the whole rule as given, for messages.
        compiled: the :mod:`regex` pattern.
    """

    option: str
    rule: str
    compiled: Any
    _spent: float = field(default=0.0, repr=False)

    @property
    def pattern(self) -> str:
        """The pattern's source text, as :attr:`re.Pattern.pattern`."""
        return str(self.compiled.pattern)

    def search(self, name: str) -> bool:
        """Whether the pattern matches anywhere in ``name`` (:meth:`re.Pattern.search`).

        Raises:
            UsageError: the pattern ran out of time.
        """
        return bool(self._run(name, lambda timeout: self.compiled.search(name, timeout=timeout)))

    def sub(self, replacement: str, name: str) -> str:
        """``name`` with every match replaced (:meth:`re.Pattern.sub`; ``\\1`` refers to groups).

        Raises:
            UsageError: the pattern ran out of time, or ``replacement`` refers to a group the
                pattern does not have or ends in a lone backslash.
        """
        try:
            return str(
                self._run(
                    name, lambda timeout: self.compiled.sub(replacement, name, timeout=timeout)
                )
            )
        except (regex.error, IndexError) as e:
            raise UsageError(f"{self.option} {self.rule!r}: bad replacement ({e})") from e

    def _run(self, name: str, call: Any) -> Any:
        left = SECONDS_IN_ALL - self._spent
        if left <= 0:
            raise self._too_long(f"over the checkpoint's names ({SECONDS_IN_ALL:g} s in all)")
        timeout = min(SECONDS_PER_NAME, left)
        start = time.monotonic()
        try:
            return call(timeout)
        except TimeoutError:
            raise self._too_long(
                f"on {name[:80]!r}"
                if timeout == SECONDS_PER_NAME
                else f"over the checkpoint's names ({SECONDS_IN_ALL:g} s in all)"
            ) from None
        finally:
            self._spent += time.monotonic() - start

    def _too_long(self, where: str) -> UsageError:
        return UsageError(
            f"{self.option} {self.rule!r}: the pattern took too long {where} "
            "(catastrophic backtracking?); simplify it, e.g. drop nested repetition such as (a+)+"
        )


def compile_pattern(pattern: str, *, option: str, rule: str) -> Pattern:
    """Compile a command-line pattern (Python :mod:`re` syntax).

    Args:
        pattern: the regular expression.
        option: the option it came from, for messages (``--rename``).
        rule: the whole rule as given, for messages.

    Raises:
        UsageError: the pattern does not compile.
    """
    try:
        compiled = regex.compile(pattern, flags=regex.VERSION0)
    except (regex.error, ValueError, OverflowError, RecursionError) as e:
        raise UsageError(f"{option} {rule!r}: bad regex ({e})") from e
    return Pattern(option, rule, compiled)


def parse_rename(rule: str) -> tuple[Pattern, str]:
    """Parse ``'REGEX=REPLACEMENT'`` (split at the first ``=``; ``\\1`` refers to groups).

    The pattern runs with a time budget (:mod:`optckpt.patterns`): names come from the
    checkpoint, and a backtracking pattern must not hang the command.

    Raises:
        UsageError: no ``=`` or a bad regex.
    """
    pattern, sep, replacement = rule.partition("=")
    if not sep or not pattern:
        raise UsageError(f"--rename {rule!r}: expected 'REGEX=REPLACEMENT'")
    return compile_pattern(pattern, option="--rename", rule=rule), replacement


def apply_renames(name: str, rules: Sequence[tuple[Pattern, str]]) -> str:
    """``name`` with the ``--rename`` rules (from :func:`parse_rename`) applied in order.

    Raises:
        UsageError: a rule runs out of time or its replacement is bad.
    """
    for pattern, replacement in rules:
        name = pattern.sub(replacement, name)
    return name
