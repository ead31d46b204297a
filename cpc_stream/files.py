"""Output files written whole or not at all.

    check_writable(dest, "--record")           # at start: refuse a path that cannot be written, before
                                               # any work is done
    with atomic_write(dest) as f:              # later: write to a temporary file beside dest, fsync,
        np.savez(f, ...)                       # rename over dest; on an exception dest is untouched

The temporary file is `.<name>.<pid>.tmp` in dest's folder (a rename is atomic only within one file
system). A process killed with SIGKILL cannot remove it, so each atomic_write first removes the
temporaries of dest left by processes that no longer exist.

    with NpzWriter({"c": (256,)}, folder) as out:   # arrays too long to hold in memory, row by row:
        out.append("c", rows)                       # each goes to a nameless temporary file in folder,
        out.save(dest, hop=160)                     # then into dest (an .npz, as np.savez writes it)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import UserError


def check_writable(dest: str | Path, what: str = "output") -> Path:
    """dest as a Path, or a one-line UserError naming `what` if a file cannot be written there."""
    p = Path(dest)
    if p.is_dir():
        raise UserError(f"{what} {p} is a folder; give a file name")
    if not p.parent.is_dir():
        raise UserError(f"{what} {p}: output folder {p.parent} does not exist")
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


class NpzWriter:
    """Arrays built row block by row block and saved as one .npz (what np.savez writes, np.load reads),
    with memory bounded by one block: each array's rows go to its own nameless temporary file in
    `folder` (tempfile.TemporaryFile: no name on disk, so even SIGKILL leaves nothing behind), and save()
    copies them into the zip after their .npy headers, 1 MB at a time. Disk: the arrays' size twice,
    while save() runs. `rows` gives each array's row shape; all are stored as `dtype`."""

    def __init__(self, rows: dict[str, tuple[int, ...]], folder: str | Path, dtype: type = np.float32):
        self.row_shape = dict(rows)
        self.dtype = np.dtype(dtype)
        self.count = dict.fromkeys(rows, 0)
        self.files = {name: tempfile.TemporaryFile(dir=folder) for name in rows}

    def __enter__(self) -> NpzWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self.files.values():
            f.close()

    def append(self, name: str, block: np.ndarray) -> None:
        """Add rows to array `name`: block (n, *row shape), n may be 0."""
        if block.shape[1:] != self.row_shape[name]:
            raise ValueError(f"{name}: rows of shape {block.shape[1:]}, expected {self.row_shape[name]}")
        self.files[name].write(np.ascontiguousarray(block, dtype=self.dtype).data)
        self.count[name] += block.shape[0]

    def save(self, dest: str | Path, **scalars: float | int) -> None:
        """Write dest atomically: every array, then `scalars` as 0-d arrays."""
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False}
        with atomic_write(dest) as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED) as z:
            for name, f in self.files.items():
                with z.open(f"{name}.npy", "w", force_zip64=True) as member:
                    shape = (self.count[name], *self.row_shape[name])
                    np.lib.format.write_array_header_1_0(member, {**header, "shape": shape})
                    f.seek(0)
                    shutil.copyfileobj(f, member, 1 << 20)
            for name, value in scalars.items():
                with z.open(f"{name}.npy", "w") as member:
                    np.lib.format.write_array(member, np.asarray(value))
