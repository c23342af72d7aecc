"""The policy chain end to end: real SMTP sessions against a running instance
whose resolver asks the DNS fixture.

Clients connect from 127.0.0.2 and up (the socket's source address is bound),
so ``trusted_networks = ["127.0.0.1/32"]`` stays on and they are treated as
internet clients. Each data vector (tests/data/policy/) is replayed here too:
the SMTP reply at each stage, the folder the message lands in (INBOX
``new/`` or ``.Junk/new/``) and the exact Authentication-Results of the
stored message.
"""

from __future__ import annotations

import shutil
import smtplib
import socket
import tempfile
import time
from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mailstack.policy.evaluations import EvaluationStore
from tests.support.dnsserver import DNSFixture
from tests.support.instance import Instance, in_thread, wait_for, write_instance
from tests.support.policykit import (
    AUTHSERV_ID, crlf, load_vector, result_clauses, start_dns, vector_names)

USER = "demo@example.test"
_USERS: list[bytes] = []


def _copy_users(root: Path) -> None:
    """A users file made once per run: argon2 hashing is slow on purpose, and
    write_instance skips users that exist."""
    if not _USERS:
        template = Path(tempfile.mkdtemp())
        write_instance(template)
        _USERS.append((template / "users").read_bytes())
        shutil.rmtree(template)
    root.mkdir(parents=True, exist_ok=True)
    (root / "users").write_bytes(_USERS[0])
    (root / "users").chmod(0o600)


def flatten(table: dict, prefix: str = "") -> dict:
    """Nested settings as TOML dotted keys (``spf.reject_on_fail``), which the
    instance writer puts under ``[policy]``."""
    out = {}
    for key, value in table.items():
        name = f'"{key}"' if "." in key else key
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value
    return out


def code_of(reply: tuple[int, bytes]) -> str:
    code, text = reply
    if code in (250, 354):
        return "250"
    enhanced = text.split(b" ", 1)[0].decode("ascii", "replace")
    return f"{code} {enhanced}"


class Client:
    """smtplib from a chosen loopback source address; every reply kept."""

    def __init__(self, port: int, source: str = "127.0.0.2"):
        self.smtp = smtplib.SMTP(timeout=10, source_address=(source, 0))
        self.greeting = self.smtp.connect("127.0.0.1", port)

    def session(self, helo, sender, recipients, message) -> dict:
        replies = {}
        try:
            self.smtp.ehlo(helo)
            replies["mail"] = code_of(self.smtp.mail(sender))
            if replies["mail"] != "250":
                return replies
            for rcpt in recipients:
                replies["rcpt"] = code_of(self.smtp.rcpt(rcpt))
                if replies["rcpt"] != "250":
                    return replies
            code, text = self.smtp.docmd("DATA")
            if code != 354:
                replies["data"] = code_of((code, text))
                return replies
            self.smtp.send(message.replace(b"\r\n.", b"\r\n..") + b".\r\n")
            replies["data"] = code_of(self.smtp.getreply())
            return replies
        finally:
            self.close()

    def close(self):
        try:
            self.smtp.quit()
        except (smtplib.SMTPException, OSError):
            self.smtp.close()


def stored_headers(path: Path) -> list[tuple[str, str]]:
    """The stored message's header fields, folded lines joined (LF kept out)."""
    fields = []
    for line in path.read_bytes().split(b"\n\n", 1)[0].decode().split("\n"):
        if line[:1] in (" ", "\t") and fields:
            fields[-1] = (fields[-1][0], fields[-1][1] + line)
        else:
            name, _, value = line.partition(":")
            fields.append((name, value))
    return fields


class PolicyInstanceTestCase(unittest.TestCase):
    def start_dns(self, zone, hang=(), servfail=()):
        self.dns = DNSFixture(zone, hang=hang, servfail=servfail)
        start_dns(self.dns)
        self.addCleanup(self.dns.stop)
        return self.dns

    def start_instance(self, policy: dict, root: Path | None = None) -> Instance:
        settings = {"trusted_networks": ["127.0.0.1/32"], "authserv_id": AUTHSERV_ID, **policy}
        if root is None:
            root = Path(self.mktemp())
            _copy_users(root)
        instance = Instance(root, sections={
            "dns": {"nameservers": ["127.0.0.1"], "port": self.dns.port, "timeout": 0.5},
            "policy": flatten(settings)})
        instance.start()
        self.addCleanup(self.stop, instance)
        return instance

    def stop(self, instance):
        if not getattr(instance, "stopped", False):
            instance.stopped = True
            return instance.stop()

    def send(self, instance, helo, sender, recipients, message, source="127.0.0.2"):
        return in_thread(lambda: Client(instance.smtp_port, source).session(
            helo, sender, recipients, message))


