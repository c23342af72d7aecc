"""SECURITY-TESTS cases that no protocol test covers elsewhere.

Each test names its case IDs. Everything runs against the real service on
loopback (an in-process instance, or the DNS fixture and a sink for the
outside world) and asserts what a client sees: reply codes, the bytes that
reach the next hop or the disk.
"""

from __future__ import annotations

import base64
import datetime
import errno
import gc
import os
import select
import socket
import stat
import struct
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import defer, protocol, reactor, task, threads
from twisted.internet.error import CannotListenError
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.basic import Int16StringReceiver
from twisted.python import threadable
from twisted.trial import unittest

from mailstack import dns as mailstack_dns
from mailstack.config import DNSConfig
from mailstack.dns import Resolver
from mailstack.policy.interface import CONTINUE, Checker
from mailstack.queue.spool import Envelope, Recipient, new_queue_id
from mailstack.tls import TLSSetupError
from tests.imap_support import OTHER, USER, IMAPTestCase, Raw
from tests.support.dnsserver import DNSFixture
from tests.support.instance import HOSTNAME, Instance, in_thread, wait_for
from tests.support.policykit import AUTHSERV_ID, make_key, resolver_for, start_dns
from tests.support.sink import Sink
from tests.support.smtpclient import MXInstance, RawClient, split_stored
from tests.test_hardening import _certbot_pair
from tests.test_outbound import ZONE, OutboundTestCase
from tests.test_policy_smtp import PolicyInstanceTestCase

DEMO = "demo@example.test"
ALICE = "alice@example.test"
SUBMISSION = (("smtp", 0), ("submission", 0))


def submission_client(instance: MXInstance) -> RawClient:
    """A client on the submission port, in TLS after STARTTLS and a second EHLO."""
    client = RawClient(instance.service.port_of("submission"))
    client.ehlo()
    client.expect("STARTTLS", 220)
    client.starttls()
    client.ehlo()
    return client


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def log_lines(test: unittest.TestCase) -> list[str]:
    """Every log line written while the test runs."""
    lines: list[str] = []

    def observer(event):
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    test.addCleanup(globalLogPublisher.removeObserver, observer)
    return lines


