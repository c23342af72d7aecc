"""/metrics after real SMTP, POP3 and IMAP traffic, parsed with prometheus_client's parser."""

from __future__ import annotations

import imaplib
import poplib
import smtplib
import socket
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from tests.support.dnsserver import DNSFixture
from tests.support.instance import DOMAIN, PASSWORD, Instance, in_thread, wait_for
from tests.support.sink import Sink

ZONE = {
    "sender.test": {"TXT": ["v=spf1 ip4:127.0.0.1 -all"]},
    "_dmarc.sender.test": {"TXT": ["v=DMARC1; p=none"]},
    "remote.test": {"MX": [(10, "mx.remote.test")]},
    "mx.remote.test": {"A": ["127.0.0.1"]},
}
MESSAGE = (b"From: alice@sender.test\r\nTo: demo@example.test\r\nSubject: hi\r\n"
           b"Message-ID: <1@sender.test>\r\n\r\nhello\r\n")


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=")
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@defer.inlineCallbacks
def scrape_until(port: int, predicate, timeout: float = 10.0):
    """Scrape (in a thread) until ``predicate(samples)`` holds; the samples."""
    deadline = time.monotonic() + timeout
    while True:
        samples = yield in_thread(scrape, port)
        if predicate(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics never satisfied {predicate}: {samples}")
        yield task.deferLater(reactor, 0.05, lambda: None)


def smtp_traffic(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("alice@sender.test", ["demo@example.test"], MESSAGE)
        client.sendmail("alice@sender.test", ["fwd@example.test"], MESSAGE)
    # A message with a bare LF is refused after the final dot: a rejected transaction.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        f = s.makefile("rb")
        f.readline()
        s.sendall(b"EHLO client.test\r\n")
        while not f.readline().startswith(b"250 "):
            pass
        # Pipelined, as EHLO offered (PIPELINING).
        s.sendall(b"MAIL FROM:<alice@sender.test>\r\nRCPT TO:<demo@example.test>\r\nDATA\r\n")
        for _ in range(3):
            f.readline()
        s.sendall(b"Subject: x\r\n\r\nbare\nLF\r\n.\r\nQUIT\r\n")
        assert f.readline().startswith(b"550"), "bare LF must be refused"
        f.readline()


def pop3_traffic(port: int) -> None:
    client = poplib.POP3("127.0.0.1", port, timeout=10)
    client.user("demo@example.test")
    try:
        client.pass_("wrong password")
        raise AssertionError("a wrong password was accepted")
    except poplib.error_proto:
        pass
    client.quit()
    client = poplib.POP3("127.0.0.1", port, timeout=10)
    client.user("demo@example.test")
    client.pass_(PASSWORD)
    client.stat()
    client.quit()


def imap_traffic(port: int) -> None:
    with imaplib.IMAP4("127.0.0.1", port, timeout=10) as client:
        client.login("demo@example.test", PASSWORD)
        client.select("INBOX")
        client.logout()


class MetricsTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        self.dns = DNSFixture(ZONE)
        self.dns.start()
        self.addCleanup(self.dns.stop)
        self.sink = Sink()
        sink_port = self.sink.start()
        self.addCleanup(self.sink.stop)
        sections = {"dns": {**self.dns.config, "timeout": 5.0},
                    "auth": {"allow_plaintext_loopback": True, "failure_delay": 0.0},
                    "policy": {"trusted_networks": [], "checkers": ["spf", "dkim", "dmarc"]},
                    "outbound": {"port": sink_port, "allow_private": True}}
        self.instance = Instance(self.mktemp(), users=("demo@example.test",),
                                 aliases={"fwd@example.test": ["bob@remote.test"]},
                                 sections=sections,
                                 listen=(("smtp", 0), ("pop3", 0), ("imap", 0), ("http", 0)))
        self.instance.start()
        self.addCleanup(self.instance.stop)
        yield None

    @defer.inlineCallbacks
    def test_counters_move_with_real_traffic(self):
        port = self.instance.port
        before = yield in_thread(scrape, port("http"))
        self.assertEqual(value(before, "mailstack_smtp_transactions_total", role="mx",
                               result="queued"), 0)
        yield in_thread(smtp_traffic, port("smtp"))
        yield wait_for(lambda: self.instance.messages("demo@example.test"))
        yield wait_for(lambda: self.sink.state.messages)
        yield in_thread(pop3_traffic, port("pop3"))
        yield in_thread(imap_traffic, port("imap"))
        after = yield scrape_until(port("http"), lambda s: (
            value(s, "mailstack_delivery_attempts_total", status="sent")
            and not value(s, "mailstack_connections_open", protocol="smtp")
            and not value(s, "mailstack_sessions_open", protocol="imap")))

        def moved(name, **labels):
            return value(after, name, **labels) - value(before, name, **labels)

        self.assertEqual(moved("mailstack_connections_total", protocol="smtp"), 2)
        self.assertEqual(moved("mailstack_connections_total", protocol="pop3"), 2)
        self.assertEqual(moved("mailstack_connections_total", protocol="imap"), 1)
        self.assertGreaterEqual(moved("mailstack_connections_total", protocol="http"), 1)
        self.assertEqual(moved("mailstack_smtp_transactions_total", role="mx", result="queued"), 2)
        self.assertEqual(moved("mailstack_smtp_transactions_total", role="mx",
                               result="rejected"), 1)
        self.assertEqual(moved("mailstack_policy_results_total", method="spf", result="pass"), 3)
        self.assertEqual(moved("mailstack_policy_results_total", method="dmarc", result="pass"), 2)
        self.assertGreaterEqual(moved("mailstack_policy_results_total", method="dkim",
                                      result="none"), 2)
        self.assertEqual(moved("mailstack_delivery_attempts_total", status="sent"), 1)
        self.assertEqual(moved("mailstack_logins_total", protocol="pop3"), 1)
        self.assertEqual(moved("mailstack_logins_total", protocol="imap"), 1)
        self.assertEqual(moved("mailstack_auth_failures_total", protocol="pop3"), 1)
        self.assertEqual(moved("mailstack_sessions_total", protocol="pop3"), 1)
        self.assertEqual(moved("mailstack_sessions_total", protocol="imap"), 1)
        self.assertEqual(value(after, "mailstack_sessions_open", protocol="imap"), 0)
        self.assertEqual(value(after, "mailstack_connections_open", protocol="smtp"), 0)
        self.assertEqual(value(after, "mailstack_queue_messages"), 0)
        self.assertEqual(value(after, "mailstack_queue_oldest_age_seconds"), 0)
        self.assertGreaterEqual(value(after, "mailstack_http_requests_total", endpoint="metrics",
                                      code="200"), 1)

    @defer.inlineCallbacks
    def test_queue_gauges_and_separate_registries(self):
        # The remote refuses for now: the message waits in the queue.
        self.sink.state.replies["RCPT"] = [b"451 4.3.0 try later"]
        yield in_thread(lambda: smtplib.SMTP("127.0.0.1", self.instance.port("smtp"), timeout=10)
                        .sendmail("alice@sender.test", ["fwd@example.test"], MESSAGE))
        samples = yield scrape_until(self.instance.port("http"), lambda s: value(
            s, "mailstack_delivery_attempts_total", status="deferred"))
        self.assertEqual(value(samples, "mailstack_queue_messages"), 1)
        self.assertGreaterEqual(value(samples, "mailstack_queue_oldest_age_seconds"), 0)
        self.assertLess(value(samples, "mailstack_queue_oldest_age_seconds"), 60)
        # A second service in this process counts only its own traffic.
        other = Instance(self.mktemp(), users=(), listen=(("http", 0),))
        other.start()
        self.addCleanup(other.stop)
        theirs = yield in_thread(scrape, other.port("http"))
        self.assertEqual(value(theirs, "mailstack_connections_total", protocol="smtp"), 0)
        self.assertEqual(value(theirs, "mailstack_queue_messages"), 0)
        self.assertEqual(value(theirs, "mailstack_delivery_attempts_total", status="deferred"), 0)