class VectorReplay(PolicyInstanceTestCase):
    group = ""

    @defer.inlineCallbacks
    def replay(self, name: str):
        vector = load_vector(self.group, name)
        self.start_dns(vector.zone(), vector.case.get("hang", ()),
                       vector.case.get("servfail", ()))
        instance = self.start_instance(vector.case.get("policy", {}))
        replies = yield self.send(instance, vector.helo, vector.sender, vector.recipients,
                                  vector.message, vector.client)
        expect = vector.expect
        for stage in ("mail", "rcpt", "data"):
            if stage in replies:
                self.assertEqual(replies[stage], expect.get(stage, "250"), f"{name}: {stage}")
        folder = expect.get("folder")
        if folder is None or replies.get("data") != "250":
            self.assertEqual(instance.messages(USER), [])
            self.assertEqual(instance.messages(USER, ".Junk/new"), [])
            return
        sub = "new" if folder == "INBOX" else f"{folder}/new"
        other = ".Junk/new" if folder == "INBOX" else "new"
        files = yield wait_for(lambda: instance.messages(USER, sub))
        self.assertEqual(instance.messages(USER, other), [])
        fields = stored_headers(files[0])
        names = [n for n, _ in fields]
        self.assertEqual(names[0], "Return-Path")
        self.assertEqual(names[1], "Authentication-Results")
        ours = [v for n, v in fields if n == "Authentication-Results"
                and v.split(";")[0].strip() == AUTHSERV_ID]
        self.assertEqual(len(ours), 1, f"{name}: one Authentication-Results of ours")
        self.assertEqual(result_clauses(ours[0]), expect["authentication_results"], name)
        received = names.index("Received")
        if "received_spf" in expect:
            self.assertEqual(names.index("Received-SPF"), 2)
            self.assertIn(expect["received_spf"], dict(fields)["Received-SPF"])
        self.assertLess(names.index("Authentication-Results"), received)
        data = files[0].read_bytes()
        if "removed" in expect:
            self.assertNotIn(b"(forged)", data)
            self.assertIn(expect["kept"].encode(), data)
        # The message itself follows unchanged (LF line ends in the Maildir).
        self.assertTrue(data.endswith(vector.message.split(b"\r\n\r\n", 1)[1]
                                      .replace(b"\r\n", b"\n")))


def _replays(group: str) -> type:
    def make(name):
        return lambda self: self.replay(name)

    attrs = {"group": group}
    for name in vector_names(group):
        attrs["test_" + name.replace("-", "_")] = make(name)
    return type(f"{group.upper()}OverSMTP", (VectorReplay,), attrs)


SPFOverSMTP = _replays("spf")
DKIMOverSMTP = _replays("dkim")
DMARCOverSMTP = _replays("dmarc")
ARCOverSMTP = _replays("arc")


MESSAGE = crlf(b"From: Sender <alice@sender.test>\nTo: demo@example.test\nSubject: hi\n\nhello\n")
ZONE = {"sender.test": {"TXT": ["v=spf1 ip4:127.0.0.0/8 -all"]},
        "_dmarc.sender.test": {"TXT": ["v=DMARC1; p=none"]},
        "forged.test": {"TXT": ["v=spf1 -all"]},
        "_dmarc.forged.test": {"TXT": ["v=DMARC1; p=reject"]},
        "3.0.0.127.bl.test": {"A": ["127.0.0.2"]}}


class GreylistingOverSMTP(PolicyInstanceTestCase):
    @defer.inlineCallbacks
    def test_first_try_retry_too_soon_after_the_delay_and_after_a_restart(self):
        self.start_dns(ZONE)
        root = Path(self.mktemp())
        policy = {"checkers": ["spf", "greylist", "dkim", "dmarc"], "greylist": {"delay": 1.0}}
        instance = self.start_instance(policy, root)
        send = lambda rcpts=(USER,): self.send(instance, "mx.sender.test", "alice@sender.test",
                                               list(rcpts), MESSAGE)
        self.assertEqual((yield send())["rcpt"], "451 4.7.1")
        self.assertEqual((yield send())["rcpt"], "451 4.7.1")
        yield task.deferLater(reactor, 1.1, lambda: None)
        self.assertEqual((yield send())["data"], "250")
        yield wait_for(lambda: instance.messages(USER))
        yield self.stop(instance)
        instance = self.start_instance(policy, root)
        # The triplet passes at once, and so does the sender to another recipient.
        self.assertEqual((yield send())["data"], "250")
        self.assertEqual((yield send(["alice@example.test"]))["data"], "250")
        # A new sender from the same network is still greylisted.
        replies = yield self.send(instance, "mx.sender.test", "bob@sender.test", [USER], MESSAGE)
        self.assertEqual(replies["rcpt"], "451 4.7.1")

    @defer.inlineCallbacks
    def test_the_trusted_network_is_never_checked(self):
        self.start_dns(ZONE)
        instance = self.start_instance({"checkers": ["spf", "greylist", "dkim", "dmarc"]})
        replies = yield self.send(instance, "mx.sender.test", "alice@forged.test", [USER],
                                  MESSAGE.replace(b"sender.test", b"forged.test"),
                                  source="127.0.0.1")
        self.assertEqual(replies["data"], "250")
        files = yield wait_for(lambda: instance.messages(USER))
        self.assertNotIn(b"Authentication-Results", files[0].read_bytes())


