"""The commands of the Selected state (RFC 3501 6.4) and their UID forms.

FETCH, STORE, SEARCH, COPY, MOVE (RFC 6851), EXPUNGE and UID EXPUNGE
(RFC 4315), CLOSE, UNSELECT (RFC 3691), CHECK. A mixin of ``IMAPServer``:
``self.mbox`` is the ``SelectedMailbox``; untagged updates are sent by the
server just before each tagged reply (see ``IMAPServer._respond``).
"""

from __future__ import annotations

import errno

from twisted.internet import task
from twisted.logger import Logger

from mailstack.imap import fetch, search
from mailstack.imap.mailbox import BadSequence
from mailstack.imap.parser import Parser
from mailstack.store.folders import MailboxError
from mailstack.store.index import FolderGone, TooManyKeywords

log = Logger(namespace="mailstack.imap")
_CHUNK = 65536


def uid_set(uids: list[int]) -> bytes:
    """1,2,3,5 -> b"1:3,5" (RFC 4315 uid-set)."""
    out = []
    start = prev = None
    for u in uids:
        if prev is not None and u == prev + 1:
            prev = u
            continue
        if start is not None:
            out.append(b"%d" % start if start == prev else b"%d:%d" % (start, prev))
        start = prev = u
    if start is not None:
        out.append(b"%d" % start if start == prev else b"%d:%d" % (start, prev))
    return b",".join(out)


class _Streaming:
    """Lets the transport pause a cooperative task that writes a long answer."""

    def __init__(self, task_):
        self.task = task_

    def pauseProducing(self):
        self.task.pause()

    def resumeProducing(self):
        self.task.resume()

    def stopProducing(self):
        self.task.stop()


