"""The fsync process: the commit's fsyncs made by a child process.

Real child processes, real descriptors and real SMTP sessions: the child
fsyncs what it is sent and reports each errno; the 250 waits for its answer;
what it leaves unanswered when it dies is fsync'd in the pool instead, and a
new child is started; it ends with the server, however the server ends.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import smtplib
import tempfile
import time
from pathlib import Path

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from mailstack.queue import fsync_process
from mailstack.queue.fsync_process import FsyncProcess
from mailstack.queue.fsyncd import fsync_each
from mailstack.queue.local import LocalDelivery
from mailstack.queue.spool import Envelope, GroupCommit, Recipient, Spool
from mailstack.store.maildir import MailRoot
from tests.test_crash import run_now
from tests.support.instance import DaemonProcess, in_thread, wait_for
from tests.support.smtpclient import MXInstance

DEMO = "demo@example.test"


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def sleep(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


class FsyncProcessTests(unittest.TestCase):
    def setUp(self):
        #: Every job the process handed to the thread pool instead of the child.
        self.pool_jobs: list = []
        self.process = FsyncProcess(reactor, self.run_blocking)
        self.process.start()
        self.addCleanup(self.process.stop)
        self.file = os.open(self.mktemp(), os.O_RDWR | os.O_CREAT, 0o600)
        self.addCleanup(os.close, self.file)
        os.write(self.file, b"durable\n")

    def run_blocking(self, f, *args):
        self.pool_jobs.append(f)
        return threads.deferToThread(f, *args)

    @defer.inlineCallbacks
    def test_each_descriptor_is_answered_with_its_errno(self):
        read_end, write_end = os.pipe()
        self.addCleanup(os.close, read_end)
        self.addCleanup(os.close, write_end)
        codes = yield self.process.fsync([self.file, read_end, self.file])
        self.assertEqual(codes, [0, errno.EINVAL, 0])  # a pipe cannot be fsync'd
        self.assertEqual(self.pool_jobs, [])

    @defer.inlineCallbacks
    def test_more_descriptors_than_one_request_carries(self):
        fds = [os.dup(self.file) for _ in range(2 * fsync_process.MAX_FDS + 7)]
        for fd in fds:
            self.addCleanup(os.close, fd)
        codes = yield self.process.fsync(fds)
        self.assertEqual(codes, [0] * len(fds))
        self.assertEqual(self.pool_jobs, [])

    @defer.inlineCallbacks
    def test_what_a_dying_child_holds_is_synced_in_the_pool_and_a_new_child_starts(self):
        self.patch(fsync_process, "RESTART_DELAYS", (0.0, 0.1))
        first = self.process.pid
        yield self.process.fsync([self.file])  # running and answering
        os.kill(first, signal.SIGSTOP)
        waiting = self.process.fsync([self.file])
        yield sleep(0.2)
        self.assertNoResult(waiting)
        os.kill(first, signal.SIGKILL)
        codes = yield waiting
        self.assertEqual(codes, [0])
        self.assertEqual(self.pool_jobs, [fsync_each])
        second = yield wait_for(lambda: self.process.pid not in (None, first) and self.process.pid)
        codes = yield self.process.fsync([self.file])
        self.assertEqual(codes, [0])
        self.assertEqual(self.pool_jobs, [fsync_each], "the new child did not take over")
        self.assertFalse(alive(first))
        self.assertTrue(alive(second))

    @defer.inlineCallbacks
    def test_a_child_that_does_not_end_at_stop_is_killed(self):
        self.patch(fsync_process, "STOP_TIMEOUT", 0.3)
        pid = self.process.pid
        yield self.process.fsync([self.file])
        os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        yield self.process.stop()
        self.assertFalse(alive(pid))
        self.assertLess(time.monotonic() - started, 5)
        codes = yield self.process.fsync([self.file])  # stopped: the pool does it
        self.assertEqual(codes, [0])
        self.assertEqual(self.pool_jobs, [fsync_each])


class LocalDeliveryTests(unittest.TestCase):
    """With an fsync process, a batch of fresh deliveries runs on the reactor
    and only the fsync of each ``new/`` leaves it; a delivery counts (the
    spool entry goes) only once that fsync is answered."""

    def setUp(self):
        self.pool_jobs: list = []
        self.process = FsyncProcess(reactor, self.run_blocking)
        self.process.start()
        self.addCleanup(self.process.stop)

    def run_blocking(self, f, *args):
        self.pool_jobs.append(f)
        return threads.deferToThread(f, *args)

    def instance(self, spool_dir: Path, mail_root: Path) -> LocalDelivery:
        self.spool = Spool(spool_dir)
        self.spool.open()
        self.addCleanup(self.spool.close)
        self.mail_root = MailRoot(mail_root)
        self.mail_root.ensure()
        local = LocalDelivery(self.spool, self.mail_root, "mx.example.test", self.run_blocking,
                              reactor, fsyncs=self.process)
        self.addCleanup(local.stop)
        return local

    def commit(self, queue_id: str) -> Envelope:
        writer = self.spool.writer(queue_id)
        writer.write_line(b"Subject: " + queue_id.encode())
        envelope = Envelope(id=queue_id, sender="s@remote.test", arrival=time.time(),
                            recipients=[Recipient(DEMO, DEMO, True)])
        self.successResultOf(GroupCommit(self.spool, run_now).commit(writer, envelope))
        return envelope

    def new(self) -> list[Path]:
        return sorted((self.mail_root.maildir(DEMO).path / "new").iterdir())

    @defer.inlineCallbacks
    def test_delivered_on_the_reactor_and_counted_after_the_fsync_of_new(self):
        root = Path(self.mktemp())
        local = self.instance(root / "spool", root / "maildirs")
        yield self.process.fsync([self.spool.queue_sync.fd])  # the child answers
        envelope = self.commit("FAST")
        yield local.deliver(self.commit("FIRST"))  # creates the Maildir
        os.kill(self.process.pid, signal.SIGSTOP)
        self.addCleanup(lambda: self.process.pid and os.kill(self.process.pid, signal.SIGCONT))
        done = local.deliver(envelope)
        # Placed at once, on this thread: in new/, but not yet delivered.
        self.assertEqual(len(self.new()), 2)
        yield sleep(0.2)
        self.assertNoResult(done)
        self.assertIn("FAST", self.spool.queued_ids())
        os.kill(self.process.pid, signal.SIGCONT)
        self.assertFalse((yield done))
        self.assertEqual(self.spool.queued_ids(), [])
        self.assertEqual(sorted(p.read_bytes() for p in self.new()),
                         [b"Subject: FAST\n", b"Subject: FIRST\n"])
        self.assertEqual(self.pool_jobs, [], "a delivery went through the pool")

    @defer.inlineCallbacks
    def test_a_spool_on_another_file_system_is_copied_in_the_pool(self):
        shm = Path("/dev/shm")
        if not shm.is_dir() or os.stat(shm).st_dev == os.stat(".").st_dev:
            raise unittest.SkipTest("needs /dev/shm on a file system of its own")
        spool_dir = Path(tempfile.mkdtemp(dir=shm))
        self.addCleanup(shutil.rmtree, spool_dir)
        local = self.instance(spool_dir / "spool", Path(self.mktemp()) / "maildirs")
        envelope = self.commit("COPIED")
        self.assertFalse((yield local.deliver(envelope)))
        [copy] = self.new()
        self.assertEqual(copy.read_bytes(), b"Subject: COPIED\n")
        self.assertEqual(os.stat(copy).st_nlink, 1)
        self.assertEqual(self.spool.queued_ids(), [])
        self.assertIn(LocalDelivery._deliver_batch.__name__,
                      [getattr(job, "__name__", "") for job in self.pool_jobs])


class CommitTests(unittest.TestCase):
    """An SMTP commit through the fsync process of a running server."""

    def send(self, instance: MXInstance, subject: str) -> defer.Deferred:
        def dialogue():
            with smtplib.SMTP("127.0.0.1", instance.port, timeout=30) as client:
                return client.sendmail("sender@remote.test", [DEMO],
                                       f"Subject: {subject}\r\n\r\nbody\r\n")
        return in_thread(dialogue)

    @defer.inlineCallbacks
    def test_the_250_waits_for_the_child(self):
        """The files stay in tmp/ and the client gets no 250 until the child
        has answered; then the message is queued and delivered."""
        instance = MXInstance(self)
        pid = instance.service.fsyncs.pid
        spool = instance.config.server.spool_dir
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(lambda: alive(pid) and os.kill(pid, signal.SIGCONT))
        sent = self.send(instance, "waits")
        yield wait_for(lambda: len(os.listdir(spool / "tmp")) == 2)
        yield sleep(0.3)
        self.assertNoResult(sent)
        self.assertEqual(os.listdir(spool / "queue"), [])
        self.assertEqual(instance.messages(DEMO), [])
        os.kill(pid, signal.SIGCONT)
        refused = yield sent
        self.assertEqual(refused, {})
        [envelope] = instance.committed
        files = yield wait_for(lambda: instance.messages(DEMO))
        self.assertIn(envelope.id, files[0].name)
        self.assertIn(b"Subject: waits", files[0].read_bytes())

    @defer.inlineCallbacks
    def test_a_killed_child_loses_nothing_and_costs_no_refusal(self):
        """kill -9 of the child while a commit waits on it: that commit is
        fsync'd in the pool and acknowledged, later ones go through a new child."""
        self.patch(fsync_process, "RESTART_DELAYS", (0.0, 0.1))
        instance = MXInstance(self)
        first = instance.service.fsyncs.pid
        os.kill(first, signal.SIGSTOP)
        sent = self.send(instance, "first")
        yield wait_for(lambda: len(os.listdir(instance.config.server.spool_dir / "tmp")) == 2)
        os.kill(first, signal.SIGKILL)
        self.assertEqual((yield sent), {})
        yield wait_for(lambda: instance.service.fsyncs.pid not in (None, first))
        self.assertEqual((yield self.send(instance, "second")), {})
        files = yield wait_for(lambda: len(instance.messages(DEMO)) == 2 and instance.messages(DEMO))
        self.assertEqual(sorted(f.read_bytes().split(b"Subject: ")[1].split(b"\n")[0]
                                for f in files), [b"first", b"second"])
        self.assertEqual(len(instance.committed), 2)


