"""A raw-socket SMTP client for tests where the exact bytes on the wire matter.

smtplib normalises line ends, dot-stuffs and waits for every reply, so it
cannot send a bare LF, pipeline a body before the 354 or inject commands
behind STARTTLS. ``RawClient`` sends exactly the bytes it is given and reads
reply lines with a timeout, so a server that hangs fails the test instead of
hanging it. It is blocking: run it with ``in_thread``.

``MXInstance`` is the server side: an in-process instance whose SMTP
sessions and spool commits a test can inspect, and ``split_stored`` takes a
Maildir file apart into its trace headers and the message as sent.
"""

from __future__ import annotations

import re
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from mailstack.auth.files import write_atomically
from mailstack.queue.spool import Envelope
from tests.support.instance import Instance, wait_for

_USERS_FILES: dict[tuple[str, ...], str] = {}
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}\Z")


@dataclass(frozen=True)
class Reply:
    code: int
    #: The RFC 3463 code of the last line ("" when there is none).
    enhanced: str
    #: Text of every line, without the code and the enhanced code.
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def status(self) -> tuple[int, str]:
        """What most assertions compare: ``(550, "5.1.1")``."""
        return self.code, self.enhanced


class ServerClosed(AssertionError):
    """The server closed the connection where a reply was expected."""


