"""A selected mailbox as one session sees it (RFC 3501 5.2, 7.4.1).

The session keeps its own list of UIDs, so message sequence numbers stay put
until the session is told otherwise: new messages, flag changes and expunges
by other sessions or processes reach it as ``EXISTS``, ``FETCH`` and
``EXPUNGE`` responses from ``sync()``, at a point where the protocol allows
them (never an EXPUNGE during FETCH, STORE or SEARCH). The list is the
shared index's own (never changed in place), so an idle session costs no
copy of a big mailbox.

Also the Twisted ``IMailbox``/``IMessage`` interfaces over the same data, for
code that wants them.
"""

from __future__ import annotations

import bisect
import io
import time
from email.utils import formatdate

from twisted.internet.defer import maybeDeferred
from twisted.mail import imap4
from zope.interface import implementer

from mailstack.imap.mime import Part, crlf, header_block, parse_fields
from mailstack.store.index import FolderIndex, to_stored

SYSTEM_FLAGS = ["\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft"]


class BadSequence(Exception):
    """A message sequence number beyond the mailbox (answer BAD)."""


@implementer(imap4.IMailbox, imap4.ICloseableMailbox)
class SelectedMailbox:
    def __init__(self, name: str, index: FolderIndex, readonly: bool, run_blocking=None):
        self.name = name
        self.index = index
        self.readonly = readonly
        self._run = run_blocking
        self.uids: list[int] = index.uids
        self.modseq = index.modseq
        self.recent: set[int] = set() if readonly else index.claim_recent()
        self._reported: dict[int, str] = {}
        #: The view still holds messages expunged meanwhile (not yet reported).
        self._stale = False
        self._flag_cache: dict[tuple, bytes] = {}
        self._keywords = list(index.keywords)
        self.listeners: list = []

    # -- flags ----------------------------------------------------------------
    def flag_names(self) -> list[str]:
        return SYSTEM_FLAGS + ["$Forwarded"] + [k for k in self.index.keywords
                                               if k and k.lower() != "$forwarded"]

    def flags(self, uid: int) -> list[str]:
        entry = self.index.entries.get(uid)
        flags = self.index.flags_of(entry.msg.flags) if entry else []
        if uid in self.recent:
            flags.append("\\Recent")
        return flags

    def flags_response(self, uid: int) -> bytes:
        entry = self.index.entries.get(uid)
        key = (entry.msg.flags if entry else "", uid in self.recent, len(self.index.keywords))
        value = self._flag_cache.get(key)
        if value is None:
            value = b"FLAGS (" + " ".join(self.flags(uid)).encode("utf-8") + b")"
            if len(self._flag_cache) < 4096:
                self._flag_cache[key] = value
        return value

    # -- sequence sets --------------------------------------------------------
    def resolve(self, ranges, uid: bool, strict: bool = True) -> list[tuple[int, int]]:
        """(seq, uid) pairs of a sequence set, ascending, each once."""
        uids = self.uids
        n = len(uids)
        spans = []
        if uid:
            top = uids[-1] if n else 0
            for lo, hi in ranges:
                lo = top if lo is None else lo
                hi = top if hi is None else hi
                if lo > hi:
                    lo, hi = hi, lo
                i, j = bisect.bisect_left(uids, lo), bisect.bisect_right(uids, hi)
                if i < j:
                    spans.append((i, j))
        else:
            for lo, hi in ranges:
                lo = n if lo is None else lo
                hi = n if hi is None else hi
                if lo > hi:
                    lo, hi = hi, lo
                if hi > n or lo < 1:
                    if strict and n:
                        raise BadSequence("Invalid message sequence number")
                    hi = min(hi, n)
                if lo <= hi:
                    spans.append((lo - 1, hi))
        spans.sort()
        result = []
        last = -1
        for i, j in spans:
            for k in range(max(i, last + 1), j):
                result.append((k + 1, uids[k]))
            last = max(last, j - 1)
        return result

    # -- notifications ----------------------------------------------------------
    def note_reported(self, uid: int, letters: str) -> None:
        """The session already told the client these flags (STORE): don't repeat them."""
        self._reported[uid] = letters

    def sync(self, expunge: bool = True) -> list[bytes]:
        """Untagged responses that bring the client up to date (RFC 3501 7.4.1)."""
        index = self.index
        index.refresh()
        lines: list[bytes] = []
        if index.keywords != self._keywords:
            self._keywords = list(index.keywords)
            lines += self.flag_lines()
        if index.modseq == self.modseq and index.uids is self.uids:
            self._reported.clear()
            return lines
        changed = index.changed_since(self.modseq)
        old = self.uids
        entries = index.entries
        if expunge:
            if changed is None or self._stale:
                gone = [i for i, u in enumerate(old) if u not in entries]
            else:
                gone = sorted(i for u in changed if u not in entries
                              for i in [bisect.bisect_left(old, u)]
                              if i < len(old) and old[i] == u)
            for i in reversed(gone):
                lines.append(b"* %d EXPUNGE" % (i + 1))
            if gone:
                dropped = {old[i] for i in gone}
                self.recent -= dropped
            view = index.uids
            self._stale = False
        else:
            # Expunges wait for a command that may report them; remember that they do.
            if changed is None or any(u not in entries for u in changed):
                self._stale = True
            last = old[-1] if old else 0
            view = old + index.uids[bisect.bisect_right(index.uids, last):] \
                if index.uids and index.uids[-1] > last else old
        new = len(view) - bisect.bisect_right(view, old[-1] if old else 0)
        if new:
            if not self.readonly:
                self.recent |= index.claim_recent()
            lines.append(b"* %d EXISTS" % len(view))
            lines.append(b"* %d RECENT" % len(self.recent))
        top_old = old[-1] if old else 0
        candidates = old if changed is None else sorted(u for u in changed if u <= top_old)
        for uid in candidates:
            entry = entries.get(uid)
            if entry is None or entry.modseq < self.modseq and changed is None:
                continue
            if self._reported.get(uid) == entry.msg.flags:
                continue
            i = bisect.bisect_left(view, uid)
            if i < len(view) and view[i] == uid:
                lines.append(b"* %d FETCH (UID %d %s)" % (i + 1, uid, self.flags_response(uid)))
        self.uids = view
        self.modseq = index.modseq
        self._reported.clear()
        return lines

    def flag_lines(self) -> list[bytes]:
        names = " ".join(self.flag_names()).encode("utf-8")
        permanent = b"" if self.readonly else names + b" \\*"
        return [b"* FLAGS (" + names + b")",
                b"* OK [PERMANENTFLAGS (" + permanent + b")] Flags permitted"]

    # -- twisted.mail.imap4.IMailbox ----------------------------------------------
    def getFlags(self):
        return self.flag_names()

    def getHierarchicalDelimiter(self):
        return "/"

    def getUIDValidity(self):
        return self.index.uidvalidity

    def getUIDNext(self):
        return self.index.uidnext

    def getUID(self, message):
        return self.uids[message - 1]

    def getMessageCount(self):
        return len(self.uids)

    def getRecentCount(self):
        return len(self.recent)

    def getUnseenCount(self):
        return sum(1 for u in self.uids if u in self.index.entries
                   and "S" not in self.index.entries[u].msg.flags)

    def isWriteable(self):
        return not self.readonly

    def destroy(self):
        raise imap4.MailboxException("Use DELETE")

    def requestStatus(self, names):
        values = {"MESSAGES": self.getMessageCount, "RECENT": self.getRecentCount,
                  "UIDNEXT": self.getUIDNext, "UIDVALIDITY": self.getUIDValidity,
                  "UNSEEN": self.getUnseenCount}
        return {n: values[n.upper()]() for n in names}

    def addListener(self, listener):
        self.listeners.append(listener)

    def removeListener(self, listener):
        if listener in self.listeners:
            self.listeners.remove(listener)

    def addMessage(self, message, flags=(), date=None):
        data = message.read() if hasattr(message, "read") else message
        letters = self.index.letters_of(flags or ())
        when = time.mktime(imap4.parseTime(date)) if date else None

        def write():
            return self.index.write_message(to_stored(data), letters, when)

        d = self._run(write) if self._run else maybeDeferred(write)
        return d.addCallback(lambda base: self.index.uids_of([base])[0])

    def expunge(self):
        if self.readonly:
            raise imap4.ReadOnlyMailbox()
        deleted = [u for u in self.uids if u in self.index.entries
                   and "T" in self.index.entries[u].msg.flags]
        removed = set(self.index.expunge(deleted))
        seqs = [i + 1 for i, u in enumerate(self.uids) if u in removed]
        self.uids = [u for u in self.uids if u not in removed]
        self.modseq = self.index.modseq
        return list(reversed(seqs))

    def fetch(self, messages, uid):
        ranges = list(messages.ranges) if hasattr(messages, "ranges") else messages
        for seq, u in self.resolve(ranges, bool(uid), strict=False):
            if u in self.index.entries:
                yield seq, Message(self, u)

    def store(self, messages, flags, mode, uid):
        if self.readonly:
            raise imap4.ReadOnlyMailbox()
        ranges = list(messages.ranges)
        wanted = self.index.letters_of(flags)
        changes = {}
        seqs = {}
        for seq, u in self.resolve(ranges, bool(uid), strict=False):
            entry = self.index.entries.get(u)
            if entry is None:
                continue
            current = set(entry.msg.flags)
            new = set(wanted) if mode == 0 else current | set(wanted) if mode > 0 \
                else current - set(wanted)
            changes[u] = "".join(sorted(new))
            seqs[u] = seq
        self.index.set_flags(changes)
        return {seqs[u]: self.flags(u) for u in changes}

    def close(self):
        self.listeners.clear()


