"""Fuzzing every command parser through real connections (issue 7).

Each test starts ``twistd mailstack`` as its own process and lets hypothesis
play scripts at it from 127.0.0.2: commands of the protocol, mutated
commands, random bytes with NUL, 8-bit, bare CR and LF, lines around every
length limit, IMAP literals of wrong and huge sizes ({N}, {N+}), deeply
nested lists, broken SASL base64, pipelined junk, and junk pipelined behind
STARTTLS/STLS. Every script ends with a command that ends the session
(QUIT, LOGOUT), so the properties of each example are:

* every line the server sends is well-formed for its protocol, and the last
  one is the goodbye or the error it closed the connection for;
* the server closes the connection within a deadline (it never hangs);
* the daemon is still running and has logged no traceback;
* a well-behaved client on 127.0.0.1, logged in before the fuzzing began,
  still gets correct answers: its session is never dropped.

With STARTTLS, the first answer inside TLS is the answer to the first
command sent inside TLS: nothing pipelined in plaintext ran (TLS-1..4).

Plain regression tests for inputs the fuzzing found follow the fuzz tests.

Examples are the same on every run (the suite's hypothesis profile). For a
longer hunt, MAILSTACK_FUZZ_SCALE=10 runs ten times as many, and
MAILSTACK_FUZZ_TRANSCRIPTS=FILE keeps every conversation (tests/support/fuzz.py).
"""

from __future__ import annotations

import imaplib
import itertools
import os
import poplib
import smtplib
import time
from pathlib import Path

from hypothesis import given, settings, strategies as st
from twisted.internet import defer
from twisted.trial import unittest

from tests.imap_support import IMAPTestCase, deliver
from tests.support.dnsserver import DNSFixture
from tests.support.fuzz import (ANSWER, BRIEF, ENDINGS, IMAP_TLS_GO, NESTED, NOISE, NUMBERS,
                                ODD_BYTES, POP3_TLS_GO, SASL, SMTP_TLS_GO, Conversation,
                                FuzzDaemon, Step, assert_released, b64, imap_replies, long_line,
                                mutated, pop3_replies, smtp_replies)
from tests.support.instance import PASSWORD, Instance, in_thread
from tests.test_pop3 import write_users

DEMO = "demo@example.test"
ALICE = "alice@example.test"
#: Fuzzing is not guessing passwords: the limits must not lock anyone out.
AUTH = {"allow_plaintext_loopback": True, "failure_delay": 0.01,
        "max_failures_per_ip": 1_000_000, "max_failures_per_account": 1_000_000}
#: Connections one client address may hold (the default of every listener).
PER_IP = 20
ZONE = {
    "remote.test": {"TXT": ["v=spf1 ip4:127.0.0.2 -all"], "MX": [(10, "mx.remote.test")]},
    "_dmarc.remote.test": {"TXT": ["v=DMARC1; p=none"]},
    "evil.test": {"TXT": ["v=spf1 -all"]},
    "_dmarc.evil.test": {"TXT": ["v=DMARC1; p=reject"]},
}


def fuzz_settings(examples: int):
    """``examples`` per test, times MAILSTACK_FUZZ_SCALE (for a longer hunt)."""
    scale = float(os.environ.get("MAILSTACK_FUZZ_SCALE", "1"))
    return settings(max_examples=max(1, int(examples * scale)), deadline=None,
                    report_multiple_bugs=False)


def falsify(example) -> None:
    """Run a hypothesis test; its failure names the example (trial leaves
    out the notes hypothesis adds to an exception)."""
    try:
        example()
    except Exception as e:
        notes = "\n".join(getattr(e, "__notes__", ()))
        raise AssertionError(f"{type(e).__name__}: {e}\n{notes}") from e


def lines_of(parts: st.SearchStrategy[bytes], endings, max_size: int = 8):
    return st.builds(lambda items: b"".join(a + b for a, b in items),
                     st.lists(st.tuples(parts, endings), min_size=1, max_size=max_size))


#: How long a junk step waits for an answer before the next one (it may get none).
WAIT = st.sampled_from([0.0, BRIEF])


class _FuzzTest(unittest.TestCase):
    timeout = 300
    protocols: tuple = ()
    sections: dict = {}

    @defer.inlineCallbacks
    def start(self, dns: bool = False):
        root = Path(self.mktemp()).resolve()
        write_users(root, (DEMO, ALICE))
        sections = {"auth": AUTH, **self.sections}
        if dns:
            fixture = DNSFixture(ZONE)
            fixture.start()
            self.addCleanup(fixture.stop)
            sections["dns"] = fixture.config
        self.daemon = FuzzDaemon(root, self.protocols, sections=sections)
        self._seen: set[str] = set()
        self.good_messages = itertools.count(1)
        yield in_thread(self.daemon.start)
        self.addCleanup(self.daemon.stop)
        mail_root = self.daemon.config.server.mail_root
        self.mail_root = mail_root if mail_root.is_absolute() else root / mail_root

    def maildir(self, address: str) -> Path:
        local, _, domain = address.partition("@")
        return self.mail_root / domain / local / "Maildir"

    def wait_delivered(self, address: str, marker: bytes, timeout: float = 15.0) -> Path:
        """The message of ``address`` that holds ``marker`` and was not
        returned before (blocking)."""
        deadline = time.monotonic() + timeout
        seen = self._seen
        while True:
            for sub in ("new", "cur"):
                folder = self.maildir(address) / sub
                for path in sorted(folder.iterdir()) if folder.exists() else ():
                    if path.name in seen:
                        continue
                    try:
                        data = path.read_bytes()
                    except FileNotFoundError:
                        continue
                    if marker in data:
                        seen.add(path.name)
                        return path
            if time.monotonic() > deadline:
                raise AssertionError(f"{marker!r} never reached the Maildir of {address}")
            time.sleep(0.02)

    def deliver(self, to: str, subject: str, body: str = "body\r\n") -> Path:
        deliver(self.daemon.ports["smtp"], to, subject, body)
        return self.wait_delivered(to, f"Subject: {subject}".encode())

    def converse(self, steps, port: int, terminator: bytes, check, tls: bool = False,
                 padding: bytes | None = None, tls_last: bytes | None = None) -> None:
        """Play ``steps``, then ``terminator``; ``check`` the transcript and
        the daemon. ``tls_last``: after STARTTLS, stop reading at this line,
        not at the close."""
        c = Conversation(port, tls=tls)
        try:
            c.read_line()
            c.play(steps)
            if not c.closed:
                c.send(terminator)
            c.finish(padding=padding, last=tls_last if c.upgraded else None)
            self.daemon.assert_healthy(steps)
            check(self, c)
        except Exception as e:
            raise AssertionError(f"{type(e).__name__}: {e}\nsent: {bytes(c.sent)[:3000]!r}\n"
                                 f"received: {bytes(c.received)[-3000:]!r}") from None
        finally:
            c.close()
            c.record()


