"""The outbound ESMTP client: one connection, several messages, per-recipient results.

Each command returns a Deferred of the server's reply, so PIPELINING
(RFC 2920) is just sending MAIL, every RCPT and DATA before waiting. The
safety rules of a sending MTA are here:

* Commands never carry CR or LF (CPython bpo-43124, SECURITY-TESTS HDR-5).
* After ``220`` to STARTTLS, whatever the server sent behind it is dropped
  before the handshake (response injection, TLS-7).
* The message goes out with CRLF line ends and dot-stuffed, whatever its
  stored form, so a bare LF can never become an end of data at the next hop
  (SMUG-10).
* Every reply has a deadline (RFC 5321 4.5.3.2); reply lines are bounded.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from twisted.internet import defer
from twisted.internet.error import ConnectionLost, TimeoutError
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

from mailstack.smtp.framing import LineSplitter

MAX_REPLY_LINE = 4096
MAX_REPLY_LINES = 100


@dataclass(frozen=True)
class ServerReply:
    code: int
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    def __str__(self) -> str:
        return f"{self.code} {self.text}"

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    def keywords(self) -> set[str]:
        """EHLO keywords (first word of each line after the greeting), upper-case."""
        return {line.split(" ", 1)[0].upper() for line in self.lines[1:] if line}


class ProtocolError(Exception):
    """The server broke the SMTP reply syntax."""


def to_wire(data: bytes) -> bytes:
    """A stored message as DATA content: CRLF line ends, leading dots doubled, final dot."""
    data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    data = data.replace(b"\r\n.", b"\r\n..")
    if data.startswith(b"."):
        data = b"." + data
    return data + b".\r\n"


class ClientConnection(Protocol):
    """An SMTP client connection; use ``command`` and ``data`` and wait for replies."""

    def __init__(self, clock, timeout: float, data_timeout: float):
        self._clock = clock
        self.timeout = timeout
        self.data_timeout = data_timeout
        self._splitter = LineSplitter(MAX_REPLY_LINE)
        self._waiting: deque[tuple[defer.Deferred, object]] = deque()
        self._lines: list[str] = []
        self.tls = False

    def connectionMade(self) -> None:
        self.greeting = self._expect(self.timeout)

    def _expect(self, timeout: float) -> defer.Deferred:
        d = defer.Deferred()
        call = self._clock.callLater(timeout, self._timed_out)
        self._waiting.append((d, call))
        return d

    def _timed_out(self) -> None:
        self._fail_all(Failure(TimeoutError("no reply from the server in time")))
        self.transport.abortConnection()

    def command(self, line: str) -> defer.Deferred:
        if "\r" in line or "\n" in line:
            return defer.fail(ValueError("CR or LF in an SMTP command"))
        self.transport.write(line.encode("utf-8") + b"\r\n")
        return self._expect(self.timeout)

    def data(self, message: bytes) -> defer.Deferred:
        """Send the message (after the 354); the reply is to the final dot."""
        self.transport.write(to_wire(message))
        return self._expect(self.data_timeout)

    def start_tls(self, context) -> None:
        self._splitter.clear()  # nothing the server sent before TLS counts (TLS-7)
        self._lines = []
        self.transport.startTLS(context)
        self.tls = True

    def tls_version(self) -> str:
        conn = self.transport.getHandle() if self.tls else None
        return conn.get_protocol_version_name() if hasattr(conn, "get_protocol_version_name") else ""

    def dataReceived(self, data: bytes) -> None:
        self._splitter.feed(data)
        while (line := self._splitter.next_line()) is not None:
            try:
                self._reply_line(line.text, line.overlong)
            except ProtocolError as e:
                self._fail_all(Failure(e))
                self.transport.abortConnection()
                return

    def _reply_line(self, text: bytes, overlong: bool) -> None:
        if overlong or len(text) < 3 or not text[:3].isdigit() or text[3:4] not in (b" ", b"-", b""):
            raise ProtocolError(f"bad reply line {text[:60]!r}")
        if len(self._lines) >= MAX_REPLY_LINES:
            raise ProtocolError("reply too long")
        self._lines.append(text[4:].decode("utf-8", "replace"))
        if text[3:4] == b"-":
            return
        reply = ServerReply(int(text[:3]), tuple(self._lines))
        self._lines = []
        if not self._waiting:
            raise ProtocolError(f"unexpected reply {reply}")
        d, call = self._waiting.popleft()
        if call.active():
            call.cancel()
        d.callback(reply)

    def _fail_all(self, failure: Failure) -> None:
        while self._waiting:
            d, call = self._waiting.popleft()
            if call.active():
                call.cancel()
            d.errback(failure)

    def connectionLost(self, reason=None) -> None:
        self._fail_all(reason if reason is not None else Failure(ConnectionLost()))

    def quit(self) -> None:
        """Say goodbye without waiting, and close."""
        if self.transport.connected:
            self.transport.write(b"QUIT\r\n")
            self.transport.loseConnection()
