"""Submission on 587 (STARTTLS) and 465 (implicit TLS): AUTH, sender rules, DKIM.

A user's mail program authenticates, sends, and the message leaves through
the outbound queue to the remote domain's MX (a sink found through the DNS
fixture) with a DKIM signature that verifies against the published key.
"""

import base64
import re
import smtplib
import socket
import ssl
import time

import dkim
import dns.resolver
from twisted.internet import defer
from twisted.logger import formatEvent, globalLogPublisher

from mailstack.queue.dkimsign import generate_key, txt_record_name
from tests.support.dnsserver import DNSFixture
from tests.support.instance import PASSWORD, Instance, in_thread, wait_for
from tests.test_outbound import ZONE, OutboundTestCase

LISTEN = (("smtp", 0), ("submission", 0), ("submissions", 0))


def tls_context():
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class SubmissionTestCase(OutboundTestCase):
    def start(self, submission=None, aliases=None, dkim_algorithms=("rsa",), auth=None):
        zone = dict(ZONE)
        self.dns = DNSFixture(zone)
        self.dns.start()
        self.addCleanup(self.dns.stop)
        self.sink = self.start_sink()
        sections = {"dns": self.dns.config,
                    "outbound": {"port": self.sink.port, "allow_private": True},
                    "queue": {"first_retry": 0.3, "max_retry_interval": 0.6},
                    "auth": {"failure_delay": 0.2, **(auth or {})},
                    "submission": submission or {}}
        root = self.mktemp()
        self.instance = Instance(root, listen=LISTEN, sections=sections,
                                 aliases=aliases or {"sales@example.test": ["demo@example.test"]})
        for index, algorithm in enumerate(dkim_algorithms):
            selector = f"sel{index}"
            _, txt = generate_key(self.instance.config.dkim.keys_dir, "example.test", selector,
                                  algorithm)
            zone[txt_record_name("example.test", selector)] = {"TXT": [txt]}
        self.dns.resolver.records.update(zone)
        self.instance.start()
        self.addCleanup(self.instance.stop)

    def client(self, implicit=False):
        if implicit:
            return smtplib.SMTP_SSL("127.0.0.1", self.instance.port("submissions"),
                                    context=tls_context(), timeout=10)
        client = smtplib.SMTP("127.0.0.1", self.instance.port("submission"), timeout=10)
        client.starttls(context=tls_context())
        return client

    def dkim_verify(self, data: bytes) -> list[bool]:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = ["127.0.0.1"]
        resolver.port = self.dns.port

        def dnsfunc(name, timeout=5):
            answer = resolver.resolve(name.decode().rstrip("."), "TXT")
            return b"".join(answer[0].strings)

        verifier = dkim.DKIM(data)
        count = data.count(b"DKIM-Signature:")
        return [verifier.verify(idx=i, dnsfunc=dnsfunc) for i in range(count)]


