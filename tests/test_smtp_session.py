"""The inbound SMTP session end to end: real sockets, the real spool and Maildirs.

Each test drives the ``mx`` listener of an in-process mailstack with smtplib
(where a well-behaved client is the point) or ``RawClient`` (where exact bytes
are), and asserts what a user sees: the reply code with its enhanced status
code, and the bytes that land in the Maildir. Case IDs refer to
SECURITY-TESTS.md.
"""

from __future__ import annotations

import email.utils
import re
import smtplib
import time

from twisted.internet import defer
from twisted.trial import unittest

from mailstack.queue.spool import GroupCommit
from tests.support.instance import in_thread, wait_for
from tests.support.smtpclient import MXInstance, RawClient, split_stored, tls_context

DEMO = "demo@example.test"
ALICE = "alice@example.test"
QUEUED_AS = re.compile(r"(?:2\.0\.0 )?Ok: queued as ([0-9A-F]+)\Z")
#: The second message of every smuggling case (SECURITY-TESTS section 1).
SMUGGLED = (b"MAIL FROM:<ceo@example.test>\r\nRCPT TO:<demo@example.test>\r\nDATA\r\n"
            b"From: ceo@example.test\r\n\r\nwire money\r\n")


def smtp(instance: MXInstance) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", instance.port, local_hostname="client.test", timeout=5)


def open_data(client: RawClient, rcpt: str = DEMO) -> None:
    """EHLO, MAIL, RCPT and DATA, each answered as a good session expects."""
    client.ehlo()
    client.expect("MAIL FROM:<sender@remote.test>", 250, "2.1.0")
    client.expect(f"RCPT TO:<{rcpt}>", 250, "2.1.5")
    client.expect("DATA", 354)


def queue_id(reply) -> str:
    match = QUEUED_AS.match(reply.text if hasattr(reply, "text") else reply)
    if not match:
        raise AssertionError(f"not a 'queued as' reply: {reply}")
    return match.group(1)


@defer.inlineCallbacks
def read_to_final_dot(test: unittest.TestCase, instance: MXInstance, payload: bytes):
    """Send a bad ``payload`` after the 354; return the reply given at the final dot.

    The session is watched in-process: once it has read ``payload`` and
    decided the outcome, no reply may have been sent yet, and DATA must not
    have ended; the reply comes only after ``.`` CRLF. A good message then
    follows on the same connection, proving the dialogue stayed in step, and
    it is the only message stored.
    """
    client = yield in_thread(RawClient, instance.port)
    test.addCleanup(client.close)
    yield in_thread(open_data, client)
    session = instance.sessions[0]
    yield in_thread(client.send, payload)

    def decided():
        t = session.transaction
        if t is None or t.reader is None:
            raise AssertionError("the DATA section ended before the final dot")
        return t.reader.error is not None and not session.splitter.pending()

    yield wait_for(decided)

    def finish():
        if not client.silent_for(0.2):
            raise AssertionError(f"reply before the final dot: {client.unread!r}")
        client.send(b".\r\n")
        bad = client.reply()
        client.send(b"MAIL FROM:<sender@remote.test>\r\nRCPT TO:<demo@example.test>\r\n"
                    b"DATA\r\n")
        test.assertEqual([r.code for r in client.replies(3)], [250, 250, 354])
        client.send(b"Subject: good\r\n\r\nthe real one\r\n.\r\nQUIT\r\n")
        test.assertEqual([r.code for r in client.replies(2)], [250, 221])
        return bad

    bad = yield in_thread(finish)
    files = yield wait_for(lambda: instance.stored(DEMO))
    test.assertEqual([split_stored(m)[2] for m in files], [b"Subject: good\n\nthe real one\n"])
    test.assertEqual(len(instance.committed), 1)
    return bad


class DeliveryTests(unittest.TestCase):
    """Accepted mail lands in the Maildir byte for byte."""

    @defer.inlineCallbacks
    def test_plain_message_stored_exactly(self):
        instance = MXInstance(self)
        body = (b"From: Sender <sender@remote.test>\r\nTo: demo@example.test\r\n"
                b"Subject: plain\r\n\r\nHello,\r\n\r\n  indented line\r\ntrailing space \r\n")

        def send():
            with smtp(instance) as client:
                client.ehlo()
                client.mail("sender@remote.test")
                client.rcpt(DEMO)
                return client.data(body)

        code, text = yield in_thread(send)
        self.assertEqual(code, 250)
        qid = queue_id(text.decode())
        files = yield wait_for(lambda: instance.stored(DEMO))
        self.assertEqual(len(files), 1)
        return_path, received, message = split_stored(files[0])
        self.assertEqual(return_path, b"Return-Path: <sender@remote.test>")
        self.assertIn(f"id {qid}", received)
        self.assertEqual(message, body.replace(b"\r\n", b"\n"))
        self.assertEqual(instance.messages(ALICE), [])

    @defer.inlineCallbacks
    def test_two_recipients_each_get_the_same_bytes(self):
        instance = MXInstance(self)
        body = b"Subject: to both\r\n\r\nfor demo and alice\r\n"

        def send():
            with smtp(instance) as client:
                return client.sendmail("sender@remote.test", [DEMO, ALICE], body)

        refused = yield in_thread(send)
        self.assertEqual(refused, {})
        demo = yield wait_for(lambda: instance.stored(DEMO))
        alice = yield wait_for(lambda: instance.stored(ALICE))
        self.assertEqual((len(demo), len(alice)), (1, 1))
        self.assertEqual(demo[0], alice[0])
        self.assertEqual(split_stored(demo[0])[2], b"Subject: to both\n\nfor demo and alice\n")
        self.assertEqual(len(instance.committed), 1)

    @defer.inlineCallbacks
    def test_8bit_body_kept_byte_for_byte(self):
        instance = MXInstance(self)
        # Latin-1 and stray bytes: not UTF-8, and not to be "repaired".
        body = (b"Subject: 8bit\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
                b"Content-Transfer-Encoding: 8bit\r\n\r\ncaf\xe9 \xff\xfe\x80\x00\x7f end\r\n"
                b"\xc3\x28 invalid utf-8\r\n")

        def send():
            with smtp(instance) as client:
                client.ehlo()
                self.assertTrue(client.has_extn("8bitmime"))
                return client.sendmail("sender@remote.test", [DEMO], body,
                                       mail_options=["BODY=8BITMIME"])

        refused = yield in_thread(send)
        self.assertEqual(refused, {})
        files = yield wait_for(lambda: instance.stored(DEMO))
        self.assertEqual(split_stored(files[0])[2], body.replace(b"\r\n", b"\n"))

    @defer.inlineCallbacks
    def test_dot_stuffed_lines_unstuffed(self):
        instance = MXInstance(self)
        # smtplib dot-stuffs these; the store must hold them as written here.
        body = b"Subject: dots\r\n\r\n.\r\n..\r\n.leading\r\n...three\r\nmid.dle\r\n. \r\n"

        def send():
            with smtp(instance) as client:
                return client.sendmail("sender@remote.test", [DEMO], body)

        yield in_thread(send)
        files = yield wait_for(lambda: instance.stored(DEMO))
        self.assertEqual(split_stored(files[0])[2], body.replace(b"\r\n", b"\n"))

    @defer.inlineCallbacks
    def test_raw_dot_stuffing_and_empty_message(self):
        """SMUG-9: ``..leading`` is stored as ``.leading``; ``.`` right after 354 is empty."""
        instance = MXInstance(self)

        def dialogue():
            with RawClient(instance.port) as client:
                open_data(client)
                client.send(b"Subject: stuffed\r\n\r\n..leading\r\n..\r\n.\r\n")
                first = client.reply()
                client.expect("MAIL FROM:<sender@remote.test>", 250)
                client.expect(f"RCPT TO:<{ALICE}>", 250)
                client.expect("DATA", 354)
                client.send(b".\r\n")
                second = client.reply()
                client.expect("QUIT", 221, "2.0.0")
                return first, second

        first, second = yield in_thread(dialogue)
        self.assertEqual(first.status, (250, "2.0.0"))
        self.assertEqual(second.status, (250, "2.0.0"))
        demo = yield wait_for(lambda: instance.stored(DEMO))
        self.assertEqual(split_stored(demo[0])[2], b"Subject: stuffed\n\n.leading\n.\n")
        alice = yield wait_for(lambda: instance.stored(ALICE))
        return_path, received, message = split_stored(alice[0])
        self.assertEqual(return_path, b"Return-Path: <sender@remote.test>")
        self.assertEqual(message, b"")

    @defer.inlineCallbacks
    def test_null_sender_kept_as_empty_return_path(self):
        """Bounces arrive with ``MAIL FROM:<>`` (RFC 5321 4.5.5)."""
        instance = MXInstance(self)

        def send():
            with smtp(instance) as client:
                return client.sendmail("<>", [DEMO], b"Subject: bounce\r\n\r\nreport\r\n")

        yield in_thread(send)
        files = yield wait_for(lambda: instance.stored(DEMO))
        self.assertTrue(files[0].startswith(b"Return-Path: <>\nReceived: "))