class SelectedCommands:
    # -- argument parsers ---------------------------------------------------------
    def arg_fetch(self, line):
        return self._parse(line, fetch.parse_items)

    def arg_search(self, line):
        try:
            return self._parse(line, search.parse)
        except search.BadCharset:
            return search.BadCharset, b""

    def arg_store(self, line):
        def parse(p: Parser):
            sign = b"+" if p.take(b"+") else b"-" if p.take(b"-") else b""
            p.expect(b"FLAGS")
            silent = p.take(b".SILENT")
            p.sp()
            return sign, silent, p.flag_list(parens_optional=True)
        return self._parse(line, parse)

    # -- FETCH ------------------------------------------------------------------
    def do_FETCH(self, tag, messages, items, uid=0):
        try:
            pairs = self.mbox.resolve(messages, bool(uid))
        except BadSequence as e:
            self.sendBadResponse(tag, str(e).encode())
            return
        mbox = self.mbox
        if any(i.sets_seen for i in items) and not mbox.readonly:
            changes = {}
            for _, u in pairs:
                entry = mbox.index.entries.get(u)
                if entry is not None and "S" not in entry.msg.flags:
                    changes[u] = "".join(sorted(entry.msg.flags + "S"))
            for u, letters in mbox.index.set_flags(changes).items():
                mbox.note_reported(u, letters)
            if not any(i.name == b"FLAGS" for i in items):
                items = items + [fetch.Item(b"FLAGS")]
        self._stream(self._fetch_lines(mbox, pairs, items, bool(uid)), tag, b"Fetch completed")

    def _fetch_lines(self, mbox, pairs, items, with_uid):
        buffer, size = [], 0
        names = [i.name for i in items]
        # The common resync of a client, (UID FLAGS), from the index alone.
        quick = set(names) <= {b"UID", b"FLAGS"} and b"FLAGS" in names
        entries = mbox.index.entries
        for seq, u in pairs:
            if u not in entries:
                continue  # expunged by another session: nothing left to send
            if quick:
                flags = mbox.flags_response(u)
                if with_uid or names[0] == b"UID":
                    line = b"* %d FETCH (UID %d %s)" % (seq, u, flags)
                elif b"UID" in names:
                    line = b"* %d FETCH (%s UID %d)" % (seq, flags, u)
                else:
                    line = b"* %d FETCH (%s)" % (seq, flags)
            else:
                try:
                    line = fetch.render(mbox, seq, u, items, with_uid)
                except (OSError, KeyError):
                    continue
            buffer.append(line)
            size += len(line)
            if size > _CHUNK:
                yield buffer
                buffer, size = [], 0
        if buffer:
            yield buffer

    def _stream(self, chunks, tag, done: bytes):
        """Write the chunks of a long answer, then the tagged OK, under back-pressure."""
        def work():
            for chunk in chunks:
                self.transport.write(b"\r\n".join(chunk) + b"\r\n")
                yield None

        coop = task.Cooperator(scheduler=lambda f: self.factory.clock.callLater(0, f))
        running = coop.cooperate(work())
        self._producer = _Streaming(running)
        self.transport.registerProducer(self._producer, True)

        def finished(result):
            self._unregister()
            if not self.transport.disconnecting and self.state == "select":
                self.sendPositiveResponse(tag, done)
            return None

        def failed(failure):
            self._unregister()
            if not failure.check(task.TaskStopped):
                log.failure("FETCH failed", failure)
                self.sendNegativeResponse(tag, b"[SERVERBUG] Internal error")

        running.whenDone().addCallbacks(finished, failed)

    def _unregister(self) -> None:
        if self._producer is not None:
            self._producer = None
            self.transport.unregisterProducer()

    # -- STORE ------------------------------------------------------------------
    def do_STORE(self, tag, messages, action, uid=0):
        if self.mbox.readonly:
            self.sendNegativeResponse(tag, b"[READ-ONLY] Mailbox is read-only")
            return
        try:
            pairs = self.mbox.resolve(messages, bool(uid))
        except BadSequence as e:
            self.sendBadResponse(tag, str(e).encode())
            return
        sign, silent, flags = action
        index = self.mbox.index
        try:
            wanted = set(index.letters_of(flags))
        except TooManyKeywords:
            self.sendNegativeResponse(tag, b"[LIMIT] Too many keywords in this mailbox (26)")
            return
        changes = {}
        for _, u in pairs:
            entry = index.entries.get(u)
            if entry is None:
                continue
            current = set(entry.msg.flags)
            new = wanted if not sign else current | wanted if sign == b"+" else current - wanted
            changes[u] = "".join(sorted(new))
        done = index.set_flags(changes)
        for u, letters in done.items():
            self.mbox.note_reported(u, letters)
        if not silent:
            for seq, u in pairs:
                if u in index.entries:
                    uidpart = b"UID %d " % u if uid else b""
                    self.sendUntaggedResponse(b"%d FETCH (%s%s)" % (
                        seq, uidpart, self.mbox.flags_response(u)))
        self.sendPositiveResponse(tag, b"Store completed")

    # -- SEARCH -----------------------------------------------------------------
    def do_SEARCH(self, tag, keys, uid=0):
        if keys is search.BadCharset:
            self.sendNegativeResponse(tag, b"[BADCHARSET (UTF-8 US-ASCII)] Unsupported charset")
            return
        mbox = self.mbox
        view = mbox.uids

        def answer(pairs):
            numbers = b" ".join(b"%d" % (u if uid else s) for s, u in pairs)
            self.sendUntaggedResponse(b"SEARCH" + (b" " + numbers if numbers else b""))
            self.sendPositiveResponse(tag, b"Search completed")

        if not search.needs_content(keys):
            answer(search.run(mbox, keys, view))
            return
        d = self.factory.run_blocking(search.run, mbox, keys, view)
        d.addCallback(answer)
        d.addErrback(self._failed, tag, "SEARCH")

    # -- COPY and MOVE (RFC 4315 COPYUID, RFC 6851) -------------------------------
    def do_COPY(self, tag, messages, target, uid=0, move=False):
        mbox = self.mbox
        if move and mbox.readonly:
            self.sendNegativeResponse(tag, b"[READ-ONLY] Mailbox is read-only")
            return
        try:
            pairs = mbox.resolve(messages, bool(uid))
        except BadSequence as e:
            self.sendBadResponse(tag, str(e).encode())
            return
        try:
            dest = self.account.mailboxes.index(target)
        except MailboxError:
            self.sendNegativeResponse(tag, b"[TRYCREATE] No such mailbox")
            return
        source = mbox.index
        items, uids = [], []
        try:
            for _, u in pairs:
                entry = source.entries.get(u)
                if entry is not None:
                    letters = dest.letters_of(source.flags_of(entry.msg.flags))
                    items.append((entry.msg, letters))
                    uids.append(u)
        except TooManyKeywords:
            self.sendNegativeResponse(tag, b"[LIMIT] Too many keywords in the target mailbox")
            return
        verb = b"Move" if move else b"Copy"
        if not items:
            self.sendPositiveResponse(tag, verb + b" completed (no messages)")
            return
        d = self.factory.run_blocking(dest.take_messages, source, items, move)

        def done(bases):
            new = dest.uids_of(bases)
            copied = [(u, n) for u, n in zip(uids, new) if n is not None]
            code = b"[COPYUID %d %s %s] " % (dest.uidvalidity, uid_set([u for u, _ in copied]),
                                             uid_set([n for _, n in copied])) if copied else b""
            if move:
                source.refresh(force=True)
                if self.mbox is not None and self.mbox.index is source:
                    self.sendUntaggedResponse(b"OK " + code + b"Moved")
                self.sendPositiveResponse(tag, b"Move completed")
            else:
                self.sendPositiveResponse(tag, code + b"Copy completed")

        d.addCallback(done)
        d.addErrback(self._failed, tag, verb.decode())

    def do_MOVE(self, tag, messages, target, uid=0):
        self.do_COPY(tag, messages, target, uid, move=True)

    # -- EXPUNGE, CLOSE, UNSELECT, CHECK ----------------------------------------
    def _deleted(self, within=None) -> list[int]:
        entries = self.mbox.index.entries
        view = self.mbox.uids if within is None else within
        return [u for u in view if u in entries and "T" in entries[u].msg.flags]

    def do_EXPUNGE(self, tag, messages=None, uid=0):
        if self.mbox.readonly:
            self.sendNegativeResponse(tag, b"[READ-ONLY] Mailbox is read-only")
            return
        within = None
        if messages is not None:
            within = [u for _, u in self.mbox.resolve(messages, True)]
        self.mbox.index.expunge(self._deleted(within))
        self.sendPositiveResponse(tag, b"Expunge completed")

    def do_CLOSE(self, tag):
        if not self.mbox.readonly:
            self.mbox.index.expunge(self._deleted())
        self._deselect()
        self.sendPositiveResponse(tag, b"Close completed")

    def do_UNSELECT(self, tag):
        self._deselect()
        self.sendPositiveResponse(tag, b"Unselect completed")

    def do_CHECK(self, tag):
        self.sendPositiveResponse(tag, b"Check completed")

    def do_UID(self, tag, command, line):
        command = command.upper()
        if command == b"EXPUNGE":
            messages, rest = self.arg_seqset(line)
            if rest:
                self.sendBadResponse(tag, b"Too many arguments")
                return
            self.do_EXPUNGE(tag, messages, uid=1)
            return
        if command not in (b"COPY", b"MOVE", b"FETCH", b"STORE", b"SEARCH"):
            self.sendBadResponse(tag, b"Unknown UID command")
            return
        self.dispatchCommand(tag, command, line, uid=1)

    # -- helpers -------------------------------------------------------------------
    def _failed(self, failure, tag, what: str):
        if failure.check(FolderGone):
            self.sendNegativeResponse(tag, b"[NONEXISTENT] Mailbox no longer exists")
        elif failure.check(OSError) and failure.value.errno in (errno.ENOSPC, errno.EDQUOT):
            self.sendNegativeResponse(tag, b"[OVERQUOTA] Not enough disk space")
        elif failure.check(OSError):
            log.warn("{what} failed: {err}", what=what, err=failure.value)
            self.sendNegativeResponse(tag, b"[UNAVAILABLE] " + what.encode()
                                      + b" failed; try again later")
        else:
            log.failure("{what} failed", failure, what=what)
            self.sendNegativeResponse(tag, b"[SERVERBUG] Internal error")
        return None