class SendingTests(SubmissionTestCase):
    @defer.inlineCallbacks
    def test_starttls_auth_send_arrives_signed_at_the_remote_mx(self):
        self.start(dkim_algorithms=("rsa", "ed25519"))
        body = (b"From: Demo <demo@example.test>\r\nTo: bob@remote.test\r\nSubject: hi\r\n"
                b"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <given@example.test>\r\n"
                b"\r\nhello over 587\r\n")

        def send():
            with self.client() as client:
                client.login("demo@example.test", PASSWORD)
                return client.sendmail("demo@example.test", ["bob@remote.test"], body)

        self.assertEqual((yield in_thread(send)), {})
        yield wait_for(lambda: self.sink.state.messages)
        received = self.sink.state.messages[0]
        self.assertEqual((received.sender, received.recipients),
                         ("demo@example.test", ["bob@remote.test"]))
        self.assertNotIn(b"Return-Path", received.data)
        self.assertIn(b"with ESMTPSA", received.data)
        self.assertIn(b"a=rsa-sha256", received.data)
        self.assertIn(b"a=ed25519-sha256", received.data)
        self.assertIn(b"c=relaxed/relaxed", received.data)
        self.assertEqual((yield in_thread(self.dkim_verify, received.data)), [True, True])
        self.assertIn(b"Message-ID: <given@example.test>", received.data)
        self.assertTrue(received.data.endswith(b"\r\n\r\nhello over 587\r\n"))

    @defer.inlineCallbacks
    def test_from_is_oversigned_so_an_added_from_breaks_the_signature(self):
        self.start()
        body = b"From: demo@example.test\r\nTo: bob@remote.test\r\nSubject: s\r\n\r\nbody\r\n"

        def send():
            with self.client() as client:
                client.login("demo@example.test", PASSWORD)
                client.sendmail("demo@example.test", ["bob@remote.test"], body)

        yield in_thread(send)
        yield wait_for(lambda: self.sink.state.messages)
        data = self.sink.state.messages[0].data
        self.assertRegex(data.replace(b"\r\n\t", b" ").decode(), r"h=from\s*:\s*from")
        head, _, rest = data.partition(b"From: demo@example.test")
        forged = head + b"From: ceo@example.test\r\nFrom: demo@example.test" + rest
        self.assertEqual((yield in_thread(self.dkim_verify, data)), [True])
        self.assertEqual((yield in_thread(self.dkim_verify, forged)), [False])

    @defer.inlineCallbacks
    def test_implicit_tls_with_auth_login_and_local_delivery(self):
        self.start()

        def send():
            with self.client(implicit=True) as client:
                client.ehlo()
                self.assertIn("LOGIN", client.esmtp_features["auth"])
                client.user, client.password = "demo@example.test", PASSWORD
                code, _ = client.auth("LOGIN", client.auth_login, initial_response_ok=False)
                self.assertEqual(code, 235)
                client.sendmail("demo@example.test", ["alice@example.test"],
                                b"From: demo@example.test\r\nSubject: local\r\n\r\nhi alice\r\n")

        yield in_thread(send)
        files = yield wait_for(lambda: self.instance.messages("alice@example.test"))
        data = files[0].read_bytes()
        self.assertIn(b"\nMessage-ID: <", data)  # completed by the server
        self.assertIn(b"\nDate: ", data)
        self.assertIn(b"DKIM-Signature:", data)

    @defer.inlineCallbacks
    def test_alias_owned_by_the_user_may_be_the_sender(self):
        self.start()

        def send():
            with self.client() as client:
                client.login("demo@example.test", PASSWORD)
                return client.sendmail("sales@example.test", ["bob@remote.test"],
                                       b"From: Sales <sales@example.test>\r\n\r\nhi\r\n")

        self.assertEqual((yield in_thread(send)), {})
        yield wait_for(lambda: self.sink.state.messages)

    @defer.inlineCallbacks
    def test_client_address_hidden_when_configured(self):
        self.start(submission={"hide_client_address": True})

        def send():
            with self.client() as client:
                client.login("demo@example.test", PASSWORD)
                client.sendmail("demo@example.test", ["alice@example.test"],
                                b"From: demo@example.test\r\n\r\nhi\r\n")

        yield in_thread(send)
        files = yield wait_for(lambda: self.instance.messages("alice@example.test"))
        data = files[0].read_bytes()
        self.assertIn(b"Received: by mail.example.test (mailstack) with ESMTPSA id ", data)
        self.assertNotIn(b"127.0.0.1", data)


