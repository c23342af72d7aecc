"""Several mailstack processes (DESIGN invariant 4) and the spool lock.

Two ``twistd mailstack`` processes with their own spools share one mail
root and deliver to the same users at the same time: every acknowledged
message must arrive exactly once, complete, under a name no other delivery
uses. A second process on a spool that is in use must refuse to start, at
once and saying why.
"""

from __future__ import annotations

import collections
import os
import smtplib
import subprocess
import sys
import threading
import time
from pathlib import Path

from twisted.trial import unittest

from tests.support.instance import DaemonProcess, free_port, write_instance
from tests.test_crash import (USERS, Ledger, Sender, _NAME, check_maildirs, maildir_files,
                              spool_empty, wait_until)


class SharedMailRootTests(unittest.TestCase):
    def test_two_processes_deliver_to_the_same_users(self):
        base = Path(self.mktemp()).absolute()
        mail_root = base / "shared-maildirs"
        daemons = []
        for name in ("one", "two"):
            daemon = DaemonProcess(base / name, users=USERS, tls=False, mail_root=mail_root)
            self.addCleanup(daemon.kill)
            daemons.append(daemon)
        self.assertNotEqual(daemons[0].config.server.spool_dir, daemons[1].config.server.spool_dir)
        for daemon in daemons:
            daemon.start()
        ledger = Ledger()
        stop = threading.Event()
        self.addCleanup(stop.set)
        senders = [Sender(daemon.port, f"{name}.{i}", ledger, stop, limit=40, per_connection=4)
                   for daemon, name in zip(daemons, ("one", "two")) for i in range(4)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join(60)
            self.assertFalse(sender.is_alive())
            self.assertEqual(sender.errors, [])
        self.assertEqual(len(ledger.acked), 2 * 4 * 40)
        for daemon in daemons:
            wait_until(lambda: spool_empty(daemon.config.server.spool_dir), 20, "delivery")
        delivered = check_maildirs(self, mail_root, ledger.acked, ledger.inflight)
        self.assertEqual(set(delivered), ledger.acked)
        # Both processes delivered into every Maildir, under unique names.
        names = [p.name for p in maildir_files(mail_root)]
        self.assertEqual(len(names), len(set(names)))
        bases = [_NAME.match(n)["base"] for n in names]
        self.assertEqual(len(bases), len(set(bases)))
        by_user = collections.Counter(p.parent.parent.parent.name for p in maildir_files(mail_root))
        self.assertEqual(set(by_user), {u.partition("@")[0] for u in USERS})
        # Nothing left half-done in the shared tree.
        for tmp in mail_root.glob("*/*/Maildir/tmp"):
            self.assertEqual(os.listdir(tmp), [])
        for daemon in daemons:
            daemon.stop()  # SIGTERM: twistd shuts down cleanly, then re-raises the signal
            self.assertIn(daemon.proc.returncode, (0, -15))
            self.assertIn("Main loop terminated", daemon.log.read_text())


class SpoolLockTests(unittest.TestCase):
    def test_second_instance_on_the_same_spool_fails_fast(self):
        base = Path(self.mktemp()).absolute()
        first = DaemonProcess(base / "first", users=USERS, tls=False)
        self.addCleanup(first.kill)
        first.start()
        spool_dir = first.config.server.spool_dir
        # Same spool, everything else its own (a different port, so it is the
        # spool and not the port that stops it).
        port = free_port()
        config = write_instance(base / "second", users=USERS, tls=False,
                                server={"spool_dir": str(spool_dir)},
                                listen=(("smtp", port),))
        twistd = Path(sys.executable).with_name("twistd")
        started = time.monotonic()
        result = subprocess.run(
            [str(twistd), "--nodaemon", "--pidfile=", f"--logfile={base / 'second.log'}",
             "mailstack", "--config", str(config)],
            cwd=base / "second", capture_output=True, text=True, timeout=30)
        elapsed = time.monotonic() - started
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(f"mailstack: {spool_dir} is in use by another running mailstack",
                      result.stderr)
        self.assertIn("each instance needs its own spool_dir", result.stderr)
        self.assertLess(elapsed, 15, "the second instance did not fail fast")
        with self.assertRaises(OSError):
            socket_probe(port)
        # The first instance is untouched and still takes mail.
        with smtplib.SMTP("127.0.0.1", first.port, timeout=10) as client:
            refused = client.sendmail("x@remote.example", [USERS[0]],
                                      b"Subject: still here\r\n\r\nhello\r\n")
        self.assertEqual(refused, {})
        wait_until(lambda: spool_empty(spool_dir) and maildir_files(first.config.server.mail_root),
                   10, "delivery by the first instance")
        self.assertTrue((spool_dir / "lock").exists())

    def test_lock_is_released_when_the_holder_dies(self):
        daemon = DaemonProcess(Path(self.mktemp()).absolute(), users=USERS, tls=False)
        self.addCleanup(daemon.kill)
        daemon.start()
        daemon.kill()  # SIGKILL: no clean shutdown, the kernel drops the lock
        daemon.start()
        with smtplib.SMTP("127.0.0.1", daemon.port, timeout=10) as client:
            self.assertEqual(client.noop()[0], 250)


def socket_probe(port: int) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass
