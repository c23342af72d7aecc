"""Who the inbound SMTP session accepts mail for: users, aliases, and never a relay.

An unauthenticated client may only reach the local domain (DESIGN invariant
3). Every test checks the reply the client sees and what was committed to
the spool: no envelope may ever hold a recipient in a foreign domain that no
alias put there. All clients connect from 127.0.0.1, which is therefore not
trusted either (SECURITY-TESTS RELAY-12). Case IDs refer to SECURITY-TESTS.md.
"""

from __future__ import annotations

import smtplib

from twisted.internet import defer
from twisted.trial import unittest

from tests.support.instance import in_thread, wait_for
from tests.support.smtpclient import MXInstance, RawClient, split_stored

DEMO = "demo@example.test"
ALICE = "alice@example.test"
BODY = b"Subject: routing\r\n\r\nwhere does this go?\r\n"

#: RCPT TO paths and the reply when demo and alice are the only users and
#: there is no catch-all. Tricks that must never reach evil.test.
RELAY_MATRIX = [
    ("RELAY-1", "<v@evil.test>", (554, "5.7.1")),
    ("RELAY-2", "<v%evil.test@example.test>", (550, "5.1.1")),
    ("RELAY-2", "<demo%evil.test@example.test>", (550, "5.1.1")),
    ("RELAY-3", "<v%evil.test>", (501, "5.1.3")),
    ("RELAY-4", '<"v@evil.test"@example.test>', (550, "5.1.1")),
    ("RELAY-4", '<"demo@evil.test"@example.test>', (550, "5.1.1")),
    ("RELAY-5", '<"v@evil.test">', (501, "5.1.3")),
    ("RELAY-6", "<v@evil.test@example.test>", (501, "5.1.3")),
    ("RELAY-6", "<demo@example.test@example.test>", (501, "5.1.3")),
    ("RELAY-7", "<@example.test:v@evil.test>", (554, "5.7.1")),
    ("RELAY-7", "<@example.test,@x.test:v@evil.test>", (554, "5.7.1")),
    ("RELAY-8", "<evil.test!v@example.test>", (550, "5.1.1")),
    ("RELAY-8", "<evil.test!v>", (501, "5.1.3")),
    ("RELAY-9", "<v@[192.0.2.1]>", (554, "5.7.1")),
    ("RELAY-9", "<v@[IPv6:2001:db8::1]>", (554, "5.7.1")),
    ("RELAY-9", "<v@[127.0.0.1]>", (554, "5.7.1")),
    ("RELAY-9", "<postmaster@[127.0.0.1]>", (554, "5.7.1")),
    ("RELAY-10", "<v@example.test.>", (550, "5.1.1")),
    ("RELAY-10", "<v@evilexample.test>", (554, "5.7.1")),
    ("RELAY-10", "<demo@evilexample.test>", (554, "5.7.1")),
    ("RELAY-10", "<v@example.test.evil.test>", (554, "5.7.1")),
    ("RELAY-10", "<demo@example.test.evil.test>", (554, "5.7.1")),
    # The same user, however it is spelled: accepted, and one copy for demo.
    ("RELAY-10", "<demo@example.test.>", (250, "2.1.5")),
    ("RELAY-10", "<demo@EXAMPLE.TEST>", (250, "2.1.5")),
    ("RELAY-10", "<DeMo@Example.Test>", (250, "2.1.5")),
    ("RELAY-7", "<@evil.test:demo@example.test>", (250, "2.1.5")),
    ("RFC 5321 4.1.2", '<"demo"@example.test>', (250, "2.1.5")),
]


def smtp(instance: MXInstance) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", instance.port, local_hostname="client.test", timeout=5)


def send_to(instance: MXInstance, paths: list[str]) -> tuple[list, object]:
    """One transaction: each RCPT's reply, then DATA's outcome (None if nothing was accepted)."""
    with RawClient(instance.port) as client:
        client.ehlo()
        client.expect("MAIL FROM:<sender@remote.test>", 250)
        replies = [client.command(f"RCPT TO:{path}") for path in paths]
        done = None
        if client.command("DATA").code == 354:
            client.send(BODY + b".\r\n")
            done = client.reply()
        client.expect("QUIT", 221)
        return replies, done


def recipients(envelopes) -> list[tuple[str, bool, str]]:
    return [(r.address, r.local, r.status) for e in envelopes for r in e.recipients]


class RecipientTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_unknown_local_user(self):
        instance = MXInstance(self)

        def send():
            with smtp(instance) as client:
                client.ehlo()
                client.mail("sender@remote.test")
                return client.rcpt("nobody@example.test"), client.rcpt(DEMO)

        unknown, known = yield in_thread(send)
        self.assertEqual(unknown[0], 550)
        self.assertTrue(unknown[1].startswith(b"5.1.1 <nobody@example.test>: "))
        self.assertEqual(known, (250, b"2.1.5 Ok"))

    @defer.inlineCallbacks
    def test_foreign_domain_is_not_relayed(self):
        """RELAY-1: the baseline, from a loopback client (RELAY-12)."""
        instance = MXInstance(self)

        def send():
            with smtp(instance) as client:
                return client.sendmail("sender@remote.test", ["v@evil.test"], BODY)

        error = yield self.assertFailure(in_thread(send), smtplib.SMTPRecipientsRefused)
        code, text = error.recipients["v@evil.test"]
        self.assertEqual(code, 554)
        self.assertTrue(text.startswith(b"5.7.1 "), text)
        self.assertIn(b"Relay access denied", text)
        self.assertEqual(instance.committed, [])

    @defer.inlineCallbacks
    def test_malformed_recipients(self):
        instance = MXInstance(self)
        replies, done = yield in_thread(send_to, instance, [
            "<demo@>", "<de mo@example.test>", "<demo@example..test>", "<demo@-example.test>",
            "<demo example.test>", "<>", "<" + "d" * 65 + "@example.test>",
            "<demo@example.test", "<demo@example.test> NOTIFY=NEVER",
            "demo@example.test"])  # no brackets: tolerated, as Postfix does
        self.assertEqual([r.status for r in replies],
                         [(501, "5.1.3")] * 8 + [(555, "5.5.4"), (250, "2.1.5")])
        self.assertEqual(done.code, 250)

    @defer.inlineCallbacks
    def test_postmaster_without_domain(self):
        """RFC 5321 4.5.1: ``RCPT TO:<postmaster>`` is accepted, in any case."""
        instance = MXInstance(self, aliases={"postmaster@example.test": [DEMO]})
        replies, done = yield in_thread(send_to, instance, ["<postmaster>", "<Postmaster>",
                                                            "postmaster"])
        self.assertEqual([r.status for r in replies], [(250, "2.1.5")] * 3)
        self.assertEqual(done.code, 250)
        files = yield wait_for(lambda: instance.stored(DEMO))
        self.assertEqual(len(files), 1)
        self.assertEqual(split_stored(files[0])[2], BODY.replace(b"\r\n", b"\n"))

    @defer.inlineCallbacks
    def test_recipient_limit(self):
        """RELAY-13: the configured number of RCPTs is accepted, the next gets 452 4.5.3."""
        instance = MXInstance(self, smtp={"max_recipients": 105},
                              aliases={"@example.test": [DEMO]})

        def send():
            with RawClient(instance.port) as client:
                client.ehlo()
                client.send(b"MAIL FROM:<sender@remote.test>\r\n" + b"".join(
                    b"RCPT TO:<r%d@example.test>\r\n" % i for i in range(107)) + b"DATA\r\n")
                replies = client.replies(109)
                client.send(BODY + b".\r\n")
                return replies, client.reply()

        replies, done = yield in_thread(send)
        self.assertEqual([r.status for r in replies],
                         [(250, "2.1.0")] + [(250, "2.1.5")] * 105 + [(452, "4.5.3")] * 2
                         + [(354, "")])
        self.assertEqual(done.code, 250)
        # Every one of them is the catch-all: one copy for demo.
        self.assertEqual(recipients(instance.committed), [(DEMO, True, "queued")])
        files = yield wait_for(lambda: instance.stored(DEMO))
        self.assertEqual(len(files), 1)

    @defer.inlineCallbacks
    def test_default_recipient_limit_is_the_rfc_minimum(self):
        """RFC 5321 4.5.3.1.8: at least 100 recipients are accepted."""
        instance = MXInstance(self, aliases={"@example.test": [DEMO]})

        def send():
            with RawClient(instance.port) as client:
                client.ehlo()
                client.send(b"MAIL FROM:<sender@remote.test>\r\n" + b"".join(
                    b"RCPT TO:<r%d@example.test>\r\n" % i for i in range(101)))
                return client.replies(102)

        replies = yield in_thread(send)
        self.assertEqual([r.status for r in replies[1:]],
                         [(250, "2.1.5")] * 100 + [(452, "4.5.3")])


class AliasTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_alias_to_two_users(self):
        instance = MXInstance(self, aliases={"team@example.test": [DEMO, ALICE]})

        def send():
            with smtp(instance) as client:
                return client.sendmail("sender@remote.test", ["team@example.test"], BODY)

        self.assertEqual((yield in_thread(send)), {})
        demo = yield wait_for(lambda: instance.stored(DEMO))
        alice = yield wait_for(lambda: instance.stored(ALICE))
        self.assertEqual(demo, alice)
        return_path, received, message = split_stored(demo[0])
        self.assertEqual(message, BODY.replace(b"\r\n", b"\n"))
        # The trace names the address the client used, not where it went.
        self.assertIn(" for <team@example.test>; ", received)
        self.assertEqual([(r.address, r.original) for r in instance.committed[0].recipients],
                         [(DEMO, "team@example.test"), (ALICE, "team@example.test")])

    @defer.inlineCallbacks
    def test_catch_all(self):
        """``@example.test`` takes what no user or alias takes; users keep their own mail."""
        instance = MXInstance(self, aliases={"@example.test": [DEMO]})

        def send():
            with smtp(instance) as client:
                client.sendmail("sender@remote.test", ["Whoever@Example.Test"],
                                b"Subject: one\r\n\r\n1\r\n")
                client.sendmail("sender@remote.test", [ALICE], b"Subject: two\r\n\r\n2\r\n")

        yield in_thread(send)
        demo = yield wait_for(lambda: instance.stored(DEMO))
        alice = yield wait_for(lambda: instance.stored(ALICE))
        self.assertEqual([split_stored(m)[2] for m in demo], [b"Subject: one\n\n1\n"])
        self.assertEqual([split_stored(m)[2] for m in alice], [b"Subject: two\n\n2\n"])

    @defer.inlineCallbacks
    def test_alias_to_remote_address_is_queued(self):
        """Forwarding is committed to the spool for the outbound side, never dropped."""
        instance = MXInstance(self, aliases={"fwd@example.test": ["far@remote.test"],
                                             "both@example.test": [DEMO, "near@remote.test"]})

        def send():
            with smtp(instance) as client:
                client.ehlo()
                client.mail("sender@remote.test")
                client.rcpt("fwd@example.test")
                first = client.data(b"Subject: forwarded\r\n\r\nfar away\r\n")
                client.mail("sender@remote.test")
                client.rcpt("both@example.test")
                second = client.data(b"Subject: split\r\n\r\nhere and there\r\n")
                return first, second

        first, second = yield in_thread(send)
        self.assertEqual((first[0], second[0]), (250, 250))
        # spool/queue/<id>.env as it was when the 250 was sent.
        forwarded, split = instance.committed
        self.assertEqual([(r.address, r.original, r.local, r.status) for r in forwarded.recipients],
                         [("far@remote.test", "fwd@example.test", False, "queued")])
        self.assertEqual(recipients([split]), [(DEMO, True, "queued"),
                                               ("near@remote.test", False, "queued")])
        for envelope, body in ((forwarded, b"Subject: forwarded\n\nfar away\n"),
                               (split, b"Subject: split\n\nhere and there\n")):
            message = instance.committed_messages[envelope.id]
            self.assertEqual(message[:envelope.body_offset], b"Return-Path: <sender@remote.test>\n")
            self.assertEqual(split_stored(message)[2], body)
        files = yield wait_for(lambda: instance.stored(DEMO))
        self.assertEqual([split_stored(m)[2] for m in files],
                         [b"Subject: split\n\nhere and there\n"])


class RelayTrickTests(unittest.TestCase):
    """SECURITY-TESTS section 4: no address trick turns mailstack into a relay."""

    @defer.inlineCallbacks
    def test_relay_matrix(self):
        instance = MXInstance(self, smtp={"max_errors": 100})
        paths = [path for _, path, _ in RELAY_MATRIX]
        replies, done = yield in_thread(send_to, instance, paths)
        got = [(case, path, r.status) for (case, path, _), r in zip(RELAY_MATRIX, replies)]
        self.assertEqual(got, RELAY_MATRIX)
        self.assertEqual(done.code, 250)
        # Every accepted spelling is demo, who gets exactly one copy.
        self.assertEqual(recipients(instance.committed), [(DEMO, True, "queued")])
        files = yield wait_for(lambda: instance.stored(DEMO))
        self.assertEqual(len(files), 1)
        yield wait_for(lambda: not instance.spooled())

    @defer.inlineCallbacks
    def test_relay_matrix_with_catch_all(self):
        """With a catch-all, tricks may be delivered locally, but still never relayed."""
        instance = MXInstance(self, smtp={"max_errors": 100},
                              aliases={"@example.test": [DEMO]})
        paths = [path for _, path, _ in RELAY_MATRIX]
        replies, done = yield in_thread(send_to, instance, paths)
        for (case, path, expected), reply in zip(RELAY_MATRIX, replies):
            if expected[0] == 550 and not path.startswith('<"'):
                # A name no user has: the catch-all takes it, locally.
                expected = (250, "2.1.5")
            self.assertEqual((case, path, reply.status), (case, path, expected))
        self.assertEqual(done.code, 250)
        self.assertEqual(recipients(instance.committed), [(DEMO, True, "queued")])
        yield wait_for(lambda: instance.stored(DEMO))
        yield wait_for(lambda: not instance.spooled())