class SMTPCommandTests(unittest.TestCase):
    """SMTP command lines: AUTH, paths, the greeting, pipelining, replies."""

    @defer.inlineCallbacks
    def test_auth_line_over_the_rfc_4954_limit(self):
        """AUTH-11: a 20 KB AUTH line, or SASL response, is refused; the session
        goes on and the account is not logged in. A response line within the
        12288 octets of RFC 4954 4 is still read."""
        instance = MXInstance(self, listen=SUBMISSION, sections={"auth": {"failure_delay": 0}})
        huge = b64(b"\0" + DEMO.encode() + b"\0" + b"x" * 15000)
        self.assertGreater(len(huge), 20000)
        longest = b64(b"x" * 9213)
        self.assertEqual(len(longest + b"\r\n"), 12286)

        def dialogue():
            with submission_client(instance) as client:
                return [client.command(b"AUTH PLAIN " + huge),
                        client.command(b"AUTH PLAIN"),
                        client.command(huge),
                        client.command(b"AUTH PLAIN"),
                        client.command(longest),
                        client.command(b"MAIL FROM:<demo@example.test>"),
                        client.command(b"NOOP")]

        replies = yield in_thread(dialogue)
        # The longest line is read and decoded: it holds no NULs (not PLAIN).
        self.assertEqual([r.status for r in replies],
                         [(500, "5.5.2"), (334, ""), (500, "5.5.6"), (334, ""), (501, "5.5.2"),
                          (530, "5.7.0"), (250, "2.0.0")])

    @defer.inlineCallbacks
    def test_auth_identity_with_cr_or_lf(self):
        """HDR-3: a SASL name holding CR or LF (after base64) is refused before it
        reaches a log line or a Received header."""
        instance = MXInstance(self, listen=SUBMISSION, sections={"auth": {"failure_delay": 0}})
        lines = log_lines(self)
        injected = b"X-Injected: yes"

        def dialogue():
            with submission_client(instance) as client:
                replies = [
                    client.command(b"AUTH PLAIN " + b64(b"\0demo@example.test\r\n" + injected
                                                        + b"\0pw")),
                    client.command(b"AUTH PLAIN " + b64(b"demo@example.test\n" + injected
                                                        + b"\0demo@example.test\0pw")),
                    client.command(b"AUTH LOGIN " + b64(b"demo@example.test\r" + injected)),
                    client.command(b"AUTH LOGIN")]
                replies.append(client.command(b64(b"demo@example.test\n" + injected)))
                replies.append(client.command(b"NOOP"))
                return replies

        replies = yield in_thread(dialogue)
        self.assertEqual([r.status for r in replies],
                         [(501, "5.5.2"), (501, "5.5.2"), (501, "5.5.2"), (334, ""),
                          (501, "5.5.2"), (250, "2.0.0")])
        self.assertFalse([line for line in lines if "X-Injected" in line or "\r" in line],
                         lines)

    @defer.inlineCallbacks
    def test_reply_text_never_carries_client_control_characters(self):
        """HDR-4: client bytes quoted in a reply lose their control characters;
        every command gets exactly one single-line reply."""
        instance = MXInstance(self)
        commands = [b"EHLO client.test", b"FOO\x0bBAR", b"EHLO a\x0cb",
                    b"MAIL FROM:<a\x1b[2J@remote.test>", b"MAIL FROM:<a@remote.test> X=\x07",
                    b"MAIL FROM:<sender@remote.test>", b"RCPT TO:<v\x1b]0;x\x07@evil.test>",
                    b'RCPT TO:<"v\x7fw"@example.test>', b"RCPT TO:<nobody@example.test> \x00",
                    b"RCPT TO:<v@evil.test>", b"NOOP"]

        def dialogue():
            with RawClient(instance.port) as client:
                replies = [client.command(line) for line in commands]
                return replies, client.silent_for(0.2)

        replies, silent = yield in_thread(dialogue)
        self.assertTrue(silent, "a reply line more than the commands asked for")
        self.assertEqual(len(replies), len(commands))
        for reply in replies[1:]:
            self.assertEqual(len(reply.lines), 1, reply)
            self.assertFalse([c for c in reply.text if ord(c) < 0x20 or ord(c) == 0x7f], reply)
        self.assertEqual([r.code for r in replies],
                         [250, 500, 501, 501, 501, 250, 501, 501, 501, 554, 250])

    @defer.inlineCallbacks
    def test_path_length_limits(self):
        """LIM-3: a 65-octet local part, a path over 256 octets and a domain over
        255 are refused (501 5.1.7 for MAIL, 501 5.1.3 for RCPT); the RFC 5321
        4.5.3.1 maxima themselves are accepted."""
        instance = MXInstance(self)
        domain = b".".join([b"d" * 62] * 3) + b".test"  # 193 octets
        longest = b"a" * 60 + b"@" + domain  # 254 octets: 256 with the brackets
        self.assertEqual(len(longest) + 2, 256)
        too_long = [b"a" * 65 + b"@remote.test",
                    b"a" * 61 + b"@" + domain,  # 257 with the brackets
                    b"a@" + b".".join([b"d" * 63] * 3 + [b"d" * 62]) + b".t"]
        self.assertEqual(len(too_long[2].partition(b"@")[2]), 256)

        def dialogue():
            with RawClient(instance.port) as client:
                client.ehlo()
                refused = [client.command(b"MAIL FROM:<" + p + b">") for p in too_long]
                accepted = [client.command(b"MAIL FROM:<" + b"b" * 64 + b"@remote.test>"),
                            client.command(b"RSET"),
                            client.command(b"MAIL FROM:<" + longest + b">")]
                refused += [client.command(b"RCPT TO:<" + p + b">") for p in too_long]
                accepted.append(client.command(b"RCPT TO:<" + b"b" * 64 + b"@example.test>"))
                return refused, accepted

        refused, accepted = yield in_thread(dialogue)
        self.assertEqual([r.status for r in refused], [(501, "5.1.7")] * 3 + [(501, "5.1.3")] * 3)
        self.assertEqual([r.status for r in accepted],
                         [(250, "2.1.0"), (250, "2.0.0"), (250, "2.1.0"), (550, "5.1.1")])

    @defer.inlineCallbacks
    def test_talking_before_the_greeting(self):
        """LIM-5: commands sent before a (slow) greeting are answered after it, in order."""
        instance = MXInstance(self, sections={"policy": {
            "checkers": ["tests.test_security_catalogue.SlowGreeting"],
            "trusted_networks": []}})

        def dialogue():
            with RawClient(instance.port, greeting=False) as client:
                client.send(b"EHLO client.test\r\nNOOP\r\n")
                early = client.silent_for(SlowGreeting.delay / 2)
                return early, client.replies(3)

        early, replies = yield in_thread(dialogue)
        self.assertTrue(early, "answered before the greeting")
        self.assertEqual([r.code for r in replies], [220, 250, 250])
        self.assertTrue(replies[0].text.startswith("mail.example.test ESMTP"))
        self.assertEqual(replies[1].lines[0], "mail.example.test Hello client.test [127.0.0.1]")

    @defer.inlineCallbacks
    def test_message_pipelined_after_helo(self):
        """LIM-7: after HELO (no PIPELINING advertised) a whole transaction with
        its text in one write: MAIL and RCPT sent ahead of their replies get
        503 5.5.0, DATA 554 5.5.0 and the connection is closed; nothing is
        queued. The same commands one at a time are served."""
        instance = MXInstance(self)

        def dialogue():
            with RawClient(instance.port) as client:
                self.assertEqual(client.command("HELO client.test").code, 250)
                client.send(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<demo@example.test>\r\n"
                            b"DATA\r\nSubject: early\r\n\r\nbody\r\n.\r\n")
                return client.replies(3), client.closed_by_server()

        replies, closed = yield in_thread(dialogue)
        self.assertEqual([r.status for r in replies],
                         [(503, "5.5.0"), (503, "5.5.0"), (554, "5.5.0")])
        self.assertTrue(closed)
        yield wait_for(lambda: not instance.sessions)
        self.assertEqual(instance.committed, [])

        def lockstep():
            with RawClient(instance.port) as client:
                self.assertEqual(client.command("HELO client.test").code, 250)
                client.expect("MAIL FROM:<a@remote.test>", 250)
                client.expect("RCPT TO:<demo@example.test>", 250)
                client.expect("DATA", 354)
                client.send(b"Subject: in step\r\n\r\nbody\r\n.\r\n")
                return client.reply()

        done = yield in_thread(lockstep)
        self.assertEqual(done.code, 250)

    @defer.inlineCallbacks
    def test_idn_local_domain(self):
        """RELAY-11: a local IDN domain is matched in its A-label form in any
        case; the U-label form is refused without SMTPUTF8 and nothing near the
        name is relayed."""
        bob = "bob@xn--bcher-kva.example"
        instance = MXInstance(self, users=(DEMO, ALICE, bob),
                              server={"domains": ["example.test", "xn--bcher-kva.example"]})

        def dialogue():
            with RawClient(instance.port) as client:
                client.ehlo()
                client.expect("MAIL FROM:<sender@remote.test>", 250)
                replies = [client.command(line) for line in (
                    b"RCPT TO:<bob@xn--bcher-kva.example>",
                    b"RCPT TO:<Bob@XN--BCHER-KVA.EXAMPLE.>",
                    "RCPT TO:<bob@bücher.example>".encode(),
                    b"RCPT TO:<bob@xn--bcher-kvb.example>",
                    b"RCPT TO:<bob@xn--bcher-kva.example.evil.test>",
                    b"RCPT TO:<bob@evil.xn--bcher-kva.example>")]
                client.expect("DATA", 354)
                client.send(b"Subject: idn\r\n\r\nhallo\r\n.\r\n")
                replies.append(client.reply())
                return replies

        replies = yield in_thread(dialogue)
        self.assertEqual([r.status for r in replies],
                         [(250, "2.1.5"), (250, "2.1.5"), (501, "5.1.3"), (554, "5.7.1"),
                          (554, "5.7.1"), (554, "5.7.1"), (250, "2.0.0")])
        [envelope] = instance.committed
        self.assertEqual([(r.address, r.local) for r in envelope.recipients], [(bob, True)])
        files = yield wait_for(lambda: instance.stored(bob))
        self.assertEqual(split_stored(files[0])[2], b"Subject: idn\n\nhallo\n")


