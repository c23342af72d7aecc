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

``LoginGuard`` is the one place that applies both limits and writes the log
lines, so SMTP AUTH, IMAP and POP3 refuse, count and log logins the same way.
"""

from __future__ import annotations

from collections import OrderedDict, deque

from twisted.logger import Logger

from mailstack.addresses import BadAddress, canonical
from mailstack.smtp.reply import printable

log = Logger(namespace="mailstack.auth")

#: Why ``LoginGuard.refusal`` turned a login away, before checking a password.
ADDRESS_LOCKED = "address"
ACCOUNT_LOCKED = "account"


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


class LoginGuard:
    """Failed logins per client address and per account, for every protocol.

    Each protocol asks ``refusal`` before it checks a password and answers a
    refusal with its own temporary error (SMTP 454 4.7.0, IMAP NO
    [UNAVAILABLE], POP3 -ERR [SYS/TEMP]); it reports the outcome of the
    check with ``failed`` or ``succeeded``. The ``auth failed`` and ``auth
    locked`` lines carry the client address before the user name, in the
    shape the README's fail2ban filter matches.
    """

    def __init__(self, per_ip: FailureLimiter, per_account: FailureLimiter):
        self.per_ip = per_ip
        self.per_account = per_account

    def refusal(self, ip: str, user: bytes) -> str | None:
        """``ADDRESS_LOCKED`` or ``ACCOUNT_LOCKED`` when this login may not
        even be tried now; None when the password may be checked."""
        if self.per_ip.blocked(ip):
            log.info("auth refused: too many failures, rip=[{ip}]", ip=ip)
            return ADDRESS_LOCKED
        account = account_key(user)
        if account is not None and self.per_account.blocked(account):
            log.info("auth locked: rip=[{ip}], user=<{user}>", ip=ip, user=account)
            return ACCOUNT_LOCKED
        return None

    def failed(self, ip: str, user: bytes) -> None:
        """Count a wrong password (or unknown user) against address and account."""
        self.per_ip.failed(ip)
        account = account_key(user)
        if account is not None:
            self.per_account.failed(account)
        log.info("auth failed: rip=[{ip}], user=<{user}>", ip=ip, user=printable(user, 100))

    def succeeded(self, ip: str) -> None:
        """A correct login clears its address's failures (a user who mistyped
        once is not left closer to a lock-out); the account's failures stay,
        so one good login from elsewhere does not reset a guessing attack."""
        self.per_ip.succeeded(ip)
