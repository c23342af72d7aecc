"""The policy chain: the configured checkers, run stage by stage for a session.

``build_chain`` makes the checkers named in ``[policy] checkers`` (built-in
names or dotted paths of third-party classes, each constructed as
``Class(settings, env)`` and verified against ``IChecker``).
``Chain.session`` gives each SMTP session a ``SessionPolicy``, which the
session calls at connect, HELO, MAIL, RCPT and the end of data; each call
answers a Deferred that fires with the ``Reply`` to send instead of the
normal one, or None.

Clients in ``trusted_networks`` and authenticated sessions skip the chain
entirely (Postfix's ``permit_mynetworks, permit_sasl_authenticated``).

Each stage has a time budget (``stage_timeout``); when it runs out, or a
checker fails with an unexpected error, the answer is a 4xx, never a pass
and never a permanent reject (DESIGN invariant 6; STYLE 4 "our fault: 451").
"""

from __future__ import annotations

import importlib
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from twisted.internet import defer
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger
from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

from mailstack.config import Config, ConfigError
from mailstack.metrics import NULL_METRICS
from mailstack.policy.interface import (
    STAGES, Action, Connection, Environment, IChecker, Message, Transaction, Verdict)
from mailstack.policy.message import MessageBuffer, claims_authserv_id, fold, header_lines
from mailstack.smtp.reply import Reply

log = Logger(namespace="mailstack.policy")

#: Built-in checkers by their config name.
BUILTIN = {
    "lists": "mailstack.policy.lists.ListsChecker",
    "ratelimit": "mailstack.policy.ratelimit.RateLimitChecker",
    "dnsbl": "mailstack.policy.dnsbl.DNSBLChecker",
    "spf": "mailstack.policy.spf.SPFChecker",
    "greylist": "mailstack.policy.greylist.GreylistChecker",
    "dkim": "mailstack.policy.dkim.DKIMChecker",
    "arc": "mailstack.policy.arc.ARCChecker",
    "dmarc": "mailstack.policy.dmarc.DMARCChecker",
}

_METHODS = {"connect": "connect", "helo": "helo", "mail": "mail_from", "rcpt": "rcpt_to",
            "data": "end_of_data"}

LOCAL_ERROR = Reply(451, "4.3.0", "Error: local error in policy checks, try again later")
TIMED_OUT = Reply(451, "4.4.3", "Error: policy checks timed out, try again later")


