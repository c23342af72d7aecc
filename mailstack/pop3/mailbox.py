"""The POP3 maildrop: a snapshot of INBOX taken at login (RFC 1939).

Message numbers and sizes stay fixed for the session. Deletions are only
marked until QUIT (``sync``); a dropped connection deletes nothing. A
retrieved message gets the ``S`` (seen) flag, so an IMAP client sees it as
read. Sizes are exact: the octets of the message as the client receives it
(CRLF line ends; RFC 1939 11, see ``wire``). The UIDL is the Maildir base
name, which never changes for a message (not when IMAP changes its flags,
nor across restarts).
"""

from __future__ import annotations

import hashlib
import os
import re

from twisted.mail.interfaces import IMailboxPOP3
from zope.interface import implementer

from mailstack.pop3.wire import wire_size
from mailstack.store.folder import Folder, StoredMessage

LOCK_NAME = "mailstack-pop3.lock"
_UIDL_OK = re.compile(r"[\x21-\x7e]{1,70}\Z")  # RFC 1939 7: 1-70 printable characters


def uidl_of(msg: StoredMessage) -> bytes:
    if _UIDL_OK.match(msg.base):
        return msg.base.encode("ascii")
    return hashlib.sha1(msg.base.encode("utf-8", "surrogateescape")).hexdigest().encode()


@implementer(IMailboxPOP3)
class Maildrop:
    """One session's view of a user's INBOX. Built in a thread (it reads files)."""

    loginDelay = 0
    messageExpiration = None

    def __init__(self, address: str, folder: Folder, lock_fd: int,
                 messages: list[StoredMessage], sizes: list[int]):
        self.address = address
        self.folder = folder
        self._lock_fd = lock_fd
        self.messages = messages
        self.sizes = sizes
        self.deleted: set[int] = set()

    @classmethod
    def open(cls, address: str, folder: Folder, size_cache: dict[str, int]) -> Maildrop:
        """Lock the maildrop (MailboxInUse if held) and take the snapshot.

        A size comes from ``W=`` in the file name when there is one (it is
        the same CRLF size, written at delivery by mailstack and Dovecot),
        so a login reads no message. Other files (from Postfix, mutt, a
        restored backup) are measured once and remembered in ``size_cache``;
        Maildir files never change their content.
        """
        lock_fd = folder.lock_exclusive(LOCK_NAME)
        try:
            folder.hold()
            messages = folder.scan()
            sizes = []
            for msg in messages:
                if msg.wsize >= 0:
                    sizes.append(msg.wsize)
                    continue
                key = f"{folder.path}/{msg.base}"
                size = size_cache.get(key)
                if size is None:
                    with folder.open_message(msg) as f:
                        size = wire_size(f)
                    size_cache[key] = size
                sizes.append(size)
        except BaseException:
            folder.release()
            os.close(lock_fd)
            raise
        return cls(address, folder, lock_fd, messages, sizes)

    def logout(self) -> None:
        """Release the maildrop lock (the session ended, with or without QUIT)."""
        if self._lock_fd is not None:
            self.folder.release()
            os.close(self._lock_fd)
            self._lock_fd = None

    def _check(self, index: int) -> None:
        if not 0 <= index < len(self.messages):
            raise ValueError("no such message")

    # IMailboxPOP3
    def listMessages(self, index: int | None = None):
        if index is None:
            return [0 if i in self.deleted else s for i, s in enumerate(self.sizes)]
        self._check(index)
        return 0 if index in self.deleted else self.sizes[index]

    def getMessage(self, index: int, buffering: int = -1):
        self._check(index)
        return self.folder.open_message(self.messages[index], buffering)

    def getUidl(self, index: int) -> bytes:
        self._check(index)
        if index in self.deleted:
            raise ValueError("message deleted")
        return uidl_of(self.messages[index])

    def deleteMessage(self, index: int) -> None:
        self._check(index)
        self.deleted.add(index)

    def undeleteMessages(self) -> None:
        self.deleted.clear()

    def mark_seen(self, index: int) -> None:
        msg = self.messages[index]
        if "S" not in msg.flags:
            self.messages[index] = self.folder.add_flags(msg, "S")

    def sync(self) -> int:
        """Remove the messages marked deleted (the UPDATE state); returns how many."""
        removed = 0
        for index in sorted(self.deleted):
            if self.folder.delete(self.messages[index]):
                removed += 1
        self.deleted.clear()
        return removed
