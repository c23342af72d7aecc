"""Parsers of untrusted input in the policy code (STYLE 12), the DNS hooks given
to pyspf and dkimpy, DMARC records and alignment, and the evaluation store."""

from __future__ import annotations

from pathlib import Path

import dkim
import spf
from hypothesis import given, settings, strategies as st
from twisted.internet import defer, threads
from twisted.trial import unittest

from mailstack.policy.dmarc import (
    AuthorProblem, aligned, author_domain, organizational_domain, parse_record)
from mailstack.policy.evaluations import Evaluation, EvaluationStore
from mailstack.policy.message import (
    MessageBuffer, authserv_id_of, claims_authserv_id, fold, header_fields)
from tests.support.dnsserver import DNSFixture
from tests.support.policykit import resolver_for, start_dns

FUZZ = settings(max_examples=150, deadline=None)


class HeaderTests(unittest.TestCase):
    def test_fields_are_unfolded_and_the_body_is_not_read(self):
        data = b"From: a@x.test\r\nSubject: one\r\n two\r\n\tthree\r\n\r\nFrom: body@x.test\r\n"
        self.assertEqual(header_fields(data), [("From", " a@x.test"),
                                               ("Subject", " one two\tthree")])

    def test_a_line_that_is_no_field_is_reported(self):
        fields = header_fields(b"From: a@x.test\r\nnot a field\r\n\r\n")
        self.assertEqual(fields[1][0], "")

    def test_authserv_id(self):
        self.assertEqual(authserv_id_of(" MX.Example.TEST; spf=pass"), "mx.example.test")
        self.assertEqual(authserv_id_of(" (a (nested) comment)\tmx.example.test 1; none"),
                         "mx.example.test")
        self.assertEqual(authserv_id_of(' "mx.example.test"; none'), "mx.example.test")
        self.assertEqual(authserv_id_of("mx.example.test(c);none"), "mx.example.test")
        self.assertTrue(claims_authserv_id("AUTHENTICATION-RESULTS", " mx.example.test; x",
                                           "MX.example.test"))
        self.assertFalse(claims_authserv_id("Authentication-Results",
                                            " mx.example.test.evil; x", "mx.example.test"))
        self.assertFalse(claims_authserv_id("X-Authentication-Results", " mx.example.test",
                                            "mx.example.test"))

    @FUZZ
    @given(st.binary(max_size=400))
    def test_header_parsing_never_fails(self, data):
        for name, value in header_fields(data):
            self.assertNotIn(":", name)
            authserv_id_of(value)

    @FUZZ
    @given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300))
    def test_folding_round_trips_and_keeps_lines_short(self, value):
        value = value.replace("\r", "").replace("\n", "")
        lines = fold("Received-SPF", value)
        self.assertEqual("".join(lines), "Received-SPF: " + value if value else
                         "Received-SPF: ")
        for line in lines[1:]:
            self.assertTrue(line.startswith(" "))


class BufferTests(unittest.TestCase):
    def lines(self, buffer, drop=None):
        out = []
        buffer.write_to(out.append, drop)
        return out

    def test_spills_to_a_file_and_reads_back(self):
        buffer = MessageBuffer()
        buffer.SPILL = 100
        lines = [b"Subject: x"] + [b""] + [b"line %d" % i for i in range(100)]
        for line in lines:
            buffer.write_line(line)
        self.assertIsNotNone(buffer._file)
        self.assertEqual(self.lines(buffer), lines)
        self.assertEqual(buffer.read(), b"".join(line + b"\r\n" for line in lines))
        buffer.close()

    def test_dropped_fields_go_with_their_continuation_lines(self):
        buffer = MessageBuffer()
        for line in (b"Authentication-Results: mx.example.test;", b"\tdkim=pass",
                     b"Authentication-Results: other.test; none", b"Subject: s", b"",
                     b"Authentication-Results: mx.example.test; in the body"):
            buffer.write_line(line)
        out = self.lines(buffer, lambda n, v: claims_authserv_id(n, v, "mx.example.test"))
        self.assertEqual(out, [b"Authentication-Results: other.test; none", b"Subject: s", b"",
                               b"Authentication-Results: mx.example.test; in the body"])


