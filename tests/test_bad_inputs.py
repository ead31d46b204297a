"""The bad-input matrix: for each bad input to cpc-stream, cpc-features, cpc-export and cpc-train, the exit
code, exactly one line on stderr that names the problem, no traceback, and nothing already produced lost
(the other streams' frames and end of stream, the other files' outputs).

Every command runs as its own process, as a user would run it."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass, field

from conftest import REPO

PROGRAMS = {
    "cpc-stream": "cpc_stream.cli",
    "cpc-features": "cpc_training.features",
    "cpc-export": "cpc_export.export",
    "cpc-train": "cpc_training.train",
}


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str
    lines: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.lines = [line for line in self.stderr.splitlines() if line.strip()]


def run(program: str, *args: str, timeout: float = 120, cwd=REPO, **kw) -> Outcome:
    r = subprocess.run(
        [sys.executable, "-m", PROGRAMS[program], *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, **kw,
    )  # fmt: skip
    return Outcome(r.returncode, r.stdout, r.stderr)


def assert_one_line_error(out: Outcome, program: str, message: str, code: int = 2) -> None:
    """Exit `code`, no traceback, and exactly one stderr line `<program>: error: ...` matching `message`."""
    assert "Traceback" not in out.stderr, out.stderr
    errors = [line for line in out.lines if line.startswith(f"{program}: error: ")]
    assert len(errors) == 1, out.stderr
    assert re.search(message, errors[0]), (message, errors[0])
    assert out.code == code, (out.code, out.stderr)
