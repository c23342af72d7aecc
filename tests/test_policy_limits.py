"""Greylisting, rate limits, allow/block lists and DNSBL, checker by checker.

Time is a ``task.Clock`` (STYLE 7); DNSBL lookups go to the real DNS fixture.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from twisted.internet import defer, task
from twisted.trial import unittest

from mailstack.config import DNSBLPolicy, GreylistPolicy, ListsPolicy, RateLimitPolicy
from mailstack.policy.chain import Chain
from mailstack.policy.dnsbl import DNSBLChecker, query_name
from mailstack.policy.greylist import Greylist, GreylistChecker, client_network
from mailstack.policy.interface import Action
from mailstack.policy.lists import ListsChecker, parse
from mailstack.policy.ratelimit import RateLimitChecker
from tests.support.dnsserver import DNSFixture
from tests.support.policykit import environment, resolver_for, start_dns


def status(reply) -> str:
    return "250" if reply is None else f"{reply.code} {reply.enhanced}"


class GreylistStoreTests(unittest.TestCase):
    def setUp(self):
        self.path = Path(self.mktemp()) / "greylist.sqlite"
        self.store = self.open()

    def open(self):
        store = Greylist(self.path, delay=300, retry_window=3600, expiry=86400)
        self.addCleanup(store.close)
        return store

    def test_first_try_waits_retry_before_delay_waits_after_delay_passes(self):
        net = "192.0.2.0/24"
        self.assertEqual(self.store.check(net, "a@x.test", "demo@example.test", 1000.0), 300)
        self.assertEqual(self.store.check(net, "a@x.test", "demo@example.test", 1100.0), 200)
        self.assertEqual(self.store.check(net, "a@x.test", "demo@example.test", 1300.0), 0)
        self.assertEqual(self.store.check(net, "a@x.test", "demo@example.test", 5000.0), 0)

    def test_restart_remembers_triplets_and_senders(self):
        net = "192.0.2.0/24"
        self.store.check(net, "a@x.test", "demo@example.test", 1000.0)
        self.store.close()
        store = self.open()
        self.assertEqual(store.check(net, "a@x.test", "demo@example.test", 1301.0), 0)
        store.close()
        store = self.open()
        # A sender that passed once: other recipients pass at once.
        self.assertEqual(store.check(net, "a@x.test", "alice@example.test", 1400.0), 0)
        # Not from another network, nor another sender.
        self.assertEqual(store.check("198.51.100.0/24", "a@x.test", "demo@example.test", 1400.0),
                         300)
        self.assertEqual(store.check(net, "b@x.test", "demo@example.test", 1400.0), 300)

    def test_a_retry_after_the_window_starts_again(self):
        net = "192.0.2.0/24"
        self.store.check(net, "a@x.test", "demo@example.test", 1000.0)
        self.assertEqual(self.store.check(net, "a@x.test", "demo@example.test", 1000.0 + 3700), 300)

    def test_a_pass_expires_when_unused(self):
        net = "192.0.2.0/24"
        self.store.check(net, "a@x.test", "demo@example.test", 1000.0)
        self.store.check(net, "a@x.test", "demo@example.test", 1300.0)
        self.assertEqual(self.store.check(net, "a@x.test", "demo@example.test", 1300 + 86401), 300)
        self.store.prune(1300 + 86401 + 10_000)
        rows = self.store.db.execute("SELECT COUNT(*) FROM triplets")
        self.assertEqual(rows[0][0], 0)

    def test_client_networks(self):
        self.assertEqual(client_network("192.0.2.77"), "192.0.2.0/24")
        self.assertEqual(client_network("::ffff:192.0.2.77"), "192.0.2.0/24")
        self.assertEqual(client_network("2001:db8:1:2:3:4:5:6"), "2001:db8:1:2::/64")
        self.assertEqual(client_network("192.0.2.77", v4_prefix=32), "192.0.2.77/32")


class GreylistCheckerTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_000_000)
        env = environment(None, self.mktemp(), self.clock)
        self.checker = GreylistChecker(GreylistPolicy(delay=60), env)
        self.addCleanup(self.checker.close)
        self.chain = Chain([self.checker], env)

    @defer.inlineCallbacks
    def rcpt(self, ip="192.0.2.10", sender="a@x.test", user="", allow=False):
        policy = self.chain.session(ip)
        if user:
            policy.authenticated(user)
        if allow:
            policy.conn.allowed = "ip 192.0.2.0/24"
        yield policy.mail(sender)
        return status((yield policy.rcpt("demo@example.test")))

    @defer.inlineCallbacks
    def test_greylisted_then_passes_from_a_neighbour_address(self):
        self.assertEqual((yield self.rcpt()), "451 4.7.1")
        self.clock.advance(30)
        self.assertEqual((yield self.rcpt(ip="192.0.2.11")), "451 4.7.1")
        self.clock.advance(31)
        self.assertEqual((yield self.rcpt(ip="192.0.2.12")), "250")

    @defer.inlineCallbacks
    def test_authenticated_and_allowed_sessions_are_never_greylisted(self):
        self.assertEqual((yield self.rcpt(user="demo@example.test")), "250")
        self.assertEqual((yield self.rcpt(allow=True)), "250")
        rows = self.checker.store.db.execute("SELECT COUNT(*) FROM triplets")
        self.assertEqual(rows[0][0], 0)


class RateLimitTests(unittest.TestCase):
    def setUp(self):
        self.clock = task.Clock()
        settings = RateLimitPolicy(window=60, max_connections=2, max_messages=2,
                                   max_recipients=2)
        self.checker = RateLimitChecker(settings, environment(None, ".", self.clock))
        self.chain = Chain([self.checker], environment(None, ".", self.clock))

    @defer.inlineCallbacks
    def test_connections_per_window(self):
        for _ in range(2):
            self.assertIsNone((yield self.chain.session("192.0.2.1").connect()))
        reply = yield self.chain.session("192.0.2.1").connect()
        self.assertEqual(status(reply), "421 4.7.0")
        self.assertIn("Too many connections from [192.0.2.1]", reply.text)
        self.assertIsNone((yield self.chain.session("192.0.2.2").connect()))
        self.clock.advance(61)
        self.assertIsNone((yield self.chain.session("192.0.2.1").connect()))

    @defer.inlineCallbacks
    def test_messages_per_window_and_recipients_per_message(self):
        policy = self.chain.session("192.0.2.1")
        for _ in range(2):
            self.assertIsNone((yield policy.mail("a@x.test")))
        self.assertEqual(status((yield policy.rcpt("a@example.test"))), "250")
        self.assertEqual(status((yield policy.rcpt("b@example.test"))), "250")
        reply = yield policy.rcpt("c@example.test")
        self.assertEqual(status(reply), "452 4.5.3")
        reply = yield policy.mail("a@x.test")
        self.assertEqual(status(reply), "451 4.7.1")
        self.assertIn("Too many messages", reply.text)

    def test_the_table_is_bounded(self):
        self.checker.connections.max_entries = 10
        for i in range(50):
            self.checker.connections.hit(f"10.0.0.{i}")
        self.assertEqual(len(self.checker.connections._events), 10)


LISTS = """\
# local policy
allow ip     192.0.2.0/24
block ip     192.0.2.66        # one bad host inside an allowed network
block ip     2001:db8:bad::/48
allow helo   mx.partner.test
block helo   .dynamic.test
allow sender friend@spam.test
block sender spam.test
block sender .evil.test
allow sender partner.test
"""


class ListsTests(unittest.TestCase):
    def setUp(self):
        self.path = Path(self.mktemp())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(LISTS)
        env = environment(None, ".", task.Clock())
        self.checker = ListsChecker(ListsPolicy(file=self.path), env)
        self.chain = Chain([self.checker], env)

    @defer.inlineCallbacks
    def session(self, ip="198.51.100.1", helo="mail.example.org", sender=None):
        policy = self.chain.session(ip)
        replies = [status((yield policy.connect())), status((yield policy.helo(helo)))]
        if sender is not None:
            replies.append(status((yield policy.mail(sender))))
        return policy, replies

    @defer.inlineCallbacks
    def test_ip_entries_most_specific_first(self):
        policy, replies = yield self.session(ip="192.0.2.7")
        self.assertEqual((replies, policy.conn.allowed), (["250", "250"], "ip 192.0.2.0/24"))
        policy, replies = yield self.session(ip="192.0.2.66")
        self.assertEqual(replies[0], "554 5.7.1")
        policy, replies = yield self.session(ip="2001:db8:bad::1")
        self.assertEqual(replies[0], "554 5.7.1")
        policy, replies = yield self.session(ip="198.51.100.1")
        self.assertEqual((replies, policy.conn.allowed), (["250", "250"], ""))

    @defer.inlineCallbacks
    def test_helo_entries(self):
        policy, replies = yield self.session(helo="MX.Partner.test")
        self.assertEqual(policy.conn.allowed, "helo mx.partner.test")
        policy, replies = yield self.session(helo="host-1-2-3-4.pool.dynamic.test")
        self.assertEqual(replies[1], "554 5.7.1")
        self.assertEqual((yield policy.helo("mx.partner.test")), None)
        # A new HELO drops what the previous name allowed.
        yield policy.helo("other.example.org")
        self.assertEqual(policy.conn.allowed, "")

    @defer.inlineCallbacks
    def test_sender_entries_address_before_domain(self):
        _, replies = yield self.session(sender="anyone@spam.test")
        self.assertEqual(replies[2], "554 5.7.1")
        policy, replies = yield self.session(sender="Friend@SPAM.test")
        self.assertEqual((replies[2], policy.txn.allowed), ("250", "sender friend@spam.test"))
        _, replies = yield self.session(sender="x@a.b.evil.test")
        self.assertEqual(replies[2], "554 5.7.1")
        _, replies = yield self.session(sender="x@evil.test")
        self.assertEqual(replies[2], "554 5.7.1")
        policy, replies = yield self.session(sender="x@partner.test")
        self.assertEqual(policy.txn.allowed, "sender partner.test")
        policy, _ = yield self.session(sender="x@sub.partner.test")
        self.assertEqual(policy.txn.allowed, "")
        _, replies = yield self.session(sender="")
        self.assertEqual(replies[2], "250")

    @defer.inlineCallbacks
    def test_the_file_reloads_when_it_changes_and_a_broken_edit_keeps_the_old_one(self):
        _, replies = yield self.session(ip="203.0.113.9")
        self.assertEqual(replies[0], "250")
        self.path.write_text(LISTS + "block ip 203.0.113.0/24\n")
        os.utime(self.path, (time.time() + 5, time.time() + 5))
        _, replies = yield self.session(ip="203.0.113.9")
        self.assertEqual(replies[0], "554 5.7.1")
        self.path.write_text("this is not a list\n")
        os.utime(self.path, (time.time() + 10, time.time() + 10))
        _, replies = yield self.session(ip="203.0.113.9")
        self.assertEqual(replies[0], "554 5.7.1")
        self.assertIn("expected 'allow|block", str(self.checker.file.last_error))

    def test_parse_errors_name_the_line(self):
        for text, reason in (("allow ip 300.1.1.1", "not an address"),
                             ("permit ip 10.0.0.0/8", "expected"),
                             ("block sender @", "not an address or a domain"),
                             ("block helo bad_name!", "not a host name")):
            with self.assertRaises(ValueError) as caught:
                parse(["# x", text], Path("lists"))
            self.assertIn("lists:2:", str(caught.exception))
            self.assertIn(reason, str(caught.exception))


class DNSBLTests(unittest.TestCase):
    ZONE = {
        "2.0.0.127.bl.test": {"A": ["127.0.0.2"]},
        "3.0.0.127.bl.test": {"A": ["127.255.255.254"]},  # "query refused", not a listing
        "2.0.0.127.other.test": {"A": ["127.0.0.4"]},
        "4.0.0.127.bl.test": {"A": ["127.0.0.10"]},
    }

    def setUp(self):
        self.dns = DNSFixture(self.ZONE, hang=["5.0.0.127.bl.test"])
        start_dns(self.dns)
        self.addCleanup(self.dns.stop)
        env = environment(resolver_for(self.dns.port, timeout=0.3), self.mktemp())
        self.chain = Chain([DNSBLChecker(DNSBLPolicy(zones=("bl.test", "other.test")), env)], env)

    @defer.inlineCallbacks
    def rcpt(self, ip, allowed=""):
        policy = self.chain.session(ip)
        self.assertIsNone((yield policy.connect()))
        policy.conn.allowed = allowed
        yield policy.mail("a@x.test")
        return (yield policy.rcpt("demo@example.test"))

    @defer.inlineCallbacks
    def test_a_listed_client_is_refused_at_rcpt_naming_the_zone(self):
        reply = yield self.rcpt("127.0.0.2")
        self.assertEqual(status(reply), "554 5.7.1")
        self.assertEqual(reply.text, "Service unavailable; client [127.0.0.2] blocked using bl.test")
        reply = yield self.rcpt("127.0.0.4")
        self.assertIn("blocked using bl.test", reply.text)

    @defer.inlineCallbacks
    def test_not_listed_and_error_codes(self):
        self.assertIsNone((yield self.rcpt("127.0.0.6")))
        self.assertIsNone((yield self.rcpt("127.0.0.3")))

    @defer.inlineCallbacks
    def test_a_lookup_timeout_is_451_4_4_3(self):
        reply = yield self.rcpt("127.0.0.5")
        self.assertEqual(status(reply), "451 4.4.3")

    @defer.inlineCallbacks
    def test_an_allowed_client_skips_it(self):
        self.assertIsNone((yield self.rcpt("127.0.0.2", allowed="ip 127.0.0.0/8")))

    def test_query_names(self):
        self.assertEqual(query_name("192.0.2.1", "bl.test"), "1.2.0.192.bl.test")
        self.assertEqual(query_name("::ffff:192.0.2.1", "bl.test."), "1.2.0.192.bl.test")
        self.assertEqual(query_name("2001:db8::1", "bl.test"),
                         "1." + "0." * 23 + "8.b.d.0.1.0.0.2.bl.test")


class VerdictShapeTests(unittest.TestCase):
    def test_ratelimit_connect_verdict_is_421(self):
        checker = RateLimitChecker(RateLimitPolicy(max_connections=1),
                                   environment(None, ".", task.Clock()))
        from mailstack.policy.interface import Connection
        conn = Connection("192.0.2.1")
        self.successResultOf(checker.connect(conn))
        verdict = self.successResultOf(checker.connect(conn))
        self.assertEqual((verdict.action, verdict.code), (Action.DEFER, 421))
