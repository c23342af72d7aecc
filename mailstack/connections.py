"""Counting a listener's connections, in total and per client address.

SMTP, POP3 and IMAP refuse a connection over ``max_connections`` or over
``max_connections_per_ip`` for one address, each with its own protocol's
words (SMTP ``421 4.7.0``, POP3 ``-ERR [SYS/TEMP]``, IMAP ``* BYE``); the
bookkeeping is this one class, so every listener counts the same way.
"""

from __future__ import annotations

from collections import Counter
from typing import Hashable

#: Why ``admit`` refused a connection.
TOO_MANY = "Too many connections"
TOO_MANY_FROM_ADDRESS = "Too many connections from your address"


class ConnectionLimits:
    def __init__(self, max_total: int, max_per_address: int):
        self.max_total = max_total
        self.max_per_address = max_per_address
        #: The admitted connections, each with its client address.
        self.connections: dict[Hashable, str] = {}
        self._per_address: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self.connections)

    def admit(self, connection: Hashable, address: str) -> str | None:
        """Count ``connection``, or return why it is refused (TOO_MANY...)."""
        if len(self.connections) >= self.max_total:
            return TOO_MANY
        if self._per_address[address] >= self.max_per_address:
            return TOO_MANY_FROM_ADDRESS
        self.connections[connection] = address
        self._per_address[address] += 1
        return None

    def release(self, connection: Hashable) -> bool:
        """Forget a closed connection; False if it was never admitted."""
        address = self.connections.pop(connection, None)
        if address is None:
            return False
        self._per_address[address] -= 1
        if not self._per_address[address]:
            del self._per_address[address]
        return True
