"""Local delivery (the MDA): from the spool into the recipients' Maildirs.

Each queued message is hard-linked into every local recipient's ``new/``
(``store.maildir``), the recipient is marked sent, and the spool entry is
removed once no recipient is left queued. Recipients on other servers stay
queued for the outbound runner, never dropped.

Deliveries are batched: messages committed while a batch is running wait
and go together in the next one. A batch opens each Maildir once, places
every message in ``new/``, fsyncs each ``new/`` once, and only then counts
those recipients as delivered (group commit). Under load that is one fsync
per Maildir per batch instead of one per message; with no load a batch is a
single message, delivered at once. With an fsync process (the usual case) a
batch of fresh deliveries runs on the reactor thread and only its fsyncs
leave it; otherwise, and for replays, a batch is one thread job.

After a restart the spool is replayed; a delivery whose Maildir file already
exists (found by its replay-stable base name) is not made twice, so every
acknowledged message arrives exactly once. Such a file may have been renamed
into ``new/`` just before the crash and not fsync'd yet, so ``new/`` is
fsync'd before it counts as delivered, like a fresh delivery.
"""

from __future__ import annotations

import time
from typing import Callable

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailstack.queue.fsync_process import FsyncProcess, error_of
from mailstack.queue.spool import Envelope, Spool
from mailstack.store.maildir import DeliveryTarget, MailRoot, delivery_base

log = Logger(namespace="mailstack.local")

RunBlocking = Callable[..., Deferred]

#: A log line made in the delivery thread and emitted on the reactor thread:
#: (level, format, fields).
Record = tuple[str, str, dict]


