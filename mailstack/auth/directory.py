"""Who receives mail for an address: local domains, users and aliases together."""

from __future__ import annotations

from dataclasses import dataclass

from mailstack.addresses import BadAddress, canonical, canonical_domain
from mailstack.auth.aliases import Aliases
from mailstack.auth.users import Users


@dataclass(frozen=True)
class Destination:
    address: str
    local: bool


class Directory:
    def __init__(self, domains: tuple[str, ...], users: Users, aliases: Aliases):
        self.domains = frozenset(domains)
        #: Where RCPT TO:<postmaster> without a domain goes (RFC 5321 4.5.1).
        self.primary_domain = domains[0] if domains else "localhost"
        self.users = users
        self.aliases = aliases

    def is_local_domain(self, domain: str) -> bool:
        """Exact match after normalisation, never a suffix match (RELAY-10).

        Both sides are in canonical form: lower case, A-labels (RELAY-11),
        no trailing dot. An address literal is never a local domain.
        """
        try:
            return canonical_domain(domain) in self.domains
        except BadAddress:
            return False

    def resolve(self, address: str) -> list[Destination] | None:
        """Final destinations of mail to ``address`` in a local domain, or None.

        None means nobody here receives it (550 5.1.1 for SMTP), and is also
        the answer for a foreign domain: resolving is not permission to relay.
        """
        try:
            key = canonical(address)
        except BadAddress:
            return None
        if not self.is_local_domain(key.rpartition("@")[2]):
            return None
        final = self.aliases.resolve(key, self.users.exists, self.is_local_domain)
        if final is None:
            return None
        return [Destination(a, self.is_local_domain(a.rpartition("@")[2])) for a in final]