class ReceivedHeaderTests(unittest.TestCase):
    """RFC 5321 4.4: the trace header says who handed the message over, and how."""

    @defer.inlineCallbacks
    def test_plaintext_single_recipient(self):
        instance = MXInstance(self)

        def send():
            with smtp(instance) as client:
                client.ehlo()
                client.mail("sender@remote.test")
                client.rcpt(DEMO)
                return client.data(b"Subject: x\r\n\r\nx\r\n")

        before = time.time()
        code, text = yield in_thread(send)
        after = time.time()
        qid = queue_id(text.decode())
        files = yield wait_for(lambda: instance.stored(DEMO))
        received = split_stored(files[0])[1]
        self.assertRegex(
            received,
            r"\AReceived: from client\.test \(\[127\.0\.0\.1\]\) by mail\.example\.test "
            rf"\(mailstack\) with ESMTP id {qid} for <demo@example\.test>; \S.*\d{{4}}\Z")
        # The date is the second the message came in (RFC 5322 3.3, with a zone).
        stamp = email.utils.parsedate_to_datetime(received.rpartition("; ")[2])
        self.assertIsNotNone(stamp.tzinfo)
        self.assertTrue(int(before) <= stamp.timestamp() <= after, (before, stamp, after))
        self.assertNotIn("using TLS", received)
        self.assertEqual(instance.committed[0].id, qid)

    @defer.inlineCallbacks
    def test_starttls_names_protocol_version_and_cipher(self):
        instance = MXInstance(self)

        def send():
            with smtp(instance) as client:
                client.starttls(context=tls_context())
                version, (cipher, _, bits) = client.sock.version(), client.sock.cipher()
                client.ehlo()
                client.mail("sender@remote.test")
                client.rcpt(DEMO)
                code, text = client.data(b"Subject: tls\r\n\r\nsecret\r\n")
                return text.decode(), version, cipher, bits

        text, version, cipher, bits = yield in_thread(send)
        qid = queue_id(text)
        files = yield wait_for(lambda: instance.stored(DEMO))
        received = split_stored(files[0])[1]
        self.assertIn("Received: from client.test ([127.0.0.1]) "
                      f"(using {version} with cipher {cipher} ({bits} bits)) "
                      f"by mail.example.test (mailstack) with ESMTPS id {qid} "
                      "for <demo@example.test>; ", received)

    @defer.inlineCallbacks
    def test_no_for_clause_with_several_recipients(self):
        """Naming one recipient would reveal it to the others (Bcc)."""
        instance = MXInstance(self)

        def send():
            with smtp(instance) as client:
                client.sendmail("sender@remote.test", [DEMO, ALICE], b"Subject: x\r\n\r\nx\r\n")

        yield in_thread(send)
        files = yield wait_for(lambda: instance.stored(ALICE))
        received = split_stored(files[0])[1]
        self.assertIn(f"with ESMTP id {instance.committed[0].id}; ", received)
        self.assertNotIn(" for ", received)
        self.assertNotIn("demo@", received)

    @defer.inlineCallbacks
    def test_helo_gives_smtp_protocol(self):
        instance = MXInstance(self)

        def send():
            with smtp(instance) as client:
                client.helo()
                return client.sendmail("sender@remote.test", [DEMO], b"Subject: x\r\n\r\nx\r\n")

        yield in_thread(send)
        files = yield wait_for(lambda: instance.stored(DEMO))
        self.assertIn(" with SMTP id ", split_stored(files[0])[1])

    @defer.inlineCallbacks
    def test_bare_lf_in_ehlo_never_becomes_a_header(self):
        """HDR-1: ``EHLO foo\\nX-Injected: yes`` is refused; the header stays clean."""
        instance = MXInstance(self)

        def dialogue():
            with RawClient(instance.port) as client:
                client.send(b"EHLO foo\nX-Injected: yes\r\n")
                injected = client.replies(2)
                # The refused EHLO does not count as a greeting.
                no_helo = client.command("MAIL FROM:<sender@remote.test>")
                bad_name = [client.command(b"EHLO foo\rX-Injected: yes"),
                            client.command(b"EHLO foo\x00X-Injected:yes"),
                            client.command(b"EHLO foo X-Injected: yes")]
                open_data(client)
                client.send(b"Subject: hdr\r\n\r\nbody\r\n.\r\n")
                done = client.reply()
                return injected, no_helo, bad_name, done

        injected, no_helo, bad_name, done = yield in_thread(dialogue)
        self.assertEqual([r.status for r in injected], [(500, "5.5.2"), (500, "5.5.1")])
        self.assertEqual(no_helo.status, (503, "5.5.1"))
        self.assertEqual([r.code for r in bad_name], [500, 501, 501])
        self.assertEqual(done.code, 250)
        files = yield wait_for(lambda: instance.stored(DEMO))
        received = split_stored(files[0])[1]
        self.assertNotIn(b"X-Injected", files[0])
        self.assertNotIn("foo", received)
        self.assertIn("Received: from client.test ", received)