def load_class(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def build_chain(config: Config, resolver, clock, run_blocking) -> Chain:
    """The chain of ``config``; raises ConfigError when a checker cannot be made."""
    policy = config.policy
    state_dir = policy.state_dir or (config.server.spool_dir / "policy")
    # Checks may hold pool threads for a whole DNS timeout each; they get at
    # most half the pool, so spool commits and deliveries always find a thread
    # even when a block list's servers stop answering.
    slots = defer.DeferredSemaphore(max(1, config.server.threads // 2))

    def run_checks(f, *args, **kwargs) -> Deferred:
        return slots.run(run_blocking, f, *args, **kwargs)

    env = Environment(resolver=resolver, clock=clock, run_blocking=run_checks,
                      hostname=config.server.hostname,
                      authserv_id=policy.authserv_id or config.server.hostname,
                      state_dir=Path(state_dir), local_domains=config.server.domains)
    checkers = []
    source = config.source or "config"
    for name in policy.checkers:
        if name in BUILTIN:
            settings, path = getattr(policy, name), BUILTIN[name]
        else:
            settings, path = dict(policy.plugins.get(name, {})), name
        try:
            checker = load_class(path)(settings, env)
            verifyObject(IChecker, checker)
        except (ImportError, AttributeError) as e:
            raise ConfigError(source, [f"policy.checkers: cannot load {name!r}: {e}"]) from None
        except Invalid as e:
            raise ConfigError(source, [f"policy.checkers: {name!r} does not provide "
                                       f"IChecker: {e}"]) from None
        except (ValueError, OSError) as e:
            raise ConfigError(source, [f"policy.{name}: {e}"]) from None
        unknown = set(checker.stages) - set(STAGES)
        if unknown:
            raise ConfigError(source, [f"policy.checkers: {name!r} names unknown stages "
                                       f"{sorted(unknown)}"])
        checkers.append(checker)
    names = list(policy.checkers)
    if "dmarc" in names and not {"spf", "dkim"} <= set(names[:names.index("dmarc")]):
        raise ConfigError(source, ["policy.checkers: dmarc needs spf and dkim before it "
                                   "(it reads their results)"])
    trusted = [ipaddress.ip_network(n, strict=False) for n in policy.trusted_networks]
    return Chain(checkers, env, trusted, policy.stage_timeout)


class Chain:
    #: Counts verdicts and results (mailstack.metrics; the service sets its own).
    metrics = NULL_METRICS

    def __init__(self, checkers: list, env: Environment, trusted=(), stage_timeout: float = 60.0):
        self.checkers = list(checkers)
        self.env = env
        self.trusted = list(trusted)
        self.stage_timeout = stage_timeout
        self.by_stage = {stage: [c for c in self.checkers if stage in c.stages]
                         for stage in STAGES}

    def is_trusted(self, ip: str) -> bool:
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in net for net in self.trusted)

    def session(self, client_ip: str, client_port: int = 0, tls: bool = False) -> SessionPolicy:
        conn = Connection(client_ip, client_port, tls=tls, trusted=self.is_trusted(client_ip))
        return SessionPolicy(self, conn)

    def checker(self, name: str):
        return next((c for c in self.checkers if c.name == name), None)

    def close(self) -> None:
        for checker in self.checkers:
            try:
                checker.close()
            except Exception:
                log.failure("policy: closing {name} failed", name=checker.name)


@dataclass
class Outcome:
    """What the end-of-data checks decided."""

    #: The error reply (DEFER or REJECT), or None to accept.
    reply: Reply | None = None
    #: Header lines to put in front of the message (LF-free, folded).
    header_lines: list[str] = field(default_factory=list)
    #: The Maildir++ folder for the local recipients ("" for INBOX).
    folder: str = ""
    #: Why the message goes to ``folder``.
    reason: str = ""
    #: Header fields to leave out of the stored message (forged A-R).
    drop: Callable[[str, str], bool] | None = None


JUNK = ".Junk"


class SessionPolicy:
    """The chain as one SMTP session uses it."""

    def __init__(self, chain: Chain, conn: Connection):
        self.chain = chain
        self.conn = conn
        self.txn: Transaction | None = None
        #: Result clauses found at connect and at the last HELO, copied into
        #: each transaction.
        self._connect_results: list = []
        self._helo_results: list = []

    @property
    def active(self) -> bool:
        return bool(self.chain.checkers) and not self.conn.trusted and not self.conn.user

    # -- stages ----------------------------------------------------------------
    def connect(self) -> Deferred:
        return self._stage("connect", self._connect_results, lambda c: c.connect(self.conn))

    def helo(self, name: str) -> Deferred:
        self.conn.helo = name
        self._helo_results = []
        return self._stage("helo", self._helo_results, lambda c: c.helo(self.conn))

    def authenticated(self, user: str) -> None:
        """SMTP AUTH succeeded: the chain no longer applies to this session."""
        self.conn.user = user

    def mail(self, sender: str) -> Deferred:
        self.txn = Transaction(sender, results=self._connect_results + self._helo_results)
        txn = self.txn
        return self._stage("mail", txn.results, lambda c: c.mail_from(self.conn, txn), txn)

    def rcpt(self, recipient: str) -> Deferred:
        txn = self.txn
        if txn is None:
            return defer.succeed(None)
        d = self._stage("rcpt", txn.results, lambda c: c.rcpt_to(self.conn, txn, recipient), txn)

        def accepted(reply):
            if reply is None:
                txn.recipients.append(recipient)
            return reply

        return d.addCallback(accepted)

    def message_buffer(self, tmp_dir: Path | str | None = None) -> MessageBuffer | None:
        """Where DATA should put the message, or None when no check needs it."""
        if not self.active or self.txn is None:
            return None
        return MessageBuffer(tmp_dir)

    def end_of_data(self, buffer: MessageBuffer) -> Deferred:
        """Run the end-of-data checks on the buffered message; Deferred[Outcome]."""
        txn = self.txn
        self.txn = None
        if txn is None or not self.active:
            return defer.succeed(Outcome())
        if self.chain.by_stage["data"]:
            d = (defer.succeed(buffer.read()) if buffer.in_memory
                 else self.chain.env.run_blocking(buffer.read))
            d.addCallback(lambda data: self._stage(
                "data", txn.results, lambda c: c.end_of_data(self.conn, txn, Message(data)), txn))
        else:
            d = defer.succeed(None)
        d.addCallback(self._outcome, txn)
        return d

    def _outcome(self, reply: Reply | None, txn: Transaction) -> Outcome:
        authserv_id = self.chain.env.authserv_id
        outcome = Outcome(reply=reply, drop=lambda name, value: claims_authserv_id(
            name, value, authserv_id))
        if reply is not None:
            return outcome
        parts = [authserv_id] + ([str(r) for r in txn.results] or ["none"])
        outcome.header_lines = header_lines("Authentication-Results", parts)
        for name, value in txn.headers:
            outcome.header_lines += fold(name, value)
        quarantine = txn.quarantine or self.conn.quarantine
        if quarantine:
            outcome.folder, outcome.reason = JUNK, quarantine
        return outcome

    # -- running one stage -------------------------------------------------------
    def _stage(self, stage: str, results: list, call, txn: Transaction | None = None) -> Deferred:
        if not self.active or not self.chain.by_stage[stage]:
            return defer.succeed(None)
        d = self._run(stage, results, call, txn)
        d.addTimeout(self.chain.stage_timeout, self.chain.env.clock,
                     onTimeoutCancel=lambda *_: self._timed_out(stage))
        return d

    def _timed_out(self, stage: str) -> Reply:
        log.warn("policy: {stage} checks for [{ip}] took longer than {t}s", stage=stage,
                 ip=self.conn.client_ip, t=self.chain.stage_timeout)
        return TIMED_OUT

    @inlineCallbacks
    def _run(self, stage: str, results: list, call, txn: Transaction | None):
        for checker in self.chain.by_stage[stage]:
            try:
                verdict = yield call(checker)
                if not isinstance(verdict, Verdict):
                    raise TypeError(f"{checker.name} answered {verdict!r}, not a Verdict")
            except defer.CancelledError:
                raise
            except Exception:
                log.failure("policy: {name} failed at {stage} for [{ip}]", name=checker.name,
                            stage=stage, ip=self.conn.client_ip)
                return LOCAL_ERROR
            results.extend(verdict.results)
            self.chain.metrics.policy_verdict(checker.name, verdict)
            if txn is not None:
                txn.headers.extend(verdict.headers)
            if verdict.action is Action.CONTINUE:
                continue
            log.info("policy: {name}: {action} at {stage} for [{ip}]{why}", name=checker.name,
                     action=verdict.action.value, stage=stage, ip=self.conn.client_ip,
                     why=self._why(verdict))
            if verdict.action is Action.ACCEPT:
                break
            if verdict.action is Action.QUARANTINE:
                reason = verdict.reason or checker.name
                if txn is not None:
                    txn.quarantine = txn.quarantine or reason
                else:
                    self.conn.quarantine = self.conn.quarantine or reason
                continue
            return Reply(verdict.code, verdict.enhanced, verdict.text)
        return None

    @staticmethod
    def _why(verdict: Verdict) -> str:
        if verdict.final:
            return f": {verdict.code} {verdict.enhanced} {verdict.text}"
        return f": {verdict.reason}" if verdict.reason else ""