# -- SMTP -------------------------------------------------------------------
SMTP_COMMANDS = st.sampled_from([
    b"EHLO fuzz.remote.test", b"HELO x", b"EHLO", b"EHLO [127.0.0.2]", b"HELO a b",
    b"EHLO foo\nX-Injected: yes", b"EHLO " + b"a" * 300,
    b"MAIL FROM:<sender@remote.test>", b"MAIL FROM:<>", b"MAIL FROM:<a@evil.test> SIZE=100",
    b"MAIL FROM:<sender@remote.test> BODY=8BITMIME", b'MAIL FROM:<"a\nb"@remote.test>',
    b"MAIL FROM:<sender@remote.test> SIZE=99999999999999999999", b"MAIL FROM:sender@remote.test",
    b"MAIL FROM:<sender@remote.test> SMTPUTF8", b"MAIL FROM:<x@[127.0.0.1]>", b"MAIL TO:<x>",
    b"MAIL FROM:<alice@example.test>", b"MAIL FROM:<@a,@b:s@remote.test>",
    b"MAIL FROM:<sender@remote.test> \xff=1", b"MAIL FROM:<sender@remote.test> SIZE=\xc3\xa9",
    b"RCPT TO:<alice@example.test>", b"RCPT TO:<postmaster>", b"RCPT TO:<nobody@example.test>",
    b"RCPT TO:<x@evil.test>", b"RCPT TO:<alice@example.test> NOTIFY=NEVER",
    b"RCPT TO:<@a,@b:alice@example.test>", b"RCPT TO:<alice%evil.test@example.test>",
    b'RCPT TO:<"alice"@example.test>', b"RCPT TO:<alice@[127.0.0.1]>", b"RCPT TO:<>",
    b"RCPT TO:<ALICE@EXAMPLE.TEST>", b"RCPT TO:<alice@example.test.>",
    b"DATA", b"DATA x", b"BDAT 10 LAST", b"RSET", b"RSET x", b"NOOP", b"NOOP x", b"VRFY alice",
    b"EXPN list", b"HELP", b"STARTTLS foo", b"AUTH", b"AUTH PLAIN", b"AUTH LOGIN",
    b"AUTH CRAM-MD5", b"AUTH PLAIN " + b64(b"\0alice@example.test\0wrong"), b"TURN", b"ETRN x",
    b".", b"", b" ", b"\x00", b"\xff\xfe",
])
BODY_LINES = st.one_of(
    st.sampled_from([b".", b"..", b".x", b"", b"From: alice@example.test", b"Subject: fuzz",
                     b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"MAIL FROM:<ceo@example.test>",
                     b"\x00", b"\xff\xfe", b"From: <ceo@example.test>", b"X-A: " + b"b" * 997,
                     b"Authentication-Results: x; spf=pass", b"Received: forged",
                     b"DKIM-Signature: v=1; a=rsa-sha256; d=remote.test; s=x; b=; bh=; h=from",
                     b"Content-Type: multipart/mixed; boundary=x", b"--x", b"--x--"]),
    NOISE, long_line(b"m"))
#: A message: often a header block that passes the checks, then odd lines.
BODY = st.builds(lambda head, lines: head + lines, st.sampled_from([
    b"From: <sender@remote.test>\r\nTo: <alice@example.test>\r\nSubject: fuzz\r\n\r\n",
    b"From: <alice@example.test>\r\nSubject: fuzz\r\nDate: Mon, 1 Jan 2024 10:00:00 +0000"
    b"\r\nMessage-ID: <fuzz@remote.test>\r\n\r\n",
    b"From: <a@evil.test>\r\n\r\n", b"From: \xff@example.test\r\n\r\n",
    b"From: <alice@example.test>\r\nFrom: <alice@example.test>\r\n\r\n", b""]),
    lines_of(BODY_LINES, ENDINGS, 12))


def smtp_junk(commands) -> st.SearchStrategy[Step]:
    """One step of junk: a command, mutated or not, bytes, a long line,
    pipelined lines, a DATA block, a SASL dialogue."""
    return st.one_of(
        st.builds(Step, st.builds(lambda c, e: c + e, commands, ENDINGS), WAIT),
        st.builds(Step, st.builds(lambda c, e: c + e, mutated(commands), ENDINGS), WAIT),
        st.builds(Step, NOISE, WAIT),
        st.builds(Step, st.builds(lambda x, e: x + e, long_line(), ENDINGS), WAIT),
        st.builds(Step, lines_of(commands, ENDINGS), WAIT),
        st.builds(lambda body: Step(body), BODY),
        st.builds(Step, st.builds(lambda sasl, e: sasl + e, SASL, ENDINGS), WAIT),
    )


@st.composite
def smtp_script(draw, submission: bool = False):
    steps = []
    prelude = draw(st.sampled_from(["none", "ehlo", "mail", "data"]))
    if prelude != "none":
        steps.append(Step(b"EHLO fuzz.remote.test\r\n", ANSWER))
    if submission and prelude != "none" and draw(st.booleans()):
        credentials = b64(b"\0alice@example.test\0" + PASSWORD.encode())
        steps.append(Step(b"AUTH PLAIN " + credentials + b"\r\n", ANSWER))
        sender, rcpt = b"alice@example.test", draw(st.sampled_from([b"x@remote.test",
                                                                    b"alice@example.test"]))
    else:
        sender, rcpt = b"sender@remote.test", b"alice@example.test"
    if prelude in ("mail", "data"):
        steps.append(Step(b"MAIL FROM:<" + sender + b">\r\n", ANSWER))
        steps.append(Step(b"RCPT TO:<" + rcpt + b">\r\n", ANSWER))
    if prelude == "data":
        steps.append(Step(b"DATA\r\n", ANSWER))
        steps.append(Step(draw(BODY)))
    steps += draw(st.lists(smtp_junk(SMTP_COMMANDS), min_size=1, max_size=6))
    return steps


@st.composite
def smtp_starttls(draw):
    """EHLO or not, then STARTTLS with junk pipelined behind it in one write."""
    steps = []
    if draw(st.booleans()):
        steps.append(Step(b"EHLO fuzz.remote.test\r\nMAIL FROM:<sender@remote.test>\r\n",
                          ANSWER))
    junk = draw(st.one_of(lines_of(SMTP_COMMANDS, ENDINGS), NOISE, BODY))[:2000]
    steps.append(Step(b"STARTTLS\r\n" + junk, tls_go=SMTP_TLS_GO))
    # Inside TLS: nothing of the junk ran, and the session starts afresh (TLS-4).
    steps.append(Step(b"NOOP\r\nMAIL FROM:<sender@remote.test>\r\n", ANSWER))
    steps += draw(st.lists(smtp_junk(SMTP_COMMANDS), max_size=3))
    return steps


def check_smtp(test, c: Conversation) -> None:
    replies = smtp_replies(bytes(c.received), upgraded=c.upgraded)
    test.assertTrue(replies and replies[0].startswith(b"220 "), replies[:1])
    if c.upgraded:
        after = replies[replies.index(SMTP_TLS_GO) + 1:]
        test.assertEqual(after[:1], [b"250 2.0.0 Ok"], "a plaintext command ran inside TLS")
        test.assertTrue(after[1].startswith(b"503 5.5.1"), after[1])
    last = replies[-1]
    test.assertTrue(last == b"221 2.0.0 Bye" or last[:1] in b"45" or last == SMTP_TLS_GO,
                    f"closed after {last!r}")


