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
from dataclasses import dataclass
from typing import BinaryIO

from mailstack.store.maildir import Maildir

_INFO = re.compile(r":2,([A-Za-z]{0,52})\Z")
_SIZE = re.compile(r",S=(\d+)")
_WSIZE = re.compile(r",W=(\d+)")
_MAX_NAME = 255


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
    def arrival(self) -> int:
        head = self.base.split(".", 1)[0]
        return int(head) if head.isdigit() else 0


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
    """A Maildir (INBOX or a Maildir++ subfolder) seen as a list of messages."""

    def scan(self) -> list[StoredMessage]:
        """All messages in ``new/`` and ``cur/``, oldest first."""
        top = self._open(create=True)
        messages = []
        try:
            for sub in ("new", "cur"):
                fd = self._subdir(top, sub)
                try:
                    with os.scandir(fd) as entries:
                        for entry in entries:
                            if not entry.is_file(follow_symlinks=False):
                                continue
                            msg = parse_name(sub, entry.name,
                                             entry.stat(follow_symlinks=False).st_size)
                            if msg is not None:
                                messages.append(msg)
                finally:
                    os.close(fd)
        finally:
            os.close(top)
        messages.sort(key=lambda m: (m.arrival, m.base))
        return messages

    def find(self, base: str) -> StoredMessage | None:
        """Where a message is now, after other sessions may have renamed it."""
        for msg in self.scan():
            if msg.base == base:
                return msg
        return None

    def open_message(self, msg: StoredMessage) -> BinaryIO:
        """Open a message for reading; follows a rename by another session."""
        for _ in range(3):
            try:
                return self._open_file(msg)
            except FileNotFoundError:
                found = self.find(msg.base)
                if found is None:
                    raise
                msg = found
        raise FileNotFoundError(errno.ENOENT, "message keeps moving", msg.base)

    def _open_file(self, msg: StoredMessage) -> BinaryIO:
        top = self._open(create=False)
        try:
            sub = self._subdir(top, msg.subdir)
            try:
                fd = os.open(msg.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=sub)
            finally:
                os.close(sub)
        finally:
            os.close(top)
        return os.fdopen(fd, "rb")

    def set_flags(self, msg: StoredMessage, flags: str) -> StoredMessage:
        """Move the message to ``cur/`` with exactly ``flags`` (sorted letters)."""
        flags = "".join(sorted(set(flags)))
        stem = msg.name.split(":", 1)[0]
        new_name = f"{stem}:2,{flags}"
        for _ in range(3):
            if msg.subdir == "cur" and msg.name == new_name:
                return msg
            top = self._open(create=False)
            try:
                src = self._subdir(top, msg.subdir)
                dst = self._subdir(top, "cur")
                try:
                    os.rename(msg.name, new_name, src_dir_fd=src, dst_dir_fd=dst)
                    return StoredMessage(msg.base, "cur", new_name, msg.size, msg.wsize, flags)
                except FileNotFoundError:
                    pass
                finally:
                    os.close(src)
                    os.close(dst)
            finally:
                os.close(top)
            found = self.find(msg.base)
            if found is None:
                raise FileNotFoundError(errno.ENOENT, "message was removed", msg.base)
            msg = found
        raise FileNotFoundError(errno.ENOENT, "message keeps moving", msg.base)

    def delete(self, msg: StoredMessage) -> bool:
        """Remove a message; False if it was already gone."""
        for _ in range(3):
            top = self._open(create=False)
            try:
                sub = self._subdir(top, msg.subdir)
                try:
                    os.unlink(msg.name, dir_fd=sub)
                    return True
                except FileNotFoundError:
                    pass
                finally:
                    os.close(sub)
            finally:
                os.close(top)
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


def user_inbox(maildir: Maildir) -> Folder:
    """The INBOX of a user as a Folder (``MailRoot.maildir`` checks the address)."""
    return Folder(maildir.root, maildir.components)
