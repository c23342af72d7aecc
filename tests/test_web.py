"""The HTTP(S) listener, fetched with real clients: urllib over http, curl over https
(with the certificate checked for each name, as mail programs and senders do)."""

from __future__ import annotations

import json
import plistlib
import re
import shutil
import subprocess
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET

from twisted.internet import defer
from twisted.trial import unittest

from tests.support.instance import DOMAIN, HOSTNAME, in_thread
from tests.support.setupkit import SetupInstance

CLIENT_LISTENERS = ("submission", "submissions", "imap", "imaps", "pop3", "pop3s", "http",
                    "https")
POX_NS = "{http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006}"
OUTLOOK_NS = "{http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a}"
POX_REQUEST = b"""<?xml version="1.0" encoding="utf-8"?>
<Autodiscover xmlns="http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006">
  <Request>
    <EMailAddress>%s</EMailAddress>
    <AcceptableResponseSchema>%s</AcceptableResponseSchema>
  </Request>
</Autodiscover>"""
OUTLOOK_SCHEMA = b"http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"
#: RFC 8461 3.2 ABNF, field by field.
STS_FIELDS = {"version": r"STSv1", "mode": r"testing|enforce|none", "max_age": r"[0-9]{1,10}",
              "mx": r"(\*\.)?[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9]"
                    r"(?:[A-Za-z0-9-]*[A-Za-z0-9])?)+"}


def fetch(url: str, data: bytes | None = None, headers: dict | None = None,
          method: str | None = None) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def thunderbird_servers(document: bytes) -> tuple[list[dict], list[dict]]:
    """What Thunderbird's readFromXML.js takes from a clientConfig (and what it refuses)."""
    root = ET.fromstring(document)
    assert root.tag == "clientConfig" and root.get("version") == "1.1", root.tag
    provider = root.find("emailProvider")
    assert provider is not None and provider.get("id"), "need <emailProvider id=...>"
    assert [d.text for d in provider.findall("domain")], "need <domain>"
    servers = {"incomingServer": [], "outgoingServer": []}
    for tag, kinds in (("incomingServer", ("imap", "pop3")), ("outgoingServer", ("smtp",))):
        for element in provider.findall(tag):
            server = {"type": element.get("type")}
            for name in ("hostname", "port", "socketType", "authentication", "username"):
                value = element.findtext(name)
                assert value, f"{tag} needs <{name}>"
                server[name] = value
            assert server["type"] in kinds, server
            assert 0 < int(server["port"]) < 65536, server
            assert server["socketType"] in ("plain", "SSL", "STARTTLS"), server
            assert server["authentication"] in ("password-cleartext", "plain",
                                                "password-encrypted", "secure"), server
            servers[tag].append(server)
        assert servers[tag], f"need at least one <{tag}>"
    return servers["incomingServer"], servers["outgoingServer"]


def parse_sts_policy(text: str) -> dict:
    """RFC 8461 3.2: "key: value" lines, CRLF or LF; one version, mode and max_age;
    mx for testing and enforce."""
    fields: dict[str, list[str]] = {}
    for line in re.split(r"\r?\n", text.rstrip("\r\n")):
        m = re.fullmatch(r"([A-Za-z0-9_.-]{1,32}): *([\x21-\x7e][\x20-\x7e]*?) *", line)
        assert m, f"not a policy field: {line!r}"
        fields.setdefault(m.group(1), []).append(m.group(2))
    for key, pattern in STS_FIELDS.items():
        for value in fields.get(key, []):
            assert re.fullmatch(pattern, value), (key, value)
    for key in ("version", "mode", "max_age"):
        assert len(fields.get(key, [])) == 1, f"exactly one {key}"
    assert int(fields["max_age"][0]) <= 31_557_600
    if fields["mode"][0] != "none":
        assert fields.get("mx"), "mx needed"
    return fields


