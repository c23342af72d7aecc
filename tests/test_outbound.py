"""The outbound queue end to end: MX lookup over real DNS, real SMTP, retries, DSNs.

Mail reaches the queue through an alias that points to another domain
(``fwd@example.test -> bob@remote.test``). The remote side is either a
second mailstack or a scriptable sink (tests/support/sink.py); the DNS
fixture publishes the MX records.
"""

import email
import json
import smtplib

from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.trial import unittest

from mailstack.queue.client import to_wire
from tests.support.dnsserver import DNSFixture
from tests.support.instance import Instance, in_thread, wait_for
from tests.support.sink import Sink

ZONE = {
    "remote.test": {"MX": [(10, "mx.remote.test")]},
    "mx.remote.test": {"A": ["127.0.0.1"]},
    "pref.test": {"MX": [(20, "second.pref.test"), (10, "first.pref.test")]},
    "first.pref.test": {"A": ["127.0.0.2"]},
    "second.pref.test": {"A": ["127.0.0.1"]},
    "fallback.test": {"MX": [(10, "dead.fallback.test"), (20, "live.fallback.test")]},
    "dead.fallback.test": {"A": ["127.0.0.3"]},
    "live.fallback.test": {"A": ["127.0.0.1"]},
    "nullmx.test": {"MX": [(0, ".")]},
    "private.test": {"MX": [(10, "mx.remote.test")]},
}
QUICK_QUEUE = {"first_retry": 0.3, "max_retry_interval": 0.6}


class OutboundTestCase(unittest.TestCase):
    def start_dns(self, hang=()):
        self.dns = DNSFixture(ZONE, hang=hang)
        self.dns.start()
        self.addCleanup(self.dns.stop)

    def start_sender(self, port, aliases, queue=None, outbound=None):
        sections = {"dns": self.dns.config,
                    "outbound": {"port": port, "allow_private": True, **(outbound or {})},
                    "queue": {**QUICK_QUEUE, **(queue or {})}}
        self.sender = Instance(self.mktemp(), aliases=aliases, sections=sections)
        self.sender.start()
        self.addCleanup(self.sender.stop)
        return self.sender

    def start_sink(self, interface="127.0.0.1", port=0):
        sink = Sink(interface, port)
        sink.start()
        self.addCleanup(sink.stop)
        return sink

    def start_sink_pair(self):
        """Sinks on 127.0.0.2 and 127.0.0.1 with the same port number (MX tests).

        The second bind can collide with a port another process holds on
        127.0.0.1, so a few first ports are tried.
        """
        for _ in range(20):
            first = Sink("127.0.0.2")
            first.start()
            second = Sink("127.0.0.1", first.port)
            try:
                second.start()
            except CannotListenError:
                first.stop()
                continue
            self.addCleanup(first.stop)
            self.addCleanup(second.stop)
            return first, second
        raise CannotListenError("127.0.0.1", 0, "no port free on both addresses")

    def send(self, instance, sender, rcpts, body):
        def go():
            with smtplib.SMTP("127.0.0.1", instance.smtp_port) as client:
                return client.sendmail(sender, rcpts, body)
        return in_thread(go)

    def queued(self, instance):
        queue = instance.config.server.spool_dir / "queue"
        return [json.loads(p.read_bytes()) for p in sorted(queue.glob("*.env"))]