class RefusalTests(SubmissionTestCase):
    def raw(self, lines, implicit=True, drain=False):
        """Send lines (after EHLO) over TLS; return every reply line.

        ``drain``: also read what the server sends after the last reply,
        until it closes the connection.
        """
        port = self.instance.port("submissions" if implicit else "submission")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as plain:
            sock = tls_context().wrap_socket(plain) if implicit else plain
            reader = sock.makefile("rb")
            replies = [reader.readline()]
            for line in [b"EHLO client.test", *lines]:
                sock.sendall(line + b"\r\n")
                while True:
                    answer = reader.readline()
                    replies.append(answer)
                    if answer[3:4] != b"-":
                        break
            while drain and (answer := reader.readline()):
                replies.append(answer)
            return [r.rstrip(b"\r\n") for r in replies]

    @defer.inlineCallbacks
    def test_no_auth_before_tls_on_587(self):
        """AUTH-1: no AUTH in the plaintext EHLO, 538 5.7.11 for AUTH; AUTH-12: 530 5.7.0."""
        self.start()
        replies = yield in_thread(self.raw, [b"AUTH PLAIN AGRlbW9AZXhhbXBsZS50ZXN0AHg=",
                                             b"MAIL FROM:<demo@example.test>"], implicit=False)
        self.assertFalse([r for r in replies if b"AUTH" in r and r.startswith(b"250")])
        self.assertTrue([r for r in replies if r[:4] in (b"250-", b"250 ") and r[4:] == b"STARTTLS"])
        self.assertTrue(replies[-2].startswith(b"538 5.7.11"))
        self.assertTrue(replies[-1].startswith(b"530 5.7.0"))

    @defer.inlineCallbacks
    def test_relay_tricks_without_auth_never_get_a_recipient(self):
        """SECURITY-TESTS section 4 on 587 (after STARTTLS) and 465, without AUTH (AUTH-12)."""
        self.start()
        tricks = [b"<v@evil.test>", b"<v%evil.test@example.test>", b"<v%evil.test>",
                  b'<"v@evil.test"@example.test>', b'<"v@evil.test">',
                  b"<v@evil.test@example.test>", b"<@example.test:v@evil.test>",
                  b"<evil.test!v@example.test>", b"<v@[192.0.2.1]>", b"<v@example.test.evil.test>",
                  b"<demo@example.test>"]
        for implicit in (True, False):
            for rcpt in tricks:
                replies = yield in_thread(self.raw_tls, [
                    b"MAIL FROM:<demo@example.test>", b"RCPT TO:" + rcpt], implicit)
                self.assertTrue(replies[-2].startswith(b"530 5.7.0"), replies)
                self.assertTrue(replies[-1].startswith(b"503 5.5.1"), replies)
        self.assertEqual(list((self.instance.config.server.spool_dir / "queue").iterdir()), [])

    def raw_tls(self, lines, implicit):
        """Like ``raw``, for 587 too: STARTTLS first, then EHLO again inside TLS."""
        if implicit:
            return self.raw(lines)
        port = self.instance.port("submission")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as plain:
            reader = plain.makefile("rb")
            reader.readline()
            plain.sendall(b"EHLO client.test\r\n")
            while reader.readline()[3:4] == b"-":
                pass
            plain.sendall(b"STARTTLS\r\n")
            assert reader.readline().startswith(b"220")
            sock = tls_context().wrap_socket(plain)
            reader = sock.makefile("rb")
            replies = []
            for line in [b"EHLO client.test", *lines]:
                sock.sendall(line + b"\r\n")
                while (answer := reader.readline())[3:4] == b"-":
                    pass
                replies.append(answer.rstrip(b"\r\n"))
            return replies

    @defer.inlineCallbacks
    def test_wrong_password_gets_535_after_a_growing_delay_then_421(self):
        """AUTH-4: 535 5.7.8 for each wrong AUTH PLAIN, then 421 4.7.0 and close."""
        self.start(auth={"failure_delay": 0.3})
        bad = base64.b64encode(b"\0demo@example.test\0wrong").decode()
        started = time.monotonic()
        replies = yield in_thread(self.raw, [f"AUTH PLAIN {bad}".encode()] * 3, drain=True)
        elapsed = time.monotonic() - started
        self.assertEqual([r[:9] for r in replies[-4:-1]],
                         [b"535 5.7.8", b"535 5.7.8", b"535 5.7.8"])
        self.assertTrue(replies[-1].startswith(b"421 4.7.0"))
        self.assertGreaterEqual(elapsed, 0.3 + 0.6 + 0.9 - 0.05)

    @defer.inlineCallbacks
    def test_failures_are_logged_for_fail2ban(self):
        self.start()
        lines = []
        observer = lambda event: lines.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        token = base64.b64encode(b"\0x>, rip=[192.0.2.99]\0wrong")
        yield in_thread(self.raw, [b"AUTH PLAIN " + token])
        # The README's filter: "\\] auth failed: rip=\\[<HOST>\\], user="
        hosts = [m.group(1) for line in lines
                 if (m := re.search(r"auth failed: rip=\[([^\]]+)\], user=", line))]
        self.assertEqual(hosts, ["127.0.0.1"])

    @defer.inlineCallbacks
    def test_failures_for_one_account_lock_it_for_the_window(self):
        self.start(auth={"max_failures_per_account": 2, "failure_delay": 0.05})
        bad = base64.b64encode(b"\0demo@example.test\0wrong")
        good = base64.b64encode(f"\0DEMO@example.test\0{PASSWORD}".encode())
        yield in_thread(self.raw, [b"AUTH PLAIN " + bad])
        yield in_thread(self.raw, [b"AUTH PLAIN " + bad])
        replies = yield in_thread(self.raw, [b"AUTH PLAIN " + good])
        self.assertTrue(replies[-1].startswith(
            b"454 4.7.0 Too many failed logins for this account"), replies)
        other = base64.b64encode(f"\0alice@example.test\0{PASSWORD}".encode())
        replies = yield in_thread(self.raw, [b"AUTH PLAIN " + other])
        self.assertTrue(replies[-1].startswith(b"235 2.7.0"), replies)

    @defer.inlineCallbacks
    def test_unknown_user_and_wrong_password_answer_alike(self):
        self.start()
        answers = []
        for user in (b"demo@example.test", b"nobody@example.test"):
            token = base64.b64encode(b"\0" + user + b"\0wrong")
            replies = yield in_thread(self.raw, [b"AUTH PLAIN " + token])
            answers.append(replies[-1])
        self.assertEqual(answers[0], answers[1])

    @defer.inlineCallbacks
    def test_sasl_protocol_errors(self):
        self.start()
        good = base64.b64encode(f"\0demo@example.test\0{PASSWORD}".encode())
        replies = yield in_thread(self.raw, [
            b"AUTH",                                    # AUTH-7
            b"AUTH CRAM-MD5",
            b"AUTH PLAIN", b"*",                        # AUTH-8: 334, then cancelled
            b"AUTH PLAIN !!!notbase64",                 # AUTH-9
            b"AUTH PLAIN " + base64.b64encode(b"\0demo@example.test\0a\0b"),
            b"AUTH PLAIN " + base64.b64encode(b"admin\0demo@example.test\0x"),
            b"AUTH PLAIN " + good,
            b"AUTH PLAIN " + good,                      # AUTH-10
        ])
        codes = [r[:9] for r in replies[-9:]]
        self.assertEqual(codes, [b"501 5.5.4", b"504 5.5.4", b"334 ", b"501 5.7.0",
                                 b"501 5.5.2", b"501 5.5.2", b"501 5.5.2", b"235 2.7.0",
                                 b"503 5.5.1"])

    @defer.inlineCallbacks
    def test_sender_and_from_must_belong_to_the_user(self):
        """AUTH-13: demo may not send as alice, in MAIL FROM or in From."""
        self.start()

        def send(envelope_from, header_from):
            with self.client() as client:
                client.login("demo@example.test", PASSWORD)
                try:
                    client.sendmail(envelope_from, ["alice@example.test"],
                                    b"From: " + header_from + b"\r\n\r\nhi\r\n")
                except smtplib.SMTPSenderRefused as e:
                    return e.smtp_code, e.smtp_error
                except smtplib.SMTPDataError as e:
                    return e.smtp_code, e.smtp_error
                return 250, b""

        code, text = yield in_thread(send, "alice@example.test", b"alice@example.test")
        self.assertEqual(code, 553)
        self.assertTrue(text.startswith(b"5.7.1"))
        code, text = yield in_thread(send, "demo@example.test", b"Boss <alice@example.test>")
        self.assertEqual(code, 553)
        self.assertIn(b"alice@example.test", text)
        code, _ = yield in_thread(send, "demo@example.test",
                                  b"demo@example.test, alice@example.test")
        self.assertEqual(code, 553)
        # HDR-6: a second From field, even one demo owns twice, is refused.
        code, text = yield in_thread(send, "demo@example.test",
                                     b"demo@example.test\r\nFrom: demo@example.test")
        self.assertEqual((code, text[:5]), (550, b"5.6.0"))
        self.assertEqual(self.instance.messages("alice@example.test"), [])

    @defer.inlineCallbacks
    def test_auth_is_not_offered_on_port_25(self):
        self.start()

        def probe():
            with smtplib.SMTP("127.0.0.1", self.instance.smtp_port, timeout=10) as client:
                client.starttls(context=tls_context())
                client.ehlo()
                return client.has_extn("auth"), client.docmd("AUTH", "PLAIN")

        has_auth, (code, _) = yield in_thread(probe)
        self.assertFalse(has_auth)
        self.assertEqual(code, 502)