class WebTests(unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self):
        root = self.mktemp()
        self.instance = SetupInstance(root, {}, listen=CLIENT_LISTENERS, users=(),
                                      sections={"http": {
                                          "metrics_networks": ["192.0.2.0/24"],
                                          "acme_challenge_dir": "acme"}})
        self.instance.start()
        self.addCleanup(self.instance.stop)
        self.http = f"http://127.0.0.1:{self.instance.port('http')}"
        yield None

    def curl(self, name: str, path: str, *args: str) -> subprocess.CompletedProcess:
        """GET https://name/path from the https listener, the certificate checked for name."""
        port = self.instance.port("https")
        return subprocess.run(
            ["curl", "-sS", "--max-time", "10", "--resolve", f"{name}:{port}:127.0.0.1",
             "--cacert", str(self.instance.cafile), "-D", "-", *args,
             f"https://{name}:{port}{path}"], capture_output=True, timeout=30)

    @defer.inlineCallbacks
    def test_thunderbird_autoconfig(self):
        url = f"{self.http}/mail/config-v1.1.xml?emailaddress=demo%40{DOMAIN}"
        status, headers, body = yield in_thread(fetch, url)
        self.assertEqual(status, 200)
        self.assertEqual(headers["Content-Type"], "application/xml")
        incoming, outgoing = thunderbird_servers(body)
        self.assertEqual([(s["type"], s["port"], s["socketType"]) for s in incoming],
                         [("imap", "993", "SSL"), ("imap", "143", "STARTTLS"),
                          ("pop3", "995", "SSL"), ("pop3", "110", "STARTTLS")])
        self.assertEqual([(s["type"], s["port"], s["socketType"]) for s in outgoing],
                         [("smtp", "465", "SSL"), ("smtp", "587", "STARTTLS")])
        for server in incoming + outgoing:
            self.assertEqual(server["hostname"], HOSTNAME)
            self.assertEqual(server["username"], "%EMAILADDRESS%")
        # The well-known path on the domain's own host, found from the Host header.
        status, _, same = yield in_thread(
            fetch, f"{self.http}/.well-known/autoconfig/mail/config-v1.1.xml",
            headers={"Host": f"autoconfig.{DOMAIN}"})
        self.assertEqual((status, same), (200, body))
        # Over HTTPS as Thunderbird tries first, the certificate valid for autoconfig.<domain>.
        result = yield in_thread(self.curl, f"autoconfig.{DOMAIN}",
                                 f"/mail/config-v1.1.xml?emailaddress=demo@{DOMAIN}")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(result.stdout.endswith(body))
        status, _, _ = yield in_thread(
            fetch, f"{self.http}/mail/config-v1.1.xml?emailaddress=x%40elsewhere.test")
        self.assertEqual(status, 404)

    @defer.inlineCallbacks
    def test_outlook_autodiscover_pox(self):
        url = f"{self.http}/autodiscover/autodiscover.xml"
        request = POX_REQUEST % (b"Demo@example.test", OUTLOOK_SCHEMA)
        status, headers, body = yield in_thread(fetch, url, request,
                                                {"Content-Type": "text/xml"})
        self.assertEqual(status, 200)
        self.assertTrue(headers["Content-Type"].startswith("text/xml"))
        root = ET.fromstring(body)
        self.assertEqual(root.tag, f"{POX_NS}Autodiscover")
        account = root.find(f"{OUTLOOK_NS}Response/{OUTLOOK_NS}Account")
        self.assertEqual(account.findtext(f"{OUTLOOK_NS}AccountType"), "email")
        self.assertEqual(account.findtext(f"{OUTLOOK_NS}Action"), "settings")
        protocols = {}
        for p in account.findall(f"{OUTLOOK_NS}Protocol"):
            fields = {child.tag.replace(OUTLOOK_NS, ""): child.text for child in p}
            protocols[fields["Type"]] = fields
        self.assertEqual(set(protocols), {"IMAP", "POP3", "SMTP"})
        self.assertEqual((protocols["IMAP"]["Port"], protocols["IMAP"]["SSL"]), ("993", "on"))
        self.assertEqual((protocols["POP3"]["Port"], protocols["POP3"]["SSL"]), ("995", "on"))
        self.assertEqual((protocols["SMTP"]["Port"], protocols["SMTP"]["SSL"]), ("465", "on"))
        for fields in protocols.values():
            self.assertEqual(fields["Server"], HOSTNAME)
            self.assertEqual(fields["LoginName"], "demo@example.test")  # canonical
            self.assertEqual((fields["SPA"], fields["AuthRequired"]), ("off", "on"))
        # Errors are autodiscover documents too ([MS-OXDSCLI] 2.2.4.2.1.1).
        mobilesync = OUTLOOK_SCHEMA.replace(b"outlook/responseschema/2006a",
                                            b"mobilesync/responseschema/2006")
        for request, code in ((POX_REQUEST % (b"x@elsewhere.test", OUTLOOK_SCHEMA), "500"),
                              (b"<not xml", "600"),
                              (b'<!DOCTYPE x [<!ENTITY a "aaaa">]><x>&a;</x>', "600"),
                              (POX_REQUEST % (b"demo@example.test", mobilesync), "601")):
            status, _, body = yield in_thread(fetch, url, request)
            self.assertEqual(status, 200)
            self.assertEqual(ET.fromstring(body).findtext(
                f"{POX_NS}Response/{POX_NS}Error/{POX_NS}ErrorCode"), code)
        status, headers, _ = yield in_thread(fetch, url)
        self.assertEqual((status, headers.get("Allow")), (405, "POST"))

    @defer.inlineCallbacks
    def test_outlook_autodiscover_json(self):
        base = f"{self.http}/autodiscover/autodiscover.json"
        https = self.instance.config.clients.https_port
        for url in (f"{base}?Email=demo%40{DOMAIN}&Protocol=AutodiscoverV1&RedirectCount=1",
                    f"{base}/v1.0/demo@{DOMAIN}?Protocol=AutodiscoverV1"):
            status, headers, body = yield in_thread(fetch, url)
            self.assertEqual(status, 200, body)
            self.assertTrue(headers["Content-Type"].startswith("application/json"))
            self.assertEqual(json.loads(body), {
                "Protocol": "AutodiscoverV1",
                "Url": f"https://{HOSTNAME}{'' if https == 443 else f':{https}'}"
                       "/autodiscover/autodiscover.xml"})
        status, _, body = yield in_thread(fetch, f"{base}?Email=demo%40{DOMAIN}&Protocol=Ews")
        self.assertEqual((status, json.loads(body)["ErrorCode"]), (400, "InvalidProtocol"))
        status, _, _ = yield in_thread(
            fetch, f"{base}?Email=x%40elsewhere.test&Protocol=AutodiscoverV1")
        self.assertEqual(status, 404)

    @defer.inlineCallbacks
    def test_apple_profile(self):
        status, headers, body = yield in_thread(
            fetch, f"{self.http}/apple/mail.mobileconfig?emailaddress=demo%40{DOMAIN}")
        self.assertEqual(status, 200)
        self.assertEqual(headers["Content-Type"], "application/x-apple-aspen-config")
        self.assertIn(f'filename="{DOMAIN}.mobileconfig"', headers["Content-Disposition"])
        profile = plistlib.loads(body)
        self.assertEqual((profile["PayloadType"], profile["PayloadVersion"]), ("Configuration", 1))
        [mail] = profile["PayloadContent"]
        self.assertEqual(mail["PayloadType"], "com.apple.mail.managed")
        self.assertEqual(mail["EmailAccountType"], "EmailTypeIMAP")
        self.assertEqual(mail["EmailAddress"], f"demo@{DOMAIN}")
        self.assertEqual((mail["IncomingMailServerHostName"], mail["IncomingMailServerPortNumber"],
                          mail["IncomingMailServerUseSSL"]), (HOSTNAME, 993, True))
        self.assertEqual((mail["OutgoingMailServerHostName"], mail["OutgoingMailServerPortNumber"],
                          mail["OutgoingMailServerUseSSL"]), (HOSTNAME, 465, True))
        self.assertEqual(mail["IncomingMailServerAuthentication"], "EmailAuthPassword")
        # The same address gets the same UUIDs: installing again replaces the account.
        _, _, again = yield in_thread(
            fetch, f"{self.http}/apple/mail.mobileconfig?emailaddress=demo%40{DOMAIN}")
        self.assertEqual(plistlib.loads(again)["PayloadUUID"], profile["PayloadUUID"])
        status, _, _ = yield in_thread(
            fetch, f"{self.http}/apple/mail.mobileconfig?emailaddress=nobody%40elsewhere.test")
        self.assertEqual(status, 400)
        status, _, page = yield in_thread(fetch, f"{self.http}/")
        self.assertEqual(status, 200)
        self.assertIn(b"/apple/mail.mobileconfig", page)

    @defer.inlineCallbacks
    def test_mta_sts_policy_over_https(self):
        result = yield in_thread(self.curl, f"mta-sts.{DOMAIN}", "/.well-known/mta-sts.txt")
        self.assertEqual(result.returncode, 0, result.stderr)
        head, _, body = result.stdout.partition(b"\r\n\r\n")
        self.assertIn(b" 200 ", head.split(b"\r\n")[0])
        self.assertRegex(head.lower(), rb"content-type: text/plain")
        fields = parse_sts_policy(body.decode("ascii"))
        self.assertEqual(fields, {"version": ["STSv1"], "mode": ["testing"], "mx": [HOSTNAME],
                                  "max_age": ["604800"]})
        # A name whose certificate does not match is refused by curl (as by senders).
        wrong = yield in_thread(self.curl, "mta-sts.elsewhere.test", "/.well-known/mta-sts.txt")
        self.assertNotEqual(wrong.returncode, 0)

    @defer.inlineCallbacks
    def test_health_metrics_access_acme_and_limits(self):
        status, _, body = yield in_thread(fetch, f"{self.http}/healthz")
        self.assertEqual((status, body), (200, b"ok\n"))
        # [http] metrics_networks does not include 127.0.0.1 here.
        status, _, _ = yield in_thread(fetch, f"{self.http}/metrics")
        self.assertEqual(status, 403)
        status, _, _ = yield in_thread(fetch, f"{self.http}/nothing-here")
        self.assertEqual(status, 404)
        challenge = self.instance.root / "acme" / ".well-known" / "acme-challenge"
        challenge.mkdir(parents=True)
        (challenge / "tok_EN-1").write_bytes(b"tok_EN-1.thumbprint")
        status, _, body = yield in_thread(fetch, f"{self.http}/.well-known/acme-challenge/tok_EN-1")
        self.assertEqual((status, body), (200, b"tok_EN-1.thumbprint"))
        (self.instance.root / "acme" / "secret").write_bytes(b"no")
        for path in ("..%2fsecret", "..", "missing"):
            status, _, _ = yield in_thread(
                fetch, f"{self.http}/.well-known/acme-challenge/{path}")
            self.assertEqual(status, 404, path)
        status, _, _ = yield in_thread(fetch, f"{self.http}/autodiscover/autodiscover.xml",
                                       b"<x>" + b"a" * 100_000 + b"</x>")
        self.assertEqual(status, 413)


if shutil.which("curl") is None:
    WebTests.skip = "curl is not installed (make test-deps)"
