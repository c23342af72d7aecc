"""SMTP worker processes ([smtp] processes, mailstack.workers).

A real ``twistd mailstack`` with ``processes = 2``: the main process and one
worker accept on the same port. The main process is paused with SIGSTOP
where a test needs the worker (and only the worker) to take connections.
Every check is what a user sees: 250 replies, files in the Maildirs, messages
at the remote MX, lines in the one log file.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import subprocess
import sys
import threading
from pathlib import Path

from twisted.internet import defer
from twisted.trial import unittest

from tests.support.dnsserver import DNSFixture
from tests.support.instance import DaemonProcess, in_thread, wait_for
from tests.support.sink import Sink
from tests.test_crash import (SENDER, USERS, Ledger, Sender, check_maildirs, make_message,
                              spool_empty, wait_until)
from tests.test_outbound import ZONE
from tests.test_queue_cli import mailstack

_WORKER = re.compile(r"started SMTP worker 1, pid (\d+)")
_QUEUED = re.compile(r"\] ([0-9A-F]{22}): client=")


def worker_pids(daemon: DaemonProcess) -> list[int]:
    """Pids of worker 1, in the order the main process started them."""
    text = daemon.log.read_text() if daemon.log.exists() else ""
    return [int(pid) for pid in _WORKER.findall(text)]


def accepting_pids(daemon: DaemonProcess) -> set[int]:
    """The processes that answered 250, from the queue ids in the log
    (a queue id holds the pid of the process that made it)."""
    text = daemon.log.read_text()
    return {int(queue_id[13:19], 16) for queue_id in _QUEUED.findall(text)}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has ended too.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0] != "Z"


def all_spools_empty(spool_dir: Path) -> bool:
    dirs = [spool_dir] + sorted((spool_dir / "workers").glob("*"))
    return all(not (d / "queue").is_dir() or spool_empty(d) for d in dirs)


class WorkerTests(unittest.TestCase):
    timeout = 150

    def setUp(self):
        self.daemon = DaemonProcess(Path(self.mktemp()).absolute(), users=USERS, tls=False,
                                    smtp={"processes": 2}, sections={"queue": {"retry_delay": 60}})
        self.addCleanup(self.cleanup)
        self.spool_dir = self.daemon.config.server.spool_dir
        self.mail_root = self.daemon.config.server.mail_root
        self.ledger = Ledger()

    def cleanup(self) -> None:
        if self.daemon.proc is not None and self.daemon.proc.poll() is None:
            os.kill(self.daemon.proc.pid, signal.SIGCONT)
        self.daemon.stop()
        for pid in worker_pids(self.daemon):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)

    def start(self) -> int:
        """Start the daemon; the pid of its worker once it runs."""
        count = len(worker_pids(self.daemon))
        self.daemon.start()
        wait_until(lambda: len(worker_pids(self.daemon)) > count, 20, "the worker to start")
        return worker_pids(self.daemon)[-1]

    def send(self, prefix: str, clients: int, each: int) -> None:
        stop = threading.Event()
        senders = [Sender(self.daemon.port, f"{prefix}{i}", self.ledger, stop, limit=each,
                          per_connection=1) for i in range(clients)]
        for s in senders:
            s.start()
        for s in senders:
            s.join(60)
            self.assertEqual(s.errors, [])

    def test_worker_accepts_delivers_and_logs_into_the_one_log(self):
        worker = self.start()
        # With the main process paused only the worker can take connections.
        os.kill(self.daemon.proc.pid, signal.SIGSTOP)
        try:
            self.send("w", clients=3, each=10)
        finally:
            os.kill(self.daemon.proc.pid, signal.SIGCONT)
        self.send("m", clients=4, each=25)
        wait_until(lambda: all_spools_empty(self.spool_dir), 30, "the spools to drain")
        delivered = check_maildirs(self, self.mail_root, self.ledger.acked, set())
        self.assertEqual(len(delivered), 130)
        wait_until(lambda: len(accepting_pids(self.daemon)) == 2, 10, "the worker's log lines")
        self.assertEqual(accepting_pids(self.daemon), {self.daemon.proc.pid, worker})
        # Its delivery lines reach the same log, with the worker's queue ids.
        log = self.daemon.log.read_text()
        self.assertRegex(log, rf"\[mailstack.local#info\] [0-9A-F]{{13}}{worker:06X}[0-9A-F]{{3}}: "
                              r"to=<[^>]+>, .*status=sent")

    def test_kill_9_of_the_worker_loses_nothing_and_it_comes_back(self):
        """Messages the worker acknowledged but could not deliver yet (demo's
        Maildir is unusable, the retry is a minute away) are taken over by the
        main process when the worker is killed; a new worker takes its place."""
        worker = self.start()
        blocked = self.mail_root / "example.test" / "demo"
        blocked.parent.mkdir(parents=True, exist_ok=True)
        blocked.write_bytes(b"")  # not a directory: delivery to demo fails
        os.kill(self.daemon.proc.pid, signal.SIGSTOP)
        try:
            self.send("w", clients=2, each=6)
        finally:
            os.kill(self.daemon.proc.pid, signal.SIGCONT)
        worker_queue = self.spool_dir / "workers" / "1" / "queue"
        wait_until(lambda: len(list(worker_queue.glob("*.env"))) == 4, 10,
                   "demo's 4 to wait in the worker's spool, the others delivered")
        # The queue commands see them there.
        listing = mailstack(self.daemon.config_path, "queue", "list")
        self.assertEqual(listing.returncode, 0, listing.stderr)
        self.assertIn("-- 4 message(s)", listing.stdout)
        waiting = sorted(p.stem for p in worker_queue.glob("*.env"))
        shown = mailstack(self.daemon.config_path, "queue", "show", waiting[0])
        self.assertIn("Recipient: <demo@example.test> (for <demo@example.test>) queued",
                      shown.stdout)
        blocked.unlink()
        os.kill(worker, signal.SIGKILL)
        wait_until(lambda: len(worker_pids(self.daemon)) > 1, 20, "a new worker")
        replacement = worker_pids(self.daemon)[-1]
        wait_until(lambda: all_spools_empty(self.spool_dir), 30, "the spools to drain")
        self.assertIn("took over 4 message(s)", self.daemon.log.read_text())
        # The new worker serves too (main paused), and nothing was lost.
        os.kill(self.daemon.proc.pid, signal.SIGSTOP)
        try:
            self.send("after", clients=2, each=3)
        finally:
            os.kill(self.daemon.proc.pid, signal.SIGCONT)
        wait_until(lambda: all_spools_empty(self.spool_dir), 30, "the spools to drain")
        delivered = check_maildirs(self, self.mail_root, self.ledger.acked, set())
        self.assertEqual(len(delivered), 18)
        wait_until(lambda: replacement in accepting_pids(self.daemon), 10, "the new worker's logs")

    def test_kill_9_of_the_main_process_ends_the_worker_and_a_restart_delivers_all(self):
        worker = self.start()
        stop = threading.Event()
        self.addCleanup(stop.set)
        senders = [Sender(self.daemon.port, f"x{i}", self.ledger, stop, per_connection=3)
                   for i in range(4)]
        for s in senders:
            s.start()
        wait_until(lambda: self.ledger.count() >= 80, 30, "80 acknowledged messages")
        self.daemon.kill()
        # Its stdin closed with the main process: the worker stops too.
        wait_until(lambda: not alive(worker), 15, "the orphaned worker to exit")
        stop.set()
        for s in senders:
            s.join(15)
        self.start()
        wait_until(lambda: all_spools_empty(self.spool_dir), 30, "the spools to drain")
        check_maildirs(self, self.mail_root, self.ledger.acked, self.ledger.inflight)


class WorkerRemoteTests(unittest.TestCase):
    timeout = 90

    @defer.inlineCallbacks
    def test_remote_recipient_accepted_by_the_worker_reaches_the_remote_mx(self):
        """The worker hands the message to the main process, whose outbound
        runner delivers it (and the local copy is delivered by the worker)."""
        dns = DNSFixture(ZONE)
        dns.start()
        self.addCleanup(dns.stop)
        sink = Sink()
        sink.start()
        self.addCleanup(sink.stop)
        daemon = DaemonProcess(Path(self.mktemp()).absolute(), tls=False,
                               aliases={"fwd@example.test": ["bob@remote.test",
                                                             "demo@example.test"]},
                               smtp={"processes": 2},
                               sections={"dns": dns.config,
                                         "outbound": {"port": sink.port, "allow_private": True}})
        self.addCleanup(daemon.stop)
        yield in_thread(daemon.start)
        yield wait_for(lambda: worker_pids(daemon), timeout=20)
        worker = worker_pids(daemon)[0]
        self.addCleanup(lambda: alive(worker) and os.kill(worker, signal.SIGKILL))

        def send():
            os.kill(daemon.proc.pid, signal.SIGSTOP)
            try:
                for n in range(5):
                    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as c:
                        c.sendmail(SENDER, ["fwd@example.test"],
                                   make_message(f"remote-{n}", "fwd@example.test"))
            finally:
                os.kill(daemon.proc.pid, signal.SIGCONT)

        yield in_thread(send)
        yield wait_for(lambda: len(sink.state.messages) >= 5, timeout=30)
        tokens = sorted(re.search(rb"Subject: crash (\S+)", m.data)[1].decode()
                        for m in sink.state.messages)
        self.assertEqual(tokens, [f"remote-{n}" for n in range(5)])
        self.assertEqual({tuple(m.recipients) for m in sink.state.messages}, {("bob@remote.test",)})
        self.assertEqual(accepting_pids(daemon), {worker})
        yield wait_for(lambda: all_spools_empty(daemon.config.server.spool_dir), timeout=20)
        inbox = daemon.config.server.mail_root / "example.test" / "demo" / "Maildir" / "new"
        self.assertEqual(len(list(inbox.iterdir())), 5)


class WorkerLogTests(unittest.TestCase):
    """Workers write to the main process's log destination themselves."""

    timeout = 90

    def test_logrotate_rename_and_sigusr1_reopen_in_every_process(self):
        daemon = DaemonProcess(Path(self.mktemp()).absolute(), users=USERS, tls=False,
                               smtp={"processes": 2})
        self.addCleanup(daemon.stop)
        daemon.start()
        wait_until(lambda: worker_pids(daemon), 20, "the worker to start")
        worker = worker_pids(daemon)[0]
        rotated = daemon.log.with_name("twistd.log.1")
        os.rename(daemon.log, rotated)
        os.kill(daemon.proc.pid, signal.SIGUSR1)
        wait_until(daemon.log.exists, 10, "the main process to reopen its log")
        ledger = Ledger()
        # Both processes log a transaction: the worker while the main one is paused...
        os.kill(daemon.proc.pid, signal.SIGSTOP)
        try:
            sender = Sender(daemon.port, "w", ledger, threading.Event(), limit=2,
                            per_connection=1)
            sender.run()
        finally:
            os.kill(daemon.proc.pid, signal.SIGCONT)
        self.assertEqual(sender.errors, [])
        # And the main process while the worker is.
        os.kill(worker, signal.SIGSTOP)
        try:
            Sender(daemon.port, "m", ledger, threading.Event(), limit=2, per_connection=1).run()
        finally:
            os.kill(worker, signal.SIGCONT)
        self.assertEqual(len(ledger.acked), 4)
        wait_until(lambda: {daemon.proc.pid, worker} <= accepting_pids(daemon), 10,
                   "lines of both processes in the new log")
        self.assertNotRegex(rotated.read_text(), r"client=")

    def test_standard_output_is_shared(self):
        """``--logfile=-`` (the systemd unit): the worker's lines come out on
        the main process's standard output."""
        root = Path(self.mktemp()).absolute()
        daemon = DaemonProcess(root, users=USERS, tls=False, smtp={"processes": 2})
        twistd = Path(sys.executable).with_name("twistd")
        out = open(root / "stdout.log", "wb")
        self.addCleanup(out.close)
        daemon.proc = subprocess.Popen(
            [str(twistd), "--nodaemon", "--pidfile=", "--logfile=-", "mailstack",
             "--config", str(daemon.config_path)], cwd=root, stdout=out, stderr=out)
        daemon.log = root / "stdout.log"
        self.addCleanup(daemon.stop)
        wait_until(lambda: worker_pids(daemon), 20, "the worker to start")
        worker = worker_pids(daemon)[0]
        ledger = Ledger()
        os.kill(daemon.proc.pid, signal.SIGSTOP)
        try:
            Sender(daemon.port, "w", ledger, threading.Event(), limit=2, per_connection=1).run()
        finally:
            os.kill(daemon.proc.pid, signal.SIGCONT)
        self.assertEqual(len(ledger.acked), 2)
        wait_until(lambda: worker in accepting_pids(daemon), 10, "the worker's lines on stdout")
