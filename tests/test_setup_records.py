"""The record list and the parsers behind `mailstack dns`, `mailstack check` and autodiscover,
without sockets."""

from __future__ import annotations

from pathlib import Path

import dns.zone
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from mailstack.config import from_dict
from mailstack.queue.dkimsign import generate_key, load_keys
from mailstack.setup.check import parse_policy
from mailstack.setup.records import (
    dkim_txt, mta_sts_id, mta_sts_policy, records, warnings, zone_text)
from mailstack.web.clients import BadRequest, Settings, parse_pox_request


def config(tmp: str, **sections):
    raw = {"server": {"hostname": "mx.hosting.example", "domains": ["example.org"],
                      "public_ipv4": "203.0.113.25"}, **sections}
    return from_dict(raw, Path(tmp) / "mailstack.toml")


class RecordTests(unittest.SynchronousTestCase):
    def test_a_host_outside_the_domain_is_left_to_its_own_zone(self):
        c = config(self.mktemp())
        text = zone_text(c, "example.org")
        zone = dns.zone.from_text(text, origin="example.org.", check_origin=False)
        self.assertEqual({n.to_text() for n in zone.nodes} & {"mx.hosting.example."}, set())
        self.assertIn(";   mx.hosting.example. 3600 IN A 203.0.113.25", text)
        self.assertIn(';   mx.hosting.example. 3600 IN TXT "v=spf1 a -all"', text)
        self.assertIn("example.org. 3600 IN MX 10 mx.hosting.example.", text)

    def test_the_dkim_record_is_the_one_keygen_printed(self):
        c = config(self.mktemp())
        printed = {}
        for selector, algorithm in (("r", "rsa"), ("e", "ed25519")):
            _, txt = generate_key(c.dkim.keys_dir, "example.org", selector, algorithm)
            printed[selector] = txt
        for key in load_keys(c.dkim.keys_dir, "example.org"):
            self.assertEqual(dkim_txt(key), printed[key.selector])

    def test_the_spf_record_and_warnings_follow_the_config(self):
        c = config(self.mktemp(), records={"spf_extra": ["include:_spf.relay.example"]},
                   outbound={"relay": "relay.example:587"})
        spf = [r.value for r in records(c, "example.org") if r.kind == "spf"]
        self.assertEqual(spf, ["v=spf1 mx include:_spf.relay.example -all", "v=spf1 a -all"])
        bare = config(self.mktemp(), outbound={"relay": "relay.example:587"})
        found = warnings(bare, "example.org")
        self.assertTrue(any("relay.example:587" in w for w in found), found)
        self.assertTrue(any("no DKIM key" in w for w in found), found)
        self.assertTrue(any("no smtp listener" in w for w in found), found)

    def test_the_mta_sts_id_changes_with_the_policy(self):
        testing = config(self.mktemp())
        enforce = config(self.mktemp(), records={"mta_sts_mode": "enforce"})
        self.assertNotEqual(mta_sts_id(testing), mta_sts_id(enforce))
        self.assertEqual(parse_policy(mta_sts_policy(enforce)),
                         {"version": "STSv1", "mode": "enforce", "mx": ["mx.hosting.example"],
                          "max_age": 604800})

    def test_nothing_plain_text_is_advertised(self):
        # Without a certificate the STARTTLS listeners cannot protect passwords.
        c = from_dict({"server": {"domains": ["example.org"]},
                       "listen": [{"protocol": "imap", "port": 143},
                                  {"protocol": "pop3", "port": 110}]}, "/x/m.toml")
        settings_ = Settings.from_config(c)
        self.assertEqual((settings_.incoming, settings_.outgoing), ((), ()))
        srv = {r.name: r.value for r in records(c, "example.org") if r.rtype == "SRV"}
        self.assertEqual(srv["_imap._tcp.example.org"], "0 0 0 .")


class PolicyParserTests(unittest.SynchronousTestCase):
    def test_rfc_8461_examples(self):
        self.assertEqual(parse_policy("version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\n"
                                      "mx: *.example.net\r\nmx: backupmx.example.com\r\n"
                                      "max_age: 604800\r\n")["mx"],
                         ["*.example.net", "backupmx.example.com", "mail.example.com"])
        for bad in ("mode: enforce\nmx: a.example\nmax_age: 1\n",          # no version
                    "version: STSv1\nmode: sometimes\nmx: a.example\nmax_age: 1\n",
                    "version: STSv1\nmode: enforce\nmax_age: 1\n",         # no mx
                    "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 31557601\n",
                    "<html>not found</html>"):
            self.assertIsNone(parse_policy(bad), bad)

    @settings(max_examples=200, deadline=None)
    @given(st.text(max_size=300))
    def test_any_text_parses_or_is_refused(self, text):
        result = parse_policy(text)
        self.assertTrue(result is None or result["version"] == "STSv1")


class AutodiscoverRequestTests(unittest.SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(st.one_of(st.binary(max_size=400),
                     st.text(max_size=200).map(lambda t: (
                         "<Autodiscover><Request><EMailAddress>" + t
                         + "</EMailAddress></Request></Autodiscover>").encode("utf-8"))))
    def test_any_body_gives_an_address_or_bad_request(self, body):
        try:
            address, schema = parse_pox_request(body)
        except BadRequest:
            return
        self.assertTrue(address)
        self.assertIsInstance(schema, str)

    def test_entities_are_refused(self):
        bomb = (b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa">'
                b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>'
                b"<Autodiscover><Request><EMailAddress>&b;</EMailAddress></Request></Autodiscover>")
        self.assertRaises(BadRequest, parse_pox_request, bomb)