class SlowGreeting(Checker):
    """A third-party checker whose connect stage takes a while (LIM-5)."""

    name = "slow-greeting"
    stages = frozenset({"connect"})
    delay = 0.5

    def __init__(self, settings, env):
        self.env = env

    def connect(self, conn):
        return task.deferLater(self.env.clock, self.delay, lambda: CONTINUE)


class IMAPCatalogueTests(IMAPTestCase):
    """IMAP mailbox names and reply lines."""

    sections = {"imap": {"max_mailboxes": 20}}

    @defer.inlineCallbacks
    def test_names_that_are_not_nfc_or_hold_controls(self):
        """MBX-4: a name that decodes (modified UTF-7) to a control character or
        to Unicode not in NFC is refused with NO; its NFC twin is fine."""
        not_nfc = b"e&AwE-"  # "e" and U+0301 COMBINING ACUTE ACCENT
        nfc = b"&AOk-"  # U+00E9
        bad = [not_nfc, b"&AAk-x", b"&AB8-", b"&AH8-", b"&AIU-", b"&ICg-", b'"a&AAA-b"']

        def check():
            r = self.raw()
            r.login()
            refused = {name: r.cmd(b"t CREATE " + name)[-1] for name in bad}
            return refused, r.cmd(b"u CREATE " + nfc)[-1], r.cmd(b'v LIST "" "*"')

        refused, created, listed = yield self.blocking(check)
        for name, reply in refused.items():
            self.assertTrue(reply.startswith(b"t NO "), (name, reply))
        self.assertTrue(created.startswith(b"u OK"), created)
        names = [line.rsplit(b" ", 1)[1].strip() for line in listed[:-1]]
        self.assertIn(b'"' + nfc + b'"', names)
        self.assertEqual([n for n in names if b"&" in n], [b'"' + nfc + b'"'])

    @defer.inlineCallbacks
    def test_mailbox_count_is_limited(self):
        """MBX-6: CREATE past ``[imap] max_mailboxes`` is NO [LIMIT]; a 300-octet
        name is NO, not a traceback; the session goes on."""
        def check():
            r = self.raw()
            r.login()
            replies = [r.cmd(b"c%d CREATE f%d" % (i, i))[-1] for i in range(40)]
            long_name = r.cmd(b"d CREATE " + b"n" * 300)[-1]
            return replies, long_name, r.cmd(b'l LIST "" "*"'), r.cmd(b"n NOOP")[-1]

        replies, long_name, listed, noop = yield self.blocking(check)
        made = [r for r in replies if b" OK" in r]
        refused = replies[len(made):]
        self.assertTrue(made and refused, replies)
        for reply in refused:
            self.assertRegex(reply, rb"^c\d+ NO \[LIMIT\] ")
        self.assertTrue(long_name.startswith(b"d NO "), long_name)
        # INBOX and at most max_mailboxes others (the special-use ones count).
        self.assertEqual(len(listed) - 1, 1 + 20, listed)
        self.assertEqual(noop, b"n OK NOOP completed\r\n")

    @defer.inlineCallbacks
    def test_no_way_into_another_users_mailbox(self):
        """MBX-7, with a mailbox selected: COPY, MOVE and UID COPY to another
        user's mailbox by any spelling are NO; the message stays, and the
        other user's Maildir is untouched."""
        yield self.deliver(USER, "mine")
        yield self.deliver(OTHER, "theirs")
        yield wait_for(lambda: self.instance.messages(USER) and self.instance.messages(OTHER))
        other_files = sorted(p.name for p in self.instance.messages(OTHER))
        targets = [b'"../alice/INBOX"', b'"../../example.test/alice/Maildir"', b'"~alice/INBOX"',
                   b'"#shared/alice"', b'"#users/alice/INBOX"', b'"/alice"', b"&AC4ALg-/alice"]

        def check():
            r = self.raw()
            r.login()
            assert r.cmd(b"s SELECT INBOX")[-1].startswith(b"s OK")
            replies = []
            for target in targets:
                for command in (b"COPY 1 ", b"MOVE 1 ", b"UID COPY 1:* "):
                    replies.append((command + target, r.cmd(b"c " + command + target)[-1]))
            return replies, r.cmd(b"f FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])")

        replies, fetched = yield self.blocking(check)
        for command, reply in replies:
            self.assertTrue(reply.startswith(b"c NO "), (command, reply))
        self.assertIn(b"Subject: mine", b"".join(fetched))
        self.assertEqual(sorted(p.name for p in self.instance.messages(OTHER)), other_files)
        self.assertEqual(list(self.instance.maildir(OTHER, "cur").iterdir()), [])

    @defer.inlineCallbacks
    def test_mailbox_names_with_crlf_forge_no_reply_line(self):
        """HDR-4 for IMAP: a mailbox name sent as a literal holding CRLF and a
        fake response is refused, and no reply line starts with the fake."""
        fake = b"x\r\n* OK [ALERT] forged\r\ny"
        literal = b"{%d+}\r\n" % len(fake) + fake

        def check():
            r = self.raw()
            r.login()
            lines = []
            for verb in (b"CREATE ", b"SELECT ", b"STATUS ", b"DELETE ", b"RENAME INBOX "):
                tail = b" (MESSAGES)" if verb == b"STATUS " else b""
                r.send(b"t " + verb + literal + tail + b"\r\n")
                lines += r.until(b"t")
            return lines + r.cmd(b"n NOOP")

        lines = yield self.blocking(check)
        self.assertFalse([line for line in lines if line.startswith(b"* OK [ALERT] forged")],
                         lines)
        tagged = [line for line in lines if line.startswith(b"t ")]
        self.assertEqual(len(tagged), 5, lines)
        for line in tagged:
            self.assertTrue(line.startswith((b"t NO ", b"t BAD ")), line)
        self.assertEqual(lines[-1], b"n OK NOOP completed\r\n")