class ListsAndLimitsOverSMTP(PolicyInstanceTestCase):
    def lists(self, text: str) -> Path:
        path = Path(self.mktemp()).resolve()
        path.write_text(text)
        return path

    @defer.inlineCallbacks
    def test_a_blocked_client_gets_554_at_connect_and_only_quit(self):
        self.start_dns(ZONE)
        lists = self.lists("block ip 127.0.0.4\n")
        instance = self.start_instance({"lists": {"file": str(lists)}})

        def talk():
            with socket.create_connection(("127.0.0.1", instance.smtp_port), timeout=5,
                                          source_address=("127.0.0.4", 0)) as s:
                f = s.makefile("rb")
                greeting = f.readline()
                s.sendall(b"EHLO x.test\r\n")
                ehlo = f.readline()
                s.sendall(b"QUIT\r\n")
                return greeting, ehlo, f.readline()

        greeting, ehlo, quit_ = yield in_thread(talk)
        self.assertEqual(greeting, b"554 5.7.1 Access denied: client [127.0.0.4] is blocked "
                                   b"by local policy\r\n")
        self.assertTrue(ehlo.startswith(b"503 5.5.1"))
        self.assertTrue(quit_.startswith(b"221"))

    @defer.inlineCallbacks
    def test_an_allowed_client_skips_greylisting_and_dnsbl_but_not_dmarc(self):
        self.start_dns(ZONE)
        lists = self.lists("allow ip 127.0.0.3\n")
        instance = self.start_instance({
            "checkers": ["lists", "dnsbl", "spf", "greylist", "dkim", "dmarc"],
            "lists": {"file": str(lists)}, "dnsbl": {"zones": ["bl.test"]}})
        replies = yield self.send(instance, "mx.sender.test", "alice@sender.test", [USER],
                                  MESSAGE, source="127.0.0.3")
        self.assertEqual(replies["data"], "250")
        forged = MESSAGE.replace(b"alice@sender.test", b"ceo@forged.test")
        replies = yield self.send(instance, "mx.sender.test", "alice@sender.test", [USER],
                                  forged, source="127.0.0.3")
        self.assertEqual((replies["rcpt"], replies["data"]), ("250", "550 5.7.1"))
        # Off the list (the file is re-read), 127.0.0.3 is listed in bl.test.
        lists.write_text("# nobody is allowed now\n")
        code, text = yield in_thread(lambda: self._rcpt_text(instance, "127.0.0.3"))
        self.assertEqual(code, 554)

    def _rcpt_text(self, instance, source):
        client = Client(instance.smtp_port, source)
        try:
            client.smtp.ehlo("mx.sender.test")
            client.smtp.mail("alice@sender.test")
            return client.smtp.rcpt(USER)
        finally:
            client.close()

    @defer.inlineCallbacks
    def test_a_dnsbl_listed_client_is_refused_at_rcpt(self):
        self.start_dns(ZONE)
        instance = self.start_instance({"dnsbl": {"zones": ["bl.test"]}})
        code, text = yield in_thread(lambda: self._rcpt_text(instance, "127.0.0.3"))
        self.assertEqual(code, 554)
        self.assertEqual(text, b"5.7.1 Service unavailable; client [127.0.0.3] blocked using "
                               b"bl.test")

    @defer.inlineCallbacks
    def test_too_many_connections_get_421(self):
        self.start_dns(ZONE)
        instance = self.start_instance({"ratelimit": {"max_connections": 2}})

        def connect():
            client = Client(instance.smtp_port, "127.0.0.5")
            greeting = client.greeting
            client.close()
            return greeting

        self.assertEqual((yield in_thread(connect))[0], 220)
        self.assertEqual((yield in_thread(connect))[0], 220)
        code, text = yield in_thread(connect)
        self.assertEqual(code, 421)
        self.assertIn(b"Too many connections from [127.0.0.5]", text)


