"""Run optckpt commands on hostile inputs, many in one process (``python runner.py JOBS OUT``).

The test starts this script in a subprocess under resource limits (address space, CPU time)
and a wall-clock timeout. Each job runs ``optckpt.cli.app.main()`` as the console script
does, with its output captured, and appends one JSON line to OUT as soon as it ends, so a
job that hangs or kills the process is known by the last line written.

A job is ``{"id", "argv", "cwd", "watch": [paths], "out_dir"}``; its result adds ``code``
(the exit status, or ``"uncaught: Type"``), ``stdout``, ``stderr``, ``seconds``, whether the
watched inputs are unchanged, what appeared in ``out_dir``, and whether ``CANARY`` exists.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import stat
import sys
import time
from pathlib import Path
from typing import Any

PER_JOB_SECONDS = 20


class _Timeout(Exception):
    pass


def _on_alarm(signum: int, frame: Any) -> None:
    raise _Timeout


def fingerprint(path: str) -> str:
    """What a path is and holds, without opening FIFOs or following links."""
    try:
        info = os.lstat(path)
    except OSError as e:
        return f"missing: {e.errno}"
    if stat.S_ISLNK(info.st_mode):
        return f"link -> {os.readlink(path)}"
    if stat.S_ISDIR(info.st_mode):
        return "dir: " + ", ".join(
            f"{name}={fingerprint(os.path.join(path, name))}" for name in sorted(os.listdir(path))
        )
    if not stat.S_ISREG(info.st_mode):
        return f"special {stat.S_IFMT(info.st_mode)}"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"file {info.st_size} {info.st_mtime_ns} {digest.hexdigest()}"


def run(job: dict[str, Any]) -> dict[str, Any]:
    """Run one job in this process and describe what happened."""
    from optckpt.cli.app import main

    os.chdir(job["cwd"])
    before = [fingerprint(p) for p in job["watch"]]
    out, err = io.StringIO(), io.StringIO()
    sys.argv = ["optckpt", *job["argv"]]
    start = time.monotonic()
    signal.alarm(PER_JOB_SECONDS)
    code: int | str
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except _Timeout:
        code = "timeout"
    except BaseException as e:  # a bug: what main() let through
        code = f"uncaught: {type(e).__name__}: {e}"[:300]
    finally:
        signal.alarm(0)
    seconds = time.monotonic() - start
    out_dir = Path(job["out_dir"])
    return {
        "id": job["id"],
        "code": code,
        "stdout": out.getvalue()[-4000:],
        "stderr": err.getvalue()[-4000:],
        "seconds": round(seconds, 3),
        "unchanged": before == [fingerprint(p) for p in job["watch"]],
        "left_at_output": sorted(os.listdir(out_dir)) if out_dir.is_dir() else [],
        "canary": (Path(job["cwd"]) / "CANARY").exists(),
    }


def main() -> None:
    """Run every job of the JOBS file, appending each result to OUT."""
    jobs = json.loads(Path(sys.argv[1]).read_text())
    results = Path(sys.argv[2])
    signal.signal(signal.SIGALRM, _on_alarm)
    for job in jobs:
        result = run(job)
        with results.open("a") as f:
            f.write(json.dumps(result) + "\n")
        # what a job wrote must not reach the next one
        for left in Path(job["out_dir"]).iterdir():
            if left.is_dir() and not left.is_symlink():
                shutil.rmtree(left)
            else:
                left.unlink()


if __name__ == "__main__":
    main()