class DaemonTests(unittest.TestCase):
    """The child of a real ``twistd mailstack`` never outlives it."""

    def children(self, pid: int) -> list[int]:
        """The fsync processes whose parent is ``pid`` (read from /proc)."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    command = f.read()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if ppid == pid and b"mailstack.queue.fsyncd" in command:
                found.append(int(entry))
        return found

    def start(self, **options) -> DaemonProcess:
        daemon = DaemonProcess(Path(self.mktemp()))
        daemon.start(**options)
        self.addCleanup(daemon.kill)
        return daemon

    def wait_gone(self, pid: int) -> None:
        deadline = time.monotonic() + 10
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertFalse(alive(pid), f"the fsync process {pid} outlived the server")

    def test_the_child_ends_when_the_server_is_killed(self):
        daemon = self.start()
        [child] = self.children(daemon.proc.pid)
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=30) as client:
            client.sendmail("sender@remote.test", [DEMO], "Subject: before\r\n\r\nkill\r\n")
        os.kill(daemon.proc.pid, signal.SIGKILL)
        daemon.proc.wait(10)
        self.wait_gone(child)

    def test_ctrl_c_stops_both_cleanly(self):
        """Ctrl-C at a terminal: SIGINT to the server's process group. The
        child is in a group of its own, so it cannot die first (or while it
        starts, with a traceback); the server stops and then ends it."""
        daemon = self.start(foreground_job=True)
        [child] = self.children(daemon.proc.pid)
        self.assertNotEqual(os.getpgid(child), os.getpgid(daemon.proc.pid))
        os.killpg(daemon.proc.pid, signal.SIGINT)
        # twistd ends a SIGINT shutdown by re-raising the signal on itself.
        self.assertIn(daemon.proc.wait(15), (0, -signal.SIGINT))
        self.wait_gone(child)
        log = daemon.log.read_text()
        self.assertIn("started the fsync process", log)
        self.assertIn("Main loop terminated.", log)
        self.assertNotIn("Traceback", log)
        self.assertNotIn("fsync process ended", log)
