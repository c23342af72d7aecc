"""A text file that is re-read when it changes on disk.

The users and aliases files are edited by ``mailstack user``/``alias`` (or by
hand) while the daemon runs; each lookup stats the file and parses it again
only when its identity, size or mtime changed. A stat is cheap next to an SMTP
round trip, and no timer or inotify watch is needed. Given the reactor, a
lookup on its thread stats once per reactor turn (a busy MX looks up the same
file for every recipient of every session of a turn, and those stats were 4%
of the reactor thread); a change is seen from the next turn on. Writers replace the file
atomically (``write_atomically``), so a reader sees the old or the new
version, never half of one.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Generic, Iterator, TypeVar

from twisted.python.threadable import isInIOThread

from mailstack.fsutil import replace_synced

T = TypeVar("T")


class ReloadingFile(Generic[T]):
    """Holds ``parse(lines)`` of a file, refreshed when the file changes.

    A missing file parses as empty. A parse error keeps the previous good
    version in service (and raises on first load, so start-up fails fast);
    the broken version is not parsed again until it changes once more.
    """

    def __init__(self, path: Path, parse: Callable[[list[str], Path], T], reactor=None):
        self.path = Path(path)
        self._parse = parse
        self._reactor = reactor
        #: Checked on the reactor thread during the current reactor turn.
        self._checked_this_turn = False
        self._stamp: tuple | None = None
        self._bad_stamp: tuple | None = None
        self._value: T = parse([], self.path)
        self.last_error: Exception | None = None
        self.get(strict=True)

    def get(self, strict: bool = False) -> T:
        if self._checked_this_turn and not strict:
            return self._value
        if self._reactor is not None and self._reactor.running and isInIOThread():
            self._checked_this_turn = True
            self._reactor.callLater(0, self._next_turn)
        try:
            st = os.stat(self.path)
            stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            stamp = ()
        if stamp != self._stamp and (strict or stamp != self._bad_stamp):
            try:
                lines = self.path.read_text("utf-8").splitlines() if stamp else []
                self._value = self._parse(lines, self.path)
                self._stamp = stamp
                self.last_error = None
            except (ValueError, OSError) as e:
                self.last_error = e
                self._bad_stamp = stamp
                if strict:
                    raise
        return self._value

    def _next_turn(self) -> None:
        self._checked_this_turn = False


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Serialise writers of ``path`` (across processes) with a lock file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_atomically(path: Path, text: str, mode: int = 0o600) -> None:
    """Replace a text file so that readers see the old or the new version."""
    replace_synced(Path(path), text.encode("utf-8"), mode=mode)
