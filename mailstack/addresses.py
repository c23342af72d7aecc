"""Canonical forms of mailbox addresses, shared by SMTP, IMAP, POP3 and the CLI.

A user is stored and looked up as ``localpart@domain`` in lower case, with the
domain in its IDNA A-label form, so ``Demo@Example.TEST`` and
``demo@example.test.`` name the same mailbox (SECURITY-TESTS RELAY-10/11,
AUTH-14). Anything that could reach a file name is refused here, before any
lookup.
"""

from __future__ import annotations

import functools
import re

# RFC 5321 4.5.3.1.1 and 4.5.3.1.2.
MAX_LOCAL = 64
MAX_DOMAIN = 255

_LOCAL_OK = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.]+\Z")
_LABEL_OK = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")


class BadAddress(ValueError):
    """Not an address mailstack can hold as a user or alias."""


@functools.lru_cache(maxsize=4096)
def canonical_domain(domain: str) -> str:
    """Lower-case A-label form without a trailing dot, or BadAddress.

    Cached: every RCPT, MAIL and policy check asks it about the same few
    domains, and the IDNA codec is slow.
    """
    # One trailing dot is the root (an absolute name); "example.test.." is not a name.
    name = domain[:-1] if domain.endswith(".") else domain
    try:
        ascii_domain = name.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise BadAddress(f"{domain!r} is not a valid domain") from None
    labels = ascii_domain.split(".")
    if len(ascii_domain) > MAX_DOMAIN or not all(_LABEL_OK.match(label) for label in labels):
        raise BadAddress(f"{domain!r} is not a valid domain")
    return ascii_domain


def canonical(address: str) -> str:
    """The canonical ``local@domain`` for a login name or a user address.

    Only dot-atom local parts are accepted (no quoting), and none that start
    or end with a dot or hold ``..``: these names become directory names.
    Nor one that starts with ``#``: it would read as a comment in the users
    and aliases files.
    """
    local, at, domain = address.strip().rpartition("@")
    if not at or not local:
        raise BadAddress(f"{address!r} is not of the form user@domain")
    if (
        len(local) > MAX_LOCAL
        or not _LOCAL_OK.match(local)
        or local.startswith((".", "#"))
        or local.endswith(".")
        or ".." in local
        or "/" in local
    ):
        raise BadAddress(f"{address!r}: the part before @ is not allowed")
    return f"{local.lower()}@{canonical_domain(domain)}"


def split(address: str) -> tuple[str, str]:
    """``local@domain`` -> (local, domain) of an already canonical address."""
    local, _, domain = address.rpartition("@")
    return local, domain
