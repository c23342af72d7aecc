"""`mailstack dns` and `mailstack check`, run as the real command against the DNS fixture
and a running instance with every listener (ports mapped with --port-map)."""

from __future__ import annotations

import base64
import copy
import dataclasses
import re
import time

import dkim
import dns.zone
from twisted.internet import defer
from twisted.trial import unittest

from mailstack.config import DNSConfig
from mailstack.setup.check import Check, render
from mailstack.queue.dkimsign import load_keys, sign
from tests.support.dnsserver import DNSFixture
from tests.support.instance import DOMAIN, HOSTNAME, in_thread
from tests.support.setupkit import SetupInstance, mailstack, zone_records

PTR = "1.0.0.127.in-addr.arpa"
#: `mailstack dns example.test`, run by the first test.
_OUTPUT: list = []


def rows(output: str) -> dict[tuple[str, str], str]:
    """(check, name) -> status from the check table."""
    found = {}
    for line in output.splitlines():
        m = re.match(r"(\S+(?: \d+| policy)?)\s+(\S+(?: on \S+)?)\s+(OK|WRONG|MISSING|ERROR)\b",
                     line)
        if m:
            found[(m.group(1), m.group(2))] = m.group(3)
    return found


class SetupTestCase(unittest.TestCase):
    """A DNS fixture (empty until a test loads a zone) and a running instance."""

    @defer.inlineCallbacks
    def setUp(self):
        self.dns = DNSFixture({})
        self.dns.start()
        self.addCleanup(self.dns.stop)
        # A generous DNS timeout: a loaded test machine must not turn rows into ERROR.
        self.instance = SetupInstance(self.mktemp(), {**self.dns.config, "timeout": 5.0},
                                      users=())
        self.instance.start()
        self.addCleanup(self.instance.stop)
        if not _OUTPUT:
            # The same for every test (same keys, names and ports): made once.
            result = yield in_thread(mailstack, self.instance.config_path, "dns", DOMAIN)
            self.assertEqual(result.returncode, 0, result.stderr)
            _OUTPUT.append(result)
        self.zone_text = _OUTPUT[0].stdout
        self.zone = zone_records(self.zone_text, DOMAIN)
        # The reverse DNS is set at the hosting provider, not in the zone.
        self.zone[PTR] = {"PTR": [HOSTNAME]}

    def load_zone(self, records: dict) -> None:
        self.dns.resolver.records = copy.deepcopy(records)

    def check(self, *args, config=None):
        return in_thread(mailstack, config or self.instance.config_path, "check",
                         "--port-map", self.instance.port_map(),
                         "--cafile", str(self.instance.cafile), "--timeout", "5", *args)


