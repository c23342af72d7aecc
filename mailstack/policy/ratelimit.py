"""Rate limits per client address, counted over a sliding window.

* connections (at connect): over ``max_connections`` per window the client
  gets ``421 4.7.0`` and the connection is closed (RFC 5321 3.8);
* messages (at MAIL FROM, Postfix's "message delivery requests"): over
  ``max_messages`` -> ``451 4.7.1``;
* recipients per message (at RCPT TO): past ``max_recipients`` ->
  ``452 4.5.3`` (RFC 5321 4.5.3.1.10: the client sends the rest in another
  transaction).

Failed logins per address are limited where logins happen, for SMTP
submission, IMAP and POP3 alike (``[auth] max_failures_per_ip``,
``mailstack.auth.limiter``); the inbound mx sessions this chain serves offer
no AUTH.

Counters live in memory (a restart resets them) in a table of at most
``max_entries`` addresses, least recently seen forgotten first, so a client
with many addresses cannot grow it without bound (SECURITY-TESTS AUTH-5).
The clock is injected (STYLE 7).
"""

from __future__ import annotations

from collections import OrderedDict, deque

from twisted.internet.defer import Deferred, succeed

from mailstack.policy.interface import (
    CONTINUE, Action, Checker, Connection, Environment, Transaction, Verdict, defer)


class SlidingWindow:
    def __init__(self, window: float, clock, max_entries: int = 50_000):
        self.window = window
        self.clock = clock
        self.max_entries = max_entries
        self._events: OrderedDict[str, deque[float]] = OrderedDict()

    def count(self, key: str) -> int:
        times = self._events.get(key)
        if times is None:
            return 0
        limit = self.clock.seconds() - self.window
        while times and times[0] <= limit:
            times.popleft()
        if not times:
            del self._events[key]
            return 0
        return len(times)

    def hit(self, key: str) -> int:
        """Count one event now; returns the events in the window, this one included."""
        self.count(key)
        times = self._events.setdefault(key, deque())
        times.append(self.clock.seconds())
        self._events.move_to_end(key)
        while len(self._events) > self.max_entries:
            self._events.popitem(last=False)
        return len(times)


class RateLimitChecker(Checker):
    name = "ratelimit"
    stages = frozenset({"connect", "mail", "rcpt"})

    def __init__(self, settings, env: Environment):
        self.settings = settings
        self.env = env
        self.connections = SlidingWindow(settings.window, env.clock)
        self.messages = SlidingWindow(settings.window, env.clock)

    def _seconds(self) -> str:
        return f"{self.settings.window:g} seconds"

    def connect(self, conn: Connection) -> Deferred:
        s = self.settings
        ip = conn.client_ip
        if s.max_connections and self.connections.hit(ip) > s.max_connections:
            return succeed(Verdict(Action.DEFER, 421, "4.7.0",
                                   f"Too many connections from [{ip}] in the last "
                                   f"{self._seconds()} (limit {s.max_connections}), "
                                   "try again later"))
        return succeed(CONTINUE)

    def mail_from(self, conn: Connection, txn: Transaction) -> Deferred:
        s = self.settings
        if s.max_messages and self.messages.hit(conn.client_ip) > s.max_messages:
            return succeed(defer(f"Too many messages from [{conn.client_ip}] in the last "
                                 f"{self._seconds()} (limit {s.max_messages}), "
                                 "try again later", "4.7.1"))
        return succeed(CONTINUE)

    def rcpt_to(self, conn: Connection, txn: Transaction, recipient: str) -> Deferred:
        limit = self.settings.max_recipients
        if limit and len(txn.recipients) >= limit:
            return succeed(defer(f"Too many recipients for one message (limit {limit}); "
                                 "send the rest in another message", "4.5.3", 452))
        return succeed(CONTINUE)