class SmarthostTests(SubmissionTestCase):
    def relay_through(self, port: int) -> Instance:
        """An instance that sends all outbound mail through 127.0.0.1:port with AUTH."""
        relay = Instance(self.mktemp(), aliases={"fwd@example.test": ["bob@remote.test"]},
                         sections={"outbound": {"relay": f"127.0.0.1:{port}",
                                                "relay_username": "demo@example.test",
                                                "relay_password": PASSWORD,
                                                "relay_verify_certificate": False},
                                   "queue": {"first_retry": 0.3, "max_retry_interval": 0.6}})
        relay.start()
        self.addCleanup(relay.stop)
        return relay

    def forward(self, relay: Instance, subject: bytes) -> defer.Deferred:
        def send():
            with smtplib.SMTP("127.0.0.1", relay.smtp_port, timeout=10) as client:
                client.sendmail("demo@example.test", ["fwd@example.test"],
                                b"From: demo@example.test\r\nSubject: " + subject + b"\r\n\r\nhi\r\n")
        return in_thread(send)

    @defer.inlineCallbacks
    def test_relay_through_a_smarthost_with_starttls_and_auth(self):
        """A -> smarthost B (its submission port: STARTTLS required, AUTH) -> MX sink."""
        self.start()
        smarthost = Instance(self.mktemp(), listen=LISTEN, sections={
            "dns": self.dns.config,
            "outbound": {"port": self.sink.port, "allow_private": True}})
        smarthost.start()
        self.addCleanup(smarthost.stop)
        yield self.forward(self.relay_through(smarthost.port("submission")), b"via relay")
        yield wait_for(lambda: self.sink.state.messages, timeout=15)
        data = self.sink.state.messages[0].data
        self.assertIn(b"with ESMTPSA", data)  # the relay logged in over TLS at the smarthost
        self.assertIn(b"Subject: via relay", data)

    @defer.inlineCallbacks
    def test_smarthost_without_starttls_is_never_given_the_password(self):
        self.start()
        plain = self.start_sink()
        relay = self.relay_through(plain.port)
        yield self.forward(relay, b"plain")
        queue = relay.config.server.spool_dir / "queue"
        yield wait_for(lambda: [p for p in queue.glob("*.env") if b"STARTTLS" in p.read_bytes()])
        self.assertFalse([c for c in plain.state.commands if c.startswith(b"AUTH")])
        self.assertEqual(plain.state.messages, [])
