"""Config -> one MultiService: the listeners, the thread pool and local delivery."""

from __future__ import annotations

import os
import resource
import signal
import stat
import threading
import time

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.threads import deferToThreadPool
from twisted.logger import ILogObserver, Logger
from twisted.python.threadpool import ThreadPool

from mailstack import tls, transport
from twisted.cred.portal import Portal
from twisted.mail.interfaces import IAccountIMAP, IMailboxPOP3

from mailstack.auth.aliases import Aliases
from mailstack.auth.checker import PasswordChecker
from mailstack.auth.limiter import FailureLimiter, LoginGuard
from mailstack.auth.realm import MailRealm
from mailstack.auth.directory import Directory
from mailstack.auth.users import Users
from mailstack.config import Config, Listener
from mailstack.queue.fsync_process import FsyncProcess
from mailstack.queue.local import LocalDelivery
from mailstack.metrics import Metrics
from mailstack.dns import Resolver
from mailstack.policy.chain import build_chain
from mailstack.imap.server import IMAPFactory, open_account
from mailstack.pop3.mailbox import Maildrop, MaildropCache
from mailstack.pop3.server import POP3Factory
from mailstack.queue.bounce import build_dsn
from mailstack.queue.runner import OutboundRunner
from mailstack.queue.spool import (Envelope, GroupCommit, Recipient, Spool, SpoolLocked,
                                   new_queue_id)
from mailstack.smtp.server import SMTPFactory
from mailstack.smtp.submission import ISender
from mailstack.store.folder import user_inbox
from mailstack.store.folders import Mailboxes
from mailstack.store.index import IndexRegistry
from mailstack.store.watch import FolderWatcher
from mailstack.store.maildir import MailRoot
from mailstack.workers import (AdoptedEndpoint, Handoff, WorkerPool, WorkerRole,
                               worker_spool_dir, worker_spools)

log = Logger(namespace="mailstack")


class ListenerService(Service):
    """Binds one listener in ``privilegedStartService`` (before privileges drop).

    A bind failure raises there, so twistd stops at start-up with the reason
    instead of running without the port.
    """

    def __init__(self, spec: Listener, endpoint, factory):
        self.spec = spec
        self.endpoint = endpoint
        self.factory = factory
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        failures = []
        d = self.endpoint.listen(self.factory)
        d.addCallbacks(self._listening, failures.append)
        if failures:
            failures[0].raiseException()

    def _listening(self, port: IListeningPort) -> None:
        self.port = port
        host = port.getHost()
        log.info("listening for {proto} on {host}:{port}", proto=self.spec.protocol,
                 host=host.host, port=host.port)

    def stopService(self) -> Deferred | None:
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()
        return None