class IMAPLoginLiteralTests(IMAPTestCase):
    """IMAP-9 before login, with a short login timeout."""

    sections = {"imap": {"login_timeout": 1.0}}

    @defer.inlineCallbacks
    def test_literal_never_sent_before_login(self):
        """IMAP-9: a synchronising literal that never comes ends in a timeout
        and a close, not in a parser waiting for it forever."""
        def check():
            r = self.raw()
            r.send(b"a LOGIN {17}\r\n")
            assert r.line().startswith(b"+ "), "no continuation"
            started = time.monotonic()
            assert r.line() == b"* BYE Autologout; idle for too long\r\n"
            assert r.line() == b"", "connection closed"
            return time.monotonic() - started

        waited = yield self.blocking(check)
        self.assertLess(waited, 10)


class IMAPIdleLiteralTests(IMAPTestCase):
    """IMAP-9 after login, with a short idle timeout."""

    sections = {"imap": {"idle_timeout": 1.0}}

    @defer.inlineCallbacks
    def test_literal_stopped_half_way(self):
        """IMAP-9: an APPEND literal, synchronising or not, that stops half-way
        ends in a timeout and a close; nothing of it is stored and the server
        serves the next client."""
        def check():
            for literal in (b"{100}", b"{100+}"):
                r = self.raw()
                r.login()
                r.send(b"b APPEND INBOX " + literal + b"\r\n")
                if literal == b"{100}":
                    assert r.line().startswith(b"+ "), "no continuation"
                r.send(b"Subject: half\r\n\r\n")
                assert r.line() == b"* BYE Autologout; idle for too long\r\n"
                assert r.line() == b"", "connection closed"
            r = self.raw()
            r.login()
            return r.cmd(b"c STATUS INBOX (MESSAGES)")

        status = yield self.blocking(check)
        self.assertEqual(status[0], b'* STATUS "INBOX" (MESSAGES 0)\r\n')
        maildir = self.instance.maildir(USER, "")
        for sub in ("new", "cur", "tmp"):
            self.assertEqual(list((maildir / sub).iterdir()), [], sub)


