"""Every hostile input of :mod:`corpus` through every command, in subprocesses under limits.

For each (input, command): the exit code is one the case allows (never 1 for a bug, never
70), an error is exactly one ``error: ...`` line on stderr with no traceback, nothing is
left at ``-o``, the input is unchanged, no code from the file ran (no ``CANARY`` file, no
Zen of Python), terminal escapes from the file never reach stdout raw, and each command
ends within the runner's time budget inside a bounded address space.

The jobs run in a few batches (one ``import torch`` each) by :mod:`runner`, two batches
at a time; the per-case tests then read the results.
"""

from __future__ import annotations

import contextlib
import json
import resource
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from adversarial.corpus import CASES, LAYOUT_COMMANDS, Case, real_pt

RUNNER = Path(__file__).with_name("runner.py")
MEMORY = 4 << 30  # address space per batch: torch needs ~3 GiB of it to import
BATCHES = 8
BATCH_SECONDS = 900


def _toy_layout(folder: Path) -> Path:
    """The layout of corpus._adam_state's two parameters, for remap --to."""
    path = folder / "toy_layout.json"
    layout = {
        "params": {"w": {"shape": [3, 2]}, "b": {"shape": [2]}},
        "groups": [{"params": ["w", "b"], "lr": 1e-3}],
    }
    path.write_text(json.dumps(layout))
    return path


def _commands(source: Path, out: Path, shared: Path) -> dict[str, list[str]]:
    """The argv of every command run on a checkpoint input (a folder is written as one)."""
    s = str(source)
    folder = source.is_dir()
    return {
        "inspect": ["inspect", s],
        "inspect-stats": ["inspect", s, "--stats", "--json"],
        "diff": ["diff", s, s],
        "convert": ["convert", s, "-o", str(out / ("out" if folder else "out.safetensors"))],
        "move": [
            *("move", s, "--device", "cpu", "--dtype", "bfloat16"),
            *("-o", str(out / ("m" if folder else "m.pt"))),
        ],
        "remap": ["remap", s, "--to", str(_toy_layout(shared)), "--dry-run"],
        "resume-step": ["resume-step", s],
        "resume-step-o": ["resume-step", s, "-o", str(out / ("r" if folder else "r.pt"))],
    }


def _layout_commands(layout: Path, out: Path, shared: Path) -> dict[str, list[str]]:
    """The argv of every command run on a layout input."""
    good = shared / "adam.pt"
    if not good.exists():
        real_pt(shared)
    return {
        "remap-to": ["remap", str(good), "--to", str(layout), "-o", str(out / "out.pt")],
        "regenerate": [
            "regenerate",
            "--optimizer",
            "adam",
            "--layout",
            str(layout),
            "-o",
            str(out / "g.pt"),
        ],
    }


def _jobs(root: Path) -> tuple[list[dict[str, Any]], dict[str, Case]]:
    shared = root / "_shared"
    shared.mkdir()
    jobs, by_id = [], {}
    for case in CASES:
        folder = root / case.name
        out = folder / "_out"
        out.mkdir(parents=True)
        source = case.build(folder)
        make = _layout_commands if case.commands == LAYOUT_COMMANDS else _commands
        for command, argv in make(source, out, shared).items():
            job_id = f"{case.name}::{command}"
            watch = [str(source), *(str(p) for p in folder.iterdir() if p.name != "_out")]
            jobs.append(
                {
                    "id": job_id,
                    "argv": argv,
                    "cwd": str(folder),
                    "watch": watch,
                    "out_dir": str(out),
                }
            )
            by_id[job_id] = case
    return jobs, by_id


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))


def _run_batch(index: int, jobs: list[dict[str, Any]], root: Path) -> list[dict[str, Any]]:
    jobs_file = root / f"_jobs{index}.json"
    results = root / f"_results{index}.jsonl"
    jobs_file.write_text(json.dumps(jobs))
    with contextlib.suppress(subprocess.TimeoutExpired):
        subprocess.run(
            [sys.executable, str(RUNNER), str(jobs_file), str(results)],
            preexec_fn=_limits,
            timeout=BATCH_SECONDS,
            capture_output=True,
            check=False,
        )
    done = (
        [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    )
    finished = {r["id"] for r in done}
    # a job that killed or hung its batch, and those after it, are reported as such
    return done + [
        {"id": j["id"], "code": "batch died or timed out here"}
        for j in jobs
        if j["id"] not in finished
    ]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    root = tmp_path_factory.mktemp("corpus")
    torch.manual_seed(0)
    jobs, _ = _jobs(root)
    # one case's commands share its folder and -o: they run in one batch, one after another
    cases = sorted({job["cwd"] for job in jobs})
    batch_of = {cwd: i % BATCHES for i, cwd in enumerate(cases)}
    batches = [[job for job in jobs if batch_of[job["cwd"]] == i] for i in range(BATCHES)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        ran = pool.map(lambda ib: _run_batch(ib[0], ib[1], root), enumerate(batches))
        return {r["id"]: r for batch in ran for r in batch}


def test_the_corpus_is_large_enough() -> None:
    assert len(CASES) >= 100


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_hostile_input(case: Case, results: dict[str, dict[str, Any]]) -> None:
    ran = {
        job_id.split("::")[1]: r
        for job_id, r in results.items()
        if job_id.split("::")[0] == case.name
    }
    assert ran, "no command ran"
    problems = []
    for command, r in ran.items():
        where = f"{command}: exit {r['code']!r}, stderr {r.get('stderr', '')!r}"
        if r["code"] not in case.allowed(command):
            problems.append(f"{where} (allowed {sorted(case.allowed(command))})")
            continue
        lines = r["stderr"].splitlines()
        # 1 is a finding (diff: differences; resume-step: a failed check), reported on stdout
        if r["code"] not in (0, 1) and not (len(lines) == 1 and lines[0].startswith("error: ")):
            problems.append(f"{where}: not one error line")
        if "Traceback" in r["stderr"] or "Traceback" in r["stdout"]:
            problems.append(f"{where}: traceback")
        if r["code"] not in (0, 1) and r["left_at_output"]:
            problems.append(f"{command}: left {r['left_at_output']} at -o")
        if not r["unchanged"]:
            problems.append(f"{command}: the input changed")
        if r["canary"] or "Beautiful is better than ugly" in r["stdout"] + r["stderr"]:
            problems.append(f"{command}: code from the file ran")
        if "\x1b" in r["stdout"] or "\x1b" in r["stderr"]:
            problems.append(f"{command}: a raw terminal escape was printed")
    assert not problems, "\n".join(problems)
