"""Counting failed logins per client address, to slow down password guessing.

Each failure is remembered for ``window`` seconds; an address with
``max_failures`` failures in the window is refused until the oldest one
expires. The table holds at most ``max_entries`` addresses (the least
recently failing are forgotten first), so an attacker with many addresses
cannot grow it without bound (SECURITY-TESTS AUTH-5).

The same class, keyed by ``account_key``, limits failures per account
(``[auth] max_failures_per_account``): guesses at one account from many
addresses lock it for the rest of the window. The lock-out is decided before
the password is checked, and for unknown accounts as for real ones, so its
reply tells nothing about which accounts exist (AUTH-6).
"""

from __future__ import annotations

from collections import OrderedDict, deque

from mailstack.addresses import BadAddress, canonical


class FailureLimiter:
    def __init__(self, max_failures: int, window: float, clock, max_entries: int = 10_000):
        self.max_failures = max_failures
        self.window = window
        self._clock = clock
        self.max_entries = max_entries
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, key: str) -> deque[float]:
        times = self._failures.get(key)
        if times is None:
            return deque()
        limit = self._clock.seconds() - self.window
        while times and times[0] <= limit:
            times.popleft()
        if not times:
            del self._failures[key]
        return times

    def blocked(self, key: str) -> bool:
        return len(self._recent(key)) >= self.max_failures

    def failed(self, key: str) -> None:
        times = self._recent(key)
        times.append(self._clock.seconds())
        self._failures[key] = times
        self._failures.move_to_end(key)
        while len(self._failures) > self.max_entries:
            self._failures.popitem(last=False)

    def succeeded(self, key: str) -> None:
        self._failures.pop(key, None)


def account_key(user: bytes | str) -> str | None:
    """The account a login name stands for (``Alice@Example.test`` is
    ``alice@example.test``), or None for a name no account can have."""
    try:
        if isinstance(user, bytes):
            user = user.decode("utf-8")
        return canonical(user)
    except (UnicodeDecodeError, BadAddress):
        return None
