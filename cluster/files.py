"""Small files that several processes read and write: replaced whole, never half-written.

A reader sees the old file or the new one, never a mix: the new text is written to a
temporary file beside the target, fsynced, then renamed over it (rename is atomic within one
filesystem). Writers that read-modify-write serialise on an flock of a sibling `.lock` file.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path


def replace_text(path: Path, text: str, mode: int = 0o644) -> None:
    """Writes `text` to `path` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


@contextmanager
def locked(path: Path):
    """An exclusive flock of `path` (created if missing) for the duration of the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def append_line(path: Path, line: str, durable: bool = False) -> None:
    """Appends one line with a single O_APPEND write, so concurrent writers never interleave;
    `durable`: under an flock and fsynced before returning (records that must survive a crash)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if durable:
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, (line.rstrip("\n") + "\n").encode())
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