class GoodSMTP:
    """A well-behaved SMTP client on one session kept open for the whole test."""

    def __init__(self, test: _FuzzTest, port: int):
        self.test = test
        self.client = smtplib.SMTP("127.0.0.1", port, timeout=15)
        self.client.ehlo("good.example.test")

    def check(self) -> None:
        """NOOP, then a message to demo that must reach the Maildir."""
        self.test.assertEqual(self.client.noop()[0], 250)
        n = next(self.test.good_messages)
        self.client.sendmail("sender@remote.test", [DEMO],
                             f"From: <sender@remote.test>\r\nTo: <{DEMO}>\r\n"
                             f"Subject: good message {n}\r\n\r\nbody {n}\r\n".encode())
        path = self.test.wait_delivered(DEMO, f"Subject: good message {n}\n".encode())
        self.test.assertIn(f"body {n}\n".encode(), path.read_bytes())

    def close(self) -> None:
        self.test.assertEqual(self.client.quit()[0], 221)


class SMTPFuzzTests(_FuzzTest):
    protocols = ("smtp", "submission", "submissions")
    # The fuzzer (127.0.0.2) goes through the policy checks (SPF, DKIM,
    # DMARC against the test zone); the rate limits would only refuse it.
    sections = {"policy": {"trusted_networks": ["127.0.0.1/32"],
                           "ratelimit.max_connections": 0, "ratelimit.max_messages": 0}}

    def fuzz(self, port: int, strategy, examples: int, tls: bool = False):
        good = GoodSMTP(self, self.daemon.ports["smtp"])

        @fuzz_settings(examples)
        @given(strategy)
        def example(steps):
            self.converse(steps, port, b"\r\n.\r\nQUIT\r\n", check_smtp, tls=tls)
            good.check()

        falsify(example)
        good.check()
        good.close()
        if not tls:
            assert_released(port, PER_IP, b"220 ")
        fresh = GoodSMTP(self, self.daemon.ports["smtp"])
        fresh.check()
        fresh.close()

    @defer.inlineCallbacks
    def test_mx(self):
        yield self.start(dns=True)
        port = self.daemon.ports["smtp"]
        yield in_thread(self.fuzz, port, st.one_of(smtp_script(), smtp_starttls()), 60)

    @defer.inlineCallbacks
    def test_submission(self):
        yield self.start(dns=True)
        yield in_thread(self.fuzz, self.daemon.ports["submissions"],
                        smtp_script(submission=True), 35, True)
        yield in_thread(self.fuzz, self.daemon.ports["submission"], smtp_starttls(), 15)


# -- IMAP -------------------------------------------------------------------
TAGS = st.sampled_from([b"a", b"A001", b"t.1", b"x]"])
ODD_TAGS = st.sampled_from([b"*", b"+", b"a+b", b"t\x00", b"\xff", b"x" * 150, b"(", b"{5}",
                            b"", b"%", b"\\", b'"a"'])


@st.composite
def literal(draw, data: st.SearchStrategy[bytes] = st.binary(max_size=40)) -> bytes:
    """{N} or {N+} CRLF and data: the right size mostly, else a wrong, huge or
    malformed one."""
    data = draw(data)
    size = draw(st.one_of(st.just(len(data)), st.just(len(data)), st.integers(0, 80), NUMBERS,
                          st.sampled_from([b"65536", b"65537", b"100000000", b"-100"])))
    size = b"%d" % size if isinstance(size, int) else size
    plus = draw(st.sampled_from([b"", b"", b"+", b"+", b"++", b"-"]))
    return b"{" + size + plus + b"}\r\n" + data


def astring(words: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """A word as an atom, a quoted string or a literal."""
    return st.one_of(words, words, st.builds(lambda w: b'"' + w.replace(b"\\", b"\\\\")
                                             .replace(b'"', b'\\"') + b'"', words),
                     literal(words))


MAILBOXES = astring(st.sampled_from([
    b"INBOX", b"inbox", b"Fuzz", b"Fuzz/Sub", b"Archive", b"Trash", b"", b"&AC4ALg-", b"&AC8-",
    b"&Jjo!", b"&", b"..", b"../bob", b"a/../../b", b"/abs", b"a//b", b"a/", b"cur", b"new",
    b".Trash", b"a.b", b"~bob/INBOX", b"#shared/x", b"x" * 300, b"caf\xc3\xa9", b"a\x00b",
    b"&AAA-", b"Fuzz/*", b"%"]))
SEQUENCES = st.sampled_from([
    b"1", b"2", b"*", b"1:*", b"*:1", b"1,2", b"2:1", b"0", b"4294967295", b"4294967296", b"3:5",
    b"1:4294967295", b"1,*", b"1:2,2:1,*", b"1:4294967295," * 200 + b"1", b"-1", b"1:", b":1",
    b"1,,2", b"$"])
FETCH_ATTS = st.sampled_from([
    b"FLAGS", b"UID", b"ENVELOPE", b"BODYSTRUCTURE", b"BODY", b"RFC822.SIZE", b"INTERNALDATE",
    b"RFC822", b"RFC822.HEADER", b"RFC822.TEXT", b"BODY[]", b"BODY.PEEK[]", b"BODY[1]",
    b"BODY[1.MIME]", b"BODY[2.1]", b"BODY[1.2.3.4]", b"BODY[HEADER]", b"BODY[TEXT]",
    b"BODY[MIME]", b"BODY[1.HEADER]", b"BODY[2.TEXT]", b"BODY[HEADER.FIELDS (Subject)]",
    b"BODY.PEEK[HEADER.FIELDS.NOT (From \"X-A\" {2}\r\nTo)]", b"BODY[HEADER.FIELDS ()]",
    b"BODY[]<0.5>", b"BODY[]<4294967295.1>", b"BODY[1]<10.4294967296>", b"BODY[]<5>",
    b"BODY[]<0.0>", b"BINARY[1]", b"BODY[" + b"1." * 70 + b"1]", b"BODY[0]", b"BODY[1.0]",
    b"MODSEQ", b"X-GM-MSGID", b"BODY[HEADER.FIELDS (" + b"X " * 500 + b")]"])
FETCH_ITEMS = st.one_of(
    st.sampled_from([b"ALL", b"FAST", b"FULL", b"()", b"(", b"ALLX"]), FETCH_ATTS,
    st.builds(lambda atts: b"(" + b" ".join(atts) + b")", st.lists(FETCH_ATTS, min_size=1,
                                                                     max_size=6)))
DATES = st.sampled_from([b"1-Jan-2020", b"01-Feb-2024", b"99-Jan-2024", b"31-Feb-2024",
                         b"0-Jan-2024", b"1-Foo-2020", b"1-Jan-0000", b"1-Jan-9999",
                         b"10-Jan-99999", b'"1-Jan-2020"', b"1-jan-2020", b"-Jan-2020",
                         b"1-Jan-", b"29-Feb-2023", b"32-Dec-2024"])
SEARCH_WORDS = astring(st.sampled_from([b"a", b"fuzz", b"", b"caf\xc3\xa9", b"\xff\xfe",
                                        b"x" * 200, b"=?utf-8?q?x?=", b"Subject"]))
SEARCH_KEYS = st.recursive(
    st.one_of(
        st.sampled_from([b"ALL", b"ANSWERED", b"DELETED", b"DRAFT", b"FLAGGED", b"NEW", b"OLD",
                         b"RECENT", b"SEEN", b"UNANSWERED", b"UNDELETED", b"UNDRAFT",
                         b"UNFLAGGED", b"UNSEEN", b"BOGUS", b"LARGER 10",
                         b"LARGER 4294967296", b"SMALLER 0", b"KEYWORD $Junk",
                         b"UNKEYWORD \\Seen", b"MODSEQ 1"]),
        SEQUENCES,
        st.builds(lambda s: b"UID " + s, SEQUENCES),
        st.builds(lambda k, d: k + b" " + d, st.sampled_from([
            b"BEFORE", b"ON", b"SINCE", b"SENTBEFORE", b"SENTON", b"SENTSINCE"]), DATES),
        st.builds(lambda k, w: k + b" " + w, st.sampled_from([
            b"BCC", b"BODY", b"CC", b"FROM", b"SUBJECT", b"TEXT", b"TO"]), SEARCH_WORDS),
        st.builds(lambda h, w: b"HEADER " + h + b" " + w, SEARCH_WORDS, SEARCH_WORDS)),
    lambda keys: st.one_of(
        st.builds(lambda k: b"NOT " + k, keys),
        st.builds(lambda a, b: b"OR " + a + b" " + b, keys, keys),
        st.builds(lambda ks: b"(" + b" ".join(ks) + b")", st.lists(keys, min_size=1,
                                                                   max_size=4))),
    max_leaves=8)
SEARCH_ARGS = st.builds(lambda c, ks: c + b" ".join(ks),
                        st.sampled_from([b"", b"", b"CHARSET UTF-8 ", b"CHARSET KOI8-R ",
                                         b"CHARSET ", b"RETURN (ALL) "]),
                        st.lists(SEARCH_KEYS, min_size=1, max_size=4))
FLAGS = st.sampled_from([b"\\Seen", b"\\Deleted", b"\\Flagged", b"\\Answered",
                         b"\\Draft", b"\\Recent", b"\\*", b"$Junk", b"$Forwarded", b"\\",
                         b"\\Bogus", b"a]", b"k1", b"k2", b"k3", b"\xff"])
FLAG_LISTS = st.one_of(
    st.builds(lambda fs: b"(" + b" ".join(fs) + b")", st.lists(FLAGS, max_size=5)), FLAGS,
    st.just(b"(" + b" ".join(b"$k%d" % i for i in range(40)) + b")"))
STORE_ARGS = st.builds(lambda s, op, fl: s + b" " + op + b" " + fl, SEQUENCES, st.sampled_from(
    [b"FLAGS", b"+FLAGS", b"-FLAGS", b"+FLAGS.SILENT", b"FLAGS.SILENT", b"X-GM-LABELS",
     b"(UNCHANGEDSINCE 1) +FLAGS"]), FLAG_LISTS)
DATE_TIMES = st.sampled_from([b'"01-Jan-2024 10:00:00 +0100"', b'" 1-Jan-2024 10:00:00 -1200"',
                              b'"31-Feb-2024 25:61:61 +9999"', b'"1-Jan-1 1:1:1 +0"',
                              b'"01-Jan-99999 10:00:00 +0100"', b"01-Jan-2024"])
HEADER_LINES = st.sampled_from([
    b"From: Alice <alice@example.test>", b"From: =?utf-8?b?w6k=?= <a@b>", b"From: \xff\xfe",
    b"To: a@b, (comment) c@d, group: e@f;", b"Subject: =?iso-8859-1?q?caf=E9?=",
    b"Subject: " + b"x" * 3000, b"Date: Mon, 1 Jan 2024 10:00:00 +0100", b"Date: yesterday",
    b"Message-ID: <a@b>", b"In-Reply-To: <<<>>>", b"MIME-Version: 1.0", b"X-Empty:",
    b"Content-Type: text/plain; charset=bogus", b'Content-Type: text/plain; name="a\\"b"',
    b"Content-Type: multipart/mixed", b"Content-Type: message/rfc822",
    b"Content-Transfer-Encoding: base64", b"Content-Transfer-Encoding: quoted-printable",
    b"Content-Disposition: attachment; filename*=utf-8''%E9", b"Content-Language: en",
    b"folded:", b"\tcontinued", b"no colon here", b": empty name", b"\x00: nul"])


@st.composite
def mime_message(draw, depth: int = 0) -> bytes:
    """A message with odd headers and, sometimes, nested multipart and
    message/rfc822 parts, broken boundaries and encodings."""
    headers = draw(st.lists(HEADER_LINES, max_size=6))
    kind = draw(st.sampled_from(["text", "text", "multipart", "rfc822"] if depth < 3
                                else ["text"]))
    if kind == "multipart":
        boundary = draw(st.sampled_from([b"b1", b"", b"x" * 100, b'"q"', b"--"]))
        headers.append(b"Content-Type: multipart/mixed; boundary=" + boundary)
        parts = draw(st.lists(mime_message(depth + 1), max_size=3))
        body = b"".join(b"--" + boundary.strip(b'"') + b"\r\n" + p + b"\r\n" for p in parts)
        body += draw(st.sampled_from([b"--" + boundary.strip(b'"') + b"--\r\n", b""]))
    elif kind == "rfc822":
        headers.append(b"Content-Type: message/rfc822")
        body = draw(mime_message(depth + 1))
    else:
        body = draw(st.one_of(st.sampled_from([b"", b"body\r\n", b"=E9=\r\n", b"w6k=\r\n",
                                               b"!!!not base64\r\n", b".\r\n..\r\n"]),
                              st.binary(max_size=80)))
    return b"\r\n".join(headers) + b"\r\n\r\n" + body


APPEND_ARGS = st.builds(
    lambda box, flags, when, msg: box + b" " + flags + when + msg,
    MAILBOXES, st.one_of(st.just(b""), st.builds(lambda f: f + b" ", FLAG_LISTS)),
    st.one_of(st.just(b""), st.builds(lambda d: d + b" ", DATE_TIMES)),
    st.one_of(literal(mime_message()), literal(mime_message()), st.just(b"{0}\r\n")))
LIST_ARGS = st.builds(
    lambda sel, ref, pat, ret: sel + ref + b" " + pat + ret,
    st.sampled_from([b"", b"", b"(SUBSCRIBED) ", b"(SPECIAL-USE RECURSIVEMATCH) ",
                     b"(RECURSIVEMATCH) ", b"(BOGUS) ", b"() "]),
    astring(st.sampled_from([b"", b"Fuzz", b"../", b"&AC8-", b"%"])),
    st.one_of(astring(st.sampled_from([b"*", b"%", b"Fuzz/%", b"", b"*/*/*/*/*/*/*/*/*/*",
                                       b"&Jjo!"])), st.just(b'("*" "%")'), st.just(b"()")),
    st.sampled_from([b"", b"", b" RETURN (STATUS (MESSAGES UNSEEN))", b" RETURN (CHILDREN)",
                     b" RETURN (SUBSCRIBED SPECIAL-USE)", b" RETURN (STATUS ())",
                     b" RETURN (STATUS (BOGUS))", b" RETURN"]))
STATUS_ITEMS = st.sampled_from([b"(MESSAGES RECENT UIDNEXT UIDVALIDITY UNSEEN)", b"()",
                                b"(MESSAGES", b"(BOGUS)", b"MESSAGES", b"(HIGHESTMODSEQ)"])
LOGIN_WORDS = astring(st.sampled_from([b"alice@example.test", b"nobody@example.test", b"",
                                       b"\xff@example.test", PASSWORD.encode(), b"wrong",
                                       b"a\x00b"]))

#: The arguments of each command (RFC 3501 6 and the extensions advertised).
IMAP_GRAMMAR = {
    b"CAPABILITY": st.just(b""), b"NOOP": st.just(b""), b"LOGOUT": st.just(b""),
    b"NAMESPACE": st.just(b""), b"CHECK": st.just(b""), b"CLOSE": st.just(b""),
    b"UNSELECT": st.just(b""), b"EXPUNGE": st.just(b""), b"IDLE": st.just(b""),
    b"STARTTLS": st.just(b""),
    b"ID": st.sampled_from([b"NIL", b'("name" "fuzz" "version" NIL)', b"()", b"(",
                            b"(" + b'"k" "v" ' * 40 + b")", b'("a")']),
    b"ENABLE": st.sampled_from([b"UTF8=ACCEPT", b"CONDSTORE", b"", b"(X)"]),
    b"LOGIN": st.builds(lambda u, p: u + b" " + p, LOGIN_WORDS, LOGIN_WORDS),
    b"AUTHENTICATE": st.builds(lambda m, r: m + r, st.sampled_from([b"PLAIN", b"plain",
                                                                    b"LOGIN", b"XOAUTH2"]),
                               st.one_of(st.just(b""), st.builds(lambda x: b" " + x, SASL))),
    b"SELECT": MAILBOXES, b"EXAMINE": MAILBOXES, b"CREATE": MAILBOXES, b"DELETE": MAILBOXES,
    b"SUBSCRIBE": MAILBOXES, b"UNSUBSCRIBE": MAILBOXES,
    b"RENAME": st.builds(lambda a, b: a + b" " + b, MAILBOXES, MAILBOXES),
    b"LIST": LIST_ARGS, b"LSUB": LIST_ARGS,
    b"STATUS": st.builds(lambda m, i: m + b" " + i, MAILBOXES, STATUS_ITEMS),
    b"APPEND": APPEND_ARGS,
    b"SEARCH": SEARCH_ARGS,
    b"FETCH": st.builds(lambda s, i: s + b" " + i, SEQUENCES, FETCH_ITEMS),
    b"STORE": STORE_ARGS,
    b"COPY": st.builds(lambda s, m: s + b" " + m, SEQUENCES, MAILBOXES),
    b"MOVE": st.builds(lambda s, m: s + b" " + m, SEQUENCES, MAILBOXES),
}
IMAP_GRAMMAR[b"UID"] = st.one_of(
    *[st.builds(lambda a, v=verb: v + b" " + a, IMAP_GRAMMAR[verb])
      for verb in (b"FETCH", b"SEARCH", b"STORE", b"COPY", b"MOVE")],
    st.builds(lambda s: b"EXPUNGE " + s, SEQUENCES), st.sampled_from([b"NOOP", b"", b"EXPUNGE"]))
#: The commands of each state, the most interesting first (hypothesis
#: favours the first branches).
SELECTED_VERBS = (b"FETCH", b"SEARCH", b"UID", b"STORE", b"APPEND", b"COPY", b"MOVE", b"LIST",
                  b"STATUS", b"SELECT", b"EXAMINE", b"CREATE", b"RENAME", b"DELETE",
                  b"SUBSCRIBE", b"UNSUBSCRIBE", b"LSUB", b"IDLE", b"EXPUNGE", b"CLOSE",
                  b"UNSELECT", b"CHECK", b"NAMESPACE", b"ENABLE", b"ID", b"NOOP", b"LOGIN",
                  b"CAPABILITY", b"LOGOUT")
UNAUTH_VERBS = (b"LOGIN", b"AUTHENTICATE", b"ID", b"CAPABILITY", b"NOOP", b"STARTTLS",
                b"SELECT", b"FETCH", b"APPEND", b"LOGOUT")


@st.composite
def imap_command(draw, verbs=SELECTED_VERBS) -> bytes:
    """A tagged command with its arguments; sometimes with a bad tag, in
    lower case, or with an argument too many."""
    verb = draw(st.sampled_from(verbs))
    args = draw(IMAP_GRAMMAR[verb])
    command = verb + (b" " + args if args else b"")
    tag = draw(st.one_of(TAGS, TAGS, TAGS, ODD_TAGS))
    if draw(st.integers(0, 9)) == 0:
        command = command.lower()
    if draw(st.integers(0, 9)) == 0:
        command += b" " + draw(st.one_of(ODD_BYTES, NUMBERS, literal()))
    return tag + b" " + command


IMAP_VALID = st.sampled_from([
    b"a LOGIN {18}\r\nalice@example.test {5+}\r\nwrong",
    b'a APPEND Fuzz (\\Seen) "01-Jan-2024 10:00:00 +0100" {21}\r\nSubject: x\r\n\r\nbody\r\n',
    b"a FETCH 1:* (FLAGS UID BODY.PEEK[HEADER.FIELDS (SUBJECT FROM)]<0.10> ENVELOPE "
    b"BODYSTRUCTURE RFC822.SIZE INTERNALDATE)",
    b'a SEARCH CHARSET UTF-8 OR (FROM "a" SUBJECT {3}\r\nabc) NOT SEEN SINCE 1-Jan-2020 UID 1:*',
    b"a STORE 1 +FLAGS.SILENT (\\Flagged $Junk)", b"a IDLE\r\nDONE",
    b'a LIST (SUBSCRIBED) "" ("*" "%") RETURN (STATUS (MESSAGES UNSEEN))',
])


def imap_junk(verbs) -> st.SearchStrategy[Step]:
    commands = st.one_of(imap_command(verbs), imap_command(verbs), imap_command(verbs),
                         mutated(imap_command(verbs)), mutated(IMAP_VALID))
    command = st.builds(Step, st.builds(lambda c, e: c + e, commands, ENDINGS), WAIT)
    return st.one_of(
        command, command, command, command, command,
        st.builds(Step, lines_of(commands, ENDINGS, 5), WAIT),
        st.builds(lambda m: Step(b"a APPEND INBOX {%d}\r\n" % len(m) + m + b"\r\n"
                                 b"b FETCH * (BODYSTRUCTURE ENVELOPE BODY[1.MIME] BODY[2.1] "
                                 b"BINARY[1] BODY.PEEK[HEADER.FIELDS (Subject From)])\r\n"
                                 b"c SEARCH TEXT caf\xc3\xa9 FROM alice\r\n"),
                  mime_message()),
        st.one_of(
            st.builds(Step, NOISE, WAIT),
            st.builds(lambda x, e: Step(b"a SEARCH " + x + e), long_line(b"("), ENDINGS),
            st.builds(Step, st.builds(lambda x, e: b"a " + x + e, long_line(), ENDINGS)),
            st.builds(lambda x, e: Step(b"a SEARCH " + x + e), NESTED, ENDINGS),
            st.builds(lambda x, e: Step(b"a FETCH 1 " + x + e), NESTED, ENDINGS),
            st.builds(lambda sasl, e: Step(b"a AUTHENTICATE PLAIN\r\n" + sasl + e), SASL,
                      ENDINGS)),
    )


@st.composite
def imap_script(draw, login: bool):
    steps = []
    if login:
        steps.append(Step(b'L LOGIN alice@example.test "' + PASSWORD.encode() + b'"\r\n',
                          ANSWER))
        select = draw(st.sampled_from([b"S SELECT INBOX\r\n", b"S EXAMINE INBOX\r\n", b""]))
        if select:
            steps.append(Step(select, ANSWER))
    steps += draw(st.lists(imap_junk(SELECTED_VERBS if login else UNAUTH_VERBS), min_size=1,
                           max_size=12))
    return steps


@st.composite
def imap_starttls(draw):
    junk = draw(st.one_of(lines_of(imap_command(UNAUTH_VERBS), ENDINGS, 4), NOISE))[:2000]
    steps = [Step(b"S STARTTLS\r\n" + junk, tls_go=b"S" + IMAP_TLS_GO),
             Step(b"P NOOP\r\n", ANSWER)]
    steps += draw(st.lists(imap_junk(UNAUTH_VERBS), max_size=3))
    return steps


def check_imap(test, c: Conversation) -> None:
    replies = imap_replies(bytes(c.received), bytes(c.sent), upgraded=c.upgraded)
    test.assertTrue(replies and replies[0].startswith(b"* OK "), replies[:1])
    if c.upgraded:
        after = replies[replies.index(b"S" + IMAP_TLS_GO) + 1:]
        test.assertEqual(after[:1], [b"P OK NOOP completed"], "a plaintext command ran in TLS")
    last = replies[-1]
    test.assertTrue(last.endswith(b" OK Logout completed") or last.startswith(b"* BYE ")
                    or b" BAD " in last or last.endswith(IMAP_TLS_GO), f"closed after {last!r}")


class GoodIMAP:
    """A well-behaved IMAP client logged in for the whole test, reading a known message."""

    def __init__(self, test: _FuzzTest, port: int, body: bytes):
        self.test = test
        self.body = body
        self.client = imaplib.IMAP4("127.0.0.1", port, timeout=15)
        self.client.login(DEMO, PASSWORD)
        self.check()

    def check(self) -> None:
        c = self.client
        self.test.assertEqual(c.noop()[0], "OK")
        self.test.assertEqual(c.select("INBOX"), ("OK", [b"1"]))
        typ, data = c.uid("SEARCH", "ALL")
        self.test.assertEqual((typ, len(data[0].split())), ("OK", 1))
        typ, data = c.uid("FETCH", data[0], "(BODY.PEEK[] FLAGS)")
        self.test.assertEqual(typ, "OK")
        self.test.assertIn(self.body, data[0][1])

    def close(self) -> None:
        self.test.assertEqual(self.client.logout()[0], "BYE")


class IMAPFuzzTests(_FuzzTest):
    protocols = ("imap", "smtp")
    #: The padding that completes any literal the fuzzer left open (APPEND
    #: literals are limited by max_message_size, the others by max_literal).
    sections = {"imap": {"max_message_size": 100_000, "max_literal": 65_536}}
    PADDING = b"\r\n" * 50_001 + b"Z LOGOUT\r\n"

    @defer.inlineCallbacks
    def fuzz(self, strategy, examples: int):
        yield self.start()
        good_body = b"the well-behaved client's message"
        yield in_thread(self.deliver, DEMO, "known", good_body.decode() + "\r\n")
        for n in range(2):
            yield in_thread(self.deliver, ALICE, f"alice {n}", "x\r\n.\r\n..y\r\n")
        port = self.daemon.ports["imap"]

        def run():
            good = GoodIMAP(self, port, good_body)

            @fuzz_settings(examples)
            @given(strategy)
            def example(steps):
                self.converse(steps, port, b"\r\nZ LOGOUT\r\n", check_imap,
                              padding=self.PADDING)
                good.check()

            falsify(example)
            good.close()
            assert_released(port, PER_IP, b"* OK ")
            GoodIMAP(self, port, good_body).close()

        yield in_thread(run)

    def test_not_authenticated(self):
        return self.fuzz(st.one_of(imap_script(login=False), imap_starttls()), 55)

    def test_authenticated(self):
        return self.fuzz(imap_script(login=True), 60)


# -- POP3 -------------------------------------------------------------------
POP3_COMMANDS = st.sampled_from([  # the TRANSACTION state's first: hypothesis favours them
    b"RETR 1", b"TOP 1 0", b"LIST", b"UIDL", b"STAT", b"DELE 1", b"RETR 2", b"LIST 1", b"UIDL 1",
    b"TOP 1 -5", b"TOP 2 99999999999999999999", b"TOP 1", b"RSET", b"NOOP", b"CAPA",
    b"RETR 0", b"RETR -1", b"RETR 99999999999999999999", b"RETR \xd9\xa5", b"UIDL 0",
    b"DELE 1 1", b"LIST 1 2", b"LAST", b"RPOP x", b"XTND XMIT",
    b"USER alice@example.test", b"USER", b"USER a b", b"PASS " + PASSWORD.encode(),
    b"PASS wrong", b"PASS", b"APOP alice x", b"AUTH", b"AUTH PLAIN", b"AUTH LOGIN",
    b"AUTH PLAIN =", b"AUTH PLAIN " + b64(b"\0alice@example.test\0wrong"), b"AUTH PLAIN a b c",
    b"STLS x", b"", b" ", b"\x00", b".",
])


def pop3_junk() -> st.SearchStrategy[Step]:
    commands = st.one_of(POP3_COMMANDS, st.builds(lambda c, n: c + b" " + n, POP3_COMMANDS,
                                                  NUMBERS))
    return st.one_of(
        st.builds(Step, st.builds(lambda c, e: c + e, commands, ENDINGS), WAIT),
        st.builds(Step, st.builds(lambda c, e: c + e, mutated(POP3_COMMANDS), ENDINGS),
                  WAIT),
        st.builds(Step, lines_of(commands, ENDINGS), WAIT),
        st.builds(Step, NOISE, WAIT),
        st.builds(Step, st.builds(lambda x, e: x + e, long_line(), ENDINGS)),
        st.builds(lambda sasl, e: Step(b"AUTH PLAIN\r\n" + sasl + e, BRIEF), SASL, ENDINGS),
        st.builds(lambda sasl: Step(b"AUTH PLAIN " + sasl + b"\r\n", BRIEF), SASL),
    )


@st.composite
def pop3_script(draw):
    steps = []
    login = draw(st.sampled_from(["none", "user", "sasl"]))
    if login == "user":
        steps.append(Step(b"USER alice@example.test\r\nPASS " + PASSWORD.encode() + b"\r\n",
                          ANSWER))
    elif login == "sasl":
        steps.append(Step(b"AUTH PLAIN " + b64(b"\0alice@example.test\0" + PASSWORD.encode())
                          + b"\r\n", ANSWER))
    steps += draw(st.lists(pop3_junk(), min_size=1, max_size=6))
    return steps


@st.composite
def pop3_stls(draw):
    junk = draw(st.one_of(lines_of(POP3_COMMANDS, ENDINGS), NOISE))
    steps = [Step(b"USER alice@example.test\r\nSTLS\r\n" + junk, tls_go=POP3_TLS_GO),
             Step(b"PASS x\r\n", ANSWER)]
    steps += draw(st.lists(pop3_junk(), max_size=3))
    return steps


def check_pop3(test, c: Conversation) -> None:
    replies = pop3_replies(bytes(c.received), upgraded=c.upgraded)
    test.assertTrue(replies and replies[0].startswith(b"+OK "), replies[:1])
    if c.upgraded:
        after = replies[replies.index(POP3_TLS_GO) + 1:]
        # The USER sent before STLS is forgotten, and nothing pipelined ran.
        test.assertEqual(after[:1], [b"-ERR Send USER first"], "a plaintext command ran in TLS")
    last = replies[-1]
    test.assertTrue(last.startswith(b"+OK Bye") or last == POP3_TLS_GO, f"closed after {last!r}")


class GoodPOP3:
    """A well-behaved POP3 client logged in for the whole test, reading a known message."""

    def __init__(self, test: _FuzzTest, port: int, body: bytes):
        self.test = test
        self.body = body
        self.client = poplib.POP3("127.0.0.1", port, timeout=15)
        self.client.user(DEMO)
        self.client.pass_(PASSWORD)
        self.check()

    def check(self) -> None:
        count, _ = self.client.stat()
        self.test.assertEqual(count, 1)
        _, lines, _ = self.client.retr(1)
        self.test.assertIn(self.body, lines)
        self.test.assertTrue(self.client.noop().startswith(b"+OK"))

    def close(self) -> None:
        self.test.assertTrue(self.client.quit().startswith(b"+OK"))


#: After STLS the server answers QUIT but does not close the connection
#: (POP3TLSCloseTests): the fuzzer stops reading at the answer there.
POP3_TLS_BYE = b"+OK Bye"


class POP3FuzzTests(_FuzzTest):
    protocols = ("pop3", "smtp")

    @defer.inlineCallbacks
    def test_commands(self):
        yield self.start()
        good_body = b"the well-behaved client's message"
        yield in_thread(self.deliver, DEMO, "known", good_body.decode() + "\r\n")
        for n in range(2):
            yield in_thread(self.deliver, ALICE, f"alice {n}",
                            "x\r\n..\r\n..y\r\n" + "z" * 990 + "\r\n")
        port = self.daemon.ports["pop3"]

        def run():
            good = GoodPOP3(self, port, good_body)

            @fuzz_settings(70)
            @given(st.one_of(pop3_script(), pop3_script(), pop3_stls()))
            def example(steps):
                # RSET: a DELE of the fuzzer must not empty alice's maildrop at QUIT.
                self.converse(steps, port, b"\r\n*\r\nRSET\r\nQUIT\r\n", check_pop3,
                              tls_last=POP3_TLS_BYE)
                good.check()

            falsify(example)
            good.close()
            assert_released(port, PER_IP, b"+OK ")
            GoodPOP3(self, port, good_body).close()

        yield in_thread(run)


# -- inputs the fuzzing found ---------------------------------------------------
class IMAPFoundTests(IMAPTestCase):
    """Plain tests of the inputs that made the fuzzing above fail."""

    @defer.inlineCallbacks
    def test_invalid_tags_are_not_echoed(self):
        """A tag of "*", "+", or with NUL or 8-bit bytes was echoed into the
        tagged reply: "+ OK ..." reads as a continuation request, "* BAD ..."
        as an untagged response (RFC 3501 9: tag = 1*<ASTRING-CHAR except "+">)."""
        def check():
            r = self.raw()
            for tag in (b"\x00", b"+", b"*", b"a+b", b"\xff", b"(", b"a%", b'"a"', b"x" * 150):
                r.send(tag + b" NOOP\r\n")
                self.assertEqual(r.line(), b"* BAD Invalid tag\r\n", tag)
            # A literal in such a command is read, not run as a command.
            r.send(b"+ LOGIN {4+}\r\nb OK {1+}\r\nx\r\n")
            self.assertEqual(r.line(), b"* BAD Invalid tag\r\n")
            for tag in (b"a", b"A001", b"t.1", b"x]", b"~a!"):
                self.assertEqual(r.cmd(tag + b" NOOP"), [tag + b" OK NOOP completed\r\n"])

        yield self.blocking(check)

    @defer.inlineCallbacks
    def test_authenticate_continuation_has_a_space(self):
        """RFC 3501 7.5: continue-req = "+" SP ...; an empty challenge was "+"."""
        def check():
            r = self.raw()
            r.send(b"a AUTHENTICATE PLAIN\r\n")
            self.assertEqual(r.line(), b"+ \r\n")
            r.send(b"*\r\n")
            self.assertEqual(r.line(), b"a BAD Authentication cancelled\r\n")

        yield self.blocking(check)

    @defer.inlineCallbacks
    def test_user_name_that_is_not_utf8(self):
        """b"\\x0f\\xbe..." as the user name (from a base64 SASL response)
        raised in the password checker: NO [UNAVAILABLE] Internal error and a
        traceback in the log, instead of a failed login."""
        def check():
            r = self.raw()
            response = b64(b"\0\x0f\xbe\xfb\xef\xff\xff\xff\xff\xff\xff\xff\xfc\x0f\xc0\0pw")
            lines = r.cmd(b"a AUTHENTICATE PLAIN " + response)
            self.assertEqual(lines, [b"a NO [AUTHENTICATIONFAILED] Authentication failed\r\n"])
            lines = r.cmd(b"b LOGIN {5}\r\n\xff@x.y password")
            self.assertEqual(lines[-1], b"b NO [AUTHENTICATIONFAILED] Authentication failed\r\n")

        yield self.blocking(check)
        self.assertEqual(self.flushLoggedErrors(), [])

    @defer.inlineCallbacks
    def test_literal_sent_with_its_command_behind_a_pending_one(self):
        """A synchronising literal already buffered when its command was read
        (here: sent without waiting for the "+", while LOGIN was checked)
        was never taken: the session hung."""
        def check():
            r = self.raw()
            r.send(b'L LOGIN demo@example.test "' + PASSWORD.encode() + b'"\r\n'
                   b"a APPEND INBOX {21}\r\nSubject: x\r\n\r\nbody\r\n\r\nb NOOP\r\n")
            lines = r.until(b"b")
            self.assertTrue(lines[0].startswith(b"L OK "), lines)
            self.assertEqual(lines[1], b"+ Ready for literal data\r\n")
            self.assertTrue(lines[-2].startswith(b"a OK [APPENDUID "), lines)
            self.assertEqual(lines[-1], b"b OK NOOP completed\r\n")
            # The same with nothing pending: command and literal in one write.
            r.send(b"c APPEND INBOX {21}\r\nSubject: y\r\n\r\nbody\r\n\r\nd NOOP\r\n")
            lines = r.until(b"d")
            self.assertTrue(lines[-2].startswith(b"c OK [APPENDUID "), lines)

        yield self.blocking(check)

    @defer.inlineCallbacks
    def test_search_dates_that_do_not_exist(self):
        """SEARCH BEFORE 99-Jan-2024 raised ValueError in datetime.date: NO
        [SERVERBUG] and a traceback in the log instead of BAD."""
        yield self.deliver()

        def check():
            r = self.raw()
            r.login()
            r.cmd(b"s SELECT INBOX")
            for date in (b"99-jan-2024", b"31-Feb-2024", b"0-Jan-2024", b"1-Jan-0000",
                         b'"29-Feb-2023"'):
                lines = r.cmd(b"a SEARCH BEFORE " + date)
                self.assertEqual(lines, [b"a BAD Bad date\r\n"], date)
            self.assertEqual(r.cmd(b"b SEARCH SINCE 29-Feb-2024")[-1],
                             b"b OK Search completed\r\n")

        yield self.blocking(check)
        self.assertEqual(self.flushLoggedErrors(), [])

    @defer.inlineCallbacks
    def test_error_text_is_one_line(self):
        """"! LOGIN {0" answered "! BAD Expected }" CRLF CRLF: the parser's
        message held the CRLF it expected, and an empty line followed."""
        def check():
            r = self.raw()
            r.send(b"! LOGIN {0\r\n")
            self.assertEqual(r.line(), b"! BAD Expected } and CRLF after a literal size\r\n")
            self.assertEqual(r.cmd(b"a NOOP"), [b"a OK NOOP completed\r\n"])

        yield self.blocking(check)



class IMAPErrorBudgetTests(IMAPTestCase):
    sections = {"imap": {"max_errors": 3}}

    @defer.inlineCallbacks
    def test_commands_refused_while_read_count_as_errors(self):
        """Invalid tags and over-long lines were answered BAD without counting
        toward [imap] max_errors, so junk of that kind never ended a session."""
        def check():
            r = self.raw()
            r.send(b"\x00 NOOP\r\n+ NOOP\r\na " + b"x" * 70_000 + b"\r\n* NOOP\r\nb NOOP\r\n")
            lines = [r.line() for _ in range(5)]
            self.assertEqual(lines, [b"* BAD Invalid tag\r\n", b"* BAD Invalid tag\r\n",
                                     b"a BAD Line too long\r\n", b"* BAD Invalid tag\r\n",
                                     b"* BYE Too many errors\r\n"])
            self.assertEqual(r.line(), b"")

        yield self.blocking(check)



class SMTPFoundTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_reply_text_is_seven_bit(self):
        """"MAIL FROM:<s@remote.test> \\xff=1" was answered with the
        parameter decoded as U+FFFD, in UTF-8: RFC 5321 4.2 reply text is
        7-bit, and SMTPUTF8 is not offered."""
        instance = Instance(self.mktemp(), listen=(("smtp", 0),))
        instance.start()
        self.addCleanup(instance.stop)

        def check():
            c = Conversation(instance.smtp_port, source="127.0.0.1")
            try:
                c.read_line()
                c.play([Step(b"EHLO x\r\n", ANSWER),
                        Step(b"MAIL FROM:<s@remote.test> \xff=1\r\n", ANSWER),
                        Step(b"MAIL FROM:<s@remote.test> SIZE=\xc3\xa9\r\n", ANSWER)])
                return smtp_replies(bytes(c.received))[-2:]
            finally:
                c.close()

        replies = yield in_thread(check)
        self.assertEqual(replies, [b"501 5.1.7 Bad sender address syntax: bad parameter '?=1'",
                                   b"501 5.1.7 Bad sender address syntax: bad parameter "
                                   b"'SIZE=??'"])



class POP3AuthLineTests(unittest.TestCase):

    @defer.inlineCallbacks
    def test_overlong_sasl_response_ends_the_exchange(self):
        """An over-long line in answer to "AUTH PLAIN" gets "-ERR Line too
        long", but the session stays in the exchange: the next command is
        taken as the SASL response ("STAT" is valid base64)."""
        instance = Instance(self.mktemp(), listen=(("pop3", 0),),
                            sections={"auth": {"allow_plaintext_loopback": True}})
        instance.start()
        self.addCleanup(instance.stop)

        def check():
            c = Conversation(instance.port("pop3"), source="127.0.0.1")
            try:
                c.read_line()
                c.send(b"AUTH PLAIN\r\n" + b"A" * 600 + b"\r\nSTAT\r\nQUIT\r\n")
                return pop3_replies(c.finish())
            finally:
                c.close()

        replies = yield in_thread(check)
        self.assertEqual(replies[1:], [b"+ ", b"-ERR Line too long",
                                       b"-ERR Command not valid in this state", b"+OK Bye"])


class POP3TLSCloseTests(_FuzzTest):
    """POP3 inside TLS (POP3S, or after STLS): QUIT and the idle timeout must
    close the connection. The session is the transport's producer for its
    whole life, and Twisted's TLS transport holds back its close while a
    producer is registered, so the connection stays open until the client
    goes away."""

    protocols = ("pop3s", "pop3")
    sections = {"pop3": {"idle_timeout": 1.0}}

    def closes(self, port: int, tls: bool, command: bytes) -> bool:
        c = Conversation(port, tls=tls)
        try:
            c.read_line()
            if not tls:
                c.play([Step(b"STLS\r\n", tls_go=POP3_TLS_GO)])
            c.send(command)
            return c.wait_closed(3.0)
        finally:
            c.close()

    @defer.inlineCallbacks
    def test_quit(self):
        yield self.start()
        self.assertTrue((yield in_thread(self.closes, self.daemon.ports["pop3s"], True,
                                         b"QUIT\r\n")), "POP3S: open after QUIT")
        self.assertTrue((yield in_thread(self.closes, self.daemon.ports["pop3"], False,
                                         b"QUIT\r\n")), "STLS: open after QUIT")

    @defer.inlineCallbacks
    def test_idle_timeout(self):
        yield self.start()
        self.assertTrue((yield in_thread(self.closes, self.daemon.ports["pop3s"], True, b"")),
                        "POP3S: open after the idle timeout")
