"""SMTP worker processes: more than one CPU core for the mx listeners.

One Python process runs its reactor on one core, and receiving mail is
mostly reactor work (parsing, policy, logging), so a busy MX is bound by one
core however many the machine has. With ``[smtp] processes = N`` the main
process binds the mx listeners as usual and starts N - 1 workers
(``python -m mailstack.workers``) that inherit those listening sockets and
accept on them too; the kernel gives each new connection to one of them.

A worker is the same ``MailstackService`` with only the mx listeners, and its
own spool under ``<spool_dir>/workers/<n>`` (a spool has one owner: its lock).
It commits, answers 250 and delivers locally exactly as the main process does.
A message with remote recipients left is moved into the main spool
(``Spool.take``) and named to the main process, whose outbound runner alone
talks to other servers. When a worker dies the main process takes over
whatever its spool still holds, delivers it, and starts a new worker; at
start-up it takes over every worker spool before starting any worker.

Workers write their log lines where the main process writes its own (the
same file, opened for appending, or the same standard output), so there is
one log. Where the main process logs through something else (twistd's
syslog or custom logger, or no twistd at all), a worker sends its log events
over its stdout instead, as ``["log", time, namespace, level, system, text]``,
and the main process publishes them. ``["queued", queue_id]`` on the same
stdout names a message handed over, and ``["ready"]`` says the worker's
signal handlers (SIGHUP, SIGUSR1) are in place. A worker stops when its stdin closes,
which happens when the main process exits or dies.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from twisted.application.service import Service
from twisted.internet import defer, protocol
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessExitedAlready
from twisted.logger import ILogObserver, LogLevel, Logger, globalLogBeginner, globalLogPublisher
from zope.interface import implementer

from mailstack import transport
from mailstack.logs import AppendFile, LineObserver, format_text, system_of
from mailstack.queue.spool import Spool

log = Logger(namespace="mailstack.workers")

#: Seconds before a worker that died is started again (doubling up to the last).
RESTART_DELAYS = (1.0, 2.0, 5.0, 15.0, 60.0)
#: A worker that ran this long before dying starts again after the first delay.
STABLE_AFTER = 60.0
#: Seconds a stopping worker gets to finish before it is killed.
STOP_TIMEOUT = 15.0


def worker_spool_dir(spool_dir: Path, index: int) -> Path:
    return Path(spool_dir) / "workers" / str(index)


def worker_spools(spool_dir: Path) -> list[Path]:
    """The spool directories workers have used, by any earlier configuration."""
    try:
        return sorted(p for p in (Path(spool_dir) / "workers").iterdir() if p.is_dir())
    except FileNotFoundError:
        return []


# -- the main process's side ------------------------------------------------------


class _WorkerProcess(protocol.ProcessProtocol):
    """One running worker: its messages, its end."""

    def __init__(self, pool: WorkerPool, index: int):
        self.pool = pool
        self.index = index
        self.started = pool.reactor.seconds()
        self.ended: Deferred = Deferred()
        #: Set once the worker runs its service (its signal handlers are in place);
        #: signals for it wait in ``pending`` until then, or they would kill it.
        self.ready = False
        self.pending: list[int] = []
        self._buffer = b""
        self._err = b""

    def signal(self, signum: int) -> None:
        if not self.ready and signum != signal.SIGKILL:
            self.pending.append(signum)
            return
        try:
            self.transport.signalProcess(signum)
        except (OSError, ProcessExitedAlready):
            pass  # ended; processEnded is on its way

    def outReceived(self, data: bytes) -> None:
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        for line in lines:
            try:
                message = json.loads(line)
                kind = message[0]
            except (ValueError, IndexError, TypeError):
                log.error("worker {n}: unreadable message {line!r}", n=self.index, line=line[:200])
                continue
            if kind == "log":
                _, when, namespace, level, system, text = message
                globalLogPublisher({
                    "log_time": when, "log_namespace": namespace,
                    "log_level": LogLevel.levelWithName(level), "log_system": system,
                    "log_format": "{log_text}", "log_text": text,
                })
            elif kind == "queued":
                # A message with remote recipients moved into the main spool.
                self.pool.service.handed_over(message[1])
            elif kind == "ready":
                self.ready = True
                pending, self.pending = self.pending, []
                for signum in pending:
                    self.signal(signum)

    def errReceived(self, data: bytes) -> None:
        lines = (self._err + data).split(b"\n")
        self._err = lines.pop()
        for line in lines:
            log.error("worker {n}: {line}", n=self.index, line=line.decode("utf-8", "replace"))

    def processEnded(self, reason) -> None:
        self.ended.callback(None)
        self.pool.ended(self, reason.value)


class WorkerPool(Service):
    """Starts, watches and stops the SMTP workers of the main process."""

    def __init__(self, service, count: int):
        self.service = service
        self.count = count
        self.reactor = service.reactor
        self.running_workers: dict[int, _WorkerProcess] = {}
        self._failures: dict[int, int] = {}
        self._restarts: dict[int, object] = {}

    def startService(self) -> None:
        super().startService()
        if not self._sockets():
            log.warn("[smtp] processes = {n}, but no smtp (port 25) listener: no workers",
                     n=self.count)
            return
        for index in range(1, self.count):
            self._spawn(index)

    def _sockets(self) -> dict[int, int]:
        """Listener index in the config -> the bound socket's descriptor (mx only)."""
        return {i: listener.port.fileno()
                for i, listener in enumerate(self.service.listeners)
                if listener.spec.role == "mx" and listener.port is not None}

    def _spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        config = self.service.config
        child_fds: dict[int, object] = {0: "w", 1: "r", 2: "r"}
        args = [sys.executable, "-m", "mailstack.workers", "--config",
                str(Path(config.source).resolve()), "--index", str(index)]
        for n, (listener_index, fd) in enumerate(sorted(self._sockets().items())):
            child_fds[3 + n] = fd
            args += ["--listen", f"{listener_index}={3 + n}"]
        out = getattr(self.service.log_observer, "out", None)
        if isinstance(out, AppendFile):
            args += ["--log-file", out.path]
        elif out is not None:
            log_fd = max(child_fds) + 1
            child_fds[log_fd] = out.fileno()
            args += ["--log-fd", str(log_fd)]
        worker = _WorkerProcess(self, index)
        self.reactor.spawnProcess(worker, sys.executable, args, env=dict(os.environ),
                                childFDs=child_fds)
        self.running_workers[index] = worker
        log.info("started SMTP worker {n}, pid {pid}", n=index, pid=worker.transport.pid)

    def ended(self, worker: _WorkerProcess, reason) -> None:
        self.running_workers.pop(worker.index, None)
        if not self.running:
            return  # stopping: the next start takes over its spool
        ran = self.reactor.seconds() - worker.started
        failures = 0 if ran >= STABLE_AFTER else self._failures.get(worker.index, 0) + 1
        self._failures[worker.index] = failures
        delay = RESTART_DELAYS[min(failures, len(RESTART_DELAYS) - 1)]
        log.error("SMTP worker {n} ended ({reason}); starting it again in {delay:.0f} s",
                  n=worker.index, reason=reason, delay=delay)
        # What it acknowledged and had not finished is ours now; its
        # successor starts on an empty spool.
        d = self.service.adopt_worker_spool(worker.index)
        d.addBoth(lambda _: self._restart_later(worker.index, delay))

    def _restart_later(self, index: int, delay: float) -> None:
        if self.running:
            self._restarts[index] = self.reactor.callLater(delay, self._spawn, index)

    def signal(self, signum: int) -> None:
        for worker in self.running_workers.values():
            worker.signal(signum)

    def stopService(self) -> Deferred:
        super().stopService()
        for call in self._restarts.values():
            call.cancel()
        self._restarts.clear()
        workers = list(self.running_workers.values())
        for worker in workers:
            worker.ready = True  # the default action of SIGTERM is what it is for
            worker.signal(signal.SIGTERM)
        kill = self.reactor.callLater(STOP_TIMEOUT, self.signal, signal.SIGKILL)
        d = defer.DeferredList([w.ended for w in workers])
        return d.addCallback(lambda _: kill.cancel() if kill.active() else None)


# -- the worker's side --------------------------------------------------------------


class ParentChannel(protocol.Protocol):
    """The worker's stdin (closed when the main process goes) and stdout (to it)."""

    def __init__(self, reactor):
        self.reactor = reactor

    def send(self, message: list) -> None:
        if self.transport is not None:
            self.transport.write(json.dumps(message).encode() + b"\n")

    def connectionLost(self, reason=None) -> None:
        self.transport = None
        if self.reactor.running:
            self.reactor.stop()


@implementer(ILogObserver)
@dataclass
class ChannelLogObserver:
    """Log events of the worker, sent as text for the main process's log."""

    channel: ParentChannel

    def __call__(self, event: dict) -> None:
        level = event.get("log_level", LogLevel.info)
        self.channel.send(["log", event.get("log_time"), event.get("log_namespace", "-"),
                           level.name, system_of(event), format_text(event)])


@dataclass
class Handoff:
    """The worker's stand-in for the outbound runner: remote recipients go to
    the main process's spool, and the main process is told."""

    spool: Spool
    main_spool: Spool
    channel: ParentChannel
    run_blocking: object
    _running: set = field(default_factory=set)

    def start(self, envelopes) -> None:
        for envelope in envelopes:
            if any(not r.local for _, r in envelope.pending()):
                self.schedule(envelope.id)

    def schedule(self, queue_id: str) -> None:
        d = self.run_blocking(self.main_spool.take, self.spool, queue_id)
        self._running.add(d)
        d.addBoth(lambda result: (self._running.discard(d), result)[1])
        d.addCallbacks(lambda _: self.channel.send(["queued", queue_id]),
                       lambda f: log.failure("{id}: cannot hand over to the main spool", f,
                                             id=queue_id))

    def stop(self) -> Deferred:
        return defer.DeferredList(list(self._running))


@dataclass(frozen=True)
class WorkerRole:
    """What makes a MailstackService a worker: its number, its inherited
    sockets (config listener index -> descriptor) and its channel."""

    index: int
    sockets: dict[int, int]
    channel: ParentChannel


class AdoptedEndpoint:
    """A server endpoint over a listening socket inherited from the main process."""

    def __init__(self, reactor, fd: int, address: str):
        self.reactor = reactor
        self.fd = fd
        self.family = socket.AF_INET6 if ":" in address else socket.AF_INET

    def listen(self, factory) -> Deferred:
        port = transport.adopt(self.reactor, self.fd, self.family, factory)
        os.close(self.fd)  # adopt keeps its own duplicate
        return defer.succeed(port)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m mailstack.workers")
    ap.add_argument("--config", required=True)
    ap.add_argument("--index", type=int, required=True)
    ap.add_argument("--listen", action="append", default=[], help="LISTENER_INDEX=FD")
    ap.add_argument("--log-file", help="append log lines to this file")
    ap.add_argument("--log-fd", type=int, help="write log lines to this descriptor")
    args = ap.parse_args(argv)

    from twisted.internet import reactor, stdio

    from mailstack.config import load
    from mailstack.service import MailstackService

    channel = ParentChannel(reactor)
    stdio.StandardIO(channel, reactor=reactor)
    if args.log_file:
        observer = LineObserver(AppendFile(args.log_file), reactor)
    elif args.log_fd is not None:
        observer = LineObserver(open(args.log_fd, "w", encoding="utf-8", errors="replace"),
                               reactor)
    else:
        observer = ChannelLogObserver(channel)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    sockets = {int(i): int(fd) for i, fd in (spec.split("=", 1) for spec in args.listen)}
    service = MailstackService(load(args.config), reactor,
                               worker=WorkerRole(args.index, sockets, channel))
    service.log_observer = observer
    service.privilegedStartService()
    service.startService()
    channel.send(["ready"])
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()


if __name__ == "__main__":
    main()
