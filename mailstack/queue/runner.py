"""The outbound runner: delivers queued remote recipients, retries, bounces.

Every second it takes the messages that are due, groups their remote
recipients by domain (so one connection carries up to
``messages_per_connection`` messages to the same host, and several such
connections run at once up to ``max_connections``), finds the routes (``routes``), and tries the hosts in order until
each recipient is sent (2xx) or refused (5xx). Temporary failures (4xx,
timeouts, connection and DNS failures) are retried on an exponential
schedule (``[queue] first_retry`` doubling up to ``max_retry_interval``)
until ``max_lifetime``; then, or on a 5xx, the sender gets a DSN.

The spool envelope is the only state: it is read again before each attempt
and written after it, so a restart (or ``kill -9``) resumes from the last
recorded result. A recipient whose remote 250 arrived but was not yet
recorded is sent again after a crash; that duplicate is the one loss-free
choice (RFC 5321 6.1).

``mailstack queue flush`` asks a running runner to try everything now by
creating the file ``flush`` in the spool directory.
"""

from __future__ import annotations

import re
import time
from typing import Callable

from twisted.internet import defer, task
from twisted.internet.error import ConnectError
from twisted.logger import Logger

from mailstack.config import Config
from mailstack.dns import Resolver, TemporaryDNSError
from mailstack.metrics import NULL_METRICS
from mailstack.queue.routes import NoRoute, resolve_routes
from mailstack.queue.spool import Envelope, Recipient, Spool
from mailstack.queue.transfer import Item, Results, transfer

log = Logger(namespace="mailstack.smtp")
#: What no envelope address we send may hold: control characters, and the
#: angle brackets that end a path (the SMTP parser accepts neither).
_UNSENDABLE = re.compile(r"[\x00-\x1f\x7f<>]")

#: (envelope, recipients, "failed" or "delayed", original headers) -> None
Notify = Callable[[Envelope, list[Recipient], str, bytes], None]


def backoff(config: Config, attempts: int) -> float:
    """Seconds to wait after the ``attempts``-th failure."""
    q = config.queue
    return min(q.first_retry * 2 ** max(attempts - 1, 0), q.max_retry_interval)