class FileSystemWatch:
    """Records the file-system calls (open, write, fsync, link, rename) made
    under ``root`` by any thread, with full paths; ``failures`` make some fail."""

    def __init__(self, test: unittest.TestCase, root: Path):
        self.root = str(Path(root).resolve())
        self.events: list[tuple] = []
        #: (operation, path predicate, errno): calls that raise OSError(errno).
        self.failures: list[tuple] = []
        real = {name: getattr(os, name) for name in ("open", "write", "fsync", "link", "rename")}

        def where(fd=None, path=None, dir_fd=None) -> str:
            try:
                if fd is not None:
                    return os.readlink(f"/proc/self/fd/{fd}")
                if dir_fd is not None and not os.fspath(path).startswith("/"):
                    return os.readlink(f"/proc/self/fd/{dir_fd}") + "/" + os.fspath(path)
                return os.path.abspath(os.fspath(path))
            except (OSError, TypeError):
                return ""

        def note(op: str, path: str, *extra):
            if not path.startswith(self.root):
                return
            for failing, predicate, err in self.failures:
                if failing == op and predicate(path):
                    raise OSError(err, os.strerror(err), path)
            self.events.append((op, path[len(self.root):], *extra))

        def open_(path, flags, mode=0o777, *, dir_fd=None):
            note("open", where(path=path, dir_fd=dir_fd), flags, mode)
            return real["open"](path, flags, mode, dir_fd=dir_fd)

        def write(fd, data):
            note("write", where(fd=fd))
            return real["write"](fd, data)

        def fsync(fd):
            path = where(fd=fd)
            result = real["fsync"](fd)
            note("fsync", path)
            return result

        def link(src, dst, *, src_dir_fd=None, dst_dir_fd=None, follow_symlinks=True):
            note("link", where(path=src, dir_fd=src_dir_fd),
                 where(path=dst, dir_fd=dst_dir_fd)[len(self.root):])
            return real["link"](src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd,
                                follow_symlinks=follow_symlinks)

        def rename(src, dst, *, src_dir_fd=None, dst_dir_fd=None):
            note("rename", where(path=src, dir_fd=src_dir_fd),
                 where(path=dst, dir_fd=dst_dir_fd)[len(self.root):])
            return real["rename"](src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

        for name, replacement in (("open", open_), ("write", write), ("fsync", fsync),
                                  ("link", link), ("rename", rename)):
            test.patch(os, name, replacement)

    def index(self, *event) -> int:
        """Where the first event starting with ``event`` is; fails if there is none."""
        for i, e in enumerate(self.events):
            if e[:len(event)] == event:
                return i
        raise AssertionError(f"no {event} in {self.events}")


class DurabilityTests(unittest.TestCase):
    """What a 250 or an APPEND OK promises about the bytes on disk."""

    def send(self, instance: MXInstance, body: bytes, rcpt: str = DEMO):
        """One transaction on a raw client; returns the reply to the final dot
        and how many file-system events had happened when it arrived."""
        def dialogue():
            with RawClient(instance.port) as client:
                client.ehlo()
                client.expect("MAIL FROM:<sender@remote.test>", 250)
                client.expect(f"RCPT TO:<{rcpt}>", 250)
                client.expect("DATA", 354)
                client.send(body + b".\r\n")
                reply = client.reply()
                seen = len(self.watch.events)
                client.expect("NOOP", 250)
                return reply, seen

        return in_thread(dialogue)

    @defer.inlineCallbacks
    def test_250_only_after_the_message_is_durable(self):
        """MD-2: the message is written to a new file (O_EXCL, 0600) and
        fsync'd, renamed into the queue and the queue directory fsync'd before
        the 250; the Maildir gets it through tmp/, by rename into new/, and
        new/ is fsync'd. (In this process, where the watch sees the fsyncs:
        with the fsync process, tests/test_fsync_process.py shows the rename
        and the 250 waiting for its answer.)"""
        instance = MXInstance(self, server={"fsync_process": False})
        self.watch = FileSystemWatch(self, instance.root)
        reply, seen = yield self.send(instance, b"Subject: durable\r\n\r\nkept\r\n")
        self.assertEqual(reply.status, (250, "2.0.0"))
        [envelope] = instance.committed
        files = yield wait_for(lambda: instance.messages(DEMO))
        yield wait_for(lambda: any(e[0] == "fsync" and e[1].endswith("/Maildir/new")
                                   for e in self.watch.events))
        w, qid = self.watch, envelope.id
        spool = "/" + str(instance.config.server.spool_dir.relative_to(instance.root.resolve()))
        created = w.index("open", f"{spool}/tmp/{qid}.msg")
        flags, mode = w.events[created][2:]
        self.assertTrue(flags & os.O_EXCL and flags & os.O_CREAT, flags)
        self.assertEqual(mode, 0o600)
        synced = w.index("fsync", f"{spool}/tmp/{qid}.msg")
        env_synced = w.index("fsync", f"{spool}/tmp/{qid}.env")
        renamed = w.index("rename", f"{spool}/tmp/{qid}.msg", f"{spool}/queue/{qid}.msg")
        committed = w.index("rename", f"{spool}/tmp/{qid}.env", f"{spool}/queue/{qid}.env")
        queue_synced = next((i for i, e in enumerate(w.events)
                             if i > committed and e == ("fsync", f"{spool}/queue")), len(w.events))
        self.assertLess(created, synced)
        self.assertLess(max(synced, env_synced), renamed)
        self.assertLess(renamed, committed)
        self.assertLess(queue_synced, seen, "250 before the queue directory was fsync'd")
        # Local delivery: a link into tmp/, a rename into new/, then new/ fsync'd.
        maildir = "/" + str(instance.maildir(DEMO, "").relative_to(instance.root.resolve()))
        name = files[0].name
        linked = w.index("link", f"{spool}/queue/{qid}.msg")
        self.assertEqual(w.events[linked][2], f"{maildir}/tmp/{name}")
        moved = w.index("rename", f"{maildir}/tmp/{name}", f"{maildir}/new/{name}")
        self.assertLess(linked, moved)
        self.assertLess(moved, w.index("fsync", f"{maildir}/new"))
        self.assertEqual(stat.S_IMODE(files[0].stat().st_mode), 0o600)
        self.assertEqual(list(instance.maildir(DEMO, "tmp").iterdir()), [])

    @defer.inlineCallbacks
    def test_disk_full_during_data(self):
        """MD-6: no space for the spool file, at the final dot (a small
        message) or while a large one arrives (written to the spool as it
        comes): 452 4.3.1 after the final dot, never a 250, nothing
        half-written in the spool or a Maildir; the session goes on and the
        message sent once there is room is accepted."""
        instance = MXInstance(self)
        self.watch = FileSystemWatch(self, instance.root)
        tmp = str(instance.config.server.spool_dir / "tmp")
        full = ("write", lambda path: path.startswith(tmp), errno.ENOSPC)
        self.watch.failures.append(full)
        refused, _ = yield self.send(instance, b"Subject: small\r\n\r\nno room\r\n")
        large = b"Subject: large\r\n\r\n" + (b"z" * 998 + b"\r\n") * 100
        refused_large, _ = yield self.send(instance, large)
        self.watch.failures.remove(full)
        accepted, _ = yield self.send(instance, b"Subject: room again\r\n\r\nok\r\n")
        self.assertEqual(refused.status, (452, "4.3.1"))
        self.assertEqual(refused_large.status, (452, "4.3.1"))
        self.assertEqual(accepted.status, (250, "2.0.0"))
        self.assertEqual(len(instance.committed), 1)
        files = yield wait_for(lambda: instance.stored(DEMO))
        self.assertEqual([split_stored(f)[2] for f in files], [b"Subject: room again\n\nok\n"])
        self.assertEqual(list((instance.config.server.spool_dir / "tmp").iterdir()), [])

    @defer.inlineCallbacks
    def test_disk_full_during_append(self):
        """MD-6 for IMAP: APPEND without room is NO [OVERQUOTA], whether the
        mailbox's first file or the message itself cannot be written, and
        leaves no file in tmp/, new/ or cur/."""
        instance = Instance(self.mktemp(), listen=(("imap", 0),),
                            sections={"auth": {"allow_plaintext_loopback": True}})
        instance.start()
        self.addCleanup(instance.stop)
        self.watch = FileSystemWatch(self, instance.root)
        maildir = instance.maildir(DEMO, "")
        message = b"Subject: no room\r\n\r\nbody\r\n"
        append = b"a APPEND INBOX {%d+}\r\n" % len(message) + message + b"\r\n"

        def failing(err, under):
            return ("write", lambda path: path.startswith(str(under)), err)

        def dialogue():
            r = Raw(instance.port("imap"))
            try:
                r.login()
                answers = []
                for failure in (failing(errno.ENOSPC, maildir), None,
                                failing(errno.ENOSPC, maildir / "tmp"),
                                failing(errno.EDQUOT, maildir / "tmp"), None):
                    if failure is None:
                        answers.append(r.cmd(b"s STATUS INBOX (MESSAGES)")[-1])
                        continue
                    self.watch.failures.append(failure)
                    r.send(append)
                    answers.append(r.until(b"a")[-1])
                    self.watch.failures.remove(failure)
                r.send(append.replace(b"a ", b"b ", 1))
                answers.append(r.until(b"b")[-1])
                return answers
            finally:
                r.close()

        answers = yield in_thread(dialogue)
        full = b"a NO [OVERQUOTA] Not enough disk space\r\n"
        status = b"s OK Status completed\r\n"
        self.assertEqual(answers[:5], [full, status, full, full, status])
        self.assertTrue(answers[5].startswith(b"b OK [APPENDUID "), answers[5])
        self.assertEqual(list((maildir / "tmp").iterdir()), [])
        self.assertEqual(list((maildir / "new").iterdir()), [])
        self.assertEqual(len(list((maildir / "cur").iterdir())), 1)


class OutboundWireTests(OutboundTestCase):
    """What mailstack's own client puts on the wire to the next hop."""

    def plant(self, instance: Instance, sender: str, rcpt: str, body: bytes) -> str:
        """A committed spool entry, as if accepted before a restart."""
        queue = instance.config.server.spool_dir / "queue"
        queue.mkdir(parents=True, exist_ok=True)
        qid = new_queue_id()
        return_path = f"Return-Path: <{sender}>\n".encode()
        (queue / f"{qid}.msg").write_bytes(return_path + body)
        envelope = Envelope(id=qid, sender=sender, recipients=[Recipient(rcpt, rcpt, False)],
                            arrival=time.time(), body_offset=len(return_path))
        (queue / f"{qid}.env").write_bytes(envelope.to_json())
        return qid

    @defer.inlineCallbacks
    def test_stored_line_ends_never_reach_the_next_hop_as_they_are(self):
        """SMUG-10 and HDR-5: a stored message with LF ends, a bare CR, a CRLF
        and lone dots goes out with CRLF only, dot-stuffed, ending once; an
        envelope address holding CR LF is never written to the next hop: the
        recipient bounces at once (no connection is opened for it)."""
        self.dns = DNSFixture({**ZONE, "other.test": {"MX": [(10, "mx.remote.test")]},
                               "third.test": {"MX": [(10, "mx.remote.test")]}})
        self.dns.start()
        self.addCleanup(self.dns.stop)
        sink = self.start_sink()
        instance = Instance(self.mktemp(), sections={
            "dns": self.dns.config, "outbound": {"port": sink.port, "allow_private": True},
            "queue": {"first_retry": 60, "max_retry_interval": 60}})
        body = (b"From: demo@example.test\nSubject: planted\n\n.\n..two\nbare\rcr\n"
                b"windows\r\n.\r\nlast line without end")
        self.plant(instance, "demo@example.test", "bob@remote.test", body)
        bad = [self.plant(instance, "demo@example.test\r\nNOOP injected", "bob@other.test",
                          b"Subject: a\n\nx\n"),
               self.plant(instance, "demo@example.test", "bob\r\nNOOP injected@third.test",
                          b"Subject: b\n\ny\n")]
        instance.start()
        self.addCleanup(instance.stop)
        yield wait_for(lambda: sink.state.messages, timeout=15)
        queue = instance.config.server.spool_dir / "queue"

        # Bounced at once: the spool entries are gone; demo, the sender of the
        # second, has the DSN (the one to the bad sender fails the same way,
        # and a bounce is never bounced).
        yield wait_for(lambda: not any((queue / f"{q}.env").exists() for q in bad), timeout=15)
        [dsn] = yield wait_for(lambda: instance.messages("demo@example.test"), timeout=15)
        self.assertIn(b"control character in the envelope address", dsn.read_bytes())
        gc.collect()
        self.assertEqual(self.flushLoggedErrors(), [])
        received = next(m for m in sink.state.messages if b"Subject: planted" in m.data)
        self.assertEqual(received.data, b"From: demo@example.test\r\nSubject: planted\r\n\r\n"
                                         b".\r\n..two\r\nbare\r\ncr\r\nwindows\r\n.\r\n"
                                         b"last line without end\r\n")
        raw = bytes(sink.state.raw)
        start = raw.index(b"From: demo@example.test\r\nSubject: planted")
        self.assertEqual(raw[start:raw.index(b"\r\n.\r\n", start) + 5],
                         b"From: demo@example.test\r\nSubject: planted\r\n\r\n..\r\n...two\r\n"
                         b"bare\r\ncr\r\nwindows\r\n..\r\nlast line without end\r\n.\r\n")
        self.assertEqual(raw.count(b"\r"), raw.count(b"\n"))
        self.assertEqual(raw.count(b"\r\n"), raw.count(b"\n"))
        self.assertNotIn(b"injected", raw)


def _pointer(offset: int) -> bytes:
    """A DNS name compression pointer (RFC 1035 4.1.4)."""
    return struct.pack("!H", 0xC000 | offset)


class HostileDNS:
    """A nameserver that answers every UDP question truncated, so the client
    comes back over TCP, where the answer's owner name is a compression
    pointer to itself or, with ``chain``, the end of that many pointers each
    to the one before (leading back to the question's name): what a malicious
    server may send (twisted.names hung on such names, CVE-2026-42304)."""

    TXT = b"v=spf1 ip4:127.0.0.1 -all"

    def __init__(self, chain: int = 0):
        self.chain = chain
        self.questions = 0

    def answer(self, query: bytes, truncated: bool) -> bytes:
        self.questions += 1
        end = 12
        while query[end]:
            end += query[end] + 1
        question = query[12:end + 5]
        if truncated:
            return query[:2] + b"\x83\x80\x00\x01\x00\x00\x00\x00\x00\x00" + question
        txt = bytes([len(self.TXT)]) + self.TXT
        answers = 2 if self.chain else 1
        body = query[:2] + struct.pack("!HHHHH", 0x8180, 1, answers, 0, 0) + question
        if not self.chain:
            owner = _pointer(len(body))  # to itself
            return body + owner + struct.pack("!HHIH", 16, 1, 60, len(txt)) + txt
        # The pointers sit in the data of a NULL record; each points to the
        # one before it, the first to the question's name (offset 12).
        start = len(body) + 2 + 10
        pointers, target = b"", 12
        for i in range(self.chain):
            pointers += _pointer(target)
            target = start + 2 * i
        carrier = _pointer(12) + struct.pack("!HHIH", 10, 1, 60, len(pointers)) + pointers
        return (body + carrier + _pointer(target) + struct.pack("!HHIH", 16, 1, 60, len(txt))
                + txt)

    def start(self, test: unittest.TestCase) -> int:
        server = self

        class UDP(protocol.DatagramProtocol):
            def datagramReceived(self, data, address):
                self.transport.write(server.answer(data, truncated=True), address)

        class TCP(Int16StringReceiver):
            def stringReceived(self, data):
                self.sendString(server.answer(data, truncated=False))

        for _ in range(20):
            udp = reactor.listenUDP(0, UDP(), interface="127.0.0.1")
            port = udp.getHost().port
            try:
                tcp = reactor.listenTCP(port, protocol.Factory.forProtocol(TCP),
                                        interface="127.0.0.1")
            except CannotListenError:
                udp.stopListening()
                continue
            test.addCleanup(udp.stopListening)
            test.addCleanup(tcp.stopListening)
            return port
        raise CannotListenError("127.0.0.1", 0, "no port free for both UDP and TCP")


class DNSTests(PolicyInstanceTestCase):
    """The one resolver under hostile or slow DNS, over real SMTP sessions."""

    def session(self, instance: Instance, sender: str, commands=()) -> defer.Deferred:
        """EHLO, MAIL FROM:<sender> (timed), then ``commands``; the replies."""
        def dialogue():
            with RawClient(instance.smtp_port) as client:
                client.ehlo("mx.sender.test")
                started = time.monotonic()
                mail = client.command(f"MAIL FROM:<{sender}>")
                elapsed = time.monotonic() - started
                return mail, elapsed, [client.command(c) for c in commands]

        return in_thread(dialogue)

    @defer.inlineCallbacks
    def test_truncated_answer_is_asked_again_over_tcp(self):
        """DNS-4 (and DKIM-12): a 4096-bit DKIM key does not fit in 512 octets of
        UDP; the truncated answer is asked again over TCP and the key, in
        several strings, is joined."""
        key = make_key("big-key.test", "s1", bits=4096)
        self.start_dns(key.zone())
        resolver = resolver_for(self.dns.port)
        record = yield in_thread(resolver.dkim_txt, key.record_name)
        self.assertEqual(record, key.txt.encode())
        self.assertGreater(len(record), 512)
        self.assertEqual(self.dns.transports, [("udp", key.record_name, "TXT"),
                                               ("tcp", key.record_name, "TXT")])

    @defer.inlineCallbacks
    def test_hostile_compression_pointers(self):
        """DNS-5: over TCP, a name that is a compression pointer to itself, or
        the end of a chain of 8000 pointers, is a temporary error (451 4.4.3)
        at once; a short chain is decoded and the record behind it used. The
        server goes on serving (mailstack resolves with dnspython, which bounds
        pointer chains, not twisted.names; it requires Twisted >= 26.10, which
        has the fix for the names decoder anyway)."""
        self.dns = None
        for chain, expected in ((0, (451, "4.4.3")), (8000, (451, "4.4.3")),
                                (10, (250, "2.1.0"))):
            hostile = HostileDNS(chain)
            port = hostile.start(self)
            instance = Instance(self.mktemp(), sections={
                "dns": {"nameservers": ["127.0.0.1"], "port": port, "timeout": 2.0},
                "policy": {"checkers": ["spf"], "trusted_networks": []}})
            instance.start()
            self.addCleanup(instance.stop)
            mail, elapsed, [noop] = yield self.session(instance, "alice@hostile.test", ["NOOP"])
            self.assertEqual(mail.status, expected, chain)
            self.assertLess(elapsed, 2.0, chain)
            self.assertEqual(noop.status, (250, "2.0.0"))
            self.assertGreaterEqual(hostile.questions, 2)

    @defer.inlineCallbacks
    def test_slow_lookups_spend_one_budget(self):
        """SPF-7: each lookup answers in time, but together they outlast
        ``[policy.spf] time_budget``: temperror, 451 4.4.3, soon after the budget."""
        zone = {"spf-slow.test": {"TXT": ["v=spf1 " + " ".join(
            f"include:i{i}.spf-slow.test" for i in range(6)) + " -all"]}}
        zone.update({f"i{i}.spf-slow.test": {"TXT": ["v=spf1 ip4:192.0.2.1 ?all"]}
                     for i in range(6)})
        self.dns = DNSFixture(zone, delay={f"i{i}.spf-slow.test": 0.45 for i in range(6)})
        start_dns(self.dns)
        self.addCleanup(self.dns.stop)
        instance = self.start_instance({"checkers": ["spf"], "trusted_networks": [],
                                        "spf": {"time_budget": 1.0}})
        mail, elapsed, _ = yield self.session(instance, "alice@spf-slow.test")
        self.assertEqual(mail.status, (451, "4.4.3"))
        self.assertLess(elapsed, 2.5)
        asked = [name for name, _ in self.dns.resolver.queries if name.startswith("i")]
        self.assertLess(len(asked), 6, "every include was looked up")

    @defer.inlineCallbacks
    def test_hard_fail_explained_on_one_line(self):
        """SPF-9 (and HDR-4): a hard fail with ``reject_on_fail`` is 550 5.7.23
        with the domain's explanation (exp=), whose CR LF cannot forge a reply."""
        self.start_dns({
            "spf-exp.test": {"TXT": ["v=spf1 ip4:192.0.2.1 -all exp=why.spf-exp.test"]},
            "why.spf-exp.test": {"TXT": ["Not from %{i}\r\n250 2.0.0 forged"]}})
        instance = self.start_instance({"checkers": ["spf"], "trusted_networks": [],
                                        "spf": {"reject_on_fail": True}})
        mail, _, [noop] = yield self.session(instance, "alice@spf-exp.test", ["NOOP"])
        self.assertEqual(mail.status, (550, "5.7.23"))
        self.assertEqual(len(mail.lines), 1)
        self.assertIn("spf-exp.test does not allow [127.0.0.1]", mail.text)
        self.assertIn("Not from 127.0.0.1", mail.text)
        self.assertNotIn("\r", mail.text)
        self.assertEqual(noop.status, (250, "2.0.0"))

    @defer.inlineCallbacks
    def test_lookups_are_cached(self):
        """DNS-7: a second message from the same domain asks DNS nothing new:
        the SPF record, the missing DMARC record (NXDOMAIN) and the missing
        DKIM selector are all answered from the cache."""
        self.start_dns({"cache.test": {"TXT": ["v=spf1 ip4:127.0.0.0/8 -all"]}})
        instance = self.start_instance({"checkers": ["spf", "dkim", "dmarc"]})
        message = (b"From: alice@cache.test\r\nSubject: cached\r\nDKIM-Signature: v=1; "
                   b"a=rsa-sha256; d=cache.test; s=gone; h=from; bh=AAAA; b=AAAA\r\n\r\nhi\r\n")
        first = yield self.send(instance, "mx.cache.test", "alice@cache.test", [USER], message)
        asked = list(self.dns.resolver.queries)
        second = yield self.send(instance, "mx.cache.test", "alice@cache.test", [USER], message)
        self.assertEqual((first["data"], second["data"]), ("250", "250"))
        self.assertIn(("cache.test", "TXT"), asked)
        self.assertIn(("_dmarc.cache.test", "TXT"), asked)
        self.assertIn(("gone._domainkey.cache.test", "TXT"), asked)
        self.assertEqual(self.dns.resolver.queries, asked)

    @defer.inlineCallbacks
    def test_cached_answers_expire_within_the_cap(self):
        """DNS-7: a cached answer, positive or negative, is asked again once
        the cache's TTL cap has passed, however long the record's own TTL."""
        self.start_dns({"long.test": {"TXT": ["v=spf1 -all"]}})
        resolver = Resolver(DNSConfig(nameservers=("127.0.0.1",), port=self.dns.port,
                                      timeout=1.0), threads.deferToThread, max_ttl=0.5)
        self.assertEqual(mailstack_dns.MAX_CACHE_TTL, 3600)
        for name, lookup in (("long.test", resolver.txt_bytes),
                             ("missing.test", lambda n: resolver.spf_lookup(n, "TXT"))):
            started = time.monotonic()
            yield in_thread(lookup, name)
            yield in_thread(lookup, name)
            self.assertEqual(self.dns.resolver.queries.count((name, "TXT")), 1)

            def asked_again():
                deadline = time.monotonic() + 10
                while self.dns.resolver.queries.count((name, "TXT")) < 2:
                    self.assertLess(time.monotonic(), deadline, f"{name} never asked again")
                    lookup(name)
                    time.sleep(0.05)

            yield in_thread(asked_again)
            self.assertGreaterEqual(time.monotonic() - started, 0.5)

    @defer.inlineCallbacks
    def test_no_host_lookup_on_the_reactor_thread(self):
        """DNS-6: inbound policy checks (SPF, DKIM, DMARC) and outbound delivery
        (MX, addresses) make no blocking resolver call on the reactor thread."""
        zone = dict(ZONE)
        zone["sender.test"] = {"TXT": ["v=spf1 ip4:127.0.0.0/8 -all"]}
        self.start_dns(zone)
        sink = Sink()
        sink.start()
        self.addCleanup(sink.stop)
        calls = []
        for name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr",
                     "getnameinfo", "getfqdn"):
            real = getattr(socket, name)

            def watched(*args, _real=real, _name=name, **kwargs):
                calls.append((_name, threadable.isInIOThread(), args[:1]))
                return _real(*args, **kwargs)

            self.patch(socket, name, watched)
        settings = {"trusted_networks": [], "authserv_id": AUTHSERV_ID,
                    "checkers": ["spf", "dkim", "dmarc"]}
        instance = Instance(self.mktemp(), aliases={"fwd@example.test": ["bob@remote.test"]},
                            sections={"dns": self.dns.config, "policy": settings,
                                      "outbound": {"port": sink.port, "allow_private": True}})
        instance.start()
        self.addCleanup(instance.stop)

        def send():
            with RawClient(instance.smtp_port) as client:
                client.ehlo("mx.sender.test")
                client.expect("MAIL FROM:<alice@sender.test>", 250)
                client.expect("RCPT TO:<fwd@example.test>", 250)
                client.expect("DATA", 354)
                client.send(b"From: alice@sender.test\r\nSubject: lookups\r\n\r\nhi\r\n.\r\n")
                return client.reply()

        reply = yield in_thread(send)
        self.assertEqual(reply.code, 250)
        yield wait_for(lambda: sink.state.messages, timeout=15)
        self.assertIn(b"spf=pass smtp.mailfrom=sender.test", sink.state.messages[0].data)
        self.assertIn(("mx.remote.test", "A"), self.dns.resolver.queries)
        self.assertTrue(calls, "the watch saw nothing, not even the test's own client")
        self.assertEqual([c for c in calls if c[1]], [])


