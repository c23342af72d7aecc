"""Fuzzing a running ``twistd mailstack`` through real connections.

``FuzzDaemon`` is a ``DaemonProcess`` with several listeners whose log can
be asked for new tracebacks after each example. ``Conversation`` is one
fuzzing connection: it plays a script of steps (bytes to send, and whether to
wait for an answer first), reads everything the server says until it closes,
and never blocks for long: a server that stops answering is a failure, not a
hung test. ``smtp_replies``, ``imap_replies`` and ``pop3_replies`` check a
transcript against each protocol's reply grammar.

The strategies build the scripts: commands from each protocol's vocabulary,
mutated commands, random bytes (NUL, 8-bit, bare CR and LF), lines around
every length limit, IMAP literals of wrong and huge sizes, deeply nested
parenthesised lists and broken SASL base64.
"""

from __future__ import annotations

import base64
import os
import re
import select
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from hypothesis import strategies as st

from tests.support.instance import DaemonProcess, free_port

#: The fuzzing client's address; the well-behaved clients use 127.0.0.1.
FUZZ_SOURCE = "127.0.0.2"
#: Seconds the server may take to answer or close before it counts as hung.
DEADLINE = 15.0
#: Set MAILSTACK_FUZZ_TRANSCRIPTS to a file name to see what the fuzzing
#: sends and gets (every conversation is appended to it).
TRANSCRIPTS = os.environ.get("MAILSTACK_FUZZ_TRANSCRIPTS")
#: Seconds of silence after the script before the fuzzer sends its padding
#: (the server may rightly be waiting for the rest of a literal).
QUIET = 0.4
#: Seconds a step of a script waits for an answer: long enough for the
#: first steps (log in, EHLO), which are always answered; junk may not be.
ANSWER = 5.0
BRIEF = 0.1


class FuzzDaemon(DaemonProcess):
    """``twistd mailstack`` with the listeners given, on free ports."""

    def __init__(self, root: Path, protocols, **layout):
        self.ports = {protocol: free_port() for protocol in protocols}
        super().__init__(root, listen=tuple(self.ports.items()), **layout)
        self.port = self.ports[protocols[0]]
        self._log_seen = 0

    def new_log(self) -> str:
        """The log written since the last call (twistd rotates at 1 MB)."""
        size = self.log.stat().st_size if self.log.exists() else 0
        text = ""
        if size < self._log_seen:
            rotated = self.log.with_name(self.log.name + ".1")
            if rotated.exists():
                with open(rotated, "rb") as f:
                    f.seek(self._log_seen)
                    text = f.read().decode("utf-8", "replace")
            self._log_seen = 0
        with open(self.log, "rb") as f:
            f.seek(self._log_seen)
            data = f.read()
        self._log_seen += len(data)
        return text + data.decode("utf-8", "replace")

    def assert_healthy(self, context: object = "") -> None:
        """The process is running and has logged no error since the last check."""
        log = self.new_log()
        for marker in ("Traceback", "Unhandled Error", "Unhandled error"):
            if marker in log:
                raise AssertionError(f"the server logged an error after {context!r}:\n{log}")
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"the server exited after {context!r}:\n{log}")


def tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@dataclass(frozen=True)
class Step:
    """Bytes to send; ``wait``: seconds to wait for the server's answer before
    the next step; ``tls_go``: the STARTTLS go-ahead line to wait for, then do
    the handshake."""

    data: bytes
    wait: float = 0.0
    tls_go: bytes | None = None


class Hung(AssertionError):
    pass


