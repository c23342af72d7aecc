"""Parsing of the MAIL FROM and RCPT TO arguments (RFC 5321 4.1.2).

Strict where it matters for safety: no CR, LF, NUL or other control bytes
anywhere (SECURITY-TESTS HDR-2), RFC 5321 length limits (LIM-3), exactly one
``@`` outside quotes (RELAY-6), source routes dropped as RFC 5321 3.6.1 says
(RELAY-7). The percent hack, bang paths and quoted ``@`` are *not*
interpreted (RELAY-2..5, RELAY-8): such local parts are just names, which
no local user has. Lenient where real clients need it: a missing pair of
angle brackets and a space after the colon are accepted (as Postfix does).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from mailstack.addresses import MAX_DOMAIN, MAX_LOCAL, BadAddress, canonical_domain

MAX_PATH = 256  # RFC 5321 4.5.3.1.3, including the angle brackets

_ATOM = rb"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+"
_DOT_STRING = re.compile(rb"%s(?:\.%s)*\Z" % (_ATOM, _ATOM))
_QUOTED = re.compile(rb'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*)"\Z')
_ROUTE = re.compile(rb"@[^,:@]+(?:,@[^,:@]+)*:")
_LITERAL = re.compile(rb"\[[\x21-\x5a\x5e-\x7e]+\]\Z")
_LDH = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\Z")
_PARAM = re.compile(rb"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?\Z")


class AddressSyntax(ValueError):
    """The path or its parameters are malformed; the text says why."""


@dataclass(frozen=True)
class Mailbox:
    #: Local part as meant (quotes removed for a quoted string).
    local: str
    #: Lower-case A-label domain, or an address literal in its one spelling:
    #: ``[192.0.2.1]``, ``[IPv6:2001:db8::1]``, ``[tag:content]``.
    domain: str
    #: The local part was a quoted string that is not a plain dot-atom.
    quoted: bool = False

    @property
    def is_literal(self) -> bool:
        return self.domain.startswith("[")

    def __str__(self) -> str:
        local = self.local
        if self.quoted:
            local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return f"{local}@{self.domain}"


def parse_path_and_params(arg: bytes, allow_null: bool) -> tuple[Mailbox | None, dict[str, str]]:
    """Split ``<path> PARAM=VALUE ...``; None stands for the null path ``<>``."""
    if any(b < 0x20 or b == 0x7F for b in arg):
        raise AddressSyntax("control characters are not allowed")
    arg = arg.strip(b" ")
    if arg.startswith(b"<"):
        end = _closing_bracket(arg)
        path, rest = arg[1:end], arg[end + 1:]
        if rest and not rest.startswith(b" "):
            raise AddressSyntax("junk after the address")
    else:
        path, _, rest = arg.partition(b" ")
    if len(path) + 2 > MAX_PATH:
        raise AddressSyntax("address too long")
    params = _parse_params(rest)
    if not path:
        if not allow_null:
            raise AddressSyntax("empty address")
        return None, params
    return parse_mailbox(path), params


def _closing_bracket(arg: bytes) -> int:
    quoted = escaped = False
    for i in range(1, len(arg)):
        c = arg[i:i + 1]
        if escaped:
            escaped = False
        elif c == b"\\" and quoted:
            escaped = True
        elif c == b'"':
            quoted = not quoted
        elif c == b">" and not quoted:
            return i
    raise AddressSyntax("unbalanced < >")


def parse_mailbox(path: bytes) -> Mailbox:
    """``local@domain`` (with an optional source route in front)."""
    route = _ROUTE.match(path)
    if route:
        path = path[route.end():]
    if path.startswith(b'"'):
        end = _closing_quote(path)
        local_raw, rest = path[: end + 1], path[end + 1:]
        if not rest.startswith(b"@"):
            raise AddressSyntax("expected @ after the quoted local part")
        domain_raw = rest[1:]
        match = _QUOTED.match(local_raw)
        if not match:
            raise AddressSyntax("bad quoted local part")
        local = re.sub(rb"\\(.)", rb"\1", match.group(1)).decode("ascii")
        quoted = not _DOT_STRING.match(local.encode("ascii"))
    else:
        local_raw, at, domain_raw = path.partition(b"@")
        if not at:
            raise AddressSyntax("missing @domain")
        if not _DOT_STRING.match(local_raw):
            raise AddressSyntax("bad local part")
        local, quoted = local_raw.decode("ascii"), False
    if len(local_raw) > MAX_LOCAL:
        raise AddressSyntax("local part longer than 64 octets")
    if b"@" in domain_raw:
        raise AddressSyntax("too many @")
    return Mailbox(local, _parse_domain(domain_raw), quoted)


def _closing_quote(path: bytes) -> int:
    i = 1
    while i < len(path):
        if path[i:i + 1] == b"\\":
            i += 2
            continue
        if path[i:i + 1] == b'"':
            return i
        i += 1
    raise AddressSyntax("unterminated quoted string")


def _parse_domain(raw: bytes) -> str:
    if not raw:
        raise AddressSyntax("missing domain")
    if len(raw) > MAX_DOMAIN:
        raise AddressSyntax("domain longer than 255 octets")
    if raw.startswith(b"["):
        return _parse_literal(raw)
    if any(b > 0x7F for b in raw):
        # Not advertising SMTPUTF8, so U-labels are not allowed (RFC 6531 3.4).
        raise AddressSyntax("non-ASCII domain without SMTPUTF8")
    try:
        return canonical_domain(raw.decode("ascii"))
    except BadAddress:
        raise AddressSyntax("bad domain") from None


def _parse_literal(raw: bytes) -> str:
    """An address literal (RFC 5321 4.1.3) in one spelling per address.

    IPv4 as four decimal numbers, ``IPv6:`` with a valid IPv6 address (no
    zone), or a general literal ``tag:content`` whose tag is an Ldh-str.
    """
    if not _LITERAL.match(raw):
        raise AddressSyntax("bad address literal")
    inner = raw[1:-1].decode("ascii")
    tag, colon, value = inner.partition(":")
    try:
        if not colon:
            return f"[{ipaddress.IPv4Address(inner)}]"
        if tag.lower() == "ipv6" and "%" not in value:
            return f"[IPv6:{ipaddress.IPv6Address(value).compressed}]"
    except ValueError:
        raise AddressSyntax("bad address literal") from None
    if tag.lower() == "ipv6" or not _LDH.match(tag):
        raise AddressSyntax("bad address literal")
    return f"[{tag.lower()}:{value}]"


def _parse_params(rest: bytes) -> dict[str, str]:
    params: dict[str, str] = {}
    for word in rest.split():
        match = _PARAM.match(word)
        if not match:
            raise AddressSyntax(f"bad parameter {word[:40].decode('ascii', 'replace')!r}")
        key = match.group(1).decode("ascii").upper()
        params[key] = (match.group(2) or b"").decode("ascii")
    return params
