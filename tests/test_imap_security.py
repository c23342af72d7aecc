"""SECURITY-TESTS for IMAP: literals and parsing (IMAP-1..10), mailbox names (MBX-1..8).

Each case through a raw socket against the running server, asserting the
exact reply, and that the server is still in step (or closed) afterwards.
"""

from __future__ import annotations

import socket

from twisted.internet import defer

from tests.imap_support import IMAPTestCase


class LiteralTests(IMAPTestCase):
    sections = {"imap": {"max_message_size": 100_000, "max_literal": 4096}}

    @defer.inlineCallbacks
    def test_literal_limits(self):
        def check():
            r = self.raw()
            # IMAP-1: a 4 GiB literal: refused without "+", and without reading it.
            assert r.cmd(b"a LOGIN {4294967296}")[-1] == b"a BAD [TOOBIG] Literal too big\r\n"
            assert r.cmd(b"b NOOP")[-1].startswith(b"b OK")
            # IMAP-5: LITERAL+ is advertised and works.
            r.send(b"c LOGIN {17+}\r\ndemo@example.test {5+}\r\nwrong\r\n")
            assert r.until(b"c")[-1].startswith(b"c NO [AUTHENTICATIONFAILED]")
            r.login()
            # IMAP-2: APPEND above the limit: NO [TOOBIG] before any continuation.
            r.send(b"d APPEND INBOX {2000000000}\r\n")
            assert r.line() == b"d NO [TOOBIG] Message too big (limit 100000 octets)\r\n"
            assert r.cmd(b"e NOOP")[-1].startswith(b"e OK")
            # A synchronising literal of the right size gets its "+".
            r.send(b"f APPEND INBOX {20}\r\n")
            assert r.line().startswith(b"+ ")
            r.send(b"Subject: x\r\n\r\nbody\r\n\r\n")
            assert r.until(b"f")[-1].startswith(b"f OK [APPENDUID ")
            # APPEND with a non-synchronising literal (LITERAL+): no "+" is sent.
            r.send(b"g APPEND INBOX (\\Seen) {20+}\r\nSubject: y\r\n\r\nbody\r\n\r\n")
            assert r.until(b"g")[-1].startswith(b"g OK [APPENDUID ")
            assert b"APPENDLIMIT=100000" in r.cmd(b"h CAPABILITY")[0]
        yield self.blocking(check)

    @defer.inlineCallbacks
    def test_bad_literal_sizes_close(self):
        """IMAP-3: {-1}, {+5}, { 5}, {1_0}, a non-ASCII digit, {5++}: BAD, then close."""
        for size in (b"-1", b"+5", b" 5", b"1_0", "٥".encode(), b"5++", b"99999999999"):
            def check(size=size):
                r = self.raw()
                r.send(b"a LOGIN {" + size + b"}\r\n")
                assert r.line() == b"a BAD Invalid literal size\r\n", size
                assert r.line() == b"", "connection closed"
            yield self.blocking(check)

    @defer.inlineCallbacks
    def test_oversized_nonsync_literal_closes(self):
        def check():
            r = self.raw()
            r.send(b"a LOGIN {5000+}\r\n")
            assert r.line() == b"* BYE [TOOBIG] Literal too big\r\n"
            assert r.line() == b""
        yield self.blocking(check)

    @defer.inlineCallbacks
    def test_negative_literal_in_search_and_deep_nesting(self):
        """IMAP-4 (Twisted #12763) and IMAP-7: bounded errors, the reactor never hangs."""
        def check():
            r = self.raw()
            r.login()
            r.cmd(b"s SELECT INBOX")
            assert r.cmd(b"a SEARCH {-100}zzz")[-1].startswith(b"a BAD")
            r.send(b"a2 SEARCH {-100}\r\n")
            assert r.line() == b"a2 BAD Invalid literal size\r\n"
            assert r.line() == b""
            r = self.raw()
            r.login()
            r.cmd(b"s SELECT INBOX")
            assert r.cmd(b"b SEARCH " + b"(" * 10000 + b"ALL" + b")" * 10000)[-1].startswith(
                b"b BAD")
            assert r.cmd(b"c FETCH 1 (BODY[" + b"1." * 10000 + b"1])")[-1].startswith(b"c BAD")
            assert r.cmd(b"d NOOP")[-1].startswith(b"d OK")
        yield self.blocking(check)

    @defer.inlineCallbacks
    def test_many_literals_and_big_numbers(self):
        """IMAP-6 and IMAP-8."""
        def check():
            r = self.raw()
            r.login()
            r.cmd(b"s SELECT INBOX")
            r.send(b"a SEARCH" + b" SUBJECT {1+}\r\nx" * 1001 + b"\r\n")
            assert r.line() == b"* BYE [TOOBIG] Literal too big\r\n"
            r = self.raw()
            r.login()
            r.cmd(b"s SELECT INBOX")
            assert r.cmd(b"b UID FETCH 4294967296 (FLAGS)")[-1].startswith(b"b BAD")
            ranges = b",".join([b"1:4294967295"] * 5000)
            assert r.cmd(b"c UID FETCH " + ranges + b" (FLAGS)")[-1].startswith(b"c OK")
        yield self.blocking(check)

    @defer.inlineCallbacks
    def test_idle_garbage_and_long_lines(self):
        """IMAP-10 and an overlong line: BAD, bounded, and the session goes on."""
        def check():
            r = self.raw()
            r.login()
            r.cmd(b"s SELECT INBOX")
            r.send(b"a IDLE\r\n")
            assert r.line().startswith(b"+ ")
            r.send(b"x" * 200_000 + b"\r\n")
            assert r.until(b"a")[-1].startswith(b"a BAD")
            r.send(b"b " + b"y" * 100_000 + b"\r\n")
            assert r.until(b"b")[-1] == b"b BAD Line too long\r\n"
            assert r.cmd(b"c NOOP")[-1].startswith(b"c OK")
        yield self.blocking(check)

    @defer.inlineCallbacks
    def test_unknown_and_out_of_state_commands(self):
        def check():
            r = self.raw()
            assert r.cmd(b"a SELECT INBOX")[-1] == b"a BAD Command not valid in this state\r\n"
            assert r.cmd(b"b FROBNICATE")[-1] == b"b BAD Unknown command\r\n"
            assert r.cmd(b"c LOGIN")[-1].startswith(b"c BAD")
            r.send(b"\r\n")
            assert r.cmd(b"d NOOP")[-1].startswith(b"d OK")
        yield self.blocking(check)