class LocalDelivery:
    #: Most messages in one batch (one thread job).
    max_batch = 256
    #: Batches running at once (each in a pool thread). One: under load the
    #: next batch gathers everything committed meanwhile, so there are fewer
    #: thread jobs and fsyncs of ``new/`` per message than with two (bench:
    #: about 6% more messages/s, 0.1 ms less CPU per message).
    max_batches = 1

    def __init__(self, spool: Spool, mail_root: MailRoot, hostname: str,
                 run_blocking: RunBlocking, clock, retry_delay: float = 60.0,
                 fsyncs: FsyncProcess | None = None):
        self.spool = spool
        #: The fsync process: with it, fresh deliveries run on the reactor.
        self.fsyncs = fsyncs
        #: Whether the spool's files can be linked into the Maildirs (found at
        #: the first batch, once the mail root exists).
        self._links: bool | None = None
        self.mail_root = mail_root
        self.hostname = hostname
        self._run = run_blocking
        self._clock = clock
        self.retry_delay = retry_delay
        self._retries: dict[str, object] = {}
        self._waiting: list[tuple[Envelope, bool, Deferred]] = []
        #: Ids of messages in a running batch (never in two batches at once).
        self._active: set[str] = set()
        self._batches = 0
        self._stopped = False

    def deliver(self, envelope: Envelope, replay: bool = False) -> Deferred:
        """Deliver the local recipients of a committed message, off the reactor.

        The Deferred fires (it never fails) when the attempt is over, with
        True if a local recipient is still waiting (a retry is scheduled).
        """
        d = Deferred()
        self._waiting.append((envelope, replay, d))
        self._start_batches()
        return d

    def recover(self) -> list[Deferred]:
        """Replay the spool after a start: resume every interrupted delivery."""
        return self.resume(self.spool.recover())

    def resume(self, envelopes: list[Envelope]) -> list[Deferred]:
        """Resume the local deliveries of envelopes found in the spool at start-up."""
        self._stopped = False
        return [self.deliver(env, replay=True) for env in envelopes
                if any(r.local for _, r in env.pending())]

    def release(self, queue_id: str) -> None:
        """Forget a message another process now owns: no retry of it here."""
        call = self._retries.pop(queue_id, None)
        if call is not None and call.active():
            call.cancel()

    def stop(self) -> None:
        """Start nothing more; what waits is still in the spool for the next start."""
        self._stopped = True
        for call in self._retries.values():
            if call.active():
                call.cancel()
        self._retries.clear()

    # -- batching (reactor thread) ------------------------------------------
    def _start_batches(self) -> None:
        while not self._stopped and self._waiting and self._batches < self.max_batches:
            batch, rest = [], []
            for job in self._waiting:
                if len(batch) < self.max_batch and job[0].id not in self._active:
                    batch.append(job)
                else:
                    rest.append(job)
            if not batch:
                return
            self._waiting = rest
            jobs: dict[str, tuple[Envelope, bool]] = {}
            for envelope, replay, _ in batch:
                previous = jobs.get(envelope.id)
                jobs[envelope.id] = (envelope, replay or (previous is not None and previous[1]))
            self._active.update(jobs)
            self._batches += 1
            work = list(jobs.values())
            if self._deliver_here(work):
                d = self._deliver_batch_here(work)
            else:
                d = self._run(self._deliver_batch, work)
            d.addBoth(self._batch_done, batch, list(jobs))

    def _deliver_here(self, jobs) -> bool:
        """Whether a batch runs on the reactor (``_deliver_batch_here``)."""
        if self.fsyncs is None or any(replay for _, replay in jobs):
            return False
        if self._links is None:
            self._links = self.mail_root.shares_file_system(self.spool.dir)
        return self._links

    def _batch_done(self, result, batch: list[tuple[Envelope, bool, Deferred]],
                    ids: list[str]) -> None:
        self._batches -= 1
        self._active.difference_update(ids)
        if isinstance(result, Failure):
            log.failure("local delivery of {n} message(s) failed", result, n=len(ids))
            failed, records = set(ids), []
        else:
            failed, records = result
        for level, fmt, fields in records:
            getattr(log, level)(fmt, **fields)
        for envelope, _, d in batch:
            retry = envelope.id in failed
            self._retries.pop(envelope.id, None)
            if retry and not self._stopped and envelope.id not in self._retries:
                self._retries[envelope.id] = self._clock.callLater(
                    self.retry_delay, self._retry, envelope)
            d.callback(retry)
        self._start_batches()

    def _retry(self, envelope: Envelope) -> None:
        self._retries.pop(envelope.id, None)
        self.deliver(envelope, replay=True)

    # -- the work -------------------------------------------------------------
    def _deliver_batch(self, jobs: list[tuple[Envelope, bool]]) -> tuple[set[str], list[Record]]:
        """In a pool thread: deliver a batch; returns the ids still waiting for
        a local recipient and the log lines to emit."""
        batch = _Batch(self, jobs)
        try:
            batch.place(copy=True)
            errors = {}
            for key, target in batch.targets.items():
                try:
                    target.sync()
                except OSError as e:
                    errors[key] = e
            batch.synced(errors)
        finally:
            batch.close()
        batch.update(batch.settle())
        return batch.result()

    @inlineCallbacks
    def _deliver_batch_here(self, jobs: list[tuple[Envelope, bool]]):
        """The same on the reactor thread, with the fsyncs of ``new/`` made by
        the fsync process: a batch of fresh deliveries is a few cheap calls
        per message (a link, a rename, an unlink), and made in a pool thread
        each of them would cost a GIL hand-off with the reactor (bench: 20%
        more messages/s). Replays (a directory listing per Maildir) and
        copies between file systems stay in the pool."""
        batch = _Batch(self, jobs)
        try:
            batch.place(copy=False)
            keys = list(batch.targets)
            codes = yield self.fsyncs.fsync([batch.targets[key].new_fd for key in keys])
            batch.synced({key: error_of(code) for key, code in zip(keys, codes) if code})
        finally:
            batch.close()
        stale = batch.settle()
        if stale:
            yield self._run(batch.update, stale)
        return batch.result()