def tls_context() -> ssl.SSLContext:
    """Accepts the instance's self-signed certificate."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class RawClient:
    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 5.0,
                 greeting: bool = True):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self._buffer = b""
        #: Every reply line read so far, for failure messages.
        self.transcript: list[bytes] = []
        try:
            self.greeting = self.reply() if greeting else None
        except BaseException:
            self.sock.close()
            raise

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        """Write ``data`` exactly as given, in one call."""
        self.sock.sendall(data)

    def line(self) -> bytes:
        """The next reply line without its CRLF."""
        while b"\r\n" not in self._buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ServerClosed(f"connection closed; buffered {self._buffer!r}, "
                                   f"read so far {self.transcript!r}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        self.transcript.append(line)
        return line

    def reply(self) -> Reply:
        """One complete (possibly multi-line) reply."""
        texts = []
        while True:
            line = self.line()
            code, sep, text = line[:3], line[3:4], line[4:].decode("utf-8", "replace")
            if not code.isdigit() or sep not in (b" ", b"-"):
                raise AssertionError(f"malformed reply line {line!r}")
            texts.append(text)
            if sep == b" ":
                break
        first, _, rest = texts[-1].partition(" ")
        enhanced = first if _ENHANCED.match(first) else ""
        if enhanced:
            texts = [t.partition(" ")[2] if t.startswith(enhanced + " ") else t for t in texts]
        return Reply(int(code), enhanced, tuple(texts))

    def command(self, line: bytes | str) -> Reply:
        """Send one command line (CRLF added) and read its reply."""
        if isinstance(line, str):
            line = line.encode("ascii")
        self.send(line + b"\r\n")
        return self.reply()

    def expect(self, line: bytes | str, code: int, enhanced: str | None = None) -> Reply:
        """``command``, failing unless the reply has this code (and enhanced code)."""
        r = self.command(line)
        if r.code != code or (enhanced is not None and r.enhanced != enhanced):
            raise AssertionError(f"{line!r}: expected {code} {enhanced or ''}, got {r}")
        return r

    def replies(self, n: int) -> list[Reply]:
        return [self.reply() for _ in range(n)]

    def ehlo(self, name: str = "client.test") -> Reply:
        return self.expect(f"EHLO {name}", 250)

    def starttls(self, context: ssl.SSLContext | None = None) -> None:
        """Handshake on the socket now (after the server's 220 was read)."""
        if self._buffer:
            raise AssertionError(f"plaintext left before the handshake: {self._buffer!r}")
        self.sock = (context or tls_context()).wrap_socket(self.sock)

    def closed_by_server(self) -> bool:
        """Read to the end; True when the server closes without sending more.

        Raises when more bytes arrive instead, or when the server keeps the
        connection open past the socket timeout.
        """
        if self._buffer:
            raise AssertionError(f"unexpected data before close: {self._buffer!r}")
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            return True
        if chunk:
            raise AssertionError(f"unexpected data instead of close: {chunk!r}")
        return True

    @property
    def unread(self) -> bytes:
        """Bytes received but not yet returned as reply lines."""
        return self._buffer

    def silent_for(self, seconds: float) -> bool:
        """True when nothing at all arrives within ``seconds``."""
        if self._buffer:
            return False
        previous = self.sock.gettimeout()
        self.sock.settimeout(seconds)
        try:
            chunk = self.sock.recv(65536)
        except (socket.timeout, TimeoutError):
            return True
        finally:
            self.sock.settimeout(previous)
        self._buffer += chunk
        return False


def split_stored(data: bytes) -> tuple[bytes, str, bytes]:
    """A stored message as (Return-Path line, unfolded Received header, the rest).

    The rest is the message exactly as the client sent it, with LF line ends.
    """
    return_path, _, rest = data.partition(b"\n")
    if not rest.startswith(b"Received: "):
        raise AssertionError(f"no Received header after Return-Path: {data[:300]!r}")
    lines = rest.split(b"\n")
    end = 1
    while end < len(lines) and lines[end][:1] in (b"\t", b" "):
        end += 1
    received = b" ".join(line.strip() for line in lines[:end]).decode("ascii")
    return return_path, received, b"\n".join(lines[end:])


class MXInstance(Instance):
    """An Instance whose ``mx`` listener the test can look into.

    ``committed`` holds every envelope the SMTP session committed, read back
    from ``spool/queue/<id>.env`` at the moment of the 250 (and
    ``committed_messages`` the ``.msg`` files), so a test can assert what was
    (never) queued without racing local or remote delivery. Every
    server-side connection is tracked and, at cleanup, closed and waited
    for, so a test never leaves the reactor dirty.
    """

    def __init__(self, test, users=("demo@example.test", "alice@example.test"), **layout):
        root = Path(test.mktemp())
        # Argon2 hashing dominates start-up; the users file of an identical
        # user list is reused (write_instance hashes only missing users).
        cached = _USERS_FILES.get(tuple(users))
        if cached is not None:
            root.mkdir(parents=True)
            write_atomically(root / "users", cached)
        super().__init__(root, users=users, **layout)
        _USERS_FILES[tuple(users)] = (root / "users").read_text("utf-8")
        [self.factory] = [listener.factory for listener in self.service.listeners
                          if listener.spec.protocol == "smtp"]
        self.committed: list[Envelope] = []
        self.committed_messages: dict[str, bytes] = {}
        self.protocols: list = []
        queued, build = self.factory.queued, self.factory.buildProtocol

        def record(envelope: Envelope):
            queue = self.config.server.spool_dir / "queue"
            self.committed.append(Envelope.from_json((queue / f"{envelope.id}.env").read_bytes()))
            self.committed_messages[envelope.id] = (queue / f"{envelope.id}.msg").read_bytes()
            return queued(envelope)

        def track(addr):
            protocol = build(addr)
            self.protocols.append(protocol)
            return protocol

        self.factory.queued = record
        self.factory.buildProtocol = track
        self.start()
        test.addCleanup(self.stop)
        test.addCleanup(self.drain)

    @property
    def port(self) -> int:
        return self.smtp_port

    @property
    def sessions(self) -> list:
        """The server-side sessions still connected."""
        return [p for p in self.protocols if not p.transport.disconnected]

    def drain(self):
        for protocol in self.sessions:
            protocol.transport.abortConnection()
        return wait_for(lambda: not self.sessions, timeout=5)

    def spooled(self) -> list[Envelope]:
        """The envelopes now in the spool queue (what is still to be delivered)."""
        queue = self.config.server.spool_dir / "queue"
        return [Envelope.from_json(p.read_bytes()) for p in sorted(queue.glob("*.env"))]

    def stored(self, address: str) -> list[bytes]:
        return [p.read_bytes() for p in self.messages(address)]