class DMARCParsingTests(unittest.TestCase):
    def test_records(self):
        r = parse_record(b"v=DMARC1; p=reject; sp=none; adkim=s; aspf=s; pct=20; "
                         b"rua=mailto:d@x.test", "x.test")
        self.assertEqual((r.p, r.sp, r.adkim, r.aspf, r.pct, r.rua),
                         ("reject", "none", "s", "s", 20, "mailto:d@x.test"))
        self.assertEqual(parse_record(b"v=DMARC1; p=quarantine", "x").sp, "quarantine")
        # DMARC-6: v= not first, bogus p= without rua: no policy.
        self.assertIsNone(parse_record(b"p=reject; v=DMARC1", "x"))
        self.assertIsNone(parse_record(b"v=DMARC1; p=bogus", "x"))
        self.assertIsNone(parse_record(b"v=DMARC10; p=reject", "x"))
        # RFC 7489 6.6.3: an invalid p= with a valid rua= is p=none.
        self.assertEqual(parse_record(b"v=DMARC1; p=bogus; rua=mailto:a@x.test", "x").p, "none")
        self.assertEqual(parse_record(b"v=DMARC1; p=reject; pct=500", "x").pct, 100)

    def test_organizational_domains_use_the_whole_list(self):
        self.assertEqual(organizational_domain("mail.example.co.uk"), "example.co.uk")
        self.assertIsNone(organizational_domain("co.uk"))
        self.assertEqual(organizational_domain("alice.github.io"), "alice.github.io")

    def test_alignment(self):
        self.assertTrue(aligned("example.co.uk", "mail.example.co.uk", "r"))       # DMARC-1
        self.assertFalse(aligned("example.co.uk", "mail.example.co.uk", "s"))
        self.assertFalse(aligned("co.uk", "example.co.uk", "r"))                  # DMARC-2
        self.assertFalse(aligned("bob.github.io", "alice.github.io", "r"))        # DMARC-3
        self.assertTrue(aligned("xn--bcher-kva.example", "xn--bcher-kva.example", "s"))
        self.assertTrue(aligned("Example.COM.", "example.com", "s"))              # DMARC-8
        self.assertFalse(aligned("", "example.com", "r"))

    def test_author_domain(self):
        self.assertEqual(author_domain([("From", " Bob <a@Bücher.example>")]),
                         "xn--bcher-kva.example")
        for fields in ([], [("From", " a@x.test"), ("from", " b@y.test")],
                       [("From", " a@x.test, b@y.test")], [("From", " <a@x.test> <b@y.test>")],
                       [("From", " undisclosed:;")], [("From", " nobody")],
                       [("From", " a@[192.0.2.1]")], [("", "junk"), ("From", " a@x.test")]):
            with self.assertRaises(AuthorProblem, msg=repr(fields)):
                author_domain(fields)

    @FUZZ
    @given(st.binary(max_size=200))
    def test_record_parsing_never_fails(self, data):
        parse_record(data, "x.test")

    @FUZZ
    @given(st.text(max_size=120))
    def test_from_parsing_answers_a_domain_or_a_problem(self, value):
        try:
            domain = author_domain([("From", value)])
        except AuthorProblem:
            return
        self.assertRegex(domain, r"\A[a-z0-9.\-]+\Z")


class DNSHookTests(unittest.TestCase):
    """pyspf's and dkimpy's lookups, over the one resolver and the real fixture (DNS-2)."""

    def setUp(self):
        self.dns = DNSFixture({"x.test": {"TXT": [["v=spf1 ", "-all"]], "MX": [(10, "mx.x.test")],
                                          "A": ["192.0.2.1"]},
                               "s._domainkey.x.test": {"TXT": [["v=DKIM1; p=", "AAAA"]]}},
                              hang=["slow.test"], servfail=["broken.test"])
        start_dns(self.dns)
        self.addCleanup(self.dns.stop)
        self.resolver = resolver_for(self.dns.port, timeout=0.3)

    def call(self, f, *args):
        return threads.deferToThread(f, *args)

    @defer.inlineCallbacks
    def test_spf_lookup(self):
        r = self.resolver
        self.assertEqual((yield self.call(r.spf_lookup, "x.test", "TXT")),
                         [(("x.test", "TXT"), [b"v=spf1 ", b"-all"])])
        self.assertEqual((yield self.call(r.spf_lookup, "x.test", "MX")),
                         [(("x.test", "MX"), (10, "mx.x.test"))])
        self.assertEqual((yield self.call(r.spf_lookup, "nowhere.test", "A")), [])   # NXDOMAIN
        self.assertEqual((yield self.call(r.spf_lookup, "x.test", "AAAA")), [])      # NODATA
        self.assertEqual((yield self.call(r.spf_lookup, "a" * 70 + ".test", "A")), [])
        for name in ("slow.test", "broken.test"):
            with self.assertRaises(spf.TempError):
                yield self.call(r.spf_lookup, name, "TXT")

    @defer.inlineCallbacks
    def test_dkim_txt(self):
        r = self.resolver
        self.assertEqual((yield self.call(r.dkim_txt, b"s._domainkey.x.test.")),
                         b"v=DKIM1; p=AAAA")
        self.assertIsNone((yield self.call(r.dkim_txt, b"t._domainkey.x.test.")))
        for name in (b"slow.test.", b"broken.test."):
            with self.assertRaises(dkim.DnsTimeoutError):
                yield self.call(r.dkim_txt, name)