class OutboundRunner:
    #: Counts delivery attempts (mailstack.metrics; the service sets its own).
    metrics = NULL_METRICS

    def __init__(self, config: Config, spool: Spool, resolver: Resolver, clock,
                 run_blocking: Callable[..., defer.Deferred], tls_context, notify: Notify):
        self.config = config
        self.spool = spool
        self.resolver = resolver
        self.clock = clock
        self._run = run_blocking
        self.tls_context = tls_context
        self.notify = notify
        self._due: dict[str, float] = {}
        self._active: set[str] = set()
        self._connections = defer.DeferredSemaphore(config.outbound.max_connections)
        self._loop = task.LoopingCall(self.tick)
        self._loop.clock = clock
        self._running: set[defer.Deferred] = set()

    def start(self, envelopes: list[Envelope]) -> None:
        for env in envelopes:
            due = self._next_due(env)
            if due is not None:
                self._due[env.id] = due
        self._loop.start(1.0, now=False)

    def stop(self) -> defer.Deferred:
        if self._loop.running:
            self._loop.stop()
        return defer.DeferredList(list(self._running))

    def schedule(self, queue_id: str) -> None:
        """Try a message now (it was just queued)."""
        self._due[queue_id] = 0.0
        self.tick()

    @staticmethod
    def _next_due(env: Envelope) -> float | None:
        times = [r.next_attempt for _, r in env.pending() if not r.local]
        return min(times) if times else None

    def tick(self) -> None:
        flush = self.spool.dir / "flush"
        if flush.exists():
            flush.unlink(missing_ok=True)
            log.info("flush requested: trying every queued message now")
            for qid in self._due:
                self._due[qid] = 0.0
        now = self.clock.seconds()
        due = [qid for qid, when in self._due.items() if when <= now and qid not in self._active]
        if not due:
            return
        for qid in due:
            del self._due[qid]
            self._active.add(qid)
        d = self._attempt(due)
        self._running.add(d)
        d.addBoth(lambda _: self._running.discard(d))

    @defer.inlineCallbacks
    def _attempt(self, ids: list[str]):
        try:
            loaded, postponed = yield self._run(self._load, ids)
            for qid in postponed:
                # Local delivery is still retrying; come back after it.
                self._due[qid] = self.clock.seconds() + self.config.queue.retry_delay
            by_domain: dict[str, list[Item]] = {}
            results = Results()
            for env, message in loaded:
                bad_sender = _UNSENDABLE.search(env.sender)
                for index, rcpt in env.pending():
                    if rcpt.local:
                        continue
                    if bad_sender or _UNSENDABLE.search(rcpt.address):
                        # Never accepted by our SMTP parser, so a damaged or
                        # hand-made spool entry: no command may carry it (HDR-5).
                        results.fail_all([Item(env, [(index, rcpt)], message)],
                                         "550 5.1.3 control character in the envelope "
                                         "address; not sent", "perm")
                        continue
                    domain = rcpt.address.rpartition("@")[2]
                    items = by_domain.setdefault(domain, [])
                    if items and items[-1].envelope is env:
                        items[-1].recipients.append((index, rcpt))
                    else:
                        items.append(Item(env, [(index, rcpt)], message))
            size = self.config.outbound.messages_per_connection
            yield defer.DeferredList([
                self._connections.run(self._deliver_domain, domain, items[i:i + size], results)
                for domain, items in by_domain.items() for i in range(0, len(items), size)])
            for env, _ in loaded:
                yield self._finish(env, results)
        except Exception:
            log.failure("outbound attempt for {ids} failed", ids=ids)
            for qid in ids:
                self._due.setdefault(qid, self.clock.seconds() + self.config.queue.first_retry)
        finally:
            self._active.difference_update(ids)

    def _load(self, ids: list[str]) -> tuple[list[tuple[Envelope, bytes]], list[str]]:
        """Envelopes (fresh from disk) and bodies of the messages to try now,
        and the ids to try later."""
        loaded, postponed = [], []
        for qid in ids:
            try:
                env = self.spool.load(qid)
                with open(self.spool.message_path(qid), "rb") as f:
                    f.seek(env.body_offset)
                    message = f.read()
            except FileNotFoundError:
                continue  # delivered, or removed with `mailstack queue remove`
            if any(r.local for _, r in env.pending()):
                postponed.append(qid)
                continue
            loaded.append((env, message))
        return loaded, postponed

    @defer.inlineCallbacks
    def _deliver_domain(self, domain: str, items: list[Item], results: Results):
        try:
            routes = yield self._run(resolve_routes, self.resolver, domain, self.config.outbound)
        except NoRoute as e:
            results.fail_all(items, str(e), "perm")
            return
        except TemporaryDNSError as e:
            results.fail_all(items, f"451 4.4.3 DNS lookup for {domain} failed: {e}")
            return
        for route in routes:
            for address in route.addresses[:2]:
                pending = results.unfinished(items)
                if not pending:
                    return
                try:
                    yield transfer(self.clock, route, address, pending,
                                   self.config.server.hostname, self.config.outbound,
                                   self.tls_context, results)
                except (ConnectError, OSError) as e:
                    results.fail_all(pending, f"connect to {route.label(address)}: "
                                              f"{e.__class__.__name__}: {e}", "temp",
                                     route.label(address))

    @defer.inlineCallbacks
    def _finish(self, env: Envelope, results: Results):
        bounced, delayed, headers = yield self._run(self._record, env, results)
        if env.sender and bounced:
            self.notify(env, bounced, "failed", headers)
        if env.sender and delayed:
            self.notify(env, delayed, "delayed", headers)
        due = self._next_due(env)
        if due is not None:
            self._due[env.id] = due

    def _record(self, env: Envelope, results: Results):
        """Write the results into the envelope (blocking); returns what to notify."""
        now = time.time()
        queue = self.config.queue
        bounced, delayed = [], []
        for index, rcpt in env.pending():
            attempt = results.get(env.id, index)
            if rcpt.local or attempt is None:
                continue
            rcpt.reply, rcpt.relay = attempt.reply, attempt.relay
            rcpt.attempts += 1
            if attempt.kind == "sent":
                rcpt.status = "sent"
            elif attempt.kind == "perm":
                rcpt.status = "bounced"
            elif now - env.arrival >= queue.max_lifetime:
                rcpt.status = "bounced"
                rcpt.reply = f"{attempt.reply} (gave up: message older than " \
                             f"{queue.max_lifetime / 86400:g} days)"
            else:
                rcpt.next_attempt = now + backoff(self.config, rcpt.attempts)
            status = {"sent": "sent", "bounced": "bounced"}.get(rcpt.status, "deferred")
            if rcpt.status == "bounced":
                bounced.append(rcpt)
            log.info("{id}: to=<{to}>, relay={relay}, delay={delay:.1f}, tls={tls}, "
                     "status={status} ({reply})", id=env.id, to=rcpt.address,
                     relay=attempt.relay or "none", delay=now - env.arrival,
                     tls=attempt.tls or "no", status=status, reply=attempt.reply)
            self.metrics.delivery(status)
        waiting = [r for _, r in env.pending() if not r.local]
        if (queue.delay_warning > 0 and waiting and not env.extra.get("delay_warned")
                and now - env.arrival >= queue.delay_warning):
            env.extra["delay_warned"] = True
            delayed = waiting
        headers = b""
        if env.sender and (bounced or delayed):
            headers = self._original_headers(env)
        if env.pending():
            self.spool.update(env)
        else:
            self.spool.remove(env.id)
            log.info("{id}: removed", id=env.id)
        return bounced, delayed, headers

    def _original_headers(self, env: Envelope) -> bytes:
        try:
            with open(self.spool.message_path(env.id), "rb") as f:
                f.seek(env.body_offset)
                head = f.read(256 * 1024)
        except FileNotFoundError:
            return b""
        return head.split(b"\n\n", 1)[0]
