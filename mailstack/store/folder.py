"""Reading and changing the messages of one Maildir folder.

A message is known by its *base*: the part of its file name before the first
``,`` or ``:``. The base never changes while the file moves from ``new/`` to
``cur/`` or gains flags, so it serves as POP3's UIDL and as the key that
finds a message again after another session renamed it (SECURITY-TESTS MD-7).

Flags live in the name after ``:2,`` as sorted letters (Maildir spec); names
that are not plain file names, or whose flags part is absurd, are skipped
(MD-5).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import BinaryIO

from mailstack.store.maildir import Maildir

_INFO = re.compile(r":2,([A-Za-z]{0,52})\Z")
_SIZE = re.compile(r",S=(\d+)")
_WSIZE = re.compile(r",W=(\d+)")
_USEC = re.compile(r"M(\d{1,6})")
_MAX_NAME = 255
_SETTLED_NS = 1_000_000_000


class MailboxInUse(Exception):
    """Another session holds this mailbox's exclusive POP3 lock."""


@dataclass(frozen=True)
class StoredMessage:
    base: str
    subdir: str
    name: str
    #: Size on disk.
    size: int
    #: Size with CRLF line ends (what IMAP and POP3 clients see), or -1 if unknown.
    wsize: int
    flags: str

    @property
    def order(self) -> tuple[int, int, str]:
        """Arrival order: seconds, then microseconds, then the name.

        Names are ``<sec>.M<usec>...`` (Dovecot's, ours), and the microseconds
        are not zero-padded, so comparing names as text would put ``M100000``
        before ``M99999`` of the same second.
        """
        head, _, rest = self.base.partition(".")
        usec = _USEC.match(rest)
        return (int(head) if head.isdigit() else 0, int(usec.group(1)) if usec else 0,
                self.base)


def parse_name(subdir: str, name: str, st_size: int) -> StoredMessage | None:
    """The message a directory entry names, or None for junk (MD-5)."""
    if len(name) > _MAX_NAME or name.startswith(".") or "/" in name:
        return None
    stem, colon, info = name.partition(":")
    flags = ""
    if colon:
        match = _INFO.match(":" + info)
        if not match:
            return None
        flags = "".join(sorted(set(match.group(1))))
    base = stem.split(",", 1)[0]
    if not base:
        return None
    size = _SIZE.search(stem)
    wsize = _WSIZE.search(stem)
    return StoredMessage(base, subdir, name, int(size.group(1)) if size else st_size,
                         int(wsize.group(1)) if wsize else -1, flags)


