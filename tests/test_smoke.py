"""The shortest path through the foundation: one message, smtplib to Maildir."""

import smtplib

from twisted.internet import defer
from twisted.trial import unittest

from tests.support.instance import Instance, in_thread, wait_for


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
