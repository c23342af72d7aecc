"""Connect to a mail port the way a client would, and judge its certificate.

Blocking code for the ``mailstack check`` command (never used inside the
daemon). Each probe opens a connection, speaks just enough of the protocol
to reach TLS (STARTTLS for SMTP, RFC 3207; STARTTLS for IMAP, RFC 3501
6.2.1; STLS for POP3, RFC 2595 4; implicit TLS, RFC 8314), and verifies the
certificate against the host name with the system's CAs (or ``cafile``):
trusted chain, name match (RFC 6125), and days left before it expires.
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass

#: How each listener protocol reaches TLS.
TLS_MODE = {"smtp": "smtp", "submission": "smtp", "submissions": "implicit",
            "imap": "imap", "imaps": "implicit", "pop3": "pop3", "pop3s": "implicit",
            "https": "implicit", "http": "none"}


class ProbeError(Exception):
    """The service is there but does not behave: the text says how."""


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    #: What was seen (for the "found" column).
    found: str
    #: The one-line fix when not ok.
    fix: str = ""


def tls_context(cafile: str | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class _Lines:
    """Line reading over a socket, with a bound on line length."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buffer = b""

    def line(self) -> bytes:
        while b"\n" not in self.buffer:
            if len(self.buffer) > 8192:
                raise ProbeError("reply line too long")
            data = self.sock.recv(4096)
            if not data:
                raise ProbeError("connection closed by the server")
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.rstrip(b"\r")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)


def _smtp_reply(lines: _Lines) -> tuple[int, list[str]]:
    texts = []
    while True:
        line = lines.line()
        if len(line) < 3 or not line[:3].isdigit():
            raise ProbeError(f"not an SMTP reply: {line[:60]!r}")
        texts.append(line[4:].decode("utf-8", "replace"))
        if line[3:4] != b"-":
            return int(line[:3]), texts


def _starttls(lines: _Lines, mode: str) -> None:
    """Speak until the server is ready for the TLS handshake."""
    if mode == "smtp":
        code, _ = _smtp_reply(lines)
        if code != 220:
            raise ProbeError(f"greeting {code} instead of 220")
        lines.send(b"EHLO mailstack-check.invalid\r\n")
        code, extensions = _smtp_reply(lines)
        if code != 250:
            raise ProbeError(f"EHLO answered {code}")
        if not any(e.upper().split(" ")[0] == "STARTTLS" for e in extensions[1:]):
            raise ProbeError("STARTTLS is not offered")
        lines.send(b"STARTTLS\r\n")
        code, text = _smtp_reply(lines)
        if code != 220:
            raise ProbeError(f"STARTTLS answered {code} {' '.join(text)}")
    elif mode == "imap":
        greeting = lines.line()
        if not greeting.upper().startswith(b"* OK"):
            raise ProbeError(f"IMAP greeting {greeting[:60]!r}")
        lines.send(b"c1 STARTTLS\r\n")
        while True:
            line = lines.line()
            if line.startswith(b"c1 "):
                if not line.upper().startswith(b"C1 OK"):
                    raise ProbeError(f"STARTTLS answered {line[:60]!r}")
                return
    elif mode == "pop3":
        greeting = lines.line()
        if not greeting.startswith(b"+OK"):
            raise ProbeError(f"POP3 greeting {greeting[:60]!r}")
        lines.send(b"STLS\r\n")
        answer = lines.line()
        if not answer.startswith(b"+OK"):
            raise ProbeError(f"STLS answered {answer[:60]!r}")
    if lines.buffer:
        # RFC 3207 4.2: nothing may follow the go-ahead in the clear.
        raise ProbeError("data after the STARTTLS go-ahead (injection risk)")


def probe(address: str, port: int, protocol: str, hostname: str,
          context: ssl.SSLContext, timeout: float = 10.0, min_days: int = 14,
          now: float | None = None) -> ProbeResult:
    """Connect to ``address``:``port`` speaking ``protocol``; judge TLS for ``hostname``."""
    mode = TLS_MODE[protocol]
    where = f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
    try:
        sock = socket.create_connection((address, port), timeout=timeout)
    except OSError as e:
        return ProbeResult(False, f"cannot connect to {where}: {e.strerror or e}",
                           f"open port {port} in the firewall and check that mailstack "
                           f"listens for {protocol} (a hosting provider may block port 25)")
    try:
        sock.settimeout(timeout)
        if mode == "none":
            return _http_probe(sock, hostname)
        lines = _Lines(sock)
        try:
            if mode != "implicit":
                _starttls(lines, mode)
            tls = context.wrap_socket(sock, server_hostname=hostname)
        except ssl.SSLCertVerificationError as e:
            return ProbeResult(False, f"certificate not valid for {hostname}: "
                                      f"{e.verify_message}",
                               f"install a certificate for {hostname} from a public CA "
                               "(certbot) in [tls] certificate/private_key, then restart")
        except (ssl.SSLError, ProbeError) as e:
            return ProbeResult(False, f"{where}: {e}",
                               f"check the {protocol} listener and [tls] in the config")
        except OSError as e:
            return ProbeResult(False, f"{where}: {e.strerror or e}",
                               f"check the {protocol} listener on port {port}")
        sock = tls
        not_after = ssl.cert_time_to_seconds(tls.getpeercert()["notAfter"])
        days = (not_after - (time.time() if now is None else now)) / 86400
        expiry = time.strftime("%Y-%m-%d", time.gmtime(not_after))
        found = f"{tls.version()}, certificate valid until {expiry}"
        if days < min_days:
            return ProbeResult(False, f"certificate expires in {max(days, 0):.0f} days ({expiry})",
                               "renew it (certbot renew) and restart mailstack; "
                               "check that certbot's timer runs")
        return ProbeResult(True, found)
    finally:
        try:
            sock.close()
        except OSError:
            pass


def _http_probe(sock: socket.socket, hostname: str) -> ProbeResult:
    sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: {hostname}\r\nConnection: close\r\n\r\n"
                 .encode())
    status = _Lines(sock).line()
    if not status.startswith(b"HTTP/1.") or status[9:12] != b"200":
        return ProbeResult(False, f"/healthz answered {status[:60]!r}",
                           "check the http listener")
    return ProbeResult(True, "HTTP, /healthz OK")


def fetch_https(address: str, port: int, hostname: str, path: str, context: ssl.SSLContext,
                timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """GET https://hostname/path from ``address``: status, headers (lower-case), body.

    No redirects are followed (RFC 8461 3.3 forbids them for the MTA-STS policy).
    Raises OSError, ssl.SSLError or ProbeError.
    """
    with socket.create_connection((address, port), timeout=timeout) as raw:
        with context.wrap_socket(raw, server_hostname=hostname) as sock:
            sock.settimeout(timeout)
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {hostname}\r\nConnection: close\r\n"
                         f"User-Agent: mailstack-check\r\n\r\n".encode())
            data = b""
            while len(data) < 1_000_000:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        raise ProbeError("incomplete HTTP response")
    lines = head.decode("iso-8859-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise ProbeError(f"not an HTTP response: {lines[0][:60]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _unchunk(body)
    return int(parts[1]), headers, body


def _unchunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out, body = out + body[:size], body[size + 2:]
    return out