class DNSCommandTests(SetupTestCase):
    def test_the_output_is_a_zone_file_with_every_record(self):
        text = self.zone_text
        zone = dns.zone.from_text(text, origin=DOMAIN + ".", check_origin=False)
        names = {n.to_text() for n in zone.nodes}
        for name in ("@", "mail", "s1._domainkey", "s2._domainkey", "_dmarc", "_mta-sts",
                     "_smtp._tls", "_submissions._tcp", "_submission._tcp", "_imaps._tcp",
                     "_imap._tcp", "_pop3s._tcp", "_pop3._tcp", "_autodiscover._tcp",
                     "autoconfig", "autodiscover", "mta-sts"):
            self.assertIn(name, names)
        z = self.zone
        self.assertEqual(z[DOMAIN]["MX"], [(10, HOSTNAME)])
        self.assertEqual(z[HOSTNAME]["A"], ["127.0.0.1"])
        self.assertEqual(z[DOMAIN]["TXT"], [["v=spf1 mx -all"]])
        self.assertEqual(z[HOSTNAME]["TXT"], [["v=spf1 a -all"]])
        self.assertEqual(z[f"_dmarc.{DOMAIN}"]["TXT"],
                         [[f"v=DMARC1; p=quarantine; rua=mailto:postmaster@{DOMAIN}"]])
        self.assertEqual(z[f"_smtp._tls.{DOMAIN}"]["TXT"],
                         [[f"v=TLSRPTv1; rua=mailto:postmaster@{DOMAIN}"]])
        self.assertRegex(z[f"_mta-sts.{DOMAIN}"]["TXT"][0][0], r"^v=STSv1; id=[0-9a-f]{20}$")
        ports = {name.split(".")[0]: value[0][2] for name, value in
                 ((n, r.get("SRV")) for n, r in z.items()) if value}
        self.assertEqual(ports, {"_submissions": 465, "_submission": 587, "_imaps": 993,
                                 "_imap": 143, "_pop3s": 995, "_pop3": 110, "_autodiscover": 443})
        self.assertEqual(z[f"_imaps._tcp.{DOMAIN}"]["SRV"], [(0, 1, 993, HOSTNAME)])
        self.assertEqual(z[f"mta-sts.{DOMAIN}"]["CNAME"], [HOSTNAME])
        # The PTR is a comment: it belongs to the provider's reverse zone.
        self.assertIn(f";   {PTR}. 3600 IN PTR {HOSTNAME}.", text)
        self.assertIn(";   mode: testing", text)
        self.assertIn("; MX     @", text)

    def test_the_dkim_records_verify_signatures_made_with_the_keys_on_disk(self):
        keys = load_keys(self.instance.config.dkim.keys_dir, DOMAIN)
        self.assertEqual([k.algorithm for k in keys], ["rsa", "ed25519"])
        published = {f"{n}.".encode(): "".join(r["TXT"][0]).encode()
                     for n, r in self.zone.items() if "_domainkey" in n}
        message = b"From: demo@example.test\nTo: x@remote.test\nSubject: s\n\nbody\n"
        signed = (b"".join(sign(message, keys)) + message).replace(b"\n", b"\r\n")
        verifier = dkim.DKIM(signed)
        for index in range(2):
            self.assertTrue(verifier.verify(
                idx=index, dnsfunc=lambda name, timeout=5: published.get(name)))

    @defer.inlineCallbacks
    def test_table_format_and_warnings(self):
        result = yield in_thread(mailstack, self.instance.config_path, "dns", "--format",
                                 "table")
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = result.stdout.splitlines()
        self.assertEqual(lines[0].split(), ["TYPE", "NAME", "VALUE"])
        self.assertIn(["MX", "@", "10", f"{HOSTNAME}."], [line.split() for line in lines])
        self.assertTrue(any(line.startswith("PTR    reverse DNS of 127.0.0.1") for line in lines))
        self.assertIn("127.0.0.1 is not a public address", result.stderr)
        other = yield in_thread(mailstack, self.instance.config_path, "dns", "elsewhere.test")
        self.assertEqual(other.returncode, 1)
        self.assertIn("not in server.domains", other.stderr)


