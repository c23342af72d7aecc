"""Local delivery (the MDA): from the spool into the recipients' Maildirs.

Each queued message is hard-linked into every local recipient's ``new/``
(``store.maildir``), the recipient is marked sent, and the spool entry is
removed once no recipient is left queued. Recipients on other servers stay
queued for the outbound runner, never dropped.

After a restart the spool is replayed; a delivery whose Maildir file already
exists (found by its replay-stable base name) is not made twice, so every
acknowledged message arrives exactly once.
"""

from __future__ import annotations

import time
from typing import Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mailstack.queue.spool import Envelope, Spool
from mailstack.store.maildir import MailRoot, delivery_base

log = Logger(namespace="mailstack.local")

RunBlocking = Callable[..., Deferred]


class LocalDelivery:
    def __init__(self, spool: Spool, mail_root: MailRoot, hostname: str,
                 run_blocking: RunBlocking, clock, retry_delay: float = 60.0):
        self.spool = spool
        self.mail_root = mail_root
        self.hostname = hostname
        self._run = run_blocking
        self._clock = clock
        self.retry_delay = retry_delay
        self._retries: dict[str, object] = {}

    def deliver(self, envelope: Envelope, replay: bool = False) -> Deferred:
        """Deliver the local recipients of a committed message, off the reactor."""
        d = self._run(self._deliver_blocking, envelope, replay)
        d.addCallback(self._delivered, envelope)
        return d

    def recover(self) -> list[Deferred]:
        """Replay the spool after a start: resume every interrupted delivery."""
        return self.resume(self.spool.recover())

    def resume(self, envelopes: list[Envelope]) -> list[Deferred]:
        """Resume the local deliveries of envelopes found in the spool at start-up."""
        return [self.deliver(env, replay=True) for env in envelopes
                if any(r.local for _, r in env.pending())]

    def stop(self) -> None:
        for call in self._retries.values():
            if call.active():
                call.cancel()
        self._retries.clear()

    def _deliver_blocking(self, envelope: Envelope, replay: bool) -> bool:
        """Returns whether a local recipient is still waiting (a retry is due)."""
        source = self.spool.message_path(envelope.id)
        changed = failed = False
        for index, rcpt in envelope.pending():
            if not rcpt.local:
                continue
            started = time.time()
            # A quarantined message goes to the recipient's .Junk folder.
            maildir = self.mail_root.maildir(rcpt.address, rcpt.folder)
            base = delivery_base(envelope.arrival, envelope.id, index, self.hostname)
            try:
                if replay and maildir.has_delivery(base):
                    result = "already delivered before restart"
                else:
                    maildir.deliver(source, base, envelope.size, envelope.wsize)
                    result = "delivered to maildir" + (
                        f" folder {rcpt.folder}" if rcpt.folder else "")
            except OSError as e:
                failed = True
                log.warn("{id}: to=<{to}>, orig_to=<{orig}>, relay=local, delay={delay:.2f}, "
                         "status=deferred ({reason})", id=envelope.id, to=rcpt.address,
                         orig=rcpt.original, delay=time.time() - envelope.arrival,
                         reason=e.strerror or str(e))
                continue
            rcpt.status = "sent"
            changed = True
            log.info("{id}: to=<{to}>, orig_to=<{orig}>, relay=local, delay={delay:.2f}, "
                     "delays={spent:.3f}, status=sent ({result})", id=envelope.id,
                     to=rcpt.address, orig=rcpt.original, delay=time.time() - envelope.arrival,
                     spent=time.time() - started, result=result)
        if not envelope.pending():
            self.spool.remove(envelope.id)
            log.info("{id}: removed", id=envelope.id)
        elif changed:
            self.spool.update(envelope)
        return failed

    def _delivered(self, failed: bool, envelope: Envelope) -> None:
        self._retries.pop(envelope.id, None)
        if failed:
            self._retries[envelope.id] = self._clock.callLater(
                self.retry_delay, self.deliver, envelope, True)