class MailboxNameTests(IMAPTestCase):
    @defer.inlineCallbacks
    def test_traversal_and_bad_names_refused(self):
        """MBX-1, MBX-2, MBX-3, MBX-4, MBX-6, MBX-7: NO for each, nothing created outside."""
        bad = [b'"../bob"', b'"../../etc"', b'".."', b'"."', b'"a/../../b"', b'"/abs"',
               b'"a//b"', b'"a/"', b"&AC4ALg-", b"&AC8-", b"&AAA-", b'"&Jjo!"', b'"a&b"',
               b'"x' + b"y" * 300 + b'"', b'"tab\tname"', b"{5+}\r\na\x01b c"]
        def check():
            r = self.raw()
            r.login()
            for name in bad:
                for verb in (b"CREATE", b"SELECT", b"DELETE", b"SUBSCRIBE"):
                    lines = r.cmd(b"t " + verb + b" " + name)
                    assert lines[-1].startswith(b"t NO"), (verb, name, lines)
            for line in (b'RENAME INBOX "../bob/x"', b"DELETE INBOX", b'COPY 1 "../bob/INBOX"',
                         b'STATUS "../bob/INBOX" (MESSAGES)', b'SELECT "~bob/INBOX"',
                         b'SELECT "#shared/bob"'):
                lines = r.cmd(b"u " + line)
                assert lines[-1].startswith((b"u NO", b"u BAD")), (line, lines)
            return r.cmd(b'v LIST "" "*"')
        lines = yield self.blocking(check)
        root = self.instance.config.server.mail_root
        self.assertEqual(sorted(p.name for p in root.iterdir()), ["example.test"])
        self.assertEqual(sorted(p.name for p in (root / "example.test").iterdir()), ["demo"])
        self.assertEqual(len(lines), 7, lines)

    @defer.inlineCallbacks
    def test_maildir_plus_plus_names_are_injective(self):
        """MBX-5: a.b and a/b differ; names like cur or .Trash never alias internals."""
        def check():
            r = self.raw()
            r.login()
            for name in (b'"a.b"', b'"a/b"', b"cur", b"new", b"tmp", b'".Trash"',
                         b"courierimapkeywords", b'"mailstack-uidlist"'):
                assert r.cmd(b"c CREATE " + name)[-1].startswith(b"c OK"), name
            lines = r.cmd(b'l LIST "" "*"')
            return lines
        lines = yield self.blocking(check)
        names = sorted(l.split(b'"/" ')[1].strip() for l in lines[:-1])
        for expected in (b'"a.b"', b'"a/b"', b'"cur"', b'".Trash"', b'"mailstack-uidlist"'):
            self.assertIn(expected, names)
        maildir = self.instance.maildir("demo@example.test", "")
        self.assertTrue((maildir / ".a~2eb").is_dir())
        self.assertTrue((maildir / ".a.b").is_dir())
        self.assertTrue((maildir / ".~2eTrash").is_dir())
        self.assertTrue((maildir / "cur").is_dir() and not (maildir / "cur" / "cur").exists())

    @defer.inlineCallbacks
    def test_symlinked_folder_not_followed(self):
        """MD-4: a folder replaced by a symlink to another user's Maildir is refused."""
        yield self.deliver("alice@example.test", "secret")

        def login():
            r = self.raw()
            r.login()
            return r
        r = yield self.blocking(login)
        maildir = self.instance.maildir("demo@example.test", "")
        alice = self.instance.maildir("alice@example.test", "")
        (maildir / ".Evil").symlink_to(alice)

        def check():
            lines = r.cmd(b"a SELECT Evil")
            assert lines[-1].startswith(b"a NO"), lines
            lines = r.cmd(b'b LIST "" "*"')
            assert not any(b"Evil" in l for l in lines), lines
        yield self.blocking(check)


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except OSError:
        return True
