"""The SMTP listener: shared state of its sessions and the connection limits."""

from __future__ import annotations

from typing import Callable

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ServerFactory

from mailstack.auth.directory import Directory
from mailstack.config import Config
from mailstack.connections import TOO_MANY, ConnectionLimits
from mailstack.metrics import NULL_METRICS
from mailstack.queue.spool import Envelope, GroupCommit, Spool
from mailstack.smtp.reply import Reply
from mailstack.smtp.session import Session

TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Error: too many connections, try again later")
TOO_MANY_FROM_YOU = Reply(421, "4.7.0", "Error: too many connections from your address, "
                                        "try again later")


class SMTPFactory(ServerFactory):
    protocol = Session
    noisy = False
    #: Counts transactions (mailstack.metrics; the service sets its own).
    metrics = NULL_METRICS

    def __init__(self, config: Config, role: str, directory: Directory, spool: Spool,
                 queued: Callable[[Envelope], object], run_blocking: Callable[..., Deferred],
                 tls_context=None, implicit_tls: bool = False, portal=None,
                 login_guard=None, clock=None, policy=None, commits: GroupCommit | None = None):
        self.config = config
        self.hostname = config.server.hostname
        #: The 220 banner, made once: every connection sends it.
        self.greeting = Reply(220, "", f"{self.hostname} ESMTP mailstack")
        self.role = role
        self.directory = directory
        self.spool = spool
        #: Called with each envelope committed to the spool (starts delivery).
        self.queued = queued
        self.run_blocking = run_blocking
        #: Commits to the spool (the service shares one among its listeners).
        self.commits = commits or GroupCommit(spool, run_blocking)
        self.tls_context = tls_context
        self.implicit_tls = implicit_tls
        #: Submission: logins (the one cred Portal), failed logins per client
        #: address and account (shared with IMAP and POP3) and the clock for delays.
        self.portal = portal
        self.login_guard = login_guard
        self.clock = clock
        #: The inbound policy chain (mailstack.policy.chain.Chain), mx role only.
        self.policy = policy
        self.limits = ConnectionLimits(config.smtp.max_connections,
                                       config.smtp.max_connections_per_ip)

    def admit(self, session: Session) -> Reply | None:
        """Register a new session, or the 421 that refuses it."""
        refusal = self.limits.admit(session, session.client_ip)
        if refusal is None:
            return None
        return TOO_MANY_CONNECTIONS if refusal == TOO_MANY else TOO_MANY_FROM_YOU

    def release(self, session: Session) -> bool:
        """Forget a closed session; False if it was never admitted."""
        return self.limits.release(session)
