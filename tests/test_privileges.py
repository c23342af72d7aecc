"""Started as root, ``twistd -u/-g`` binds a port below 1024 and then runs as
an unprivileged user (issue 7, README "Privileges").

Only root can run it; the instance is made the unprivileged user's own first,
as the README's ``sudo -u mail mailstack init`` does.
"""

from __future__ import annotations

import os
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from twisted.trial import unittest

from tests.support.instance import write_instance

NOBODY = 65534


def free_privileged_port() -> int:
    for port in range(700, 1000):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise unittest.SkipTest("no free port below 1024")


class PrivilegeDropTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root, to bind below 1024 and switch users")
        self.root = Path(tempfile.mkdtemp(prefix="mailstack-priv-"))
        self.addCleanup(shutil.rmtree, self.root, True)

    def test_binds_below_1024_then_runs_and_delivers_as_the_user(self):
        port = free_privileged_port()
        config = write_instance(self.root, listen=(("smtp", port),), tls=False)
        # What `mailstack init` run as the user makes.
        for sub in ("maildirs", "spool/tmp", "spool/queue"):
            (self.root / sub).mkdir(mode=0o700, parents=True)
        for path in [self.root, *self.root.rglob("*")]:
            os.chown(path, NOBODY, NOBODY)
        log = self.root / "twistd.log"
        twistd = Path(sys.executable).with_name("twistd")
        proc = subprocess.Popen(
            [str(twistd), "--nodaemon", "--pidfile=", f"--logfile={log}",
             "-u", str(NOBODY), "-g", str(NOBODY), "mailstack", "--config", str(config)],
            cwd=self.root, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.addCleanup(lambda: proc.poll() is None and (proc.kill(), proc.wait(10)))
        deadline = time.monotonic() + 30
        while True:
            self.assertIsNone(proc.poll(), log.read_text() if log.exists() else "")
            try:
                with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                    client.sendmail("a@remote.example", ["demo@example.test"],
                                    b"Subject: as nobody\r\n\r\nhello\r\n")
                break
            except OSError:
                self.assertLess(time.monotonic(), deadline, "no SMTP on the privileged port")
                time.sleep(0.1)
        with open(f"/proc/{proc.pid}/status") as f:
            ids = {k: v.split() for k, _, v in (line.partition(":") for line in f)
                   if k in ("Uid", "Gid")}
        self.assertEqual(ids["Uid"], [str(NOBODY)] * 4)
        self.assertEqual(ids["Gid"], [str(NOBODY)] * 4)
        new = self.root / "maildirs" / "example.test" / "demo" / "Maildir" / "new"
        deadline = time.monotonic() + 10
        while not (new.is_dir() and list(new.iterdir())):
            self.assertLess(time.monotonic(), deadline, "not delivered")
            time.sleep(0.05)
        [delivered] = list(new.iterdir())
        st = delivered.stat()
        self.assertEqual((st.st_uid, st.st_gid, st.st_mode & 0o777), (NOBODY, NOBODY, 0o600))
        self.assertTrue(delivered.read_bytes().endswith(b"\nhello\n"))
        # A clean stop (twistd ends by the signal it got, once shut down).
        proc.terminate()
        self.assertEqual(proc.wait(20), -signal.SIGTERM)
        self.assertIn("Server Shut Down.", log.read_text())
