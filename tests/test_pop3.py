"""POP3 end to end: poplib and raw sockets against an in-process mailstack.

Every test starts a real instance (POP3 with STLS, POP3S, SMTP) in a
temporary directory, puts messages into the users' Maildirs the way another
program would (files in ``new/`` with Dovecot-style names) or delivers them
through SMTP, and checks what a POP3 client gets and what is left on disk.
Case IDs refer to SECURITY-TESTS.md.

Passwords are hashed with cheap argon2 parameters (``write_users``) so that
the many logins here take milliseconds; the server verifies whatever
parameters the stored hash names.
"""

from __future__ import annotations

import base64
import fcntl
import io
import itertools
import os
import poplib
import smtplib
import socket
import ssl
import time
from pathlib import Path

from argon2 import PasswordHasher
from hypothesis import given, strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from mailstack.auth.limiter import FailureLimiter, LoginGuard
from mailstack.config import Config
from mailstack.pop3.framing import CommandReader, LineTooLong
from mailstack.pop3.mailbox import Maildrop, MaildropCache
from mailstack.pop3.server import POP3Factory
from mailstack.pop3.wire import (AS_IS, CHUNK, LF_TO_CRLF, WireEncoder, by_recipe, encode,
                                 recipe_of, top_chunks, wire_size)
from mailstack.smtp.framing import LineSplitter
from mailstack.store.folder import Folder
from tests.support.instance import PASSWORD, Instance, in_thread, wait_for

ALICE = "alice@example.test"
BOB = "bob@example.test"
USERS = (ALICE, BOB, "demo@example.test")
_CHEAP = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
_SEQUENCE = itertools.count()


def write_users(root: Path, addresses=USERS) -> None:
    """A users file with cheap argon2id hashes (``write_instance`` keeps it)."""
    root.mkdir(parents=True, exist_ok=True)
    lines = [f"{a}:{{ARGON2ID}}{_CHEAP.hash(PASSWORD)}\n" for a in addresses]
    (root / "users").write_text("".join(lines))


def start(test: unittest.TestCase, root: Path | str | None = None, *, plaintext: bool = True,
          auth: dict | None = None, pop3: dict | None = None, users=USERS) -> Instance:
    """A running instance with smtp, pop3 and pop3s listeners, stopped at cleanup.

    ``plaintext`` is ``[auth] allow_plaintext_loopback``: tests about the
    protocol use it, tests about TLS turn it off. Passing the ``root`` of an
    instance stopped before starts a new one on the same directory.
    """
    root = Path(root or test.mktemp())
    if not (root / "users").exists():
        write_users(root, users)
    sections = {"auth": {"allow_plaintext_loopback": plaintext, "failure_delay": 0.05,
                         **(auth or {})},
                "pop3": pop3 or {}}
    instance = Instance(root, users=users, listen=(("smtp", 0), ("pop3", 0), ("pop3s", 0)),
                        sections=sections)
    instance.start()

    def stop():
        if instance.service.running:
            return instance.stop()
        return None

    test.addCleanup(stop)
    return instance


def maildir(instance: Instance, address: str) -> Path:
    return instance.maildir(address, "new").parent