class DeliveryTests(OutboundTestCase):
    @defer.inlineCallbacks
    def test_alias_to_remote_domain_arrives_at_its_mx(self):
        self.start_dns()
        remote = Instance(self.mktemp(), users=("bob@remote.test",),
                          server={"domains": ["remote.test"], "hostname": "mx.remote.test"})
        remote.start()
        self.addCleanup(remote.stop)
        sender = self.start_sender(remote.smtp_port, {"fwd@example.test": ["bob@remote.test"]})
        body = b"Subject: forwarded\r\n\r\nhello remote\r\n..dotted\r\n"
        yield self.send(sender, "someone@elsewhere.test", ["fwd@example.test"], body)
        files = yield wait_for(lambda: remote.messages("bob@remote.test"))
        data = files[0].read_bytes()
        self.assertTrue(data.endswith(b"\nSubject: forwarded\n\nhello remote\n..dotted\n"))
        self.assertIn(b"with ESMTPS", data)  # opportunistic STARTTLS was used
        self.assertIn(b"Received: from mail.example.test", data)
        yield wait_for(lambda: not self.queued(sender))

    @defer.inlineCallbacks
    def test_temporary_failures_are_retried_and_delivered_once(self):
        self.start_dns()
        sink = self.start_sink()
        sink.state.replies["RCPT"] = [b"451 4.7.1 try later", b"451 4.7.1 try later",
                                      b"250 2.1.5 Ok"]
        sender = self.start_sender(sink.port, {"fwd@example.test": ["bob@remote.test"]})
        yield self.send(sender, "demo@example.test", ["fwd@example.test"],
                        b"Subject: retry\r\n\r\nbody\r\n")
        yield wait_for(lambda: sink.state.messages, timeout=15)
        yield wait_for(lambda: not self.queued(sender))
        self.assertEqual(len(sink.state.messages), 1)
        self.assertEqual(sink.state.messages[0].recipients, ["bob@remote.test"])
        rcpts = [c for c in sink.state.commands if c.startswith(b"RCPT")]
        self.assertEqual(len(rcpts), 3)

    @defer.inlineCallbacks
    def test_permanent_failure_bounces_to_the_sender(self):
        self.start_dns()
        sink = self.start_sink()
        sink.state.replies["RCPT"] = [b"550 5.1.1 <bob@remote.test>: no such user"]
        sender = self.start_sender(sink.port, {"fwd@example.test": ["bob@remote.test"]})
        yield self.send(sender, "demo@example.test", ["fwd@example.test"],
                        b"Subject: doomed\r\nMessage-ID: <doomed@example.test>\r\n\r\nbody\r\n")
        files = yield wait_for(lambda: sender.messages("demo@example.test"))
        dsn = email.message_from_bytes(files[0].read_bytes())
        self.assertEqual(dsn["Return-Path"], "<>")
        self.assertEqual(dsn.get_content_type(), "multipart/report")
        self.assertEqual(dsn.get_param("report-type"), "delivery-status")
        parts = [p.get_content_type() for p in dsn.get_payload()]
        self.assertEqual(parts, ["text/plain", "message/delivery-status", "text/rfc822-headers"])
        status = dsn.get_payload()[1].as_string()
        self.assertIn("Final-Recipient: rfc822; bob@remote.test", status)
        self.assertIn("Action: failed", status)
        self.assertIn("Status: 5.1.1", status)
        self.assertIn("no such user", status)
        self.assertIn("Message-ID: <doomed@example.test>", dsn.get_payload()[2].as_string())
        self.assertTrue(dsn["From"].endswith("<MAILER-DAEMON@mail.example.test>"))
        yield wait_for(lambda: not self.queued(sender))

    @defer.inlineCallbacks
    def test_no_bounce_for_a_bounce(self):
        self.start_dns()
        sink = self.start_sink()
        sink.state.replies["RCPT"] = [b"550 5.1.1 no such user"]
        sender = self.start_sender(sink.port, {"fwd@example.test": ["bob@remote.test"]})
        yield self.send(sender, "<>", ["fwd@example.test"], b"Subject: dsn\r\n\r\nbody\r\n")
        yield wait_for(lambda: not self.queued(sender))
        self.assertEqual(sender.messages("demo@example.test"), [])
        self.assertEqual(sender.messages("postmaster@example.test"), [])

    @defer.inlineCallbacks
    def test_remote_down_defers_then_delivers_when_it_comes_up(self):
        self.start_dns()
        sink = Sink()
        port = sink.start()
        yield sink.stop()  # the port is known and nothing listens on it
        sender = self.start_sender(port, {"fwd@example.test": ["bob@remote.test"]},
                                   queue={"first_retry": 0.5, "max_retry_interval": 0.5})
        yield self.send(sender, "demo@example.test", ["fwd@example.test"],
                        b"Subject: later\r\n\r\nbody\r\n")
        envelope = yield wait_for(lambda: [e for e in self.queued(sender)
                                           if e["recipients"][0]["attempts"] >= 1])
        self.assertEqual(envelope[0]["recipients"][0]["status"], "queued")
        self.assertIn("connect to", envelope[0]["recipients"][0]["reply"])
        revived = self.start_sink(port=port)
        yield wait_for(lambda: revived.state.messages, timeout=15)
        yield wait_for(lambda: not self.queued(sender))
        self.assertEqual(len(revived.state.messages), 1)

    @defer.inlineCallbacks
    def test_null_mx_bounces_at_once(self):
        self.start_dns()
        sender = self.start_sender(2, {"fwd@example.test": ["bob@nullmx.test"]})
        yield self.send(sender, "demo@example.test", ["fwd@example.test"],
                        b"Subject: nowhere\r\n\r\nbody\r\n")
        files = yield wait_for(lambda: sender.messages("demo@example.test"))
        dsn = files[0].read_bytes()
        self.assertIn(b"Status: 5.1.10", dsn)
        self.assertIn(b"null MX", dsn)

    @defer.inlineCallbacks
    def test_mx_preference_order_is_followed(self):
        self.start_dns()
        first, second = self.start_sink_pair()
        sender = self.start_sender(first.port, {"fwd@example.test": ["bob@pref.test"]})
        yield self.send(sender, "demo@example.test", ["fwd@example.test"],
                        b"Subject: pref\r\n\r\nbody\r\n")
        yield wait_for(lambda: first.state.messages)
        self.assertEqual(second.state.connections, 0)

    @defer.inlineCallbacks
    def test_falls_back_to_the_next_mx_when_the_first_is_down(self):
        self.start_dns()
        live = self.start_sink("127.0.0.1")
        sender = self.start_sender(live.port, {"fwd@example.test": ["bob@fallback.test"]})
        yield self.send(sender, "demo@example.test", ["fwd@example.test"],
                        b"Subject: fallback\r\n\r\nbody\r\n")
        yield wait_for(lambda: live.state.messages)
        yield wait_for(lambda: not self.queued(sender))

    @defer.inlineCallbacks
    def test_dns_timeout_defers_and_never_bounces(self):
        self.start_dns(hang=["remote.test"])
        sender = self.start_sender(2, {"fwd@example.test": ["bob@remote.test"]})
        yield self.send(sender, "demo@example.test", ["fwd@example.test"],
                        b"Subject: dns\r\n\r\nbody\r\n")
        envelope = yield wait_for(lambda: [e for e in self.queued(sender)
                                           if e["recipients"][0]["attempts"] >= 1], timeout=15)
        rcpt = envelope[0]["recipients"][0]
        self.assertEqual(rcpt["status"], "queued")
        self.assertIn("4.4.3", rcpt["reply"])
        self.assertEqual(sender.messages("demo@example.test"), [])

    @defer.inlineCallbacks
    def test_private_addresses_refused_unless_allowed(self):
        self.start_dns()
        sink = self.start_sink()
        sender = self.start_sender(sink.port, {"fwd@example.test": ["bob@private.test"]},
                                   outbound={"allow_private": False})
        yield self.send(sender, "demo@example.test", ["fwd@example.test"],
                        b"Subject: private\r\n\r\nbody\r\n")
        files = yield wait_for(lambda: sender.messages("demo@example.test"))
        self.assertIn(b"only private addresses", files[0].read_bytes())
        self.assertEqual(sink.state.connections, 0)

    @defer.inlineCallbacks
    def test_expired_message_bounces_after_max_lifetime(self):
        self.start_dns()
        sink = self.start_sink()
        sink.state.replies["RCPT"] = [b"451 4.3.0 busy"]
        sender = self.start_sender(sink.port, {"fwd@example.test": ["bob@remote.test"]},
                                   queue={"max_lifetime": 0.5})
        yield self.send(sender, "demo@example.test", ["fwd@example.test"],
                        b"Subject: old\r\n\r\nbody\r\n")
        files = yield wait_for(lambda: sender.messages("demo@example.test"), timeout=15)
        self.assertIn(b"gave up", files[0].read_bytes())
        yield wait_for(lambda: not self.queued(sender))

    @defer.inlineCallbacks
    def test_delay_warning_is_sent_once_while_retrying(self):
        self.start_dns()
        sink = self.start_sink()
        sink.state.replies["RCPT"] = [b"451 4.3.0 busy"]
        sender = self.start_sender(sink.port, {"fwd@example.test": ["bob@remote.test"]},
                                   queue={"delay_warning": 0.5})
        yield self.send(sender, "demo@example.test", ["fwd@example.test"],
                        b"Subject: slow\r\n\r\nbody\r\n")
        files = yield wait_for(lambda: sender.messages("demo@example.test"), timeout=15)
        warning = email.message_from_bytes(files[0].read_bytes())
        self.assertEqual(warning["Subject"], "Delayed Mail (still being retried)")
        status = warning.get_payload()[1].as_string()
        self.assertIn("Action: delayed", status)
        self.assertIn("Status: 4.3.0", status)
        # Still queued, still retried, and warned only once.
        attempts = self.queued(sender)[0]["recipients"][0]["attempts"]
        yield wait_for(lambda: self.queued(sender)[0]["recipients"][0]["attempts"] > attempts + 2)
        self.assertEqual(len(sender.messages("demo@example.test")), 1)

    @defer.inlineCallbacks
    def test_several_messages_share_one_connection(self):
        self.start_dns()
        sink = self.start_sink()
        sink.state.replies["GREETING"] = [b"421 4.3.2 not yet", b"220 sink ESMTP"]
        sender = self.start_sender(sink.port, {"fwd@example.test": ["bob@remote.test"]},
                                   queue={"first_retry": 1.0, "max_retry_interval": 1.0})
        for i in range(3):
            yield self.send(sender, "demo@example.test", ["fwd@example.test"],
                            b"Subject: batch %d\r\n\r\nbody\r\n" % i)
        yield wait_for(lambda: len(sink.state.messages) == 3, timeout=15)
        # The three deferred messages went out together on the retry.
        self.assertLessEqual(sink.state.connections, 4)


class WireFormatTests(unittest.TestCase):
    def test_stored_message_is_sent_with_crlf_and_dot_stuffing(self):
        self.assertEqual(to_wire(b".start\nline\n.\n..two\n"),
                         b"..start\r\nline\r\n..\r\n...two\r\n.\r\n")

    def test_bare_cr_and_lf_never_reach_the_next_hop(self):
        """SMUG-10: CRLF only, and no end of data before the last."""
        wire = to_wire(b"a\rb\nc\r\n.\rd")
        self.assertNotIn(b"\r\r", wire)
        self.assertEqual(wire.count(b"\r"), wire.count(b"\n"))
        self.assertTrue(wire.endswith(b"\r\n.\r\n"))
        self.assertNotIn(b"\r\n.\r\n", wire[:-5])