class EvaluationStoreTests(unittest.TestCase):
    def test_rows_round_trip_and_age_out(self):
        store = EvaluationStore(Path(self.mktemp()) / "dmarc.sqlite", keep_days=1)
        self.addCleanup(store.close)
        first = Evaluation(time=1000.0, source_ip="192.0.2.1", header_from="x.test",
                           envelope_from="x.test", envelope_to="example.test",
                           policy_domain="x.test", p="reject", sp="reject",
                           dkim=({"domain": "x.test", "selector": "s", "result": "pass",
                                  "aligned": True},), dkim_aligned=True, result="pass")
        store.add(first)
        self.assertEqual(store.between(0, 2000), [first])
        self.assertEqual(store.between(0, 2000, "other.test"), [])
        store.add(Evaluation(time=1000.0 + 2 * 86400, source_ip="::1", header_from="y.test",
                             envelope_from="", envelope_to="example.test"))
        self.assertEqual([e.header_from for e in store.between(0, 10**9)], ["y.test"])


class FromFastPathTests(unittest.TestCase):
    @FUZZ
    @given(st.from_regex(r"\A ?(?:[A-Za-z0-9 .'_-]{0,12}<[A-Za-z0-9.+_-]{1,8}@[a-z0-9.-]{1,12}>"
                         r"|[A-Za-z0-9.+_-]{1,8}@[a-z0-9.-]{1,12}) ?\Z"))
    def test_the_fast_path_agrees_with_the_full_parser(self, value):
        from email.errors import InvalidHeaderDefect
        from email.headerregistry import HeaderRegistry
        from mailstack.policy.dmarc import normalize
        try:
            fast = author_domain([("From", value)])
        except AuthorProblem:
            fast = None
        full = None
        try:
            header = HeaderRegistry()("from", value)
        except Exception:  # CPython's parser crashes on some inputs (" .K@x": TypeError)
            header = None
        if header is not None and len(header.addresses) == 1 and not any(
                isinstance(d, InvalidHeaderDefect) for d in header.defects):
            full = normalize(header.addresses[0].domain) if header.addresses[0].domain else None
        if fast is not None:
            self.assertEqual(fast, full, value)


class DKIMBudgetTests(unittest.TestCase):
    """All key lookups of a message share one time budget (DNS-1, DKIM-9)."""

    @defer.inlineCallbacks
    def test_signatures_on_slow_names_spend_one_budget(self):
        import time as clock
        from mailstack.policy.dkim import verify_message
        from tests.support.policykit import crlf, make_key, sign
        names = [f"s{i}._domainkey.slow{i}.test" for i in range(4)]
        dns = DNSFixture({}, hang=names)
        start_dns(dns)
        self.addCleanup(dns.stop)
        resolver = resolver_for(dns.port, timeout=0.5)
        message = crlf(b"From: a@slow0.test\nSubject: s\n\nbody\n")
        for i in range(4):
            message = sign(message, make_key(f"slow{i}.test", f"s{i}", "ed25519"))
        started = clock.monotonic()
        results = yield threads.deferToThread(verify_message, message, resolver, 5, 1024, 0.3)
        self.assertLess(clock.monotonic() - started, 1.5)
        self.assertEqual([r.result for r in results], ["temperror"] * 4)