def put(instance: Instance, address: str, data: bytes, *, sub: str = "new", flags: str | None = None,
        sizes: bool = True) -> Path:
    """Place a message as a delivery agent would; returns its path.

    The name follows Dovecot (``<sec>.M<usec>P<pid>.<host>,S=<size>,W=<crlf size>``);
    seconds increase with every call so message numbers follow call order.
    ``sizes=False`` leaves out ``S=``/``W=`` (as Postfix and mutt write names).
    """
    n = next(_SEQUENCE)
    base = f"{1_700_000_000 + n}.M{n}P{os.getpid()}.testhost"
    name = base
    if sizes:
        wsize = len(data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
        name += f",S={len(data)},W={wsize}"
    if flags is not None:
        name += f":2,{flags}"
    top = maildir(instance, address)
    for d in ("tmp", "new", "cur"):
        (top / d).mkdir(parents=True, exist_ok=True)
    tmp = top / "tmp" / name
    tmp.write_bytes(data)
    path = top / sub / name
    tmp.rename(path)
    return path


def files(instance: Instance, address: str) -> list[str]:
    """Names of all messages (new/ and cur/), as ``sub/name``."""
    top = maildir(instance, address)
    return sorted(f"{sub}/{p.name}" for sub in ("new", "cur") if (top / sub).exists()
                  for p in (top / sub).iterdir())


def message(n: int, body_lines: int = 3) -> bytes:
    """A small message with LF line ends, as mailstack stores them."""
    body = "".join(f"body line {i} of message {n}\n" for i in range(1, body_lines + 1))
    return f"From: sender@remote.test\nTo: alice@example.test\nSubject: message {n}\n\n{body}".encode()


def crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def client_tls(instance: Instance) -> ssl.SSLContext:
    """Trusts exactly the instance's self-signed certificate, for its host name."""
    context = ssl.create_default_context(cafile=str(instance.root / "cert.pem"))
    context.check_hostname = False  # clients connect to 127.0.0.1
    return context


def login(instance: Instance, user: str = ALICE, password: str = PASSWORD) -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", instance.port("pop3"), timeout=10)
    client.user(user)
    client.pass_(password)
    return client


def login_tls(instance: Instance, user: str = ALICE) -> poplib.POP3_SSL:
    client = poplib.POP3_SSL("127.0.0.1", instance.port("pop3s"), timeout=10,
                             context=client_tls(instance))
    client.user(user)
    client.pass_(PASSWORD)
    return client


def login_when_free(instance: Instance, user: str = ALICE, timeout: float = 5.0) -> poplib.POP3:
    """Log in, retrying while the maildrop is still locked by a session that just ended."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return login(instance, user)
        except poplib.error_proto as e:
            if b"[IN-USE]" not in e.args[0] or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def unstuff(raw: bytes) -> bytes:
    """A multi-line body as the client keeps it (RFC 1939 3: remove one leading dot)."""
    lines = raw.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


class Raw:
    """A blocking POP3 peer that sends exact bytes and reads exact replies."""

    def __init__(self, instance: Instance, protocol: str = "pop3", timeout: float = 10.0):
        self.sock = socket.create_connection(("127.0.0.1", instance.port(protocol)), timeout=timeout)
        if protocol == "pop3s":
            self.sock = client_tls(instance).wrap_socket(self.sock)
        self.buffer = b""
        self.greeting = self.line()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise EOFError(f"connection closed; unread: {self.buffer!r}")
        self.buffer += chunk

    def line(self) -> bytes:
        """One reply line without its CRLF."""
        while b"\r\n" not in self.buffer:
            self._fill()
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def body(self) -> bytes:
        """The raw octets of a multi-line body, up to (without) the terminating ``.CRLF``."""
        while True:
            if self.buffer.startswith(b".\r\n"):
                self.buffer = self.buffer[3:]
                return b""
            end = self.buffer.find(b"\r\n.\r\n")
            if end >= 0:
                raw, self.buffer = self.buffer[:end + 2], self.buffer[end + 5:]
                return raw
            self._fill()

    def command(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.line()

    def login(self, user: str = ALICE) -> None:
        assert self.command(b"USER " + user.encode()).startswith(b"+OK"), user
        reply = self.command(b"PASS " + PASSWORD.encode())
        assert reply.startswith(b"+OK"), reply

    def starttls(self, instance: Instance) -> None:
        assert self.buffer == b"", f"plaintext after the STLS reply: {self.buffer!r}"
        self.sock = client_tls(instance).wrap_socket(self.sock)

    def closed(self) -> bool:
        """Whether the server closed the connection (nothing more to read)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()


class CommandTests(unittest.TestCase):
    """The RFC 1939 commands as poplib uses them."""

    timeout = 60

    def setUp(self):
        self.instance = start(self)

    @defer.inlineCallbacks
    def test_stat_list_uidl_retr_noop(self):
        data = [message(n) for n in range(1, 4)]
        paths = [put(self.instance, ALICE, d) for d in data]

        def session():
            client = login(self.instance)
            try:
                return (client.stat(), client.list(), client.list(2), client.uidl(),
                        client.uidl(3), client.retr(1), client.noop(), client.quit())
            finally:
                client.close()

        stat, listing, one, uidl, uidl3, retr, noop, quit_ = yield in_thread(session)
        sizes = [len(crlf(d)) for d in data]
        self.assertEqual(stat, (3, sum(sizes)))
        self.assertEqual(listing[1], [b"%d %d" % (i + 1, s) for i, s in enumerate(sizes)])
        self.assertEqual(one, b"+OK 2 %d" % sizes[1])
        bases = [p.name.split(",")[0].encode() for p in paths]
        self.assertEqual(uidl[1], [b"%d %s" % (i + 1, b) for i, b in enumerate(bases)])
        self.assertEqual(uidl3, b"+OK 3 " + bases[2])
        self.assertEqual(retr[0], b"+OK %d octets" % sizes[0])
        self.assertEqual(retr[1], data[0].rstrip(b"\n").split(b"\n"))
        self.assertEqual(retr[2], sizes[0])
        self.assertTrue(noop.startswith(b"+OK"))
        self.assertTrue(quit_.startswith(b"+OK"))

    @defer.inlineCallbacks
    def test_dele_takes_effect_at_quit(self):
        for n in range(1, 4):
            put(self.instance, ALICE, message(n))
        before = files(self.instance, ALICE)

        def session():
            client = login(self.instance)
            replies = [client.dele(2)]
            replies.append(client.stat())
            replies.append(client.list()[1])
            replies.append(client.uidl()[1])
            # Still on disk until QUIT (RFC 1939 6: the UPDATE state).
            replies.append(files(self.instance, ALICE))
            replies.append(client.quit())
            return replies

        dele, stat, listing, uidl, during, quit_ = yield in_thread(session)
        self.assertTrue(dele.startswith(b"+OK"))
        size = len(crlf(message(1)))
        self.assertEqual(stat, (2, 2 * size))
        self.assertEqual(listing, [b"1 %d" % size, b"3 %d" % size])
        self.assertEqual([u.split()[0] for u in uidl], [b"1", b"3"])
        self.assertEqual(during, before)
        self.assertIn(b"1 message", quit_)
        after = files(self.instance, ALICE)
        self.assertEqual(len(after), 2)
        self.assertNotIn(before[1], after)
        self.assertFalse(any(name.startswith(before[1].split(",")[0]) for name in after))

    @defer.inlineCallbacks
    def test_dele_then_rset_deletes_nothing(self):
        for n in range(1, 4):
            put(self.instance, ALICE, message(n))
        before = files(self.instance, ALICE)

        def session():
            client = login(self.instance)
            client.dele(1)
            client.dele(3)
            rset = client.rset()
            result = rset, client.stat(), client.list()[1], client.retr(1)[1], client.quit()
            return result

        rset, stat, listing, retr, quit_ = yield in_thread(session)
        self.assertTrue(rset.startswith(b"+OK"))
        self.assertEqual(stat[0], 3)
        self.assertEqual(len(listing), 3)
        self.assertEqual(retr[-1], b"body line 3 of message 1")
        self.assertIn(b"0 message", quit_)
        self.assertEqual([n.split(":")[0].split("/")[1] for n in files(self.instance, ALICE)],
                         [n.split("/")[1] for n in before])

    @defer.inlineCallbacks
    def test_dele_then_dropped_connection_deletes_nothing(self):
        """ISO-3: no QUIT, no UPDATE state, nothing deleted."""
        for n in range(1, 3):
            put(self.instance, ALICE, message(n))
        before = files(self.instance, ALICE)

        def session():
            raw = Raw(self.instance)
            raw.login()
            assert raw.command(b"DELE 1").startswith(b"+OK")
            assert raw.command(b"DELE 2").startswith(b"+OK")
            raw.sock.shutdown(socket.SHUT_RDWR)
            raw.close()
            client = login_when_free(self.instance)
            try:
                return client.stat()
            finally:
                client.quit()

        stat = yield in_thread(session)
        self.assertEqual(stat[0], 2)
        self.assertEqual(files(self.instance, ALICE), before)

    @defer.inlineCallbacks
    def test_top(self):
        data = message(1, body_lines=5)
        put(self.instance, ALICE, data)
        header = data.split(b"\n\n")[0].split(b"\n")

        def session():
            client = login(self.instance)
            try:
                return [client.top(1, n)[1] for n in (0, 2, 5, 100)]
            finally:
                client.quit()

        zero, two, five, hundred = yield in_thread(session)
        self.assertEqual(zero, header + [b""])
        self.assertEqual(two, header + [b"", b"body line 1 of message 1", b"body line 2 of message 1"])
        whole = data.rstrip(b"\n").split(b"\n")
        self.assertEqual(five, whole)
        # Asking for more lines than there are gives the whole message, no extra line.
        self.assertEqual(hundred, whole)
        # TOP is a peek: the message is not marked as read.
        self.assertEqual(files(self.instance, ALICE)[0][:4], "new/")

    @defer.inlineCallbacks
    def test_top_of_message_without_body_separator(self):
        put(self.instance, ALICE, b"Subject: headers only\nX-Other: yes\n")

        def session():
            client = login(self.instance)
            try:
                return client.top(1, 0)[1], client.top(1, 3)[1]
            finally:
                client.quit()

        zero, three = yield in_thread(session)
        self.assertEqual(zero, [b"Subject: headers only", b"X-Other: yes"])
        self.assertEqual(three, zero)

    @defer.inlineCallbacks
    def test_dot_stuffing_and_exact_sizes_on_the_wire(self):
        """Sizes in STAT, LIST and the RETR reply are the octets the client keeps.

        RFC 1939 11: the size counts each line end as CRLF, and the dots the
        server adds for byte-stuffing "need not (and must not)" be counted:
        the client removes them. The raw octets are counted on a raw socket.
        """
        data = (b".starts with a dot\nSubject: dots\n\n.\n..\n...x\n.leading\nmiddle . dot\n"
                b"\n.\nlast\n")
        put(self.instance, ALICE, data)
        put(self.instance, ALICE, message(2))

        def session():
            raw = Raw(self.instance)
            raw.login()
            stat = raw.command(b"STAT")
            listed = raw.command(b"LIST 1")
            retr = raw.command(b"RETR 1")
            wire = raw.body()
            top = raw.command(b"TOP 1 2")
            top_wire = raw.body()
            raw.command(b"QUIT")
            client = login_when_free(self.instance)
            try:
                return stat, listed, retr, wire, top, top_wire, client.retr(1)
            finally:
                client.quit()

        stat, listed, retr, wire, top, top_wire, (_, lines, octets) = yield in_thread(session)
        expected = crlf(data)
        self.assertEqual(wire, b"." + expected.replace(b"\r\n.", b"\r\n.."))
        self.assertEqual(unstuff(wire), expected)
        size = len(expected)
        self.assertEqual(listed, b"+OK 1 %d" % size)
        self.assertEqual(retr, b"+OK %d octets" % size)
        self.assertEqual(stat, b"+OK 2 %d" % (size + len(crlf(message(2)))))
        self.assertTrue(top.startswith(b"+OK"))
        self.assertEqual(top_wire, b"..starts with a dot\r\nSubject: dots\r\n\r\n..\r\n...\r\n")
        self.assertEqual(octets, size)
        self.assertEqual(lines, data.rstrip(b"\n").split(b"\n"))

    @defer.inlineCallbacks
    def test_message_without_final_line_end(self):
        data = b"Subject: cut\n\nno newline at the end"
        put(self.instance, ALICE, data, sizes=False)

        def session():
            raw = Raw(self.instance)
            raw.login()
            listed = raw.command(b"LIST 1")
            retr = raw.command(b"RETR 1")
            return listed, retr, raw.body()

        listed, retr, wire = yield in_thread(session)
        self.assertEqual(wire, b"Subject: cut\r\n\r\nno newline at the end\r\n")
        self.assertEqual(listed, b"+OK 1 %d" % len(wire))
        self.assertEqual(retr, b"+OK %d octets" % len(wire))

    @defer.inlineCallbacks
    def test_crlf_message_on_disk(self):
        """A Maildir copied from Dovecot may store CRLF line ends: served unchanged."""
        data = b"Subject: crlf on disk\r\n\r\nline one\r\n.dot line\r\n\r\nlast\r\n"
        put(self.instance, ALICE, data)
        put(self.instance, ALICE, data, sizes=False)

        def session():
            raw = Raw(self.instance)
            raw.login()
            replies = [raw.command(b"LIST")]
            replies.append(raw.body())
            for n in (b"1", b"2"):
                replies.append(raw.command(b"RETR " + n))
                replies.append(raw.body())
            return replies

        _, listing, retr1, wire1, retr2, wire2 = yield in_thread(session)
        self.assertEqual(listing, b"1 %d\r\n2 %d\r\n" % (len(data), len(data)))
        for retr, wire in ((retr1, wire1), (retr2, wire2)):
            self.assertEqual(retr, b"+OK %d octets" % len(data))
            self.assertEqual(unstuff(wire), data)
            self.assertNotIn(b"\r\r", wire)

    @defer.inlineCallbacks
    def test_names_without_sizes_are_measured(self):
        """Names from Postfix or mutt carry no W=: the size comes from the file."""
        data = b"Subject: no size in name\n\n.dot\nend\n"
        put(self.instance, ALICE, data, sizes=False)

        def session():
            client = login(self.instance)
            try:
                return client.list(1), client.retr(1)
            finally:
                client.quit()

        listed, (_, _, octets) = yield in_thread(session)
        self.assertEqual(listed, b"+OK 1 %d" % len(crlf(data)))
        self.assertEqual(octets, len(crlf(data)))

    @defer.inlineCallbacks
    def test_large_message(self):
        line = b"0123456789" * 7 + b"\n"
        data = b"Subject: large\n\n" + line * (10 * 1024 * 1024 // len(line)) + b".end\n"
        put(self.instance, ALICE, data)

        def session():
            client = login(self.instance)
            try:
                return client.list(1), client.retr(1)
            finally:
                client.quit()

        listed, (_, lines, octets) = yield in_thread(session)
        self.assertEqual(listed, b"+OK 1 %d" % len(crlf(data)))
        self.assertEqual(octets, len(crlf(data)))
        self.assertEqual(len(lines), data.count(b"\n"))
        self.assertEqual(lines[-1], b".end")
        self.assertEqual(b"\n".join(lines) + b"\n", data)

    @defer.inlineCallbacks
    def test_empty_maildrop(self):
        def session():
            client = login(self.instance)
            replies = [client.stat(), client.list(), client.uidl()]
            for command in (b"RETR 1", b"LIST 1", b"TOP 1 0", b"DELE 1", b"UIDL 1"):
                try:
                    replies.append(client._shortcmd(command.decode()))
                except poplib.error_proto as e:
                    replies.append(e.args[0])
            replies.append(client.rset())
            replies.append(client.quit())
            return replies

        stat, listing, uidl, *errors, rset, quit_ = yield in_thread(session)
        self.assertEqual(stat, (0, 0))
        self.assertEqual(listing[1], [])
        self.assertEqual(uidl[1], [])
        for reply in errors:
            self.assertTrue(reply.startswith(b"-ERR"), reply)
        self.assertTrue(rset.startswith(b"+OK"))
        self.assertTrue(quit_.startswith(b"+OK"))

    @defer.inlineCallbacks
    def test_empty_message_file_is_counted(self):
        put(self.instance, ALICE, b"")
        put(self.instance, ALICE, message(2))

        def session():
            client = login(self.instance)
            try:
                return client.stat(), client.list()[1], client.uidl()[1], client.retr(1)
            finally:
                client.quit()

        stat, listing, uidl, retr = yield in_thread(session)
        size = len(crlf(message(2)))
        self.assertEqual(stat, (2, size))
        self.assertEqual(listing, [b"1 0", b"2 %d" % size])
        self.assertEqual(len(uidl), 2)
        self.assertEqual(retr[1:], ([], 0))

    @defer.inlineCallbacks
    def test_strict_message_numbers(self):
        """ISO-2: every malformed or out-of-range number is -ERR, and the session goes on."""
        put(self.instance, ALICE, message(1))
        put(self.instance, ALICE, message(2))
        commands = [b"RETR 0", b"RETR -1", b"RETR 99999999999999999999", b"RETR 3", b"RETR 1.5",
                    b"RETR +1", b"RETR 1x", b"RETR", b"RETR 1 2", b"TOP 1 -5", b"TOP 1", b"TOP -1 0",
                    b"TOP 1 x", b"LIST 0", b"LIST -2", b"UIDL 0", b"UIDL 3", b"DELE 0", b"DELE -1",
                    b"DELE 99999999999999999999"]

        def session():
            raw = Raw(self.instance)
            raw.login()
            replies = [raw.command(c) for c in commands]
            assert raw.command(b"DELE 1").startswith(b"+OK")
            replies += [raw.command(c) for c in (b"RETR 1", b"TOP 1 0", b"LIST 1", b"UIDL 1",
                                                 b"DELE 1")]
            ok = [raw.command(b"NOOP"), raw.command(b"RETR 2")]
            raw.body()
            ok.append(raw.command(b"STAT"))
            return replies, ok

        replies, ok = yield in_thread(session)
        for command, reply in zip(commands + [b"after DELE"] * 5, replies):
            self.assertTrue(reply.startswith(b"-ERR"), (command, reply))
        self.assertTrue(ok[0].startswith(b"+OK"))
        self.assertTrue(ok[1].startswith(b"+OK"))
        self.assertEqual(ok[2], b"+OK 1 %d" % len(crlf(message(2))))

    @defer.inlineCallbacks
    def test_commands_by_state(self):
        put(self.instance, ALICE, message(1))

        def session():
            raw = Raw(self.instance)
            before = [raw.command(c) for c in (b"STAT", b"RETR 1", b"NOOP", b"APOP alice x",
                                                b"RPOP x", b"LAST", b"XYZZY", b"PASS early")]
            raw.login()
            after = [raw.command(c) for c in (b"USER alice", b"PASS x", b"STLS", b"AUTH PLAIN",
                                               b"APOP alice x", b"LAST", b"", b"x" * 600,
                                               b"stat")]
            return raw.greeting, before, after

        greeting, before, after = yield in_thread(session)
        self.assertTrue(greeting.startswith(b"+OK"))
        for reply in before + after[:-1]:
            self.assertTrue(reply.startswith(b"-ERR"), reply)
        self.assertTrue(after[-1].startswith(b"+OK 1 "), after[-1])

    @defer.inlineCallbacks
    def test_delivered_through_smtp(self):
        body = b"From: someone@remote.test\r\nSubject: via smtp\r\n\r\n.hidden dot\r\nbye\r\n"

        def send():
            with smtplib.SMTP("127.0.0.1", self.instance.smtp_port, timeout=10) as client:
                client.sendmail("someone@remote.test", [ALICE], body)

        yield in_thread(send)
        yield wait_for(lambda: self.instance.messages(ALICE))

        def session():
            client = login(self.instance)
            try:
                return client.list(1), client.retr(1)
            finally:
                client.quit()

        listed, (_, lines, octets) = yield in_thread(session)
        self.assertEqual(lines[-3:], [b"", b".hidden dot", b"bye"])
        self.assertEqual(listed, b"+OK 1 %d" % octets)
        name = self.instance.messages(ALICE, "cur")[0].name
        self.assertIn(",W=%d" % octets, name)
        self.assertTrue(name.endswith(":2,S"), name)


class UidlTests(unittest.TestCase):
    """UIDL never changes for a message: leave-on-server clients download it once."""

    timeout = 60

    def uidls(self, instance: Instance, user: str = ALICE):
        def session():
            client = login_when_free(instance, user)
            try:
                return client.uidl()[1]
            finally:
                client.quit()

        return in_thread(session)

    @defer.inlineCallbacks
    def test_uidl_stable_across_restart(self):
        root = Path(self.mktemp())
        first = start(self, root)
        for n in range(3):
            put(first, ALICE, message(n))
        before = yield self.uidls(first)
        yield first.stop()
        second = start(self, root)
        put(second, ALICE, message(4))
        after = yield self.uidls(second)
        self.assertEqual(after[:3], before)
        self.assertEqual(len(after), 4)
        self.assertEqual(len({line.split()[1] for line in after}), 4)

    @defer.inlineCallbacks
    def test_uidl_stable_across_flag_change(self):
        """An IMAP client flagging a message (rename into cur/ with :2,FS) keeps its UIDL."""
        instance = start(self)
        paths = [put(instance, ALICE, message(n)) for n in range(3)]
        before = yield self.uidls(instance)
        cur = maildir(instance, ALICE) / "cur"
        paths[1].rename(cur / (paths[1].name + ":2,FS"))
        paths[2].rename(cur / (paths[2].name.split(",")[0] + ":2,S"))
        after = yield self.uidls(instance)
        self.assertEqual(after, before)

    @defer.inlineCallbacks
    def test_uidl_unchanged_by_retr_and_deletions(self):
        instance = start(self)
        for n in range(4):
            put(instance, ALICE, message(n))
        before = yield self.uidls(instance)

        def session():
            client = login_when_free(instance)
            client.retr(2)
            client.dele(1)
            client.quit()

        yield in_thread(session)
        after = yield self.uidls(instance)
        self.assertEqual([u.split()[1] for u in after], [u.split()[1] for u in before[1:]])

    @defer.inlineCallbacks
    def test_long_or_odd_base_names_get_a_valid_uidl(self):
        """RFC 1939 7: 1 to 70 characters 0x21-0x7E; other names are hashed."""
        instance = start(self)
        top = maildir(instance, ALICE)
        put(instance, ALICE, message(0))
        (top / "new" / ("1700000000." + "x" * 100)).write_bytes(message(1))
        (top / "new" / "1700000001.caf\u00e9 host").write_bytes(message(2))
        uidls = yield self.uidls(instance)
        again = yield self.uidls(instance)
        self.assertEqual(uidls, again)
        ids = [line.split(b" ", 1)[1] for line in uidls]
        self.assertEqual(len(set(ids)), 3)
        for uid in ids:
            self.assertTrue(1 <= len(uid) <= 70 and all(0x21 <= c <= 0x7E for c in uid), uid)


class TLSTests(unittest.TestCase):
    """Passwords only inside TLS: STLS on the pop3 port, implicit TLS on pop3s (AUTH-3, TLS-3)."""

    timeout = 60

    def setUp(self):
        self.instance = start(self, plaintext=False)
        put(self.instance, ALICE, message(1))

    @defer.inlineCallbacks
    def test_plaintext_capa_and_refusals(self):
        def session():
            client = poplib.POP3("127.0.0.1", self.instance.port("pop3"), timeout=10)
            capa = client.capa()
            replies = []
            for attempt in (lambda: client.user(ALICE), lambda: client.pass_(PASSWORD),
                            lambda: client._shortcmd("AUTH PLAIN " + base64.b64encode(
                                b"\0" + ALICE.encode() + b"\0" + PASSWORD.encode()).decode())):
                try:
                    replies.append(attempt())
                except poplib.error_proto as e:
                    replies.append(e.args[0])
            replies.append(client._longcmd("AUTH"))
            client.quit()
            return capa, replies

        capa, (user, password, auth, mechanisms) = yield in_thread(session)
        self.assertEqual(sorted(capa), sorted(["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE",
                                               "PIPELINING", "EXPIRE", "IMPLEMENTATION", "STLS"]))
        self.assertEqual(capa["EXPIRE"], ["NEVER"])
        for reply in (user, password, auth):
            self.assertTrue(reply.startswith(b"-ERR [AUTH]"), reply)
        self.assertEqual(mechanisms[1], [])

    @defer.inlineCallbacks
    def test_stls_then_login(self):
        def session():
            client = poplib.POP3("127.0.0.1", self.instance.port("pop3"), timeout=10)
            client.stls(client_tls(self.instance))
            capa = client.capa()
            stls_again = None
            try:
                client._shortcmd("STLS")
            except poplib.error_proto as e:
                stls_again = e.args[0]
            client.user(ALICE)
            client.pass_(PASSWORD)
            result = capa, stls_again, client.capa(), client.retr(1)[1]
            client.quit()
            return result

        capa, stls_again, capa_after, lines = yield in_thread(session)
        self.assertEqual(capa["SASL"], ["PLAIN"])
        self.assertIn("USER", capa)
        self.assertNotIn("STLS", capa)
        self.assertTrue(stls_again.startswith(b"-ERR"))
        self.assertNotIn("USER", capa_after)
        self.assertNotIn("SASL", capa_after)
        self.assertEqual(lines[-1], b"body line 3 of message 1")

    @defer.inlineCallbacks
    def test_implicit_tls(self):
        def session():
            client = poplib.POP3_SSL("127.0.0.1", self.instance.port("pop3s"), timeout=10,
                                     context=client_tls(self.instance))
            capa = client.capa()
            client.user(ALICE)
            client.pass_(PASSWORD)
            result = capa, client.stat(), client.retr(1)[1]
            client.quit()
            return result

        capa, stat, lines = yield in_thread(session)
        self.assertEqual(sorted(capa), sorted(["TOP", "UIDL", "RESP-CODES", "AUTH-RESP-CODE",
                                               "PIPELINING", "EXPIRE", "IMPLEMENTATION", "USER",
                                               "SASL"]))
        self.assertEqual(stat[0], 1)
        self.assertEqual(lines[0], b"From: sender@remote.test")

    @defer.inlineCallbacks
    def test_stls_injection(self):
        """TLS-3: ``STLS\\r\\nUSER x\\r\\n`` in one write; the USER must not count inside TLS."""
        def session():
            raw = Raw(self.instance)
            raw.send(b"STLS\r\nUSER " + ALICE.encode() + b"\r\n")
            stls = raw.line()
            raw.starttls(self.instance)
            # If the injected USER had run, its "+OK" would come before this.
            first = raw.command(b"CAPA")
            raw.body()
            # And it left no state behind: PASS still needs a USER.
            password = raw.command(b"PASS " + PASSWORD.encode())
            raw.login()
            return stls, first, password, raw.command(b"STAT")

        stls, first, password, stat = yield in_thread(session)
        self.assertTrue(stls.startswith(b"+OK"))
        self.assertEqual(first, b"+OK Capability list follows")
        self.assertTrue(password.startswith(b"-ERR"), password)
        self.assertTrue(stat.startswith(b"+OK 1 "))

    @defer.inlineCallbacks
    def test_sasl_plain_inside_tls(self):
        token = base64.b64encode(b"\0" + ALICE.encode() + b"\0" + PASSWORD.encode())
        bad = base64.b64encode(b"\0" + ALICE.encode() + b"\0wrong")

        def session():
            raw = Raw(self.instance, "pop3s")
            replies = [raw.command(b"AUTH PLAIN"), raw.command(b"*"),
                       raw.command(b"AUTH PLAIN !!!"),
                       raw.command(b"AUTH PLAIN " + base64.b64encode(b"admin\0alice\0x")),
                       raw.command(b"AUTH CRAM-MD5"),
                       raw.command(b"AUTH PLAIN " + bad),
                       raw.command(b"AUTH PLAIN"), raw.command(token),
                       raw.command(b"STAT")]
            return replies

        (cont, cancelled, b64, authzid, mech, wrong, cont2, ok, stat) = yield in_thread(session)
        self.assertEqual(cont, b"+ ")
        self.assertEqual(cont2, b"+ ")
        for reply in (cancelled, b64, authzid, mech):
            self.assertTrue(reply.startswith(b"-ERR"), reply)
        self.assertTrue(wrong.startswith(b"-ERR [AUTH]"), wrong)
        self.assertTrue(ok.startswith(b"+OK"), ok)
        self.assertTrue(stat.startswith(b"+OK 1 "), stat)


class PipeliningTests(unittest.TestCase):
    """RFC 2449 PIPELINING: many commands in one write, answers in order."""

    timeout = 60

    def setUp(self):
        self.instance = start(self)
        self.data = [message(n) for n in range(1, 4)]
        for d in self.data:
            put(self.instance, ALICE, d)

    @defer.inlineCallbacks
    def test_whole_session_in_one_write(self):
        def session():
            raw = Raw(self.instance)
            raw.send(b"CAPA\r\nUSER alice@example.test\r\nPASS " + PASSWORD.encode()
                     + b"\r\nSTAT\r\nLIST\r\nRETR 2\r\nUIDL 1\r\nTOP 3 1\r\nDELE 1\r\nNOOP\r\n"
                     + b"RETR 1\r\nQUIT\r\n")
            out = [raw.line(), raw.body()]
            out += [raw.line() for _ in range(3)]
            out += [raw.line(), raw.body(), raw.line(), raw.body(), raw.line(), raw.line(),
                    raw.body(), raw.line(), raw.line(), raw.line(), raw.line()]
            return out, raw.closed()

        out, closed = yield in_thread(session)
        (capa, _, user, password, stat, listing, listed, retr, wire, uidl, top, top_wire,
         dele, noop, retr1, quit_) = out
        sizes = [len(crlf(d)) for d in self.data]
        self.assertEqual(capa, b"+OK Capability list follows")
        self.assertTrue(user.startswith(b"+OK"))
        self.assertTrue(password.startswith(b"+OK"))
        self.assertEqual(stat, b"+OK 3 %d" % sum(sizes))
        self.assertTrue(listing.startswith(b"+OK"))
        self.assertEqual(listed, b"".join(b"%d %d\r\n" % (i + 1, s) for i, s in enumerate(sizes)))
        self.assertEqual(retr, b"+OK %d octets" % sizes[1])
        self.assertEqual(wire, crlf(self.data[1]))
        self.assertTrue(uidl.startswith(b"+OK 1 "))
        self.assertTrue(top.startswith(b"+OK"))
        self.assertTrue(top_wire.endswith(b"\r\n\r\nbody line 1 of message 3\r\n"))
        self.assertTrue(dele.startswith(b"+OK"))
        self.assertTrue(noop.startswith(b"+OK"))
        self.assertTrue(retr1.startswith(b"-ERR"))
        self.assertTrue(quit_.startswith(b"+OK"))
        self.assertTrue(closed)
        self.assertEqual(len(files(self.instance, ALICE)), 2)

    @defer.inlineCallbacks
    def test_pipelined_after_sasl_and_after_failed_login(self):
        token = base64.b64encode(b"\0" + ALICE.encode() + b"\0" + PASSWORD.encode())

        def session():
            raw = Raw(self.instance)
            raw.send(b"USER alice@example.test\r\nPASS wrong\r\nSTAT\r\n"
                     b"AUTH PLAIN " + token + b"\r\nSTAT\r\nRETR 3\r\nLIST 3\r\n")
            out = [raw.line() for _ in range(5)]
            out += [raw.line(), raw.body(), raw.line()]
            return out

        user, wrong, stat_early, auth, stat, retr, wire, listed = yield in_thread(session)
        self.assertTrue(user.startswith(b"+OK"))
        self.assertTrue(wrong.startswith(b"-ERR [AUTH]"), wrong)
        self.assertTrue(stat_early.startswith(b"-ERR"), stat_early)
        self.assertTrue(auth.startswith(b"+OK"), auth)
        self.assertTrue(stat.startswith(b"+OK 3 "), stat)
        self.assertEqual(retr, b"+OK %d octets" % len(crlf(self.data[2])))
        self.assertEqual(wire, crlf(self.data[2]))
        self.assertEqual(listed, b"+OK 3 %d" % len(crlf(self.data[2])))

    @defer.inlineCallbacks
    def test_many_pipelined_retr(self):
        """A client that pipelines every RETR gets every answer, in order."""
        for n in range(4, 201):
            put(self.instance, ALICE, message(n, body_lines=40))

        def session():
            raw = Raw(self.instance)
            raw.login()
            raw.send(b"".join(b"RETR %d\r\n" % n for n in range(1, 201)) + b"QUIT\r\n")
            bodies = []
            for _ in range(200):
                assert raw.line().startswith(b"+OK")
                bodies.append(raw.body())
            return bodies, raw.line()

        bodies, quit_ = yield in_thread(session)
        self.assertEqual(bodies[:3], [crlf(d) for d in self.data])
        self.assertEqual(bodies[199], crlf(message(200, body_lines=40)))
        self.assertTrue(quit_.startswith(b"+OK"))


class LockTests(unittest.TestCase):
    """RFC 1939 8 and RFC 2449 [IN-USE]: one POP3 session per maildrop."""

    timeout = 60

    def setUp(self):
        self.instance = start(self)
        put(self.instance, ALICE, message(1))

    @defer.inlineCallbacks
    def test_second_session_is_in_use_until_first_drops(self):
        def session():
            first = Raw(self.instance)
            first.login()
            second = poplib.POP3("127.0.0.1", self.instance.port("pop3"), timeout=10)
            second.user(ALICE)
            try:
                second.pass_(PASSWORD)
                in_use = b"logged in"
            except poplib.error_proto as e:
                in_use = e.args[0]
            # The first session still works; then it drops without QUIT.
            stat = first.command(b"STAT")
            first.close()
            third = login_when_free(self.instance)
            after = third.stat()
            third.quit()
            return in_use, stat, after

        in_use, stat, after = yield in_thread(session)
        self.assertTrue(in_use.startswith(b"-ERR [IN-USE]"), in_use)
        self.assertTrue(stat.startswith(b"+OK 1 "))
        self.assertEqual(after[0], 1)

    @defer.inlineCallbacks
    def test_lock_released_at_quit(self):
        """A client that logs in again right after QUIT's reply is not refused."""
        def session():
            replies = []
            for _ in range(5):
                client = login(self.instance)
                replies.append(client.quit())
                client.close()
            return replies

        replies = yield in_thread(session)
        self.assertEqual(len(replies), 5)

    @defer.inlineCallbacks
    def test_connection_dropped_during_login_releases_the_lock(self):
        """The maildrop is opened after the password check: a client gone by then must not keep it."""
        slow = "slow@example.test"
        root = Path(self.mktemp())
        write_users(root, USERS)
        instance = start(self, root, users=USERS + (slow,))  # slow gets a full-cost hash
        put(instance, slow, message(1))

        def session():
            raw = Raw(instance)
            raw.send(b"USER " + slow.encode() + b"\r\nPASS " + PASSWORD.encode() + b"\r\n")
            raw.line()
            raw.close()
            time.sleep(1.0)  # the argon2 check (~0.2 s here) finishes after the close
            client = login(instance, slow)
            try:
                return client.stat()
            finally:
                client.quit()

        stat = yield in_thread(session)
        self.assertEqual(stat[0], 1)

    @defer.inlineCallbacks
    def test_connection_timed_out_during_login_releases_the_lock(self):
        """The idle timeout closes the connection while the password is checked."""
        slow = "slow@example.test"
        root = Path(self.mktemp())
        write_users(root, USERS)
        instance = start(self, root, users=USERS + (slow,), pop3={"idle_timeout": 0.05})
        put(instance, slow, message(1))

        def session():
            raw = Raw(instance)
            raw.send(b"USER " + slow.encode() + b"\r\nPASS " + PASSWORD.encode() + b"\r\n")
            raw.line()
            closed = raw.closed()
            # The argon2 check (~0.2 s, more on a loaded machine) finishes after
            # the close; it opens the maildrop (creating the lock file) and the
            # session's clean-up must release the lock again.
            lock = maildir(instance, slow) / "mailstack-pop3.lock"
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if lock.exists():
                    fd = os.open(lock, os.O_RDWR)
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        return closed, True
                    except BlockingIOError:
                        pass
                    finally:
                        os.close(fd)
                time.sleep(0.05)
            return closed, False

        closed, free = yield in_thread(session)
        self.assertTrue(closed)
        self.assertTrue(free)

    @defer.inlineCallbacks
    def test_different_users_at_once(self):
        put(self.instance, BOB, message(2))

        def session():
            alice = login(self.instance, ALICE)
            bob = login(self.instance, BOB)
            result = alice.stat(), bob.stat()
            alice.quit()
            bob.quit()
            return result

        alice, bob = yield in_thread(session)
        self.assertEqual(alice[0], 1)
        self.assertEqual(bob[0], 1)

    @defer.inlineCallbacks
    def test_in_use_across_listeners(self):
        def session():
            first = login_tls(self.instance)
            try:
                login(self.instance)
                second = b"logged in"
            except poplib.error_proto as e:
                second = e.args[0]
            first.quit()
            return second

        second = yield in_thread(session)
        self.assertTrue(second.startswith(b"-ERR [IN-USE]"), second)


class FailureTests(unittest.TestCase):
    """Failed logins: -ERR [AUTH] after a delay, and a per-address limit (AUTH-5, AUTH-6)."""

    timeout = 60

    @defer.inlineCallbacks
    def test_failure_delay(self):
        instance = start(self, auth={"failure_delay": 0.3})

        def attempt(user, password):
            client = poplib.POP3("127.0.0.1", instance.port("pop3"), timeout=10)
            try:
                client.user(user)
                t0 = time.monotonic()
                try:
                    client.pass_(password)
                    reply = b"logged in"
                except poplib.error_proto as e:
                    reply = e.args[0]
                return reply, time.monotonic() - t0
            finally:
                client.close()

        def session():
            return [attempt(ALICE, "wrong"), attempt("nobody@example.test", PASSWORD),
                    attempt("not-an-address", PASSWORD)]

        results = yield in_thread(session)
        for reply, elapsed in results:
            self.assertEqual(reply, b"-ERR [AUTH] Authentication failed")
            self.assertGreaterEqual(elapsed, 0.28)

    @defer.inlineCallbacks
    def test_per_ip_limit(self):
        instance = start(self, auth={"max_failures_per_ip": 3, "failure_window": 60.0,
                                     "failure_delay": 0.01})

        def session():
            replies = []
            for password in ("bad1", "bad2", "bad3", PASSWORD):
                client = poplib.POP3("127.0.0.1", instance.port("pop3"), timeout=10)
                client.user(ALICE)
                try:
                    replies.append(client.pass_(password))
                except poplib.error_proto as e:
                    replies.append(e.args[0])
                client.close()
            raw = Raw(instance, "pop3s")
            token = base64.b64encode(b"\0" + ALICE.encode() + b"\0" + PASSWORD.encode())
            replies.append(raw.command(b"AUTH PLAIN " + token))
            return replies

        replies = yield in_thread(session)
        for reply in replies[:3]:
            self.assertTrue(reply.startswith(b"-ERR [AUTH]"), reply)
        for reply in replies[3:]:
            self.assertTrue(reply.startswith(b"-ERR [SYS/TEMP]"), reply)


class MaildropConsistencyTests(unittest.TestCase):
    """POP3 beside IMAP and other writers on the same Maildir (ISO-1, MD-7)."""

    timeout = 60

    def setUp(self):
        self.instance = start(self)

    @defer.inlineCallbacks
    def test_retr_marks_seen(self):
        paths = [put(self.instance, ALICE, message(n)) for n in range(3)]

        def session():
            client = login(self.instance)
            client.retr(1)
            client.retr(3)
            client.retr(3)
            during = files(self.instance, ALICE)
            client.quit()
            return during

        during = yield in_thread(session)
        self.assertEqual(during, sorted([f"cur/{paths[0].name}:2,S", f"new/{paths[1].name}",
                                         f"cur/{paths[2].name}:2,S"]))

    @defer.inlineCallbacks
    def test_flags_changed_by_another_session_are_kept(self):
        """IMAP flags the message after POP3's snapshot; RETR adds S and keeps F."""
        path = put(self.instance, ALICE, message(1))
        cur = maildir(self.instance, ALICE) / "cur"

        def session():
            client = login(self.instance)
            path.rename(cur / (path.name + ":2,F"))
            lines = client.retr(1)[1]
            client.quit()
            return lines

        lines = yield in_thread(session)
        self.assertEqual(lines[-1], b"body line 3 of message 1")
        self.assertEqual(files(self.instance, ALICE), [f"cur/{path.name}:2,FS"])

    @defer.inlineCallbacks
    def test_message_removed_by_another_session(self):
        paths = [put(self.instance, ALICE, message(n)) for n in range(3)]

        def session():
            raw = Raw(self.instance)
            raw.login()
            paths[1].unlink()  # an IMAP expunge during the POP3 session
            gone = raw.command(b"RETR 2")
            assert raw.command(b"DELE 2").startswith(b"+OK")
            assert raw.command(b"DELE 3").startswith(b"+OK")
            quit_ = raw.command(b"QUIT")
            return gone, quit_

        gone, quit_ = yield in_thread(session)
        self.assertTrue(gone.startswith(b"-ERR"), gone)
        self.assertTrue(quit_.startswith(b"+OK"), quit_)
        self.assertEqual(files(self.instance, ALICE), [f"new/{paths[0].name}"])

    @defer.inlineCallbacks
    def test_new_mail_during_session_waits_for_next_login(self):
        put(self.instance, ALICE, message(1))

        def session():
            client = login(self.instance)
            put(self.instance, ALICE, message(2))
            during = client.stat()
            client.quit()
            client = login_when_free(self.instance)
            after = client.stat()
            client.quit()
            return during, after

        during, after = yield in_thread(session)
        self.assertEqual(during[0], 1)
        self.assertEqual(after[0], 2)

    @defer.inlineCallbacks
    def test_user_isolation(self):
        """ISO-1: alice never sees bob's mail, and her deletions leave his alone."""
        for n in range(2):
            put(self.instance, ALICE, message(n) + b"alice's secret\n")
        for n in range(3):
            put(self.instance, BOB, message(n) + b"bob's secret\n")
        bob_before = files(self.instance, BOB)

        def session():
            alice = login(self.instance, ALICE)
            bob = login(self.instance, BOB)
            alice_msgs = [alice.retr(i)[1] for i in (1, 2)]
            alice_uidl = alice.uidl()[1]
            bob_uidl = bob.uidl()[1]
            refused = []
            for command in ("RETR 3", "TOP 3 0", "LIST 3", "DELE 3"):
                try:
                    alice._shortcmd(command)
                    refused.append(command + " accepted")
                except poplib.error_proto as e:
                    refused.append(e.args[0])
            alice.dele(1)
            alice.dele(2)
            alice.quit()
            bob_stat = bob.stat()
            bob.quit()
            return alice_msgs, alice_uidl, bob_uidl, refused, bob_stat

        alice_msgs, alice_uidl, bob_uidl, refused, bob_stat = yield in_thread(session)
        for lines in alice_msgs:
            self.assertIn(b"alice's secret", lines)
            self.assertNotIn(b"bob's secret", lines)
        alice_ids = {u.split()[1] for u in alice_uidl}
        bob_ids = {u.split()[1] for u in bob_uidl}
        self.assertFalse(alice_ids & bob_ids)
        for reply in refused:
            self.assertTrue(reply.startswith(b"-ERR"), reply)
        self.assertEqual(bob_stat[0], 3)
        self.assertEqual(files(self.instance, BOB), bob_before)
        self.assertEqual(files(self.instance, ALICE), [])

    @defer.inlineCallbacks
    def test_junk_names_and_symlinks_are_not_served(self):
        """MD-4, MD-5: only plain files with well-formed names are messages."""
        put(self.instance, ALICE, message(1))
        new = maildir(self.instance, ALICE) / "new"
        secret = Path(self.mktemp())
        secret.write_bytes(b"Subject: not yours\n\nsecret\n")
        (new / "1700000000.symlink.host").symlink_to(secret.resolve())
        (new / ("1700000001.bad:2," + "S" * 100)).write_bytes(b"Subject: bad flags\n\nx\n")
        (new / ".hidden").write_bytes(b"Subject: hidden\n\nx\n")

        def session():
            client = login(self.instance)
            try:
                return client.stat(), client.retr(1)[1]
            finally:
                client.quit()

        stat, lines = yield in_thread(session)
        self.assertEqual(stat[0], 1)
        self.assertEqual(lines[2], b"Subject: message 1")



def reference_top(data: bytes, lines: int) -> bytes:
    """TOP by the book, on whole lines: header up to the first blank line, then ``lines``."""
    pieces = data.split(b"\n")
    all_lines = [p + b"\n" for p in pieces[:-1]] + ([pieces[-1]] if pieces[-1] else [])
    for i, line in enumerate(all_lines):
        if line in (b"\n", b"\r\n"):
            return b"".join(all_lines[:i + 1 + lines])
    return data


class WireTests(unittest.TestCase):
    """The wire form on byte strings (STYLE 2): any chunking gives the same octets."""

    @given(st.binary(max_size=300) | st.lists(st.sampled_from(
        [b"a", b".", b"..", b"\r", b"\n", b"\r\n", b"x y"]), max_size=60).map(b"".join),
        st.lists(st.integers(min_value=0, max_value=300), max_size=8))
    def test_chunking_does_not_change_the_output(self, data, cuts):
        encoder = WireEncoder()
        points = sorted(set(c for c in cuts if c <= len(data)))
        parts = [data[a:b] for a, b in zip([0] + points, points + [len(data)])]
        out = b"".join(encoder.feed(p) for p in parts) + encoder.finish()
        self.assertEqual(out, encode(data))
        self.assertEqual(encoder.size, wire_size(io.BytesIO(data)))
        # What the client keeps: CRLF lines, a final line end, no stuffing dots.
        kept = crlf(data) + (b"\r\n" if data and not crlf(data).endswith(b"\r\n") else b"")
        self.assertEqual(unstuff(out), kept)
        self.assertEqual(encoder.size, len(kept))
        # The answer cannot end early: no line of it is a lone ".".
        self.assertNotIn(b".", out.split(b"\r\n")[:-1])
        for line in out.split(b"\r\n"):
            if line.startswith(b"."):
                self.assertTrue(line.startswith(b".."), line)

    def test_examples(self):
        self.assertEqual(encode(b""), b"")
        self.assertEqual(encode(b"."), b"..\r\n")
        self.assertEqual(encode(b"a\n.\n..b\n"), b"a\r\n..\r\n...b\r\n")
        self.assertEqual(encode(b"a\r\n.b\r\n"), b"a\r\n..b\r\n")
        self.assertEqual(encode(b"no end"), b"no end\r\n")
        self.assertEqual(encode(b"cr at end\r"), b"cr at end\r\r\n")

    @given(st.lists(st.sampled_from([b"h: v\n", b"\n", b"\r\n", b".x\n", b"body", b"\r"]),
                    max_size=40).map(b"".join),
           st.integers(min_value=0, max_value=12))
    def test_top_matches_reference(self, data, lines):
        self.assertEqual(b"".join(top_chunks(io.BytesIO(data), lines)), reference_top(data, lines))

    @given(st.binary(max_size=300) | st.lists(st.sampled_from(
        [b"a", b".", b"\r", b"\n", b"\r\n", b"x y"]), max_size=60).map(b"".join))
    def test_recipe_gives_the_same_octets(self, data):
        wire = encode(data)
        recipe = recipe_of(data, wire)
        if recipe is not None:
            self.assertEqual(by_recipe(recipe, data), wire)

    def test_recipe_examples(self):
        self.assertEqual(recipe_of(b"", encode(b"")), AS_IS)
        self.assertEqual(recipe_of(b"a\r\nb\r\n", encode(b"a\r\nb\r\n")), AS_IS)
        self.assertEqual(recipe_of(b"a\nb\n", encode(b"a\nb\n")), LF_TO_CRLF)
        # Dot-stuffing, a missing last line end, mixed line ends: no recipe.
        for data in (b"a\n.b\n", b".a\r\n", b"a\r\nb", b"a\nb", b"a\r\nb\n", b"a\rb\n"):
            self.assertIsNone(recipe_of(data, encode(data)), data)

    def test_top_across_chunks(self):
        header = b"Subject: big\n" + b"X-Long: " + b"y" * (CHUNK + 10) + b"\n\n"
        body = b"".join(b"line %d\n" % i for i in range(40_000))
        data = header + body
        for lines in (0, 1, 9_999, 20_000, 39_999, 40_000, 99_999_999, 2**31 - 2):
            self.assertEqual(b"".join(top_chunks(io.BytesIO(data), lines)),
                             reference_top(data, lines), lines)


class CommandReaderTests(unittest.TestCase):
    """Command framing on byte strings (STYLE 2)."""

    def lines(self, reader: CommandReader) -> list:
        out = []
        while True:
            try:
                line = reader.next_line()
            except LineTooLong:
                out.append(LineTooLong)
                continue
            if line is None:
                return out
            out.append(line)

    def test_examples(self):
        reader = CommandReader(16)
        reader.feed(b"USER a\r\nPASS b c\nNOOP\r\r\nRE")
        self.assertEqual(self.lines(reader), [b"USER a", b"PASS b c", b"NOOP\r"])
        self.assertTrue(reader.pending())
        reader.feed(b"TR 1\r\n" + b"x" * 40 + b"\r\nQUIT\r\n")
        self.assertEqual(self.lines(reader), [b"RETR 1", LineTooLong, b"QUIT"])
        self.assertFalse(reader.pending())

    def test_overlong_line_is_not_held(self):
        reader = CommandReader(16)
        reader.feed(b"y" * 20)
        self.assertEqual(self.lines(reader), [LineTooLong])
        for _ in range(100):
            reader.feed(b"y" * 1000)
            self.assertEqual(self.lines(reader), [])
            self.assertLess(len(reader._buffer), 1016)
        reader.feed(b"yy\r\nNOOP\r\n")
        self.assertEqual(self.lines(reader), [b"NOOP"])

    @given(st.lists(st.sampled_from([b"a", b"RETR 1", b"\r", b"\n", b"\r\n", b" ", b"x" * 7]),
                    max_size=80).map(b"".join),
           st.lists(st.integers(min_value=0, max_value=400), max_size=8))
    def test_same_lines_as_smtp_splitter(self, data, cuts):
        """The same lines and limits as SMTP's LineSplitter, however the input is cut."""
        reader, splitter = CommandReader(16), LineSplitter(16)
        points = sorted(set(c for c in cuts if c <= len(data)))
        got, expected = [], []
        for a, b in zip([0] + points, points + [len(data)]):
            reader.feed(data[a:b])
            splitter.feed(data[a:b])
            got += self.lines(reader)
            while (line := splitter.next_line()) is not None:
                expected.append(LineTooLong if line.overlong else line.text)
        self.assertEqual(got, expected)


class _TCPLikeTransport(StringTransport):
    """A transport that tells its producer to pause when its buffer holds ``limit`` octets."""

    limit = 100_000

    def write(self, data):
        super().write(data)
        if self.producer is not None and len(self.value()) >= self.limit:
            self.producer.pauseProducing()


class FlowControlTests(unittest.TestCase):
    """A client that pipelines RETRs without reading cannot make the server buffer them (LIM-11)."""

    def test_pipelined_retr_waits_for_the_client(self):
        root = Path(self.mktemp())
        root.mkdir()
        folder = Folder(root, ("Maildir",))
        folder.scan()  # creates the Maildir
        big = b"Subject: big\n\n" + b"".join(b".line %d\n" % i for i in range(100_000))
        small = message(2)
        for i, data in enumerate((big, small)):
            (root / "Maildir" / "new" / f"{1_700_000_000 + i}.M1P1.host").write_bytes(data)
        config = Config()
        factory = POP3Factory(config, None, LoginGuard(FailureLimiter(10, 60, Clock()),
                                                       FailureLimiter(10, 60, Clock())), Clock())
        session = factory.buildProtocol(None)
        transport = _TCPLikeTransport()
        session.makeConnection(transport)
        drop = Maildrop.open(ALICE, folder, MaildropCache())
        session.mbox, session._onLogout = drop, drop.logout
        transport.clear()
        session.dataReceived(b"RETR 1\r\nRETR 2\r\nNOOP\r\n")
        received = []
        rounds = 0
        while session._output_paused:
            # The buffer stays near the limit, and no more input is read meanwhile.
            self.assertLess(len(transport.value()), transport.limit + 2 * CHUNK)
            self.assertEqual(transport.producerState, "paused")
            received.append(transport.value())
            transport.clear()
            session.resumeProducing()
            rounds += 1
        received.append(transport.value())
        self.assertGreater(rounds, 5)
        self.assertEqual(transport.producerState, "producing")
        expected = (b"+OK %d octets\r\n" % len(crlf(big)) + encode(big) + b".\r\n"
                    + b"+OK %d octets\r\n" % len(crlf(small)) + encode(small) + b".\r\n"
                    + b"+OK \r\n")
        self.assertEqual(b"".join(received), expected)
        session.connectionLost(None)
        # The session is gone: the maildrop lock is free again.
        Maildrop.open(ALICE, folder, MaildropCache()).logout()


class MaildropCacheTests(unittest.TestCase):
    """What one login leaves for the next: listings, sizes and recipes."""

    def setUp(self):
        root = Path(self.mktemp())
        root.mkdir()
        self.folder = Folder(root, ("Maildir",))
        self.folder.scan()  # creates the Maildir
        self.top = root / "Maildir"
        self.cache = MaildropCache()

    def add(self, n: int, data: bytes, name: str = "") -> Path:
        path = self.top / "new" / (name or f"{1_700_000_000 + n}.M{n}P1.host")
        path.write_bytes(data)
        return path

    def age(self, ns: int) -> None:
        """Set the mtimes of new/ and cur/ to ``ns``."""
        for sub in ("new", "cur"):
            os.utime(self.top / sub, ns=(ns, ns))

    def bases(self) -> list[str]:
        drop = Maildrop.open(ALICE, self.folder, self.cache)
        drop.logout()
        return [m.base for m in drop.messages]

    def test_listing_kept_while_the_folder_is_unchanged(self):
        self.add(1, message(1))
        self.add(2, message(2))
        old = time.time_ns() - 10 * 10**9
        self.age(old)
        self.assertEqual(len(self.bases()), 2)
        # A file that appears without changing the directory's mtime is not
        # seen: the directories were not read again.
        self.add(3, message(3))
        self.age(old)
        self.assertEqual(len(self.bases()), 2)
        # Any real change (delivery, rename, removal) sets the mtime.
        os.utime(self.top / "new")
        self.assertEqual(len(self.bases()), 3)

    def test_listing_not_kept_for_a_directory_restored_in_its_place(self):
        self.add(1, message(1))
        old = time.time_ns() - 10 * 10**9
        self.age(old)
        self.assertEqual(len(self.bases()), 1)
        restored = self.top / "restored"
        restored.mkdir()
        for n in (1, 2):
            (restored / f"{1_700_000_000 + n}.M{n}P1.host").write_bytes(message(n))
        (self.top / "new").rename(self.top / "old-new")
        restored.rename(self.top / "new")
        self.age(old)
        self.assertEqual(len(self.bases()), 2)

    def test_listing_not_kept_within_a_second_of_a_change(self):
        """Two changes in one tick of the mtime clock leave the same mtime."""
        self.add(1, message(1))
        now = time.time_ns()
        self.age(now)
        self.assertEqual(len(self.bases()), 1)
        self.add(2, message(2))
        self.age(now)
        self.assertEqual(len(self.bases()), 2)

    def test_recipe_is_checked_against_the_length(self):
        """A file changed in place (against the Maildir rules) is encoded afresh."""
        path = self.add(1, b"Subject: x\r\n\r\nplain\r\n")
        drop = Maildrop.open(ALICE, self.folder, self.cache)
        self.addCleanup(drop.logout)
        self.assertEqual(drop.wire_message(0, CHUNK), b"Subject: x\r\n\r\nplain\r\n")
        path.write_bytes(b"Subject: x\r\n\r\n.\r\nmore\r\n")
        self.assertEqual(drop.wire_message(0, CHUNK), b"Subject: x\r\n\r\n..\r\nmore\r\n")

    def test_whole_message_read_despite_a_wrong_size_in_its_name(self):
        data = message(1)
        self.add(1, data, name=f"{1_700_000_001}.M1P1.host,S=5")
        drop = Maildrop.open(ALICE, self.folder, self.cache)
        self.addCleanup(drop.logout)
        self.assertEqual(drop.messages[0].size, 5)
        self.assertEqual(drop.wire_message(0, CHUNK), crlf(data))
        self.assertIsNone(drop.wire_message(0, len(data) - 1))


class ReadAheadTests(unittest.TestCase):
    """A client that waits for each answer gets the next one prepared meanwhile."""

    def setUp(self):
        root = Path(self.mktemp())
        root.mkdir()
        folder = Folder(root, ("Maildir",))
        folder.scan()  # creates the Maildir
        self.new = root / "Maildir" / "new"
        self.datas = [message(n) for n in range(3)]
        self.names = [f"{1_700_000_000 + i}.M{i}P1.host" for i in range(3)]
        for name, data in zip(self.names, self.datas):
            (self.new / name).write_bytes(data)
        factory = POP3Factory(Config(), None, LoginGuard(FailureLimiter(10, 60, Clock()),
                                                         FailureLimiter(10, 60, Clock())), Clock())
        self.session = factory.buildProtocol(None)
        self.transport = StringTransport()
        self.session.makeConnection(self.transport)
        drop = Maildrop.open(ALICE, folder, MaildropCache())
        self.session.mbox, self.session._onLogout = drop, drop.logout
        self.addCleanup(self.session.connectionLost, None)

    def command(self, line: bytes) -> bytes:
        self.transport.clear()
        self.session.dataReceived(line + b"\r\n")
        return self.transport.value()

    def answer(self, i: int) -> bytes:
        data = self.datas[i]
        return b"+OK %d octets\r\n" % len(crlf(data)) + encode(data) + b".\r\n"

    def test_answers_in_any_order(self):
        self.assertEqual(self.command(b"RETR 1"), self.answer(0))
        self.assertEqual(self.command(b"RETR 3"), self.answer(2))
        self.assertEqual(self.command(b"RETR 2"), self.answer(1))
        self.assertEqual(self.command(b"RETR 3"), self.answer(2))

    def test_only_retrieved_messages_are_seen(self):
        self.command(b"RETR 1")
        self.assertEqual(sorted(os.listdir(self.new)), self.names[1:])

    def test_deleted_message_is_not_sent(self):
        self.command(b"RETR 1")
        self.assertEqual(self.command(b"DELE 2"), b"+OK Marked to be deleted\r\n")
        self.assertTrue(self.command(b"RETR 2").startswith(b"-ERR"))
        self.command(b"RSET")
        self.assertEqual(self.command(b"RETR 2"), self.answer(1))