def served_chain(port: int, server_name: bytes | None = None) -> list:
    """The certificates a TLS port sends (leaf first), as cryptography objects."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        conn = SSL.Connection(context, sock)
        if server_name:
            conn.set_tlsext_host_name(server_name)
        conn.set_connect_state()
        deadline = time.monotonic() + 10
        while True:
            try:
                conn.do_handshake()
                break
            except SSL.WantReadError:
                if not select.select([sock], [], [], max(deadline - time.monotonic(), 0))[0]:
                    raise TimeoutError("no TLS handshake") from None
        return [c.to_cryptography() for c in conn.get_peer_cert_chain()]


class CertificateTests(unittest.TestCase):
    """TLSV-6: what certificate a TLS port serves."""

    def start(self, root: Path | None = None, **layout) -> Instance:
        instance = Instance(root or self.mktemp(), listen=(("smtp", 0), ("imaps", 0)), **layout)
        instance.start()
        self.addCleanup(instance.stop)
        return instance

    @defer.inlineCallbacks
    def test_first_run_certificate_is_rsa_2048(self):
        """The self-signed certificate of a first run has an RSA key of 2048 bits."""
        instance = self.start()
        [leaf] = yield in_thread(served_chain, instance.port("imaps"))
        key = leaf.public_key()
        self.assertIsInstance(key, rsa.RSAPublicKey)
        self.assertGreaterEqual(key.key_size, 2048)

    @defer.inlineCallbacks
    def test_full_chain_is_served(self):
        """A certbot-style fullchain.pem (an ECDSA P-256 leaf and its CA) is
        served whole, leaf first, whatever name the client asks for (SNI)."""
        root = Path(self.mktemp())
        root.mkdir()
        _, _, leaf_der = _certbot_pair(root, HOSTNAME, 1)
        instance = self.start(root=root, tls=False, sections={"tls": {
            "certificate": "archive/fullchain1.pem", "private_key": "archive/privkey1.pem"}})
        for server_name in (None, HOSTNAME.encode(), b"other.example"):
            chain = yield in_thread(served_chain, instance.port("imaps"), server_name)
            self.assertEqual(len(chain), 2, server_name)
            self.assertEqual(chain[0].public_bytes(serialization.Encoding.DER), leaf_der)
            self.assertEqual(chain[0].issuer, chain[1].subject)
            key = chain[0].public_key()
            self.assertIsInstance(key, ec.EllipticCurvePublicKey)
            self.assertEqual(key.curve.name, "secp256r1")

    def test_weak_rsa_key_is_refused_at_start(self):
        """An RSA key under 2048 bits stops the start with the files named."""
        root = Path(self.mktemp())
        root.mkdir()
        key = rsa.generate_private_key(65537, 1024)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOSTNAME)])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=30)).sign(key, hashes.SHA256()))
        (root / "weak.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (root / "weak.key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        error = self.assertRaises(TLSSetupError, Instance, root, tls=False, sections={
            "tls": {"certificate": "weak.pem", "private_key": "weak.key"}})
        self.assertIn("weak.pem", str(error))
        self.assertIn("key too small", str(error))