def raise_open_files_limit() -> None:
    """Raise the soft limit on open files to the hard one.

    Every connection is a descriptor, and each commit in flight holds two
    more (its spool files, open until their batch is fsync'd): the usual
    soft limit of 1024 is below the default ``max_connections`` of SMTP,
    IMAP and POP3 together, and running out answers clients with 4xx errors.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= target:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as e:
        log.warn("cannot raise the open files limit from {soft}: {err}", soft=soft, err=e)
        return
    log.info("open files limit raised from {soft} to {target}", soft=soft, target=target)


class MailstackService(MultiService):
    #: Signal handlers replaced by ours while running (restored at stop).
    _previous_signals: dict = {}
    #: The observer twistd should log through (mailstack.logs), set by the plugin.
    log_observer = None

    def __init__(self, config: Config, reactor=None, worker: WorkerRole | None = None):
        """``worker``: run as an SMTP worker process (mailstack.workers): the mx
        listeners only, on sockets inherited from the main process, with a
        spool of its own, handing remote recipients to the main process."""
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.config = config
        self.worker = worker
        server = config.server
        self.pool = ThreadPool(minthreads=0, maxthreads=server.threads, name="mailstack")
        self.users = Users(server.users_file, reactor)
        self.directory = Directory(server.domains, self.users,
                                   Aliases(server.aliases_file, reactor))
        self.mail_root = MailRoot(server.mail_root)
        if worker is None:
            self.spool = Spool(server.spool_dir)
        else:
            self.spool = Spool(worker_spool_dir(server.spool_dir, worker.index))
        self.spool.open()
        self.fsyncs = FsyncProcess(reactor, self.run_blocking) if server.fsync_process else None
        self.commits = GroupCommit(self.spool, self.run_blocking, self.fsyncs)
        #: Prometheus metrics of this service (its own registry), served at /metrics.
        self.metrics = Metrics(self.spool)
        self.tls_context = tls.server_context(config.tls)
        self.resolver = Resolver(config.dns, self.run_blocking)
        #: Inbound checks (SPF, DKIM, DMARC, greylisting, ...) for the mx listeners.
        self.policy = build_chain(config, self.resolver, reactor, self.run_blocking)
        self.policy.metrics = self.metrics
        if worker is None:
            self.outbound = OutboundRunner(config, self.spool, self.resolver, reactor,
                                           self.run_blocking,
                                           tls.client_context(config.outbound),
                                           self.notify_sender)
        else:
            self.outbound = Handoff(self.spool, Spool(server.spool_dir), worker.channel,
                                    self.run_blocking)
        self.outbound.metrics = self.metrics
        self.local = LocalDelivery(self.spool, self.mail_root, server.hostname,
                                   self.run_blocking, reactor, config.queue.retry_delay,
                                   self.fsyncs)
        #: IMAP: the per-folder indexes shared by all sessions, and the IDLE watcher.
        self.imap_indexes = IndexRegistry()
        self.imap_watcher = FolderWatcher(reactor, config.imap.poll_interval)
        #: Logged-in IMAP sessions by user, over all IMAP listeners.
        self.imap_user_sessions: dict[str, int] = {}
        realm = MailRealm({IMailboxPOP3: self._open_maildrop,
                           IAccountIMAP: self._open_imap_account,
                           ISender: lambda address: (address, lambda: None)})
        self.portal = Portal(realm, [PasswordChecker(self.users, self.run_blocking,
                                                     config.auth.max_concurrent_checks)])
        auth = config.auth
        #: Failed logins per client address and per account, shared by every protocol.
        self.login_guard = LoginGuard(
            FailureLimiter(auth.max_failures_per_ip, auth.failure_window, reactor),
            FailureLimiter(auth.max_failures_per_account, auth.failure_window, reactor))
        #: POP3 sizes and listings, so a login reads each file once and an unchanged
        #: maildrop's directories not at all.
        self._pop3_cache = MaildropCache()
        self.listeners: list[ListenerService] = []
        for i, spec in enumerate(config.listen):
            if worker is not None:
                if i not in worker.sockets:
                    continue
                endpoint = AdoptedEndpoint(reactor, worker.sockets[i], spec.address)
            else:
                endpoint = self._endpoint(spec)
            factory = self._factory(spec)
            self.metrics.instrument(factory, spec.protocol)
            listener = ListenerService(spec, endpoint, factory)
            listener.setServiceParent(self)
            self.listeners.append(listener)
        #: The SMTP worker processes ([smtp] processes), started once the listeners are bound.
        self.workers: WorkerPool | None = None
        if worker is None and config.smtp.processes > 1:
            self.workers = WorkerPool(self, config.smtp.processes)
            self.workers.setServiceParent(self)

    def run_blocking(self, f, *args, **kwargs) -> Deferred:
        """Run blocking work (fsync, hashing) in the bounded pool."""
        return deferToThreadPool(self.reactor, self.pool, f, *args, **kwargs)

    def _endpoint(self, spec: Listener) -> transport.ServerEndpoint:
        return transport.ServerEndpoint(self.reactor, spec.port, spec.address,
                                        self.tls_context if spec.implicit_tls else None)

    def _factory(self, spec: Listener):
        if spec.speaks == "http":
            from mailstack.web.site import build_site
            return build_site(self.config, self.metrics, self.run_blocking, self.port_of)
        if spec.speaks == "imap":
            return IMAPFactory(self.config, self.portal, self.login_guard, self.reactor,
                               self.run_blocking, self.imap_watcher, self.tls_context,
                               spec.implicit_tls, user_sessions=self.imap_user_sessions)
        if spec.speaks == "pop3":
            return POP3Factory(self.config, self.portal, self.login_guard, self.reactor,
                               self.tls_context, spec.implicit_tls)
        return SMTPFactory(self.config, spec.role, self.directory, self.spool, self.queued,
                           self.run_blocking, self.tls_context, spec.implicit_tls,
                           self.portal, self.login_guard, self.reactor,
                           policy=self.policy if spec.role == "mx" else None,
                           commits=self.commits)

    def _open_maildrop(self, address: str) -> Deferred:
        """The POP3 avatar: the locked INBOX snapshot, built off the reactor."""
        folder = user_inbox(self.mail_root.maildir(address))
        d = self.run_blocking(Maildrop.open, address, folder, self._pop3_cache)
        return d.addCallback(lambda maildrop: (maildrop, maildrop.logout))

    def _open_imap_account(self, address: str) -> Deferred:
        """The IMAP avatar; the first login creates the special-use mailboxes."""
        mailboxes = Mailboxes(self.mail_root.maildir(address), self.imap_indexes,
                              self.config.imap.max_mailboxes)
        d = self.run_blocking(open_account, address, mailboxes, self.run_blocking)
        return d.addCallback(lambda account: (account, lambda: None))

    def queued(self, envelope: Envelope, replay: bool = False) -> None:
        """A message was committed to the spool (or taken over with ``replay``):
        deliver locally, then remotely.

        In an SMTP worker "remotely" means handing the message to the main
        process, which then owns it whole: a local retry still pending here
        is dropped, the main process makes it.
        """
        pending = [r for _, r in envelope.pending()]
        remote = any(not r.local for r in pending)
        if any(r.local for r in pending):
            d = self.local.deliver(envelope, replay)
            if remote:
                if self.worker is not None:
                    d.addCallback(lambda _: self.local.release(envelope.id))
                d.addCallback(lambda _: self.outbound.schedule(envelope.id))
        elif remote:
            self.outbound.schedule(envelope.id)

    def handed_over(self, queue_id: str) -> None:
        """An SMTP worker moved a message into our spool: finish it here."""
        d = self.run_blocking(self.spool.load, queue_id)
        d.addCallbacks(self.queued, lambda f: log.failure("{id}: cannot load", f, id=queue_id),
                       callbackKeywords={"replay": True})

    def inject(self, sender: str, recipients: list[str], message: bytes) -> Deferred:
        """Queue a message made here (a bounce): same spool, same deliveries."""
        destinations = []
        for address in recipients:
            domain = address.rpartition("@")[2]
            if self.directory.is_local_domain(domain):
                for dest in self.directory.resolve(address) or []:
                    destinations.append(Recipient(dest.address, address, dest.local))
            else:
                destinations.append(Recipient(address, address, False))
        if not destinations:
            log.warn("dropping a notification to <{rcpts}>: no such local recipient",
                     rcpts=",".join(recipients))
            return defer.succeed(None)
        queue_id = new_queue_id()
        writer = self.spool.writer(queue_id)
        writer.write_line(f"Return-Path: <{sender}>".encode())
        offset = writer.size
        for line in message.rstrip(b"\n").split(b"\n"):
            writer.write_line(line)
        envelope = Envelope(id=queue_id, sender=sender, recipients=destinations,
                            arrival=time.time(), client="local", body_offset=offset)
        d = self.commits.commit(writer, envelope)

        def committed(_):
            log.info("{id}: from=<{sender}>, to=<{rcpts}>, size={size}, origin=local, "
                     "result=queued", id=queue_id, sender=sender,
                     rcpts=">,<".join(r.address for r in destinations), size=envelope.size)
            self.queued(envelope)
            return envelope

        return d.addCallback(committed)

    def notify_sender(self, envelope: Envelope, recipients: list[Recipient], action: str,
                      headers: bytes) -> None:
        """Send the envelope sender a DSN about ``recipients`` (failed or delayed)."""
        if not envelope.sender:
            return  # never a bounce for a bounce (RFC 5321 6.1)
        dsn = build_dsn(self.config.server.hostname, envelope, recipients, headers, action)
        d = self.inject("", [envelope.sender], dsn)
        d.addErrback(lambda f: log.failure("{id}: cannot queue the DSN", f, id=envelope.id))

    def port_of(self, protocol: str) -> int:
        """The bound port of the first listener for ``protocol`` (tests use port 0)."""
        for listener in self.listeners:
            if listener.spec.protocol == protocol and listener.port is not None:
                return listener.port.getHost().port
        raise KeyError(protocol)

    def reload(self) -> None:
        """SIGHUP: read the TLS certificate and key again (sessions stay)."""
        if self.workers is not None:
            self.workers.signal(signal.SIGHUP)
        if self.tls_context is None:
            return
        try:
            self.tls_context.reload()
        except tls.TLSSetupError as e:
            log.error("TLS reload failed, keeping the previous certificate: {err}", err=e)
        else:
            log.info("TLS certificate and key reloaded from {cert}",
                     cert=self.config.tls.certificate)

    def reopen_log(self) -> None:
        """SIGUSR1 (logrotate): open the log file again, here and in the workers."""
        if self.workers is not None:
            self.workers.signal(signal.SIGUSR1)
        if hasattr(self.log_observer, "reopen"):
            self.log_observer.reopen()

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        handlers = {signal.SIGHUP: self.reload, signal.SIGUSR1: self.reopen_log}
        self._previous_signals = {
            signum: signal.signal(signum, lambda *_, run=run: self.reactor.callFromThread(run))
            for signum, run in handlers.items()}

    def _restore_signals(self) -> None:
        previous, self._previous_signals = self._previous_signals, {}
        if threading.current_thread() is threading.main_thread():
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def check_modes(self) -> list[str]:
        """Warn about secrets and mail that other local users could read.

        Directories that group or others may enter, key and password files
        that group or others may read (a TLS key may be group-readable:
        root:mail 0640 is how the README's certbot hook installs it).
        """
        server, problems = self.config.server, []

        def check(path, mask: int, what: str) -> None:
            try:
                st = os.stat(path)
            except OSError:
                return
            mode = st.st_mode & 0o777
            if mode & mask:
                want = "0700" if stat.S_ISDIR(st.st_mode) else "0600"
                problems.append(f"{what} {path} has mode {mode:04o}; use {want}")

        check(server.mail_root, 0o077, "mail root directory")
        check(server.spool_dir, 0o077, "spool directory")
        check(server.users_file, 0o077, "users file")
        if self.config.tls.private_key is not None:
            check(self.config.tls.private_key, 0o007, "TLS private key")
        keys_dir = self.config.dkim.keys_dir
        try:
            domains = sorted(p for p in keys_dir.iterdir() if p.is_dir())
        except OSError:
            domains = []
        for domain in domains:
            check(domain, 0o077, "DKIM key directory")
            for key in sorted(domain.iterdir()):
                check(key, 0o077, "DKIM private key")
        for problem in problems:
            log.warn("insecure permissions: {problem}", problem=problem)
        return problems

    def setServiceParent(self, parent) -> None:
        """Under twistd the parent is the application, which twistd asks for
        its log observer once the plugin has made this service."""
        super().setServiceParent(parent)
        if self.log_observer is not None:
            parent.setComponent(ILogObserver, self.log_observer)

    def adopt_worker_spool(self, index: int) -> Deferred:
        """Take over what a dead SMTP worker acknowledged and had not delivered."""
        d = self.run_blocking(self._take_spool, worker_spool_dir(self.config.server.spool_dir,
                                                                 index))
        d.addCallback(lambda envelopes: [self.queued(e, replay=True) for e in envelopes])
        d.addErrback(lambda f: log.failure("cannot take over SMTP worker {n}'s spool", f,
                                           n=index))
        return d

    def _take_spool(self, directory, wait: float = 10.0) -> list[Envelope]:
        """``Spool.take_all`` under the other spool's lock: a worker that is still
        ending (its main process died) gets ``wait`` seconds to let go."""
        other = Spool(directory)
        deadline = time.monotonic() + wait
        while True:
            try:
                other.open()
                break
            except SpoolLocked:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        try:
            envelopes = self.spool.take_all(other)
        finally:
            other.close()
        if envelopes:
            log.info("took over {n} message(s) from {dir}", n=len(envelopes), dir=str(directory))
        return envelopes

    def _resume(self, envelopes: list[Envelope]) -> None:
        pending = self.local.resume(envelopes)
        if pending:
            log.info("resuming {n} interrupted local deliveries", n=len(pending))
        self.outbound.start(envelopes)

    def privilegedStartService(self) -> None:
        raise_open_files_limit()
        super().privilegedStartService()

    def startService(self) -> None:
        self._install_signals()
        self.pool.start()
        if self.fsyncs is not None:
            self.fsyncs.start()
        if self.worker is not None:
            # The main process did the start-up checks, and took over this spool.
            self._resume(self.spool.recover())
            super().startService()
            return
        self.check_modes()
        self.mail_root.ensure()
        removed = self.mail_root.clean_tmp()
        if removed:
            log.info("removed {n} stale file(s) from Maildir tmp/ directories", n=removed)
        envelopes = self.spool.recover()
        for directory in worker_spools(self.config.server.spool_dir):
            envelopes += self._take_spool(directory)
        self._resume(envelopes)
        super().startService()

    def stopService(self) -> Deferred:
        self._restore_signals()
        d = super().stopService()

        d.addBoth(lambda result: self.outbound.stop().addCallback(lambda _: result))

        def imap_closed(result):
            # IMAP sessions last long: say BYE to each one now (RFC 3501 7.1.5).
            closing = [l.factory.shutdown() for l in self.listeners
                       if isinstance(l.factory, IMAPFactory)]
            return defer.DeferredList(closing).addCallback(lambda _: result)

        d.addBoth(imap_closed)

        def fsyncs_stopped(result):
            # Before the pool stops: what the child will not answer now goes to the pool.
            if self.fsyncs is None:
                return result
            return self.fsyncs.stop().addCallback(lambda _: result)

        d.addBoth(fsyncs_stopped)

        def stopped(result):
            self.imap_watcher.stop()
            self.local.stop()
            self.pool.stop()
            self.policy.close()
            self.spool.close()
            return result

        return d.addBoth(stopped)