class EvaluationsOverSMTP(PolicyInstanceTestCase):
    @defer.inlineCallbacks
    def test_each_dmarc_evaluation_is_kept_for_reports(self):
        self.start_dns(ZONE)
        instance = self.start_instance({})
        started = time.time()
        yield self.send(instance, "mx.sender.test", "alice@sender.test", [USER], MESSAGE)
        yield self.send(instance, "mx.sender.test", "alice@sender.test", [USER],
                        MESSAGE.replace(b"alice@sender.test", b"ceo@forged.test"))
        store = EvaluationStore(instance.config.server.spool_dir / "policy" / "dmarc.sqlite")
        self.addCleanup(store.close)
        rows = store.between(started - 1, time.time() + 1)
        self.assertEqual([(r.source_ip, r.header_from, r.envelope_from, r.policy_domain, r.p,
                           r.spf_result, r.spf_aligned, r.result, r.disposition) for r in rows],
                         [("127.0.0.2", "sender.test", "sender.test", "sender.test", "none",
                           "pass", True, "pass", "none"),
                          ("127.0.0.2", "forged.test", "sender.test", "forged.test", "reject",
                           "pass", False, "fail", "reject")])


class SessionOverSMTP(PolicyInstanceTestCase):
    def raw(self, instance, source, data: bytes, replies: int) -> list[bytes]:
        def talk():
            with socket.create_connection(("127.0.0.1", instance.smtp_port), timeout=5,
                                          source_address=(source, 0)) as s:
                f = s.makefile("rb")
                lines = [f.readline()]
                s.sendall(data)
                while len(lines) < replies:
                    line = f.readline()
                    if not line:
                        break
                    if line[3:4] != b"-":
                        lines.append(line)
                return lines
        return in_thread(talk)

    @defer.inlineCallbacks
    def test_pipelined_commands_get_their_replies_in_order(self):
        self.start_dns(ZONE)
        instance = self.start_instance({"checkers": ["spf", "greylist", "dkim", "dmarc"]})
        lines = yield self.raw(instance, "127.0.0.2",
                               b"EHLO mx.sender.test\r\nMAIL FROM:<alice@sender.test>\r\n"
                               b"RCPT TO:<demo@example.test>\r\nRCPT TO:<alice@example.test>\r\n"
                               b"DATA\r\nQUIT\r\n", 7)
        expected = [b"220 ", b"250 ", b"250 2.1.0", b"451 4.7.1", b"451 4.7.1", b"503 5.5.1",
                    b"221 2.0.0"]
        self.assertEqual([line[:len(e)] for line, e in zip(lines, expected)], expected)

    @defer.inlineCallbacks
    def test_a_blocked_helo_name_is_refused_and_helo_must_be_given_again(self):
        self.start_dns(ZONE)
        lists = Path(self.mktemp()).resolve()
        lists.write_text("block helo .dynamic.test\n")
        instance = self.start_instance({"lists": {"file": str(lists)}})
        lines = yield self.raw(instance, "127.0.0.2",
                               b"EHLO host-1.pool.dynamic.test\r\nMAIL FROM:<a@sender.test>\r\n"
                               b"QUIT\r\n", 4)
        self.assertEqual([line[:9] for line in lines],
                         [b"220 mail.", b"554 5.7.1", b"503 5.5.1", b"221 2.0.0"])

    @defer.inlineCallbacks
    def test_a_large_signed_message_is_checked_from_its_spilled_copy(self):
        from tests.support.policykit import make_key, sign, split_txt
        key = make_key("sender.test", "big", "rsa", 1024)
        self.start_dns({**ZONE, key.record_name: {"TXT": [split_txt(key.txt)]}})
        instance = self.start_instance({})
        body = b"".join(b"line %06d of a large message, long enough to spill\n" % i
                        for i in range(4000))
        message = sign(crlf(MESSAGE.replace(b"hello\r\n", b"") + body), key)
        self.assertGreater(len(message), 200_000)
        replies = yield self.send(instance, "mx.sender.test", "alice@sender.test", [USER],
                                  message)
        self.assertEqual(replies["data"], "250")
        files = yield wait_for(lambda: instance.messages(USER))
        fields = dict(stored_headers(files[0]))
        self.assertIn("dkim=pass header.d=sender.test header.s=big",
                      " ".join(fields["Authentication-Results"].split()))
        self.assertTrue(files[0].read_bytes().endswith(body))
