"""Durable file-system primitives: write, fsync, rename, fsync the directory.

These are the steps of DESIGN invariant 1 ("nothing acknowledged is lost");
every module that makes a file durable uses them rather than its own copy.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_synced(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to a new file ``path`` and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make the entries (renames, links) of directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_synced(path: Path, data: bytes, tmp: Path | None = None, mode: int = 0o600) -> None:
    """Atomically and durably replace ``path`` with ``data``.

    ``tmp`` is the temporary name (default: a dot-file beside ``path``); it
    must be on the same file system.
    """
    path = Path(path)
    tmp = tmp or path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write_synced(tmp, data, mode)
    os.rename(tmp, path)
    fsync_dir(path.parent)