class Folder(Maildir):
    """A Maildir (INBOX or a Maildir++ subfolder) seen as a list of messages.

    Each operation walks from the mail root to the folder (one ``open`` with
    O_NOFOLLOW per level), unless ``hold`` keeps ``new/`` and ``cur/`` open:
    a POP3 session does that, so a RETR costs one ``open`` of the file. The
    held descriptors stay on the directories they were opened on, so a
    symlink planted later on the path changes nothing either (MD-4).
    """

    _held: dict[str, int] | None = None

    def hold(self) -> None:
        """Keep ``new/`` and ``cur/`` open until ``release``."""
        if self._held is not None:
            return
        held: dict[str, int] = {}
        top = self._open(create=True)
        try:
            for sub in ("new", "cur"):
                held[sub] = self._subdir(top, sub)
        except BaseException:
            for fd in held.values():
                os.close(fd)
            raise
        finally:
            os.close(top)
        self._held = held

    def release(self) -> None:
        held, self._held = self._held, None
        for fd in (held or {}).values():
            os.close(fd)

    def _dir(self, sub: str, create: bool = False):
        """A context giving a descriptor of ``new/`` or ``cur/``: the held one,
        or one opened for the operation and closed after it."""
        if self._held is not None:
            return nullcontext(self._held[sub])
        return _OpenedDir(self, sub, create)

    def listing_stamp(self) -> tuple | None:
        """Inodes and mtimes of ``new/`` and ``cur/``, or None if one changed in the last second.

        Creating, renaming or removing a message sets its directory's mtime,
        so a ``scan`` made after a stamp still holds while the stamp is the
        same (the inodes tell a directory restored in its place); POP3 keeps
        a listing for the next login that way. Only a settled stamp can say
        so: mtimes tick every few milliseconds, and a second change in the
        same tick would leave the mtime as it was (``FolderIndex`` waits the
        same second, as Dovecot does).
        """
        with self._dir("new", create=True) as new, self._dir("cur", create=True) as cur:
            new_st, cur_st = os.fstat(new), os.fstat(cur)
        settled = time.time_ns() - _SETTLED_NS
        if max(new_st.st_mtime_ns, cur_st.st_mtime_ns) >= settled:
            return None
        return (new_st.st_ino, new_st.st_mtime_ns, cur_st.st_ino, cur_st.st_mtime_ns)

    def scan(self) -> list[StoredMessage]:
        """All messages in ``new/`` and ``cur/``, oldest first."""
        messages = []
        for sub in ("new", "cur"):
            with self._dir(sub, create=True) as fd, os.scandir(fd) as entries:
                for entry in entries:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    msg = parse_name(sub, entry.name, entry.stat(follow_symlinks=False).st_size)
                    if msg is not None:
                        messages.append(msg)
        messages.sort(key=lambda m: m.order)
        return messages

    def find(self, base: str) -> StoredMessage | None:
        """Where a message is now, after other sessions may have renamed it."""
        for msg in self.scan():
            if msg.base == base:
                return msg
        return None

    def open_message(self, msg: StoredMessage, buffering: int = -1) -> BinaryIO:
        """Open a message for reading; follows a rename by another session.

        ``buffering=0`` gives the unbuffered file, cheaper for reading the
        whole message in large chunks.
        """
        return os.fdopen(self._open_fd(msg), "rb", buffering)

    def read_message(self, msg: StoredMessage, limit: int) -> bytes | None:
        """The content of a message of at most ``limit`` octets, or None if it is larger.

        One ``open`` and, when the size on disk is known, one ``read``, with
        no file object: POP3's RETR of a usual message.
        """
        fd = self._open_fd(msg)
        try:
            data = os.read(fd, limit + 1)
            if len(data) != msg.size:
                # Not the size the name or the scan gave: read on to the end.
                while len(data) <= limit and (more := os.read(fd, limit + 1 - len(data))):
                    data += more
        finally:
            os.close(fd)
        return data if len(data) <= limit else None

    def _open_fd(self, msg: StoredMessage) -> int:
        """A read-only descriptor of the message, wherever another session moved it."""
        for _ in range(3):
            try:
                with self._dir(msg.subdir) as sub:
                    return os.open(msg.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=sub)
            except FileNotFoundError:
                found = self.find(msg.base)
                if found is None:
                    raise
                msg = found
        raise FileNotFoundError(errno.ENOENT, "message keeps moving", msg.base)

    def set_flags(self, msg: StoredMessage, flags: str) -> StoredMessage:
        """Move the message to ``cur/`` with exactly ``flags`` (IMAP ``STORE FLAGS``)."""
        return self._rename_flags(msg, lambda current: flags)

    def add_flags(self, msg: StoredMessage, flags: str) -> StoredMessage:
        """Move the message to ``cur/`` with ``flags`` added to those it has now.

        "Now" is read again if another session renamed the file since
        ``msg`` was scanned, so flags it set meanwhile are kept.
        """
        return self._rename_flags(msg, lambda current: current + flags)

    def _rename_flags(self, msg: StoredMessage, compute) -> StoredMessage:
        for _ in range(3):
            flags = "".join(sorted(set(compute(msg.flags))))
            new_name = f"{msg.name.split(':', 1)[0]}:2,{flags}"
            if msg.subdir == "cur" and msg.name == new_name:
                return msg
            try:
                with self._dir(msg.subdir) as src, self._dir("cur") as dst:
                    os.rename(msg.name, new_name, src_dir_fd=src, dst_dir_fd=dst)
                return StoredMessage(msg.base, "cur", new_name, msg.size, msg.wsize, flags)
            except FileNotFoundError:
                pass
            found = self.find(msg.base)
            if found is None:
                raise FileNotFoundError(errno.ENOENT, "message was removed", msg.base)
            msg = found
        raise FileNotFoundError(errno.ENOENT, "message keeps moving", msg.base)

    def delete(self, msg: StoredMessage) -> bool:
        """Remove a message; False if it was already gone."""
        for _ in range(3):
            try:
                with self._dir(msg.subdir) as sub:
                    os.unlink(msg.name, dir_fd=sub)
                return True
            except FileNotFoundError:
                pass
            found = self.find(msg.base)
            if found is None:
                return False
            msg = found
        return False

    def lock_exclusive(self, name: str) -> int:
        """Take a named non-blocking lock in this folder; returns the fd to close.

        POP3 uses it for RFC 1939's exclusive maildrop access; it works
        across processes (flock) and between sessions of one process.
        """
        top = self._open(create=True)
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                         dir_fd=top)
        finally:
            os.close(top)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MailboxInUse(name) from None
        return fd


class _OpenedDir:
    """``new/`` or ``cur/`` of a Folder that holds nothing, open for one ``with``."""

    def __init__(self, folder: Folder, sub: str, create: bool):
        top = folder._open(create=create)
        try:
            self.fd = folder._subdir(top, sub)
        finally:
            os.close(top)

    def __enter__(self) -> int:
        return self.fd

    def __exit__(self, *exc) -> None:
        os.close(self.fd)


def user_inbox(maildir: Maildir) -> Folder:
    """The INBOX of a user as a Folder (``MailRoot.maildir`` checks the address)."""
    return Folder(maildir.root, maildir.components)