class CheckTests(SetupTestCase):
    @defer.inlineCallbacks
    def test_the_published_zone_passes(self):
        self.load_zone(self.zone)
        started = time.monotonic()
        result = yield self.check()
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        found = rows(result.stdout)
        self.assertNotIn("WRONG", result.stdout)
        self.assertEqual(set(found.values()), {"OK"}, result.stdout)
        for row in (("MX", DOMAIN), ("A", HOSTNAME), ("PTR", "127.0.0.1"), ("SPF", DOMAIN),
                    ("SPF", HOSTNAME), ("DKIM", f"s1._domainkey.{DOMAIN}"),
                    ("DKIM", f"s2._domainkey.{DOMAIN}"), ("DMARC", f"_dmarc.{DOMAIN}"),
                    ("MTA-STS", f"_mta-sts.{DOMAIN}"), ("TLSRPT", f"_smtp._tls.{DOMAIN}"),
                    ("SRV", f"_imaps._tcp.{DOMAIN}"), ("CNAME", f"mta-sts.{DOMAIN}"),
                    ("port 25", "smtp on 127.0.0.1"), ("port 587", "submission on 127.0.0.1"),
                    ("port 465", "submissions on 127.0.0.1"), ("port 993", "imaps on 127.0.0.1"),
                    ("port 143", "imap on 127.0.0.1"), ("port 995", "pop3s on 127.0.0.1"),
                    ("port 110", "pop3 on 127.0.0.1"), ("port 443", "https on 127.0.0.1"),
                    ("port 80", "http on 127.0.0.1")):
            self.assertEqual(found.get(row), "OK", f"{row}: {result.stdout}")
        self.assertIn("MTA-STS policy", result.stdout)
        self.assertRegex(result.stdout, r"TLSv1\.[23], certificate valid until 20")
        # For cron: silence when all is well.
        quiet = yield self.check("--quiet")
        self.assertEqual((quiet.returncode, quiet.stdout), (0, ""))
        self.assertLess(time.monotonic() - started, 30)

    @defer.inlineCallbacks
    def test_each_broken_record_gets_its_row_wrong_or_missing(self):
        host = HOSTNAME
        other_key = "MCowBQYDK2VwAyEA" + base64.b64encode(b"\x01" * 32).decode()
        includes = {f"i{n}.example.net": {"TXT": [f"v=spf1 include:i{n + 1}.example.net -all"]}
                    for n in range(11)}
        cases = [
            # (what is broken, change to the zone, the row, its status)
            ("no MX", lambda z: z[DOMAIN].pop("MX"), ("MX", DOMAIN), "MISSING"),
            ("MX elsewhere", lambda z: z[DOMAIN].update(MX=[(10, "mx.example.net")]),
             ("MX", DOMAIN), "WRONG"),
            ("A elsewhere", lambda z: z[host].update(A=["192.0.2.1"]), ("A", host), "WRONG"),
            ("no A", lambda z: z[host].pop("A"), ("A", host), "MISSING"),
            ("AAAA without public_ipv6", lambda z: z[host].update(AAAA=["2001:db8::25"]),
             ("AAAA", host), "WRONG"),
            ("no PTR", lambda z: z.pop(PTR), ("PTR", "127.0.0.1"), "MISSING"),
            ("PTR elsewhere", lambda z: z[PTR].update(PTR=["host.example.net"]),
             ("PTR", "127.0.0.1"), "WRONG"),
            ("no SPF", lambda z: z[DOMAIN].pop("TXT"), ("SPF", DOMAIN), "MISSING"),
            ("SPF fails", lambda z: z[DOMAIN].update(TXT=["v=spf1 ip4:192.0.2.1 -all"]),
             ("SPF", DOMAIN), "WRONG"),
            ("two SPF", lambda z: z[DOMAIN]["TXT"].append("v=spf1 mx ~all"), ("SPF", DOMAIN),
             "WRONG"),
            ("SPF over 10 lookups", lambda z: (z[DOMAIN].update(
                TXT=["v=spf1 mx include:i0.example.net -all"]), z.update(includes)),
             ("SPF", DOMAIN), "WRONG"),
            ("no HELO SPF", lambda z: z[host].pop("TXT"), ("SPF", host), "MISSING"),
            ("DKIM other key", lambda z: z[f"s2._domainkey.{DOMAIN}"].update(
                TXT=[f"v=DKIM1; k=ed25519; p={other_key}"]), ("DKIM", f"s2._domainkey.{DOMAIN}"),
             "WRONG"),
            ("no DKIM", lambda z: z.pop(f"s1._domainkey.{DOMAIN}"),
             ("DKIM", f"s1._domainkey.{DOMAIN}"), "MISSING"),
            ("no DMARC", lambda z: z.pop(f"_dmarc.{DOMAIN}"), ("DMARC", f"_dmarc.{DOMAIN}"),
             "MISSING"),
            ("DMARC p=none", lambda z: z[f"_dmarc.{DOMAIN}"].update(TXT=["v=DMARC1; p=none"]),
             ("DMARC", f"_dmarc.{DOMAIN}"), "WRONG"),
            ("DMARC garbage", lambda z: z[f"_dmarc.{DOMAIN}"].update(
                TXT=["v=DMARC1; p=sometimes"]), ("DMARC", f"_dmarc.{DOMAIN}"), "WRONG"),
            ("old MTA-STS id", lambda z: z[f"_mta-sts.{DOMAIN}"].update(
                TXT=["v=STSv1; id=20190101"]), ("MTA-STS", f"_mta-sts.{DOMAIN}"), "WRONG"),
            ("no MTA-STS", lambda z: z.pop(f"_mta-sts.{DOMAIN}"),
             ("MTA-STS", f"_mta-sts.{DOMAIN}"), "MISSING"),
            ("no mta-sts host", lambda z: z.pop(f"mta-sts.{DOMAIN}"),
             ("CNAME", f"mta-sts.{DOMAIN}"), "MISSING"),
            ("no TLS-RPT", lambda z: z.pop(f"_smtp._tls.{DOMAIN}"),
             ("TLSRPT", f"_smtp._tls.{DOMAIN}"), "MISSING"),
            ("SRV wrong port", lambda z: z[f"_imaps._tcp.{DOMAIN}"].update(
                SRV=[(0, 1, 1993, host)]), ("SRV", f"_imaps._tcp.{DOMAIN}"), "WRONG"),
            ("no SRV", lambda z: z.pop(f"_submissions._tcp.{DOMAIN}"),
             ("SRV", f"_submissions._tcp.{DOMAIN}"), "MISSING"),
            ("no autoconfig", lambda z: z.pop(f"autoconfig.{DOMAIN}"),
             ("CNAME", f"autoconfig.{DOMAIN}"), "MISSING"),
        ]
        # Each case gets its own DNS server, so the checks run at once: in this
        # process (the Check behind the command), and three through the command.
        runs, commands = [], []
        for index, (label, change, row, status) in enumerate(cases):
            zone = copy.deepcopy(self.zone)
            change(zone)
            fixture = DNSFixture(zone)
            fixture.start()
            self.addCleanup(fixture.stop)
            config = dataclasses.replace(self.instance.config, dns=DNSConfig(
                nameservers=("127.0.0.1",), port=fixture.port, timeout=5.0))
            runs.append(in_thread(lambda c=config: render(Check(c, probe=False).domain(DOMAIN))))
            if index in (0, 7, 11):
                path = self.instance.root / f"check-{index}.toml"
                path.write_text(self.instance.config_path.read_text().replace(
                    f"port = {self.dns.port}\n", f"port = {fixture.port}\n"))
                commands.append((index, self.check("--no-probe", config=path)))
        results = yield defer.gatherResults(runs)
        problems = []
        for (label, _, row, status), output in zip(cases, results):
            if rows(output).get(row) != status:
                problems.append(f"{label}: {row} is {rows(output).get(row)}, not {status}:\n"
                                f"{output}")
            elif "    fix: " not in output:
                problems.append(f"{label}: no fix line")
        for index, d in commands:
            result = yield d
            label, _, row, status = cases[index]
            if result.returncode != 1 or rows(result.stdout).get(row) != status:
                problems.append(f"mailstack check, {label}: exit {result.returncode}:\n"
                                f"{result.stdout}{result.stderr}")
        self.assertEqual(problems, [])

    @defer.inlineCallbacks
    def test_ports_and_certificates(self):
        self.load_zone(self.zone)
        # A certificate with fewer days left than --min-days is WRONG everywhere TLS is.
        result = yield self.check("--min-days", "1000")
        self.assertEqual(result.returncode, 1)
        found = rows(result.stdout)
        self.assertEqual(found[("port 993", "imaps on 127.0.0.1")], "WRONG")
        self.assertEqual(found[("port 25", "smtp on 127.0.0.1")], "WRONG")
        self.assertEqual(found[("port 80", "http on 127.0.0.1")], "OK")
        self.assertIn("certificate expires in", result.stdout)
        self.assertIn("fix: renew it (certbot renew)", result.stdout)
        # Without the test's trust anchor the self-signed certificate is not valid.
        untrusted = yield in_thread(mailstack, self.instance.config_path, "check",
                                    "--port-map", self.instance.port_map(), "--timeout", "5")
        self.assertEqual(untrusted.returncode, 1)
        self.assertIn("certificate not valid for mail.example.test", untrusted.stdout)
        # A port nothing listens on.
        closed = self.instance.port_map().replace(f"993={self.instance.port('imaps')}", "993=1")
        result = yield in_thread(mailstack, self.instance.config_path, "check", "--port-map",
                                 closed, "--cafile", str(self.instance.cafile))
        self.assertEqual(rows(result.stdout)[("port 993", "imaps on 127.0.0.1")], "WRONG")
        self.assertIn("cannot connect to 127.0.0.1:1", result.stdout)
        # The MTA-STS policy must come over HTTPS: here port 443 leads to plain HTTP.
        plain = self.instance.port_map().replace(f"443={self.instance.port('https')}",
                                                 f"443={self.instance.port('http')}")
        result = yield in_thread(mailstack, self.instance.config_path, "check", "--port-map",
                                 plain, "--cafile", str(self.instance.cafile), "--timeout", "1")
        policy = ("MTA-STS policy", f"https://mta-sts.{DOMAIN}/.well-known/mta-sts.txt")
        self.assertEqual(rows(result.stdout)[policy], "MISSING", result.stdout)

    @defer.inlineCallbacks
    def test_a_dns_outage_is_an_error_not_a_pass(self):
        self.dns.resolver.servfail = {DOMAIN}
        self.load_zone(self.zone)
        result = yield self.check("--no-probe")
        self.assertEqual(result.returncode, 1)
        self.assertEqual(rows(result.stdout)[("MX", DOMAIN)], "ERROR")
