"""Per-folder UID list and keyword list, shared by every session and process.

``mailstack-uidlist`` in the folder directory keeps IMAP UIDs stable across
restarts and processes (RFC 3501 2.3.1.1). Its format is Dovecot's
``dovecot-uidlist`` version 3, so it reads like one::

    3 V<uidvalidity> N<uidnext> R<highest uid already reported as \\Recent>
    <uid> :<base>

``mailstack-keywords`` maps Maildir keyword letters (``a`` to ``z`` after
``:2,``) to IMAP keywords, in the format of ``dovecot-keywords``::

    0 $Forwarded
    1 $Junk

Both files are changed only under ``flock`` on ``mailstack-uidlist.lock``
and replaced atomically (written under a temporary name, fsync'd, renamed,
directory fsync'd), so a reader never sees half a file and an assigned UID
survives a crash. A folder copied from Dovecot keeps its UIDs and keywords:
when our files do not exist yet, Dovecot's are read instead.
"""

from __future__ import annotations

import fcntl
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field

UIDLIST = "mailstack-uidlist"
KEYWORDS = "mailstack-keywords"
LOCK = "mailstack-uidlist.lock"
DOVECOT_UIDLIST = "dovecot-uidlist"
DOVECOT_KEYWORDS = "dovecot-keywords"
#: Keyword letters available in a Maildir name.
MAX_KEYWORDS = 26
_MAX_FILE = 64 << 20
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_KEYWORD = re.compile(r"[!#$&'+\-.0-9;<=>?@A-Z^_`a-z|~]{1,100}\Z")


@dataclass
class UidList:
    uidvalidity: int = 0
    uidnext: int = 1
    #: Messages with a UID above this one have not been \\Recent in any session.
    recent: int = 0
    #: base -> uid
    uids: dict[str, int] = field(default_factory=dict)

    def render(self) -> bytes:
        lines = [f"3 V{self.uidvalidity} N{self.uidnext} R{self.recent}"]
        lines += [f"{uid} :{base}" for base, uid in sorted(self.uids.items(), key=lambda i: i[1])]
        return ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")


def parse_uidlist(data: bytes) -> UidList:
    """Our file or a Dovecot one (versions 1 and 3); bad lines are skipped."""
    text = data.decode("utf-8", "surrogateescape")
    lines = text.split("\n")
    result = UidList(recent=-1)
    head = lines[0].split() if lines else []
    if head[:1] == ["1"] and len(head) >= 3:
        # Version 1: "1 <uidvalidity> <uidnext>"
        result.uidvalidity = _int(head[1])
        result.uidnext = max(1, _int(head[2]))
    else:
        for item in head[1:]:
            value = _int(item[1:])
            if item[:1] == "V":
                result.uidvalidity = value
            elif item[:1] == "N":
                result.uidnext = max(1, value)
            elif item[:1] == "R":
                result.recent = value
    top = 0
    for line in lines[1:]:
        uid_text, _, rest = line.partition(" ")
        if not uid_text.isdigit() or not rest:
            continue
        if " :" in rest or rest.startswith(":"):
            # Version 3: "<uid> [<ext> ...] :<file name>"
            filename = rest[rest.index(":") + 1:] if rest.startswith(":") else \
                rest.split(" :", 1)[1]
        else:
            filename = rest.split(" ")[-1]
        base = filename.split(":", 1)[0].split(",", 1)[0]
        uid = int(uid_text)
        if base and 0 < uid < 2 ** 32:
            result.uids[base] = uid
            top = max(top, uid)
    result.uidnext = max(result.uidnext, top + 1)
    if result.recent < 0:
        # Dovecot keeps \Recent in its index: what it listed was seen by some session.
        result.recent = top
    result.recent = min(result.recent, result.uidnext - 1)
    return result


def parse_keywords(data: bytes) -> list[str]:
    names: list[str] = [""] * MAX_KEYWORDS
    for line in data.decode("utf-8", "replace").split("\n"):
        index, _, name = line.partition(" ")
        if index.isdigit() and int(index) < MAX_KEYWORDS and valid_keyword(name.strip()):
            names[int(index)] = name.strip()
    while names and not names[-1]:
        names.pop()
    return names


def render_keywords(names: list[str]) -> bytes:
    return "".join(f"{i} {n}\n" for i, n in enumerate(names) if n).encode("utf-8")


def valid_keyword(name: str) -> bool:
    """An IMAP flag-keyword (an atom, RFC 3501 9), not a system flag."""
    return bool(_KEYWORD.match(name))


def _int(text: str) -> int:
    return int(text) if text.isdigit() and len(text) <= 10 else 0


def read_at(dir_fd: int, name: str) -> tuple[bytes, tuple] | None:
    """A small file in ``dir_fd`` and its identity stamp, or None if absent."""
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        if st.st_size > _MAX_FILE:
            raise OSError(f"{name} is too large ({st.st_size} bytes)")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks), (st.st_ino, st.st_mtime_ns, st.st_size)
    finally:
        os.close(fd)


def stamp_at(dir_fd: int, name: str) -> tuple | None:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def replace_at(dir_fd: int, name: str, data: bytes) -> None:
    """Atomically and durably replace ``name`` in ``dir_fd`` (DESIGN invariant 1).

    The temporary name has no leading dot, so it is never taken for a
    Maildir++ folder. Callers hold the folder's lock (``locked``), so one
    fixed temporary name serves every process, and one a crash leaves behind
    is overwritten by the next write instead of staying forever.
    """
    tmp = f"{name}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    os.fsync(dir_fd)


@contextmanager
def locked(dir_fd: int, name: str = LOCK):
    """An exclusive ``flock`` on ``name`` in ``dir_fd``, across processes."""
    fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                 dir_fd=dir_fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def load_uidlist(dir_fd: int) -> tuple[UidList | None, tuple | None]:
    """Our uid list, else Dovecot's (with no stamp, so it is written on first change)."""
    found = read_at(dir_fd, UIDLIST)
    if found is not None:
        return parse_uidlist(found[0]), found[1]
    found = read_at(dir_fd, DOVECOT_UIDLIST)
    if found is not None:
        return parse_uidlist(found[0]), None
    return None, None


def load_keywords(dir_fd: int) -> list[str]:
    found = read_at(dir_fd, KEYWORDS) or read_at(dir_fd, DOVECOT_KEYWORDS)
    return parse_keywords(found[0]) if found else []