class _Batch:
    """One batch of deliveries, in the steps both ways of running it share:
    ``place`` every message, fsync each ``new/`` once (group commit: one fsync
    per Maildir makes the whole batch durable), ``synced``, ``close``, then
    ``settle`` the spool entries (and ``update`` those still waiting)."""

    def __init__(self, delivery: LocalDelivery, jobs: list[tuple[Envelope, bool]]):
        self.delivery = delivery
        self.jobs = jobs
        self.records: list[Record] = []
        self.failed: set[str] = set()
        #: By (address, folder): a quarantined message goes to the user's .Junk.
        self.targets: dict[tuple[str, str], DeliveryTarget] = {}
        self.broken: dict[tuple[str, str], Exception] = {}
        self.placed: list = []

    def place(self, copy: bool) -> None:
        """Put every pending local recipient's copy into its ``new/``; with
        ``copy`` False a file that cannot be hard-linked fails (and is retried)."""
        delivery = self.delivery
        for envelope, replay in self.jobs:
            source = delivery.spool.message_path(envelope.id)
            for index, rcpt in envelope.pending():
                if not rcpt.local:
                    continue
                started = time.time()
                try:
                    key = (rcpt.address, rcpt.folder)
                    target = self.targets.get(key)
                    if target is None:
                        if key in self.broken:
                            raise self.broken[key]
                        try:
                            target = delivery.mail_root.maildir(*key).open_delivery()
                        except (OSError, ValueError) as e:
                            self.broken[key] = e
                            raise
                        self.targets[key] = target
                    base = delivery_base(envelope.arrival, envelope.id, index, delivery.hostname)
                    if replay and target.has_delivery(base):
                        result = "already delivered before restart"
                    else:
                        target.place(source, base, envelope.size, envelope.wsize, copy)
                        result = "delivered to maildir" + (
                            f" folder {rcpt.folder}" if rcpt.folder else "")
                except (OSError, ValueError) as e:
                    self.failed.add(envelope.id)
                    self.records.append(_deferred(envelope, rcpt, e))
                    continue
                self.placed.append((envelope, rcpt, result, started))

    def synced(self, errors: dict[tuple[str, str], Exception]) -> None:
        """Each ``new/`` is fsync'd but those in ``errors``: count the
        recipients there as delivered."""
        self.broken.update(errors)
        for envelope, rcpt, result, started in self.placed:
            if (rcpt.address, rcpt.folder) in self.broken:
                self.failed.add(envelope.id)
                self.records.append(_deferred(envelope, rcpt, self.broken[rcpt.address, rcpt.folder]))
                continue
            rcpt.status = "sent"
            now = time.time()
            self.records.append((
                "info", "{id}: to=<{to}>, orig_to=<{orig}>, relay=local, delay={delay:.2f}, "
                "delays={spent:.3f}, status=sent ({result})",
                dict(id=envelope.id, to=rcpt.address, orig=rcpt.original,
                     delay=now - envelope.arrival, spent=now - started, result=result)))

    def close(self) -> None:
        for target in self.targets.values():
            target.close()

    def settle(self) -> list[Envelope]:
        """Remove the spool entries with nobody left to deliver to; returns
        those to rewrite for the recipients still waiting."""
        delivered = {id(envelope) for envelope, *_ in self.placed}
        stale = []
        for envelope, replay in self.jobs:
            if envelope.pending():
                if id(envelope) in delivered or replay:
                    stale.append(envelope)
                continue
            try:
                self.delivery.spool.remove(envelope.id)
                self.records.append(("info", "{id}: removed", dict(id=envelope.id)))
            except OSError as e:
                self._not_updated(envelope, e)
        return stale

    def update(self, envelopes: list[Envelope]) -> None:
        """Blocking: rewrite these envelopes. The outbound runner reads the
        envelope from disk: it must see the local recipients done before it
        takes over."""
        for envelope in envelopes:
            try:
                self.delivery.spool.update(envelope)
            except OSError as e:
                self._not_updated(envelope, e)

    def _not_updated(self, envelope: Envelope, error: OSError) -> None:
        self.failed.add(envelope.id)
        self.records.append(("error", "{id}: cannot update the spool entry: {err}",
                             dict(id=envelope.id, err=error)))

    def result(self) -> tuple[set[str], list[Record]]:
        return self.failed, self.records


def _deferred(envelope: Envelope, rcpt, error: Exception) -> Record:
    reason = getattr(error, "strerror", None) or str(error)
    return ("warn", "{id}: to=<{to}>, orig_to=<{orig}>, relay=local, delay={delay:.2f}, "
            "status=deferred ({reason})",
            dict(id=envelope.id, to=rcpt.address, orig=rcpt.original,
                 delay=time.time() - envelope.arrival, reason=reason))
