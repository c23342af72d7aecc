"""The shortest path through the foundation: one message, smtplib to Maildir."""

import resource
import smtplib
from pathlib import Path

from twisted.internet import defer
from twisted.trial import unittest

from tests.support.instance import DaemonProcess, Instance, in_thread, wait_for


class SmokeTests(unittest.TestCase):
    def setUp(self):
        self.instance = Instance(self.mktemp())
        self.instance.start()
        self.addCleanup(self.instance.stop)

    @defer.inlineCallbacks
    def test_message_reaches_maildir_with_exact_body(self):
        body = b"Subject: hello\r\n\r\nline one\r\n.leading dot\r\n"

        def send():
            with smtplib.SMTP("127.0.0.1", self.instance.smtp_port) as client:
                return client.sendmail("sender@remote.example", ["demo@example.test"], body)

        refused = yield in_thread(send)
        self.assertEqual(refused, {})
        files = yield wait_for(lambda: self.instance.messages("demo@example.test"))
        data = files[0].read_bytes()
        self.assertTrue(data.startswith(b"Return-Path: <sender@remote.example>\nReceived: from "))
        headers, _, message = data.partition(b"\nSubject: ")
        self.assertEqual(message, b"hello\n\nline one\n.leading dot\n")


class OpenFilesLimitTests(unittest.TestCase):
    def test_daemon_raises_a_low_soft_limit_to_the_hard_one(self):
        """A soft limit of 256 open files would refuse connections long before
        max_connections; twistd mailstack lifts it at start-up (and says so)."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and hard <= 256:
            raise unittest.SkipTest(f"hard limit {hard} leaves nothing to raise")
        daemon = DaemonProcess(Path(self.mktemp()).absolute(), tls=False)
        self.addCleanup(daemon.stop)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        try:
            daemon.start()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        limits = Path(f"/proc/{daemon.proc.pid}/limits").read_text()
        [line] = [ln for ln in limits.splitlines() if ln.startswith("Max open files")]
        got = line.split()[3]
        self.assertNotEqual(got, "256", line)
        if hard != resource.RLIM_INFINITY:
            self.assertEqual(int(got), hard)
        self.assertIn("open files limit raised from 256 to", daemon.log.read_text())
