"""The fsync process: the commit's fsyncs, made where they cost the reactor nothing.

An fsync in a pool thread is cheap for this process's CPU but not for its
GIL: the thread gives the GIL up for the call and must take it back after,
and while the reactor thread is busy (any load worth measuring) taking it
back is a wait, a wake-up and a pair of context switches. A commit batch
fsyncs two files per message and then ``queue/``, so on a busy port 25 these
hand-offs were a good part of the server's CPU. A small child process, with
an interpreter of its own, makes these fsyncs instead, and the fsync of each
Maildir's ``new/`` for a batch of local deliveries (``queue.local``), which
then needs no thread at all (bench: about 17% more messages/s, 0.45 ms less
of the server's CPU per message).

One datagram each way over a ``SOCK_SEQPACKET`` socket pair (the child's
stdin): a request carries up to ``MAX_FDS`` descriptors (``SCM_RIGHTS``),
the reply one errno per descriptor (0: synced), in order. The child answers
requests in the order they come, so a reply belongs to the oldest request
still waiting. Only descriptors cross: the child opens nothing, and runs
with the privileges twistd has dropped to, so it can do nothing but fsync
what it is given.

It is never in the way of safety: a request the child cannot take (not
running, socket full) and every request waiting when it dies are fsync'd in
the thread pool instead, on the descriptors the commit still holds open; a
dead child is started again, with a growing delay if it keeps dying. It
exits when its socket closes: when the server stops, or dies. It runs in a
process group of its own, so a Ctrl-C at the terminal stops the server,
which then ends the child, rather than killing the child while it starts.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
from collections import deque
from typing import Callable, Sequence

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

from mailstack.queue.fsyncd import MAX_FDS, fsync_each

log = Logger(namespace="mailstack.fsync")

#: Seconds before a child that died is started again, growing while it keeps
#: dying within ``STABLE_AFTER`` seconds of its start.
RESTART_DELAYS = (0.0, 1.0, 5.0, 30.0)
STABLE_AFTER = 10.0
#: Seconds a stopping server waits for the child before it kills it.
STOP_TIMEOUT = 5.0
#: Seconds between looks at a child whose stderr has closed, until it has ended.
REAP_INTERVAL = 0.02


def error_of(code: int) -> OSError:
    """The OSError for an errno an fsync answered with (``fsync`` results)."""
    return OSError(code, os.strerror(code))


@implementer(IReadDescriptor)
class _Channel:
    """The server's end of the socket pair: the child's answers."""

    def __init__(self, owner: FsyncProcess, sock: socket.socket):
        self.owner = owner
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        return "fsync"

    def doRead(self):
        while True:
            try:
                data = self.sock.recv(2 * MAX_FDS)
            except BlockingIOError:
                return None
            except OSError as e:
                return e
            if not data:
                return EOFError("fsync process closed its socket")
            self.owner._replied(list(struct.unpack(f"={len(data) // 2}H", data)))

    def connectionLost(self, reason) -> None:
        self.owner._channel_lost(self)


@implementer(IReadDescriptor)
class _Stderr:
    """The child's stderr, logged line by line; its end means the child's."""

    def __init__(self, owner: FsyncProcess, child: subprocess.Popen):
        self.owner = owner
        self.child = child
        self._fd = child.stderr.fileno()
        os.set_blocking(self._fd, False)
        self._partial = b""

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "fsync"

    def doRead(self):
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return None
        except OSError as e:
            return e
        if not data:
            return EOFError("fsync process closed its stderr")
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            log.error("fsync process: {line}", line=line.decode("utf-8", "replace"))
        return None

    def connectionLost(self, reason) -> None:
        self.child.stderr.close()
        self.owner._reap(self.child)


class FsyncProcess:
    """Starts, feeds and restarts the fsync child of one server process."""

    def __init__(self, reactor, run_blocking: Callable[..., Deferred]):
        self.reactor = reactor
        self._run = run_blocking
        self._channel: _Channel | None = None
        self._child: subprocess.Popen | None = None
        #: Requests sent and not answered yet, oldest first: (descriptors, Deferred).
        self._waiting: deque[tuple[list[int], Deferred]] = deque()
        self._running = False
        self._started_at = 0.0
        self._failures = 0
        self._restart = None
        self._ended: Deferred | None = None

    @property
    def pid(self) -> int | None:
        """The running child's process id."""
        return None if self._child is None else self._child.pid

    def start(self) -> None:
        self._running = True
        self._spawn()

    def stop(self) -> Deferred:
        """Close the socket (the child exits once it has answered what it
        holds) and fire when the child has ended."""
        self._running = False
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
        self._restart = None
        self._close_channel()
        if self._child is None:
            return defer.succeed(None)
        if self._ended is None:
            self._ended = Deferred()
            kill = self.reactor.callLater(STOP_TIMEOUT, self._kill)
            self._ended.addBoth(lambda result: kill.cancel() if kill.active() else None)
        return self._ended

    def fsync(self, fds: Sequence[int]) -> Deferred:
        """Fires with each descriptor's errno (0: synced), in order; never fails
        for want of the child. The descriptors must stay open until it fires."""
        chunks = [list(fds[i:i + MAX_FDS]) for i in range(0, len(fds), MAX_FDS)]
        if len(chunks) == 1:
            return self._send(chunks[0])
        d = defer.gatherResults([self._send(chunk) for chunk in chunks], consumeErrors=True)
        return d.addCallback(lambda parts: [code for part in parts for code in part])

    # -- internals -------------------------------------------------------------
    def _send(self, fds: list[int]) -> Deferred:
        if self._channel is not None:
            try:
                socket.send_fds(self._channel.sock, [b"s"], fds)
            except OSError:
                pass  # full or broken: the pool instead (a broken one is noticed by its read)
            else:
                d = Deferred()
                self._waiting.append((fds, d))
                return d
        return self._run(fsync_each, fds)

    def _replied(self, codes: list[int]) -> None:
        if not self._waiting:
            log.error("fsync process: a reply to no request")
            return
        _, d = self._waiting.popleft()
        d.callback(codes)

    def _spawn(self) -> None:
        self._restart = None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            child = subprocess.Popen(
                [sys.executable, "-m", "mailstack.queue.fsyncd"], stdin=theirs,
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, process_group=0)
        except OSError as e:
            ours.close()
            log.error("cannot start the fsync process ({err}); fsyncs run in threads", err=e)
            self._schedule_restart()
            return
        finally:
            theirs.close()
        ours.setblocking(False)
        self._child = child
        self._channel = _Channel(self, ours)
        self._started_at = self.reactor.seconds()
        self.reactor.addReader(self._channel)
        self.reactor.addReader(_Stderr(self, child))
        log.info("started the fsync process, pid {pid}", pid=child.pid)

    def _kill(self) -> None:
        if self._child is not None:
            log.warn("the fsync process did not end in {s:.0f} s; killing it", s=STOP_TIMEOUT)
            self._child.kill()

    def _close_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            self.reactor.removeReader(channel)
            channel.sock.close()
        # What the child will never answer now is fsync'd in the pool, on the
        # descriptors its commits still hold.
        waiting, self._waiting = self._waiting, deque()
        for fds, d in waiting:
            self._run(fsync_each, fds).chainDeferred(d)

    def _channel_lost(self, channel: _Channel) -> None:
        if channel is self._channel:
            self._close_channel()

    def _reap(self, child: subprocess.Popen) -> None:
        """Wait (without blocking) for a child whose stderr has closed to end."""
        if child.poll() is None:
            self.reactor.callLater(REAP_INTERVAL, self._reap, child)
            return
        if child is not self._child:
            return
        self._child = None
        self._close_channel()
        if self._ended is not None:
            ended, self._ended = self._ended, None
            ended.callback(None)
        if not self._running:
            return
        ran = self.reactor.seconds() - self._started_at
        self._failures = 0 if ran >= STABLE_AFTER else self._failures + 1
        log.error("the fsync process ended (exit status {status}); fsyncs run in threads "
                  "until it is started again", status=child.returncode)
        self._schedule_restart()

    def _schedule_restart(self) -> None:
        if self._running:
            delay = RESTART_DELAYS[min(self._failures, len(RESTART_DELAYS) - 1)]
            self._restart = self.reactor.callLater(delay, self._spawn)
