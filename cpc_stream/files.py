"""Output files written whole or not at all.

    check_writable(dest, "--record")           # at start: refuse a path that cannot be written, before
                                               # any work is done
    with atomic_write(dest) as f:              # later: write to a temporary file beside dest, fsync,
        np.savez(f, ...)                       # rename over dest; on an exception dest is untouched

The temporary file is `.<name>.<pid>.tmp` in dest's folder (a rename is atomic only within one file
system). A process killed with SIGKILL cannot remove it, so each atomic_write first removes the
temporaries of dest left by processes that no longer exist.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import UserError


def check_writable(dest: str | Path, what: str = "output") -> Path:
    """dest as a Path, or a one-line UserError naming `what` if a file cannot be written there."""
    p = Path(dest)
    if p.is_dir():
        raise UserError(f"{what} {p} is a folder; give a file name")
    if not p.parent.is_dir():
        raise UserError(f"{what} {p}: folder {p.parent} does not exist")
    if not os.access(p.parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise UserError(f"{what} {p} is not writable")
    return p


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(dest: Path) -> None:
    """Remove `.<name>.<pid>.tmp` files of dest whose process is gone."""
    for tmp in dest.parent.glob(f".{dest.name}.*.tmp"):
        pid = tmp.name[len(dest.name) + 2 : -len(".tmp")]
        if pid.isdigit() and not _pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_write(dest: str | Path) -> Iterator[BinaryIO]:
    """A binary file that replaces `dest` when the block ends without an exception (fsync, then rename)."""
    dest = Path(dest)
    remove_stale_temporaries(dest)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