class Conversation:
    """One connection from FUZZ_SOURCE; ``received`` holds every byte the server sent."""

    def __init__(self, port: int, tls: bool = False, source: str = FUZZ_SOURCE):
        sock = socket.socket()
        sock.settimeout(DEADLINE)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls:
            sock = tls_context().wrap_socket(sock)
        self.sock = sock
        self.tls = tls
        self.received = bytearray()
        self.sent = bytearray()
        #: The server closed the connection (EOF or reset).
        self.closed = False
        #: A STARTTLS step has switched the connection to TLS.
        self.upgraded = False
        self._finishing = False

    # -- reading ---------------------------------------------------------
    def _recv(self, timeout: float) -> bool:
        """Read what arrives within ``timeout``; False if nothing did."""
        if self.closed:
            return False
        if not (self.tls and self.sock.pending()):
            readable, _, _ = select.select([self.sock], [], [], timeout)
            if not readable:
                return False
        try:
            data = self.sock.recv(65536)
        except ssl.SSLWantReadError:
            return True
        except (ConnectionResetError, ssl.SSLError, OSError):
            data = b""
        if not data:
            self.closed = True
            return False
        self.received += data
        return True

    def read_line(self, timeout: float = DEADLINE) -> None:
        """Wait until the server has sent a (further) complete line, or closes."""
        start = self.received.count(b"\n")
        deadline = time.monotonic() + timeout
        while self.received.count(b"\n") == start and not self.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._recv(left)

    def read_until(self, marker: bytes, timeout: float = DEADLINE) -> bytes:
        """Read until ``marker`` is in what was received; the text after it."""
        deadline = time.monotonic() + timeout
        while marker not in self.received:
            if self.closed:
                raise EOFError(bytes(self.received))
            left = deadline - time.monotonic()
            if left <= 0:
                raise Hung(f"no {marker!r} within {timeout}s: {bytes(self.received)[-500:]!r}")
            self._recv(left)
        return bytes(self.received).split(marker, 1)[1]

    # -- writing ---------------------------------------------------------
    def send(self, data: bytes) -> None:
        """Send ``data``, reading at the same time so neither side can stall
        the other; a server that closes meanwhile ends the sending."""
        self.sent += data
        if self.tls:
            try:
                self.sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError):
                self.closed = True
            return
        view = memoryview(data)
        deadline = time.monotonic() + DEADLINE
        while view and not self.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Hung(f"the server stopped reading: {bytes(self.received)[-500:]!r}")
            readable, writable, _ = select.select([self.sock], [self.sock], [], left)
            if readable:
                self._recv(0)
            if writable:
                try:
                    n = self.sock.send(view[:65536], socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    self.closed = True
                    return
                view = view[n:]

    def play(self, steps) -> None:
        for step in steps:
            if self.closed:
                return
            self.send(step.data)
            if step.tls_go is not None:
                self.read_until(step.tls_go + b"\r\n")
                self.sock = tls_context().wrap_socket(self.sock)
                self.tls = self.upgraded = True
            elif step.wait:
                self.read_line(timeout=step.wait)

    def wait_closed(self, timeout: float) -> bool:
        """Read until the server closes, for at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self.closed and time.monotonic() < deadline:
            self._recv(min(0.2, max(0.0, deadline - time.monotonic())))
        return self.closed

    def finish(self, padding: bytes | None = None, last: bytes | None = None) -> bytes:
        """Read until the server closes, or has sent a line that starts with ``last``. After
        a quiet spell, send ``padding`` (bytes that complete whatever the
        server may rightly be waiting for) once. A server that does neither
        within DEADLINE is hung."""
        deadline = time.monotonic() + DEADLINE
        while not self.closed:
            if last is not None and any(line.startswith(last)
                                        for line in self.received.split(b"\r\n")[:-1]):
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise Hung("the server neither answered nor closed: "
                           f"{bytes(self.received)[-500:]!r}")
            if (not self._recv(min(left, QUIET)) and not self.closed and padding
                    and not self._finishing):
                self._finishing = True
                self.send(padding)
        self.close()
        return bytes(self.received)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def record(self) -> None:
        if TRANSCRIPTS:
            with open(TRANSCRIPTS, "ab") as f:
                f.write(b"=== SENT\n" + bytes(self.sent) + b"\n=== RECEIVED\n"
                        + bytes(self.received) + b"\n")


def assert_released(port: int, count: int, greeting: bytes, timeout: float = 10.0) -> None:
    """``count`` connections from FUZZ_SOURCE at once all get ``greeting``:
    the server has let go of every connection the fuzzing opened (its
    per-address limit would refuse some otherwise)."""
    deadline = time.monotonic() + timeout
    while True:
        conversations = []
        try:
            for _ in range(count):
                conversations.append(Conversation(port))
                conversations[-1].read_line()
            refused = [bytes(c.received) for c in conversations
                       if not c.received.startswith(greeting)]
        finally:
            for c in conversations:
                c.close()
        if not refused:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"connections from {FUZZ_SOURCE} refused: {refused[:3]}")
        time.sleep(0.2)


# -- reply grammars ---------------------------------------------------------
# RFC 5321 4.2: textstring = 1*(%d09 / %d32-126): 7-bit text only.
_SMTP_REPLY = re.compile(rb"([2-5][0-9][0-9])([ -])[\t\x20-\x7e]*\Z")
SMTP_TLS_GO = b"220 2.0.0 Ready to start TLS"


def smtp_replies(data: bytes, upgraded: bool = False) -> list[bytes]:
    """The reply lines of an SMTP transcript, each checked (RFC 5321 4.2).
    Unless the client did the TLS handshake (``upgraded``), a go-ahead for
    STARTTLS ends the text."""
    lines = []
    pending_code = None
    for line in _lines(data, None if upgraded else SMTP_TLS_GO):
        m = _SMTP_REPLY.match(line)
        if not m:
            raise AssertionError(f"not an SMTP reply line: {line!r}")
        if pending_code is not None and m.group(1) != pending_code:
            raise AssertionError(f"multi-line reply changes its code: {line!r}")
        pending_code = m.group(1) if m.group(2) == b"-" else None
        lines.append(line)
    if pending_code is not None:
        raise AssertionError("multi-line reply left unfinished")
    return lines


# RFC 3501 9: tag = 1*<any ASTRING-CHAR except "+">.
_IMAP_TAG = rb'[^\x00-\x20\x7f-\xff(){%*"\\+]+'
# RFC 3501 9: outside literals a response is 7-bit text (TEXT-CHAR, quoted
# strings, atoms); anything else must be sent as a literal.
_IMAP_TAGGED = re.compile(_IMAP_TAG + rb" (OK|NO|BAD)( [\x20-\x7e]*)?\Z")
_IMAP_UNTAGGED = re.compile(rb"\* [\x20-\x7e]+\Z")
#: What this server says after "+ " (literals, AUTHENTICATE, IDLE).
IMAP_CONTINUATIONS = (b"+ Ready for literal data", b"+ ", b"+ idling")
_IMAP_LITERAL = re.compile(rb"\{([0-9]+)\}\Z")
IMAP_TLS_GO = b" OK Begin TLS negotiation now"


def imap_replies(data: bytes, sent: bytes = b"", upgraded: bool = False) -> list[bytes]:
    """The response lines of an IMAP transcript (literals skipped), each
    checked (RFC 3501 7); a tag must be one the client sent."""
    lines = []
    pos = 0
    while pos < len(data):
        # A literal in a response is {N} CRLF and N octets; then the line goes on.
        line = bytearray()
        while True:
            end = data.find(b"\r\n", pos)
            if end < 0:
                raise AssertionError(f"unterminated response line: {data[pos:pos + 300]!r}")
            segment = data[pos:end]
            pos = end + 2
            m = _IMAP_LITERAL.search(segment)
            if m is None:
                line += segment
                break
            line += segment[:m.start()] + b"{}"
            pos += int(m.group(1))
            if pos > len(data):
                raise AssertionError(f"truncated literal after {bytes(line)[:200]!r}")
        line = bytes(line)
        lines.append(line)
        if line.startswith(b"+"):
            if line not in IMAP_CONTINUATIONS:
                raise AssertionError(f"not a continuation request of this server: {line!r}")
            continue
        if _IMAP_UNTAGGED.match(line):
            continue
        m = _IMAP_TAGGED.match(line)
        if not m:
            raise AssertionError(f"not an IMAP response line: {line!r}")
        tag = line.split(b" ", 1)[0]
        if tag not in sent:
            raise AssertionError(f"a tag the client never sent: {line!r}")
        if line.endswith(IMAP_TLS_GO) and not upgraded:
            break  # what follows is TLS
    return lines


_POP3_STATUS = re.compile(rb"(\+OK|-ERR)( [\x20-\x7e]*)?\Z")
#: The status lines of this server's multi-line answers (RFC 1939 3).
_POP3_MULTI = re.compile(rb"\+OK(| Capability list follows| scan listing follows"
                         rb"| unique-id listing follows| top of message follows"
                         rb"| [0-9]+ octets)\Z")
POP3_TLS_GO = b"+OK Begin TLS negotiation now"


def pop3_replies(data: bytes, upgraded: bool = False) -> list[bytes]:
    """The status lines of a POP3 transcript (multi-line bodies skipped),
    each checked (RFC 1939 3, RFC 2449 8, RFC 5034 4)."""
    lines = []
    body = False
    for line in _lines(data, None if upgraded else POP3_TLS_GO):
        if body:
            if line == b".":
                body = False
            continue
        if line == b"+ ":
            lines.append(line)
            continue
        if not _POP3_STATUS.match(line):
            raise AssertionError(f"not a POP3 status line: {line!r}")
        lines.append(line)
        body = bool(_POP3_MULTI.match(line))
    return lines


def _lines(data: bytes, tls_go: bytes | None):
    """CRLF lines up to ``tls_go`` (after it comes TLS); no partial last line."""
    pos = 0
    while pos < len(data):
        end = data.find(b"\r\n", pos)
        if end < 0:
            raise AssertionError(f"unterminated reply line: {data[pos:pos + 300]!r}")
        line = data[pos:end]
        pos = end + 2
        if b"\n" in line or b"\r" in line:
            raise AssertionError(f"bare CR or LF in a reply line: {line!r}")
        yield line
        if line == tls_go:
            return


# -- strategies -------------------------------------------------------------
ENDINGS = st.sampled_from([b"\r\n"] * 6 + [b"\n", b"\r", b"", b"\r\r\n", b"\n\r", b"\x00\r\n"])
#: Lengths around every line limit of the three protocols.
LONG = st.sampled_from([511, 512, 513, 999, 1000, 1001, 4096, 12288, 12289, 16385, 65536,
                        65537, 70000, 200_000])
NOISE = st.binary(max_size=120)
ODD_BYTES = st.sampled_from([b"\x00", b"\xff", b"\x80", b"\r", b"\n", b"\x1b", b"\x7f", b" ",
                             b"\t", b"\xc3\xa9", b"\xe2\x80\xa8", b"%", b"{", b"}", b"(", b")",
                             b'"', b"\\", b"*", b"+", b"<", b">", b":", b"@", b"="])


def long_line(filler: bytes = b"A") -> st.SearchStrategy[bytes]:
    return st.builds(lambda n, f: (f * n)[:n], LONG, st.sampled_from([filler, b"x ", b"\xff",
                                                                        b"\x00"]))


@st.composite
def mutated(draw, commands: st.SearchStrategy[bytes]) -> bytes:
    """A command with a few bytes inserted, deleted, repeated or cut off."""
    data = bytearray(draw(commands))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["insert", "delete", "repeat", "truncate", "case", "digits"]))
        at = draw(st.integers(0, len(data)))
        if kind == "insert":
            data[at:at] = draw(st.one_of(ODD_BYTES, NOISE))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        elif kind == "repeat":
            data[at:at] = data[at:at + draw(st.integers(1, 10))] * draw(st.integers(2, 50))
        elif kind == "truncate":
            del data[at:]
        elif kind == "case":
            data = bytearray(bytes(data).swapcase())
        else:
            data[at:at] = draw(NUMBERS)
    return bytes(data)


NUMBERS = st.sampled_from([b"0", b"1", b"2", b"-1", b"+1", b"4294967295", b"4294967296",
                           b"99999999999999999999", b"1_0", b" 5", b"\xd9\xa5", b"*", b"1e3",
                           b"0x10", b"00000000001"])


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


#: SASL PLAIN responses: good and broken base64, and decodings of every wrong shape.
SASL = st.one_of(
    st.sampled_from([b"=", b"*", b"", b"====", b"AGFsaWNl", b"AGFsaWNlAA==", b"\x00", b"a b",
                     b"YQ", b"YQ=", b"Y Q==", b"YQ==\x00", b"\xffAA="]),
    st.builds(b64, st.sampled_from([b"\0alice@example.test\0wrong", b"alice@example.test",
                                    b"\0\0", b"\0alice@example.test\0", b"x\0y\0z\0w",
                                    b"bob\0alice@example.test\0pw", b"\0a\nb\0c\r\n",
                                    b"\0\xff\xfe@example.test\0pw"])),
    st.builds(b64, st.binary(max_size=60)),
    st.binary(max_size=60),
    st.builds(lambda n: b"QUFB" * n, st.sampled_from([3000, 3073, 20000])),
)


def nested(depth: int, inner: bytes = b"ALL") -> bytes:
    return b"(" * depth + inner + b")" * depth


NESTED = st.builds(nested, st.sampled_from([1, 2, 10, 63, 64, 65, 66, 200, 5000, 20000]),
                   st.sampled_from([b"ALL", b"", b"SEEN", b"1", b"FLAGS", b"NOT ALL"]))