@implementer(imap4.IMessage, imap4.IMessageFile)
class Message:
    """One message for the Twisted interfaces (the server itself uses mime.py)."""

    def __init__(self, mailbox: SelectedMailbox, uid: int, part: Part | None = None):
        self.mailbox = mailbox
        self.uid = uid
        self._part = part

    def _root(self) -> Part:
        if self._part is None:
            data = crlf(self.mailbox.index.read(self.uid))
            self._part = Part(data, 0, len(data))
        return self._part

    def getHeaders(self, negate, *names):
        wanted = {n.lower().encode() if isinstance(n, str) else n.lower() for n in names}
        result = {}
        for name, value, _ in parse_fields(header_block(self._root().data, self._root().start,
                                                        self._root().end)):
            if not names or (name in wanted) != negate:
                result.setdefault(name.decode("ascii", "replace"),
                                  value.decode("utf-8", "replace"))
        return result

    def getBodyFile(self):
        return io.BytesIO(self._root().text)

    def getSize(self):
        part = self._root()
        return part.end - part.start

    def isMultipart(self):
        return bool(self._root().children)

    def getSubPart(self, part):
        children = self._root().children
        if not 0 <= part < len(children):
            raise IndexError(part)
        return Message(self.mailbox, self.uid, children[part])

    def getUID(self):
        return self.uid

    def getFlags(self):
        return self.mailbox.flags(self.uid)

    def getInternalDate(self):
        return formatdate(self.mailbox.index.mtime(self.uid))

    def open(self):
        part = self._root()
        return io.BytesIO(part.data[part.start:part.end])
