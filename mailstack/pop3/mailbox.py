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
import threading
from collections import OrderedDict

from twisted.mail.interfaces import IMailboxPOP3
from zope.interface import implementer

from mailstack.pop3.wire import by_recipe, encode, recipe_of, wire_size
from mailstack.store.folder import Folder, StoredMessage

LOCK_NAME = "mailstack-pop3.lock"
_UIDL_OK = re.compile(r"[\x21-\x7e]{1,70}\Z")  # RFC 1939 7: 1-70 printable characters


def uidl_of(msg: StoredMessage) -> bytes:
    if _UIDL_OK.match(msg.base):
        return msg.base.encode("ascii")
    return hashlib.sha1(msg.base.encode("utf-8", "surrogateescape")).hexdigest().encode()


class MaildropCache:
    """What POP3 logins learn about maildrops, kept for later logins in this process.

    * Sizes of messages whose names give none (no ``W=``), measured once.
    * Recipes (``wire.recipe_of``): a message found on its first RETR to need
      no dot-stuffing and at most CRs before its LFs is sent again without
      being searched. Its length is checked each time, so a file changed
      in place against the Maildir rules is encoded afresh unless it kept
      its length too; whoever can do that can change what RETR sends anyway.
    * The last listing of each folder with its ``listing_stamp``: a login to
      a maildrop that nothing changed since (a client that leaves mail on
      the server and checks every few minutes) reads no directory, as with
      Dovecot's index. The least recently used listings are dropped beyond
      ``max_listed`` messages in all.

    Logins run in a thread pool, so the listings are guarded by a lock.
    """

    def __init__(self, max_messages: int = 200_000, max_listed: int = 200_000):
        #: Sizes and recipes kept at most, each (all are forgotten beyond).
        self.max_messages = max_messages
        self.max_listed = max_listed
        self._sizes: dict[str, int] = {}
        #: key/base -> (stored length, recipe)
        self._recipes: dict[str, tuple[int, int]] = {}
        self._listings: OrderedDict[str, tuple] = OrderedDict()
        self._listed = 0
        self._lock = threading.Lock()

    def measure(self, folder: Folder, key: str, msg: StoredMessage) -> int:
        """The RFC 1939 size of a message whose name gives none, read once."""
        name = key + "/" + msg.base
        size = self._sizes.get(name)
        if size is None:
            with folder.open_message(msg) as f:
                size = wire_size(f)
            if len(self._sizes) >= self.max_messages:
                self._sizes.clear()
            self._sizes[name] = size
        return size

    def wire_form(self, name: str, data: bytes) -> bytes:
        """``wire.encode(data)`` for the message stored at ``name``, by its recipe if known."""
        known = self._recipes.get(name)
        if known is not None and known[0] == len(data):
            return by_recipe(known[1], data)
        wire = encode(data)
        recipe = recipe_of(data, wire)
        if recipe is not None:
            if len(self._recipes) >= self.max_messages:
                self._recipes.clear()
            self._recipes[name] = (len(data), recipe)
        return wire

    def listing(self, key: str, stamp) -> tuple | None:
        """(messages, sizes) of the folder if listed at this very stamp, else None."""
        if stamp is None:
            return None
        with self._lock:
            entry = self._listings.get(key)
            if entry is None or entry[0] != stamp:
                return None
            self._listings.move_to_end(key)
            return entry[1]

    def remember(self, key: str, stamp, listing: tuple) -> None:
        """Keep a fresh listing for the next login (not if its stamp is unsettled)."""
        with self._lock:
            old = self._listings.pop(key, None)
            if old is not None:
                self._listed -= len(old[1][0])
            if stamp is None or len(listing[0]) > self.max_listed:
                return
            self._listings[key] = (stamp, listing)
            self._listed += len(listing[0])
            while self._listed > self.max_listed:
                _, (_, (messages, _)) = self._listings.popitem(last=False)
                self._listed -= len(messages)


@implementer(IMailboxPOP3)
class Maildrop:
    """One session's view of a user's INBOX. Built in a thread (it reads files)."""

    loginDelay = 0
    messageExpiration = None

    def __init__(self, address: str, folder: Folder, lock_fd: int,
                 messages: list[StoredMessage], sizes: list[int], cache: MaildropCache):
        self.address = address
        self.folder = folder
        self._cache = cache
        self._key = str(folder.path)
        self._lock_fd = lock_fd
        self.messages = messages
        self.sizes = sizes
        self.deleted: set[int] = set()

    @classmethod
    def open(cls, address: str, folder: Folder, cache: MaildropCache) -> Maildrop:
        """Lock the maildrop (MailboxInUse if held) and take the snapshot.

        The listing and sizes come from ``cache`` when nothing was added,
        renamed or removed in the folder since a previous login; otherwise
        the folder is scanned and the listing kept for the next one. A size
        comes from ``W=`` in the file name when there is one (it is the same
        CRLF size, written at delivery by mailstack and Dovecot), so a login
        reads no message. Other files (from Postfix, mutt, a restored backup)
        are measured once and their sizes kept in ``cache``; Maildir files
        never change their content.
        """
        lock_fd = folder.lock_exclusive(LOCK_NAME)
        try:
            folder.hold()
            # Taken before the scan: a change during it makes the next stamp differ.
            stamp = folder.listing_stamp()
            key = str(folder.path)
            known = cache.listing(key, stamp)
            if known is None:
                messages = folder.scan()
                sizes = [msg.wsize if msg.wsize >= 0 else cache.measure(folder, key, msg)
                         for msg in messages]
                known = (messages, sizes)
                cache.remember(key, stamp, known)
        except BaseException:
            folder.release()
            os.close(lock_fd)
            raise
        # Copies: the session changes its own list (Seen flags) and the cache is shared.
        return cls(address, folder, lock_fd, list(known[0]), list(known[1]), cache)

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

    def wire_message(self, index: int, limit: int) -> bytes | None:
        """Message ``index`` in wire form (``wire.encode``), or None if it is larger.

        ``limit`` bounds its size on disk; a larger message is read in
        chunks through ``getMessage``.
        """
        self._check(index)
        msg = self.messages[index]
        data = self.folder.read_message(msg, limit)
        if data is None:
            return None
        return self._cache.wire_form(self._key + "/" + msg.base, data)

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
