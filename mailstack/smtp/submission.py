"""The submission role (RFC 6409): what differs when users send mail.

The session (``session.py``) asks this module for the parts that only
submission has: SASL AUTH (RFC 4954, PLAIN RFC 4616 and LOGIN), the rule
that a user may only send as addresses they own (an account's own address
or an alias that points to it: no spoofing through our own server,
SECURITY-TESTS AUTH-13), the headers a sending server completes (Date and
Message-ID when missing, RFC 6409 8), and DKIM signing before the message is
queued.
"""

from __future__ import annotations

import base64
import binascii
import email.parser
import email.policy
import email.utils
import secrets
from dataclasses import dataclass, field
from typing import Callable

from zope.interface import Interface

from mailstack.addresses import BadAddress, canonical
from mailstack.auth.directory import Directory
from mailstack.dates import header_date
from mailstack.smtp.reply import Reply

#: RFC 4954 4: a SASL response line may be 12288 octets long.
MAX_AUTH_LINE = 12288
#: Headers kept for the From check; a larger header block is refused.
MAX_HEADER_BYTES = 256 * 1024

AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
ENCRYPTION_REQUIRED = Reply(538, "5.7.11", "Encryption required for requested authentication "
                                           "mechanism")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_CANCELLED = Reply(501, "5.7.0", "Authentication cancelled")
BAD_BASE64 = Reply(501, "5.5.2", "Invalid base64 data in SASL response")
MECHANISMS = ("PLAIN", "LOGIN")


class ISender(Interface):
    """The avatar of an authenticated submission session: its address (a str)."""


class SaslError(Exception):
    def __init__(self, reply: Reply):
        super().__init__(reply.text)
        self.reply = reply


def _b64(data: bytes) -> bytes:
    if data.strip() == b"*":
        raise SaslError(AUTH_CANCELLED)
    if data == b"=":
        return b""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise SaslError(BAD_BASE64) from None


def _clean(value: bytes) -> bytes:
    """A name or password without NUL, CR or LF (SECURITY-TESTS AUTH-9, HDR-3)."""
    if any(c in value for c in b"\0\r\n"):
        raise SaslError(Reply(501, "5.5.2", "Invalid characters in SASL response"))
    return value


class SaslExchange:
    """One AUTH dialogue. ``start`` and ``step`` return the next challenge
    (base64 text to send after ``334``) or the (user, password) pair."""

    def __init__(self, mechanism: str):
        self.mechanism = mechanism
        self._user: bytes | None = None

    def start(self, initial: bytes | None) -> str | tuple[bytes, bytes]:
        if self.mechanism == "PLAIN":
            return "" if initial is None else self._plain(_b64(initial))
        if initial is None:
            return base64.b64encode(b"Username:").decode()
        self._user = _clean(_b64(initial))
        return base64.b64encode(b"Password:").decode()

    def step(self, line: bytes) -> str | tuple[bytes, bytes]:
        data = _b64(line)
        if self.mechanism == "PLAIN":
            return self._plain(data)
        if self._user is None:
            self._user = _clean(data)
            return base64.b64encode(b"Password:").decode()
        return self._user, _clean(data)

    @staticmethod
    def _plain(data: bytes) -> tuple[bytes, bytes]:
        # RFC 4616 2: [authzid] NUL authcid NUL passwd; acting for another
        # identity (a different authzid) is not supported.
        parts = data.split(b"\0")
        if len(parts) != 3 or not parts[1] or not parts[2] or parts[0] not in (b"", parts[1]):
            raise SaslError(Reply(501, "5.5.2", "Malformed SASL PLAIN response"))
        return _clean(parts[1]), _clean(parts[2])


def owned_addresses(directory: Directory, user: str) -> set[str]:
    """The addresses ``user`` may send as: their own, and aliases that point to them."""
    owned = {user}
    for source, targets in directory.aliases.items():
        if user in targets and not source.startswith("@"):
            owned.add(source)
    return owned


def may_send_as(directory: Directory, user: str, address: str) -> bool:
    try:
        return canonical(address) in owned_addresses(directory, user)
    except BadAddress:
        return False


@dataclass
class HeaderCompleter:
    """Sits between DATA and the message buffer; adds missing Date and Message-ID.

    The header block is kept (bounded) for the From check at the final dot.
    """

    hostname: str
    write: Callable[[bytes], None]
    in_header: bool = True
    header: list[bytes] = field(default_factory=list)
    header_bytes: int = 0
    too_big: bool = False

    def line(self, text: bytes) -> None:
        if self.in_header:
            if text == b"":
                self._complete()
            else:
                self.header_bytes += len(text) + 1
                if self.header_bytes > MAX_HEADER_BYTES:
                    self.too_big = True
                else:
                    self.header.append(text)
        self.write(text)

    def finish(self) -> None:
        """At the final dot: a message without a body still gets its headers."""
        if self.in_header:
            self._complete()

    def _complete(self) -> None:
        self.in_header = False
        present = {line.split(b":", 1)[0].strip().lower() for line in self.header
                   if line[:1] not in (b" ", b"\t")}
        if b"date" not in present:
            self.write(b"Date: " + header_date().encode())
        if b"message-id" not in present:
            token = secrets.token_hex(12)
            self.write(f"Message-ID: <{token}@{self.hostname}>".encode())

    def from_addresses(self) -> list[str] | None:
        """Addresses of the From header, or None when the block cannot be read
        or has not exactly one From field (RFC 5322 3.6: a second one is how a
        forged author hides behind a signed one, SECURITY-TESTS HDR-6)."""
        if self.too_big:
            return None
        parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(
            b"\n".join(self.header) + b"\n\n")
        values = parsed.get_all("From") or []
        if len(values) != 1:
            return None
        return [addr for _, addr in email.utils.getaddresses([str(v) for v in values])]
