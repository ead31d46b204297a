"""The one exception type that command-line tools turn into a one-line error message."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input from the user (a file, a value, a setting): reported as one line, never a traceback."""


def run_cli(prog: str, body: Callable[[], int | None]) -> int:
    """Run a command's body; turn UserError (and Ctrl-C) into a one-line message and an exit code."""
    try:
        return body() or 0
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


class _Format(logging.Formatter):
    """`prog: message` for information, `prog: warning: message` and `prog: error: message` above it."""

    def __init__(self, prog: str):
        super().__init__()
        self.prog = prog

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"{self.prog}: {level}{record.getMessage()}"


def setup_logging(prog: str, level: int = logging.INFO) -> None:
    """Log lines on stderr in the commands' one-line style."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Format(prog))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