class ReplyTests(unittest.TestCase):
    """Codes for mistakes, limits and commands that are not offered."""

    @defer.inlineCallbacks
    def test_ehlo_advertises_exactly_what_is_supported(self):
        instance = MXInstance(self, smtp={"max_message_size": 123456})

        def dialogue():
            with RawClient(instance.port) as client:
                plain = client.ehlo()
                self.assertEqual(client.command("STARTTLS").code, 220)
                client.starttls()
                secure = client.ehlo()
                return client.greeting, plain, secure

        greeting, plain, secure = yield in_thread(dialogue)
        self.assertEqual(greeting.code, 220)
        self.assertTrue(greeting.text.startswith("mail.example.test ESMTP"))
        self.assertEqual(plain.lines[0], "mail.example.test Hello client.test [127.0.0.1]")
        self.assertEqual(list(plain.lines[1:]),
                         ["SIZE 123456", "PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES",
                          "STARTTLS"])
        self.assertEqual(list(secure.lines[1:]),
                         ["SIZE 123456", "PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"])

    @defer.inlineCallbacks
    def test_vrfy_expn_bdat_not_offered(self):
        """VRFY/EXPN would list users; BDAT (SMUG-7) must never be read as data."""
        instance = MXInstance(self)

        def dialogue():
            with RawClient(instance.port) as client:
                client.ehlo()
                replies = [client.command("VRFY demo"), client.command("EXPN demo"),
                           client.command("MAIL FROM:<sender@remote.test>"),
                           client.command(f"RCPT TO:<{DEMO}>"),
                           client.command("BDAT 10 LAST")]
                # Had BDAT been taken, the next ten bytes would be its data.
                replies.append(client.command("NOOP 12345"))
                replies.append(client.command("DATA"))
                return replies

        replies = yield in_thread(dialogue)
        self.assertEqual([r.status for r in replies],
                         [(502, "5.5.1"), (502, "5.5.1"), (250, "2.1.0"), (250, "2.1.5"),
                          (502, "5.5.1"), (250, "2.0.0"), (354, "")])

    @defer.inlineCallbacks
    def test_commands_out_of_order(self):
        """RELAY-14: 503 5.5.1 for RCPT before MAIL, DATA before RCPT, nested MAIL."""
        instance = MXInstance(self)

        def dialogue():
            with RawClient(instance.port) as client:
                replies = [client.command("MAIL FROM:<sender@remote.test>")]  # before EHLO
                client.ehlo()
                replies += [client.command(f"RCPT TO:<{DEMO}>"),
                            client.command("DATA"),
                            client.command("MAIL FROM:<sender@remote.test>"),
                            client.command("DATA"),
                            client.command("MAIL FROM:<other@remote.test>"),
                            client.command(f"RCPT TO:<{DEMO}>"),
                            client.command("RSET"),
                            client.command(f"RCPT TO:<{DEMO}>")]
                return replies

        replies = yield in_thread(dialogue)
        self.assertEqual([r.status for r in replies],
                         [(503, "5.5.1"), (503, "5.5.1"), (503, "5.5.1"), (250, "2.1.0"),
                          (503, "5.5.1"), (503, "5.5.1"), (250, "2.1.5"), (250, "2.0.0"),
                          (503, "5.5.1")])
        self.assertEqual(instance.committed, [])

    @defer.inlineCallbacks
    def test_malformed_sender(self):
        instance = MXInstance(self)

        def dialogue():
            with RawClient(instance.port) as client:
                client.ehlo()
                return [client.command(line) for line in (
                    "MAIL FROM:<sender@>", "MAIL FROM:<sen der@remote.test>",
                    "MAIL FROM:<sender@remote.test", "MAIL FROM:<a@b@remote.test>",
                    "MAIL FROM:<" + "x" * 65 + "@remote.test>",
                    "MAIL TO:<sender@remote.test>", "MAIL FROM:<sender@remote.test> FOO=BAR",
                    "MAIL FROM:<sender@remote.test> BODY=9BIT",
                    "MAIL FROM:<sender@remote.test>")]

        replies = yield in_thread(dialogue)
        self.assertEqual([r.status for r in replies],
                         [(501, "5.1.7")] * 5 + [(501, "5.5.4"), (555, "5.5.4"), (501, "5.5.4"),
                                                 (250, "2.1.0")])

    @defer.inlineCallbacks
    def test_control_characters_in_paths(self):
        """HDR-2: NUL in a path is a syntax error; CR or LF break the line itself."""
        instance = MXInstance(self)

        def dialogue():
            with RawClient(instance.port) as client:
                client.ehlo()
                replies = [client.command(b'MAIL FROM:<"a\x00X-Evil: 1"@evil.test>'),
                           client.command(b'MAIL FROM:<"a\rX-Evil: 1"@evil.test>')]
                client.send(b'MAIL FROM:<"a\nX-Evil: 1"@evil.test>\r\n')
                replies += client.replies(2)
                replies.append(client.command("MAIL FROM:<sender@remote.test>"))
                replies.append(client.command(b'RCPT TO:<"de\x00mo"@example.test>'))
                replies.append(client.command(b"RCPT TO:<demo@exa\x00mple.test>"))
                return replies

        replies = yield in_thread(dialogue)
        self.assertEqual([r.status for r in replies],
                         [(501, "5.1.7"), (500, "5.5.2"), (500, "5.5.2"), (500, "5.5.1"),
                          (250, "2.1.0"), (501, "5.1.3"), (501, "5.1.3")])

    @defer.inlineCallbacks
    def test_unparseable_lines(self):
        """LIM-10: NUL, a non-ASCII verb and an empty line get 500 5.5.2."""
        instance = MXInstance(self)

        def dialogue():
            with RawClient(instance.port) as client:
                replies = [client.command(line) for line in (
                    b"NO\x00OP", b"\x00", b"N\xc3\x96OP", b"\xff\xfe", b"", b"   ",
                    b"FROB", b"NOOP")]
                return replies

        replies = yield in_thread(dialogue)
        self.assertEqual([r.status for r in replies],
                         [(500, "5.5.2")] * 6 + [(500, "5.5.1"), (250, "2.0.0")])

    @defer.inlineCallbacks
    def test_command_line_limit(self):
        """LIM-1: 512 octets with CRLF is allowed, 513 is 500 5.5.2, and the session goes on."""
        instance = MXInstance(self)

        def dialogue():
            with RawClient(instance.port) as client:
                return [client.command(b"NOOP " + b"x" * 505),  # 512 with CRLF
                        client.command(b"NOOP " + b"x" * 506),
                        client.command(b"MAIL FROM:<" + b"y" * 5000 + b"@remote.test>"),
                        client.command(b"EHLO client.test")]

        replies = yield in_thread(dialogue)
        self.assertEqual([r.status for r in replies],
                         [(250, "2.0.0"), (500, "5.5.2"), (500, "5.5.2"), (250, "")])

    @defer.inlineCallbacks
    def test_too_many_errors_closes(self):
        """LIM-8: once the error budget is spent, 421 4.7.0 and close."""
        instance = MXInstance(self, smtp={"max_errors": 3})

        def dialogue():
            with RawClient(instance.port) as client:
                client.ehlo()
                client.send(b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n")
                replies = client.replies(4)
                return replies, client.closed_by_server()

        replies, closed = yield in_thread(dialogue)
        self.assertEqual([r.status for r in replies],
                         [(500, "5.5.1")] * 3 + [(421, "4.7.0")])
        self.assertTrue(closed)

    @defer.inlineCallbacks
    def test_http_request_closes(self):
        """LIM-9: an HTTP request (ALPACA) gets one 500 and the connection is closed."""
        instance = MXInstance(self)

        def dialogue():
            with RawClient(instance.port) as client:
                client.send(b"GET / HTTP/1.1\r\nHost: mail.example.test\r\n\r\n")
                return client.reply(), client.closed_by_server()

        reply, closed = yield in_thread(dialogue)
        self.assertEqual(reply.status, (500, "5.5.1"))
        self.assertTrue(closed)

    @defer.inlineCallbacks
    def test_idle_timeout(self):
        """LIM-12: silence gets 421 4.4.2 and a close, and an open DATA is dropped."""
        instance = MXInstance(self, smtp={"idle_timeout": 0.5})

        def dialogue():
            with RawClient(instance.port) as client:
                idle = client.reply(), client.closed_by_server()
            with RawClient(instance.port) as client:
                open_data(client)
                client.send(b"Subject: half\r\n\r\nnever finished\r\n")
                in_data = client.reply(), client.closed_by_server()
            return idle, in_data

        idle, in_data = yield in_thread(dialogue)
        self.assertEqual((idle[0].status, idle[1]), ((421, "4.4.2"), True))
        self.assertEqual((in_data[0].status, in_data[1]), ((421, "4.4.2"), True))
        yield wait_for(lambda: not instance.sessions)
        self.assertEqual(instance.committed, [])
        self.assertEqual(list((instance.config.server.spool_dir / "tmp").iterdir()), [])


class DataLimitTests(unittest.TestCase):
    """Size and line limits in DATA: answered after the final dot, never mid-stream."""

    @defer.inlineCallbacks
    def test_size_limit_exact_boundary(self):
        """RFC 1870: SIZE= over the limit is 552 5.3.4; a message of exactly the limit passes."""
        instance = MXInstance(self, smtp={"max_message_size": 65536})
        body = b"".join(b"%04d" % i + b"x" * 506 + b"\r\n" for i in range(128))  # 65536 octets

        def dialogue():
            with RawClient(instance.port) as client:
                client.ehlo()
                over = client.command("MAIL FROM:<sender@remote.test> SIZE=65537")
                client.expect("MAIL FROM:<sender@remote.test> SIZE=65536", 250)
                client.expect(f"RCPT TO:<{DEMO}>", 250)
                client.expect("DATA", 354)
                client.send(body + b".\r\n")
                return over, client.reply()

        over, done = yield in_thread(dialogue)
        self.assertEqual(over.status, (552, "5.3.4"))
        self.assertEqual(done.status, (250, "2.0.0"))
        files = yield wait_for(lambda: instance.stored(DEMO))
        self.assertEqual(split_stored(files[0])[2], body.replace(b"\r\n", b"\n"))

    @defer.inlineCallbacks
    def test_oversized_message_with_injected_commands(self):
        """SMUG-8: 552 5.3.4 only after the real final dot; no command inside runs."""
        instance = MXInstance(self, smtp={"max_message_size": 65536})
        # Past the limit, a dot-stuffed "." line and commands: all of it is data.
        payload = (b"Subject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 70
                   + b"..\r\n" + SMUGGLED)
        bad = yield read_to_final_dot(self, instance, payload)
        self.assertEqual(bad.status, (552, "5.3.4"))

    @defer.inlineCallbacks
    def test_overlong_data_line_never_turns_into_commands(self):
        """SMUG-11 / LIM-4: a 20000-octet line is 500 5.5.2 after the final dot."""
        instance = MXInstance(self)
        payload = b"Subject: long\r\n\r\n" + b"z" * 20000 + b"\r\n" + SMUGGLED
        bad = yield read_to_final_dot(self, instance, payload)
        self.assertEqual(bad.status, (500, "5.5.2"))

    @defer.inlineCallbacks
    def test_data_line_limit_boundary(self):
        """RFC 5321 4.5.3.1.6: a text line of 1000 octets with CRLF is fine, 1001 is not."""
        instance = MXInstance(self)
        ok_line, long_line = b"a" * 998, b"b" * 999

        def dialogue():
            with RawClient(instance.port) as client:
                open_data(client)
                client.send(b"Subject: lines\r\n\r\n" + ok_line + b"\r\n.\r\n")
                first = client.reply()
                client.send(b"MAIL FROM:<sender@remote.test>\r\n")
                client.send(b"RCPT TO:<alice@example.test>\r\n")
                client.send(b"DATA\r\n")
                self.assertEqual([r.code for r in client.replies(3)], [250, 250, 354])
                client.send(b"Subject: lines\r\n\r\n" + long_line + b"\r\n.\r\n")
                return first, client.reply()

        first, second = yield in_thread(dialogue)
        self.assertEqual(first.code, 250)
        self.assertEqual(second.status, (500, "5.5.2"))
        files = yield wait_for(lambda: instance.stored(DEMO))
        self.assertEqual(split_stored(files[0])[2], b"Subject: lines\n\n" + ok_line + b"\n")
        self.assertEqual(len(instance.committed), 1)
        self.assertEqual(instance.messages(ALICE), [])


class SmugglingTests(unittest.TestCase):
    """SMUG-1..6: no end of data but ``CRLF.CRLF``; bare CR or LF rejects the message."""

    @defer.inlineCallbacks
    def smuggle(self, fake_end: bytes):
        instance = MXInstance(self)
        payload = b"From: a@remote.test\r\nSubject: first\r\n\r\nfirst part" + fake_end + SMUGGLED
        bad = yield read_to_final_dot(self, instance, payload)
        self.assertEqual(bad.status, (550, "5.5.2"))

    def test_lf_dot_lf(self):
        return self.smuggle(b"\n.\n")

    def test_lf_dot_crlf(self):
        """SMUG-2, the Exchange/GMX variant: the ``.`` line follows a bare LF."""
        return self.smuggle(b"\n.\r\n")

    def test_crlf_dot_lf(self):
        return self.smuggle(b"\r\n.\n")

    def test_cr_dot_cr(self):
        """SMUG-4: a bare CR is never a line end, so ``\\r.\\r`` ends nothing."""
        return self.smuggle(b"\r.\r")

    def test_crlf_dot_cr(self):
        """SMUG-4: ``\\r\\n.\\r`` is no end of data either."""
        return self.smuggle(b"\r\n.\r")

    def test_cr_crlf_dot_cr_crlf(self):
        """Never collapse CR CR LF into CRLF (the Postfix fix of 2024-01-06)."""
        return self.smuggle(b"\r\r\n.\r\r\n")

    def test_bare_lf_inside_a_line(self):
        """SMUG-6: the policy is to reject, not to normalise."""
        return self.smuggle(b"\r\nhello\nworld\r\n")


class InputFloodTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_endless_line_keeps_memory_bounded(self):
        """LIM-2: megabytes without LF are dropped as they come; others are still served."""
        instance = MXInstance(self)
        client = yield in_thread(RawClient, instance.port)
        self.addCleanup(client.close)
        session = instance.sessions[0]
        held = []
        received = session.dataReceived

        def watch(data):
            received(data)
            held.append(len(session.splitter._buffer) - session.splitter._pos)

        session.dataReceived = watch
        chunk = b"A" * 65536

        def flood():
            for i in range(64):  # 4 MiB, never a LF
                client.send(chunk)
                if i == 32:
                    with RawClient(instance.port) as other:
                        self.assertEqual(other.ehlo().code, 250)
                        self.assertEqual(other.command("QUIT").code, 221)
            client.send(b"\r\nNOOP\r\n")
            return client.replies(2)

        replies = yield in_thread(flood)
        self.assertEqual([r.status for r in replies], [(500, "5.5.2"), (250, "2.0.0")])
        self.assertGreater(len(held), 1)
        self.assertLessEqual(max(held), instance.config.smtp.max_command_line)

    @defer.inlineCallbacks
    def test_endless_line_times_out_while_bytes_flow(self):
        """LIM-2: the idle timer waits for a complete line, so dripping bytes do not help."""
        instance = MXInstance(self, smtp={"idle_timeout": 0.5})

        def drip():
            with RawClient(instance.port) as client:
                client.ehlo()
                deadline = time.monotonic() + 5
                try:
                    while b"421 " not in client.unread and time.monotonic() < deadline:
                        client.send(b"x" * 100)
                        client.silent_for(0.05)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # closed by the server while bytes were still on their way
                in_time = time.monotonic() < deadline
                return in_time, client.replies(2), client.closed_by_server()

        in_time, replies, closed = yield in_thread(drip)
        self.assertTrue(in_time, "the session never timed out while bytes kept coming")
        self.assertEqual([r.status for r in replies], [(500, "5.5.2"), (421, "4.4.2")])
        self.assertTrue(closed)


class PipeliningTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_replies_in_order(self):
        """RFC 2920: one write of MAIL/RCPT/RCPT/RCPT/DATA, replies in the same order."""
        instance = MXInstance(self)

        def dialogue():
            with RawClient(instance.port) as client:
                client.ehlo()
                client.send(b"MAIL FROM:<sender@remote.test>\r\nRCPT TO:<demo@example.test>\r\n"
                            b"RCPT TO:<nobody@example.test>\r\nRCPT TO:<alice@example.test>\r\n"
                            b"DATA\r\n")
                first = client.replies(5)
                # The end of one message, the next envelope and DATA, in one write:
                # the commit is asynchronous and must not let MAIL overtake it.
                client.send(b"Subject: one\r\n\r\n1\r\n.\r\nMAIL FROM:<other@remote.test>\r\n"
                            b"RCPT TO:<demo@example.test>\r\nDATA\r\n")
                second = client.replies(4)
                client.send(b"Subject: two\r\n\r\n2\r\n.\r\nQUIT\r\n")
                third = client.replies(2)
                return first, second, third

        first, second, third = yield in_thread(dialogue)
        self.assertEqual([r.status for r in first],
                         [(250, "2.1.0"), (250, "2.1.5"), (550, "5.1.1"), (250, "2.1.5"),
                          (354, "")])
        self.assertEqual([r.status for r in second],
                         [(250, "2.0.0"), (250, "2.1.0"), (250, "2.1.5"), (354, "")])
        self.assertEqual([r.status for r in third], [(250, "2.0.0"), (221, "2.0.0")])
        self.assertEqual([e.id for e in instance.committed],
                         [queue_id(second[0]), queue_id(third[0])])
        demo = yield wait_for(lambda: len(instance.stored(DEMO)) == 2 and instance.stored(DEMO))
        alice = yield wait_for(lambda: instance.stored(ALICE))
        self.assertEqual(sorted(split_stored(m)[2] for m in demo),
                         [b"Subject: one\n\n1\n", b"Subject: two\n\n2\n"])
        self.assertEqual(split_stored(alice[0])[2], b"Subject: one\n\n1\n")

    @defer.inlineCallbacks
    def test_client_leaving_during_the_commit(self):
        """The message is kept; what was pipelined behind it leaves nothing half-written."""
        instance = MXInstance(self)
        gate, commits = defer.Deferred(), []
        run_blocking = instance.factory.run_blocking

        def slow_commit(f, *args):
            commits.append(f)
            return gate.addCallback(lambda _: run_blocking(f, *args))

        instance.factory.commits = GroupCommit(instance.factory.spool, slow_commit)

        def dialogue():
            with RawClient(instance.port) as client:
                open_data(client)
                client.send(b"Subject: last words\r\n\r\nbye\r\n.\r\n"
                            b"MAIL FROM:<sender@remote.test>\r\nRCPT TO:<alice@example.test>\r\n"
                            b"DATA\r\nSubject: never\r\n")

        yield in_thread(dialogue)
        yield wait_for(lambda: commits)
        gate.callback(None)
        yield wait_for(lambda: not instance.sessions)
        # The message was committed (the client may send it again: RFC 1047).
        files = yield wait_for(lambda: instance.stored(DEMO))
        self.assertEqual(split_stored(files[0])[2], b"Subject: last words\n\nbye\n")
        self.assertEqual(len(instance.committed), 1)
        self.assertEqual(instance.messages(ALICE), [])
        self.assertEqual(list((instance.config.server.spool_dir / "tmp").iterdir()), [])

    @defer.inlineCallbacks
    def test_connection_lost_during_the_commit(self):
        """The commit finishing after the connection is gone runs and restarts nothing.

        Trial fails the test if an idle timer is left behind.
        """
        instance = MXInstance(self)
        gate, commits = defer.Deferred(), []
        run_blocking = instance.factory.run_blocking

        def slow_commit(f, *args):
            commits.append(f)
            return gate.addCallback(lambda _: run_blocking(f, *args))

        instance.factory.commits = GroupCommit(instance.factory.spool, slow_commit)
        client = yield in_thread(RawClient, instance.port)
        self.addCleanup(client.close)
        yield in_thread(open_data, client)
        yield in_thread(client.send, b"Subject: x\r\n\r\nx\r\n.\r\nNOOP\r\n")
        yield wait_for(lambda: commits)
        [session] = instance.sessions
        session.transport.abortConnection()
        yield wait_for(lambda: not instance.sessions)
        gate.callback(None)
        files = yield wait_for(lambda: instance.stored(DEMO))
        self.assertEqual(split_stored(files[0])[2], b"Subject: x\n\nx\n")
        self.assertEqual(session._counts.get("noop"), None)

    @defer.inlineCallbacks
    def test_body_before_354_rejected(self):
        """LIM-6: message text must wait for the 354: 554 5.5.0 and close."""
        instance = MXInstance(self)

        def dialogue():
            with RawClient(instance.port) as client:
                client.send(b"EHLO x.test\r\nMAIL FROM:<a@remote.test>\r\n"
                            b"RCPT TO:<demo@example.test>\r\nDATA\r\n"
                            b"Subject: early\r\n\r\nbody\r\n.\r\n")
                return client.replies(4), client.closed_by_server()

        replies, closed = yield in_thread(dialogue)
        self.assertEqual([r.status for r in replies],
                         [(250, ""), (250, "2.1.0"), (250, "2.1.5"), (554, "5.5.0")])
        self.assertTrue(closed)
        yield wait_for(lambda: not instance.sessions)
        self.assertEqual(instance.committed, [])
        self.assertEqual(list((instance.config.server.spool_dir / "tmp").iterdir()), [])


class StartTLSTests(unittest.TestCase):
    """RFC 3207 and the CVE-2011-0411 class (SECURITY-TESTS section 2)."""

    @defer.inlineCallbacks
    def test_pipelined_plaintext_dropped(self):
        """TLS-1: ``STARTTLS\\r\\nRSET\\r\\n`` in one write: RSET is never answered."""
        instance = MXInstance(self)

        def dialogue():
            with RawClient(instance.port) as client:
                client.ehlo()
                client.send(b"STARTTLS\r\nRSET\r\n")
                ready = client.reply()
                client.starttls()
                return ready, client.command("EHLO client.test"), client.command("NOOP")

        ready, ehlo, noop = yield in_thread(dialogue)
        self.assertEqual(ready.status, (220, "2.0.0"))
        # Had RSET run, its "250 2.0.0 Ok" would come first over TLS.
        self.assertEqual(ehlo.lines[0], "mail.example.test Hello client.test [127.0.0.1]")
        self.assertEqual(noop.status, (250, "2.0.0"))

    @defer.inlineCallbacks
    def test_injected_envelope_not_in_effect(self):
        """TLS-2: MAIL and RCPT pipelined behind STARTTLS do not take effect."""
        instance = MXInstance(self)

        def dialogue():
            with RawClient(instance.port) as client:
                client.ehlo()
                client.send(b"STARTTLS\r\nMAIL FROM:<attacker@evil.test>\r\n"
                            b"RCPT TO:<demo@example.test>\r\n")
                self.assertEqual(client.reply().code, 220)
                client.starttls()
                client.ehlo()
                replies = [client.command("RCPT TO:<alice@example.test>"),
                           client.command("DATA"),
                           client.command("MAIL FROM:<sender@remote.test>"),
                           client.command("RCPT TO:<alice@example.test>"),
                           client.command("DATA")]
                client.send(b"Subject: after tls\r\n\r\nok\r\n.\r\n")
                replies.append(client.reply())
                return replies

        replies = yield in_thread(dialogue)
        self.assertEqual([r.status for r in replies],
                         [(503, "5.5.1"), (503, "5.5.1"), (250, "2.1.0"), (250, "2.1.5"),
                          (354, ""), (250, "2.0.0")])
        [envelope] = instance.committed
        self.assertEqual(envelope.sender, "sender@remote.test")
        self.assertEqual([r.address for r in envelope.recipients], [ALICE])
        yield wait_for(lambda: instance.stored(ALICE))
        self.assertEqual(instance.messages(DEMO), [])

    @defer.inlineCallbacks
    def test_state_reset(self):
        """TLS-4: the transaction and the EHLO are forgotten; EHLO must be repeated."""
        instance = MXInstance(self)

        def dialogue():
            with RawClient(instance.port) as client:
                client.ehlo()
                self.assertEqual(client.command("MAIL FROM:<x@remote.test>").code, 250)
                self.assertEqual(client.command("STARTTLS").code, 220)
                client.starttls()
                return [client.command(f"RCPT TO:<{DEMO}>"),
                        client.command("MAIL FROM:<x@remote.test>"),
                        client.command("EHLO client.test"),
                        client.command("MAIL FROM:<x@remote.test>"),
                        client.command(f"RCPT TO:<{DEMO}>")]

        replies = yield in_thread(dialogue)
        self.assertEqual([r.status for r in replies],
                         [(503, "5.5.1"), (503, "5.5.1"), (250, ""), (250, "2.1.0"),
                          (250, "2.1.5")])
        self.assertNotIn("STARTTLS", replies[2].lines)

    @defer.inlineCallbacks
    def test_starttls_twice_and_with_argument(self):
        """TLS-5: a second STARTTLS is 503 5.5.1; TLS-6: ``STARTTLS foo`` is 501."""
        instance = MXInstance(self)

        def dialogue():
            with RawClient(instance.port) as client:
                client.ehlo()
                with_arg = client.command("STARTTLS foo")
                self.assertEqual(client.command("STARTTLS").code, 220)
                client.starttls()
                again = client.command("STARTTLS")
                client.ehlo()
                return with_arg, again, client.command("STARTTLS"), client.command("NOOP")

        with_arg, again, after_ehlo, noop = yield in_thread(dialogue)
        self.assertEqual(with_arg.status, (501, "5.5.4"))
        self.assertEqual(again.status, (503, "5.5.1"))
        self.assertEqual(after_ehlo.status, (503, "5.5.1"))
        self.assertEqual(noop.status, (250, "2.0.0"))


class ConnectionLimitTests(unittest.TestCase):
    @defer.inlineCallbacks
    def check_limit(self, instance: MXInstance):
        second = None

        def fill():
            nonlocal second
            with RawClient(instance.port) as first:
                second = RawClient(instance.port)
                with RawClient(instance.port) as third:
                    refused = third.greeting, third.closed_by_server()
            return first.greeting, refused

        self.addCleanup(lambda: second and second.close())
        greeting, (refused, closed) = yield in_thread(fill)
        self.assertEqual(greeting.code, 220)
        self.assertEqual(refused.status, (421, "4.7.0"))
        self.assertTrue(closed)
        # A slot is free again once the server has seen the first client go.
        yield wait_for(lambda: len(instance.sessions) == 1)

        def again():
            with RawClient(instance.port) as client:
                return client.greeting.code, client.ehlo().code

        self.assertEqual((yield in_thread(again)), (220, 250))

    def test_per_ip_limit(self):
        return self.check_limit(MXInstance(self, smtp={"max_connections_per_ip": 2}))

    def test_listener_limit(self):
        return self.check_limit(MXInstance(self, smtp={"max_connections": 2}))
