"""Shared fixtures of the IMAP tests: an instance with IMAP listeners and clients.

Blocking clients (imaplib, raw sockets) run in a thread beside the reactor
(``in_thread``), against the real service on loopback.
"""

from __future__ import annotations

import imaplib
import smtplib
import socket
import ssl

from twisted.internet import defer
from twisted.trial import unittest

from tests.support.instance import PASSWORD, Instance, in_thread, wait_for

USER = "demo@example.test"
OTHER = "alice@example.test"


def deliver(port: int, to: str, subject: str = "hello", body: str = "body\r\n",
            extra: str = "") -> None:
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.sendmail("sender@remote.test", [to],
                        (f"From: Sender <sender@remote.test>\r\nTo: {to}\r\nSubject: {subject}\r\n"
                         f"Message-ID: <{subject.replace(' ', '.')}@remote.test>\r\n{extra}\r\n"
                         f"{body}").encode())


class Raw:
    """A line-level IMAP client for exact transcripts."""

    def __init__(self, port: int, tls: bool = False):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            self.sock = ctx.wrap_socket(self.sock)
        self.file = self.sock.makefile("rb")
        self.greeting = self.line()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        return self.file.readline()

    def until(self, tag: bytes) -> list[bytes]:
        """Lines up to and including the tagged reply of ``tag``."""
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise EOFError(b"".join(lines))
            lines.append(line)
            if line.startswith(tag + b" "):
                return lines

    def cmd(self, command: bytes) -> list[bytes]:
        tag = command.split(b" ", 1)[0]
        self.send(command + b"\r\n")
        return self.until(tag)

    def login(self, user: str = USER) -> None:
        lines = self.cmd(b"L LOGIN " + user.encode() + b' "' + PASSWORD.encode() + b'"')
        assert lines[-1].startswith(b"L OK"), lines

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class IMAPTestCase(unittest.TestCase):
    """A running instance with imap and imaps listeners (and smtp for deliveries)."""

    listen = (("smtp", 0), ("imap", 0), ("imaps", 0))
    plaintext = True
    sections: dict = {}

    def setUp(self):
        sections = {"auth": {"allow_plaintext_loopback": self.plaintext, "failure_delay": 0.05},
                    **self.sections}
        self.instance = Instance(self.mktemp(), listen=self.listen, sections=sections)
        self.instance.start()
        self.addCleanup(lambda: self.instance.stop() if self.instance.service.running else None)
        self.port = self.instance.port("imap")
        self.tls_port = self.instance.port("imaps")
        self._clients: list = []
        self.addCleanup(self._close_clients)

    def _close_clients(self):
        for c in self._clients:
            try:
                c.shutdown() if isinstance(c, imaplib.IMAP4) else c.close()
            except Exception:
                pass

    def client(self, user: str = USER, login: bool = True) -> imaplib.IMAP4:
        M = imaplib.IMAP4("127.0.0.1", self.port, timeout=10)
        self._clients.append(M)
        if login:
            M.login(user, PASSWORD)
        return M

    def raw(self, tls: bool = False) -> Raw:
        r = Raw(self.tls_port if tls else self.port, tls)
        self._clients.append(r)
        return r

    def deliver(self, to: str = USER, subject: str = "hello", **kw) -> defer.Deferred:
        return in_thread(deliver, self.instance.smtp_port, to, subject, **kw)

    @defer.inlineCallbacks
    def deliver_many(self, n: int, to: str = USER):
        for i in range(n):
            yield self.deliver(to, f"message {i}")
        yield wait_for(lambda: len(self.instance.messages(to)) + len(
            self.instance.messages(to, "cur")) >= n)

    def blocking(self, f, *args):
        """Run a blocking client function beside the reactor."""
        return in_thread(f, *args)
