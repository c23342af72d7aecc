"""The policy data vectors (tests/data/policy/*/NN-name/), run through the chain.

Each vector runs every stage of ``SessionPolicy`` (connect, HELO, MAIL,
RCPT, end of data) with the configured checkers over the real DNS fixture,
and checks the reply at each stage, the folder chosen and the exact
Authentication-Results clauses. ``test_policy_smtp`` replays the same
vectors over real SMTP sessions against a running instance.
"""

from __future__ import annotations

from pathlib import Path

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from mailstack.config import from_dict
from mailstack.policy.chain import build_chain
from mailstack.policy.message import MessageBuffer
from tests.support.dnsserver import DNSFixture
from tests.support.policykit import (
    AUTHSERV_ID, load_vector, resolver_for, result_clauses, start_dns, unfold, vector_names)


def policy_config(vector, root: Path, dns_port: int) -> dict:
    """The config of an instance for ``vector`` (also used by test_policy_smtp)."""
    policy = {"trusted_networks": ["127.0.0.1/32"], "authserv_id": AUTHSERV_ID}
    for key, value in vector.case.get("policy", {}).items():
        policy[key] = value
    return {"server": {"hostname": AUTHSERV_ID, "domains": ["example.test"],
                       "spool_dir": str(root / "spool")},
            "dns": {"nameservers": ["127.0.0.1"], "port": dns_port, "timeout": 0.5},
            "policy": policy}


def status(reply) -> str:
    return "250" if reply is None else f"{reply.code} {reply.enhanced}"


class VectorTestCase(unittest.TestCase):
    group = ""

    @defer.inlineCallbacks
    def run_vector(self, name: str):
        vector = load_vector(self.group, name)
        dns = DNSFixture(vector.zone(), hang=vector.case.get("hang", ()),
                         servfail=vector.case.get("servfail", ()))
        start_dns(dns)
        self.addCleanup(dns.stop)
        root = Path(self.mktemp())
        root.mkdir()
        config = from_dict(policy_config(vector, root, dns.port), root / "mailstack.toml")
        resolver = resolver_for(dns.port)
        chain = build_chain(config, resolver, reactor, threads.deferToThread)
        self.addCleanup(chain.close)
        policy = chain.session(vector.client, 40000)
        expect = vector.expect
        self.assertIsNone((yield policy.connect()))
        self.assertIsNone((yield policy.helo(vector.helo)))
        reply = yield policy.mail(vector.sender)
        self.assertEqual(status(reply), expect.get("mail", "250"), f"{name}: MAIL FROM")
        if reply is not None:
            return
        for rcpt in vector.recipients:
            reply = yield policy.rcpt(rcpt)
            self.assertEqual(status(reply), expect.get("rcpt", "250"), f"{name}: RCPT TO")
            if reply is not None:
                return
        buffer = MessageBuffer(root)
        self.addCleanup(buffer.close)
        for line in vector.message.split(b"\r\n")[:-1]:
            buffer.write_line(line)
        outcome = yield policy.end_of_data(buffer)
        self.assertEqual(status(outcome.reply), expect.get("data", "250"), f"{name}: end of data")
        if outcome.reply is not None:
            return
        self.assertEqual(outcome.folder or "INBOX", expect["folder"], f"{name}: folder")
        ar = [line for line in outcome.header_lines]
        end = next((i for i, line in enumerate(ar[1:], 1) if not line[:1].isspace()), len(ar))
        self.assertEqual(ar[0].split(":", 1)[0], "Authentication-Results")
        value = unfold(ar[:end]).split(":", 1)[1]
        self.assertEqual(value.split(";")[0].strip(), AUTHSERV_ID)
        self.assertEqual(result_clauses(value), expect["authentication_results"], name)
        if "received_spf" in expect:
            spf = [i for i, line in enumerate(ar) if line.startswith("Received-SPF:")]
            self.assertEqual(len(spf), 1)
            end = next((i for i, line in enumerate(ar[spf[0] + 1:], spf[0] + 1)
                        if not line[:1].isspace()), len(ar))
            self.assertIn(expect["received_spf"], "".join(ar[spf[0]:end]))
        if "removed" in expect:
            stored = []
            yield threads.deferToThread(buffer.write_to, stored.append, outcome.drop)
            text = b"\n".join(stored).decode()
            self.assertNotIn("MAIL.example.test (forged)", text)
            self.assertIn(expect["kept"], text)


def _generate(group: str) -> type:
    def make(name):
        return lambda self: self.run_vector(name)

    attrs = {"group": group}
    for name in vector_names(group):
        attrs["test_" + name.replace("-", "_")] = make(name)
    return type(f"{group.upper()}Vectors", (VectorTestCase,), attrs)


SPFVectors = _generate("spf")
DKIMVectors = _generate("dkim")
DMARCVectors = _generate("dmarc")
ARCVectors = _generate("arc")
