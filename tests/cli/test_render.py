"""The CLI's shared rendering: one JSON encoding for every --json, notes on stderr."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from optckpt.cli.render import plain_json, print_json, print_notes


def test_non_finite_floats_are_the_strings_of_design() -> None:
    data = {"a": math.nan, "b": [math.inf, -math.inf, 1.5], "c": (0.0, None, True, "x")}
    assert plain_json(data) == {"a": "nan", "b": ["inf", "-inf", 1.5], "c": [0.0, None, True, "x"]}


def test_paths_and_other_objects_become_strings() -> None:
    assert plain_json({"out": Path("/tmp/x.pt"), "dtype": object}) == {
        "out": "/tmp/x.pt",
        "dtype": "<class 'object'>",
    }


def test_print_json_is_strict_json_with_notes(capsys: pytest.CaptureFixture[str]) -> None:
    print_json({"ok": True, "rms": math.nan}, ["one", "two"])
    out = capsys.readouterr()
    data = json.loads(out.out, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert data == {"ok": True, "rms": "nan", "notes": ["one", "two"]}
    assert out.err == ""


def test_print_json_keeps_the_notes_a_report_has(capsys: pytest.CaptureFixture[str]) -> None:
    print_json({"notes": ["from the report"]}, ["from the command"])
    assert json.loads(capsys.readouterr().out)["notes"] == ["from the report", "from the command"]


def test_notes_go_to_stderr_escaped(capsys: pytest.CaptureFixture[str]) -> None:
    print_notes(["plain", "a \x1b[31mred\x1b[0m name"])
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == "note: plain\nnote: a \\x1b[31mred\\x1b[0m name\n"
