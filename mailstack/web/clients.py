"""What mail programs are told about this server, in each vendor's format.

- Thunderbird: the autoconfig ``clientConfig`` 1.1 document
  (https://wiki.mozilla.org/Thunderbird:Autoconfiguration:ConfigFileFormat),
  fetched from ``autoconfig.<domain>/mail/config-v1.1.xml`` and
  ``<domain>/.well-known/autoconfig/mail/config-v1.1.xml``;
- Outlook: the POX autodiscover exchange ([MS-OXDSCLI] 2.2.4, the "outlook
  2006a" response schema with IMAP/POP3/SMTP ``Protocol`` elements) and the
  newer JSON step (``autodiscover.json``, protocol AutodiscoverV1) that
  points at the POX URL;
- Apple: a configuration profile (``.mobileconfig``, a property list with
  one ``com.apple.mail.managed`` payload), opened in Safari or Settings.

Every document is built from the same ``Settings`` (host name and advertised
ports, ``mailstack.setup.records.advertised_ports``): implicit TLS first (RFC
8314 5.1), then STARTTLS; a plain-text service is never advertised.
"""

from __future__ import annotations

import json
import plistlib
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from xml.sax.saxutils import escape

from mailstack.config import Config
from mailstack.setup.records import advertised_ports

#: (config protocol, kind, socket type) in the order mail programs should try them.
_INCOMING = (("imaps", "imap", "SSL"), ("imap", "imap", "STARTTLS"),
             ("pop3s", "pop3", "SSL"), ("pop3", "pop3", "STARTTLS"))
_OUTGOING = (("submissions", "smtp", "SSL"), ("submission", "smtp", "STARTTLS"))

POX_REQUEST_NS = "http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006"
POX_RESPONSE_NS = "http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006"
OUTLOOK_NS = "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a"


@dataclass(frozen=True)
class Server:
    kind: str       # imap, pop3 or smtp
    port: int
    socket: str     # SSL (implicit TLS) or STARTTLS


@dataclass(frozen=True)
class Settings:
    hostname: str
    incoming: tuple[Server, ...]
    outgoing: tuple[Server, ...]
    https_port: int
    display_name: str

    @classmethod
    def from_config(cls, config: Config, bound=None) -> Settings:
        ports = advertised_ports(config, bound)
        incoming = tuple(Server(kind, ports[p], sock) for p, kind, sock in _INCOMING if p in ports)
        outgoing = tuple(Server(kind, ports[p], sock) for p, kind, sock in _OUTGOING if p in ports)
        return cls(config.server.hostname, incoming, outgoing, ports.get("https", 443),
                   config.clients.display_name)

    def name_for(self, domain: str) -> str:
        return self.display_name or domain


def _sub(parent, tag: str, text=None, **attrs):
    element = ET.SubElement(parent, tag, attrs)
    if text is not None:
        element.text = str(text)
    return element


def _xml(root) -> bytes:
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def thunderbird(settings: Settings, domain: str) -> bytes:
    """The autoconfig document for ``domain`` (clientConfig version 1.1)."""
    root = ET.Element("clientConfig", version="1.1")
    provider = _sub(root, "emailProvider", id=domain)
    _sub(provider, "domain", domain)
    _sub(provider, "displayName", settings.name_for(domain))
    _sub(provider, "displayShortName", settings.name_for(domain))
    for servers, tag in ((settings.incoming, "incomingServer"),
                         (settings.outgoing, "outgoingServer")):
        for server in servers:
            element = _sub(provider, tag, type=server.kind)
            _sub(element, "hostname", settings.hostname)
            _sub(element, "port", server.port)
            _sub(element, "socketType", server.socket)
            _sub(element, "authentication", "password-cleartext")
            _sub(element, "username", "%EMAILADDRESS%")
            if server.kind == "pop3":
                pop3 = _sub(element, "pop3")
                _sub(pop3, "leaveMessagesOnServer", "true")
    return _xml(root)


def _element(tag: str, value, indent: str) -> str:
    return f"{indent}<{tag}>{escape(str(value))}</{tag}>"


def outlook_pox(settings: Settings, address: str, domain: str) -> bytes:
    """The autodiscover response for ``address`` ([MS-OXDSCLI] 2.2.4.2, outlook 2006a).

    Written out as Exchange writes it (the Response element redeclares the
    default namespace), which is the form Outlook's parser is known to take.
    """
    # Outlook takes one server per type: the preferred incoming ones and the first outgoing.
    chosen, seen = [], set()
    for server in settings.incoming + settings.outgoing:
        if server.kind not in seen:
            seen.add(server.kind)
            chosen.append(server)
    lines = ['<?xml version="1.0" encoding="utf-8"?>',
             f'<Autodiscover xmlns="{POX_RESPONSE_NS}">',
             f'  <Response xmlns="{OUTLOOK_NS}">',
             "    <User>", _element("DisplayName", address, "      "), "    </User>",
             "    <Account>", _element("AccountType", "email", "      "),
             _element("Action", "settings", "      ")]
    for server in chosen:
        lines.append("      <Protocol>")
        for tag, value in (("Type", server.kind.upper()), ("Server", settings.hostname),
                           ("Port", server.port), ("DomainRequired", "off"),
                           ("LoginName", address), ("SPA", "off")):
            lines.append(_element(tag, value, "        "))
        if server.socket == "SSL":
            lines.append(_element("SSL", "on", "        "))
        else:
            lines.append(_element("SSL", "off", "        "))
            lines.append(_element("Encryption", "TLS", "        "))
        lines.append(_element("AuthRequired", "on", "        "))
        if server.kind == "smtp":
            lines.append(_element("UsePOPAuth", "off", "        "))
            lines.append(_element("SMTPLast", "off", "        "))
        lines.append("      </Protocol>")
    lines += ["    </Account>", "  </Response>", "</Autodiscover>"]
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


def outlook_pox_error(code: int, message: str) -> bytes:
    """An error response ([MS-OXDSCLI] 2.2.4.2.1.1: 500 address unknown, 600 bad
    request, 601 schema not available)."""
    lines = ['<?xml version="1.0" encoding="utf-8"?>',
             f'<Autodiscover xmlns="{POX_RESPONSE_NS}">',
             "  <Response>",
             '    <Error Time="00:00:00" Id="0">',
             _element("ErrorCode", code, "      "), _element("Message", message, "      "),
             "      <DebugData />", "    </Error>", "  </Response>", "</Autodiscover>"]
    return ("\r\n".join(lines) + "\r\n").encode("utf-8")


class BadRequest(ValueError):
    """The request cannot be answered; the text says why (for an error document)."""


def parse_pox_request(body: bytes) -> tuple[str, str]:
    """The EMailAddress and AcceptableResponseSchema of an autodiscover request."""
    # Entities and DTDs have no business here; refusing them avoids entity
    # expansion attacks on the XML parser.
    if b"<!DOCTYPE" in body.upper() or b"<!ENTITY" in body.upper():
        raise BadRequest("DTDs are not accepted")
    try:
        root = ET.fromstring(body)
    except ET.ParseError as e:
        raise BadRequest(f"not XML: {e}") from None
    found = {}
    for element in root.iter():
        name = element.tag.rpartition("}")[2]
        if name in ("EMailAddress", "AcceptableResponseSchema") and name not in found:
            found[name] = (element.text or "").strip()
    if not found.get("EMailAddress"):
        raise BadRequest("no EMailAddress in the request")
    return found["EMailAddress"], found.get("AcceptableResponseSchema", OUTLOOK_NS)


def outlook_json(settings: Settings) -> bytes:
    """The AutodiscoverV1 answer: where the POX service is."""
    port = "" if settings.https_port == 443 else f":{settings.https_port}"
    url = f"https://{settings.hostname}{port}/autodiscover/autodiscover.xml"
    return json.dumps({"Protocol": "AutodiscoverV1", "Url": url}).encode()


def apple_profile(settings: Settings, address: str, domain: str) -> bytes:
    """A configuration profile with one mail account (Apple's Configuration Profile
    Reference, "Mail" payload). Unsigned; the same address always gets the same
    UUIDs, so installing it again replaces the account instead of adding one."""
    incoming = next((s for s in settings.incoming if s.kind == "imap"),
                    settings.incoming[0] if settings.incoming else None)
    outgoing = settings.outgoing[0] if settings.outgoing else None
    if incoming is None or outgoing is None:
        raise BadRequest("this server offers no IMAP/POP3 or submission service")
    reverse = ".".join(reversed(settings.hostname.split(".")))
    account = {
        "PayloadType": "com.apple.mail.managed",
        "PayloadVersion": 1,
        "PayloadIdentifier": f"{reverse}.mailstack.mail.{address}",
        "PayloadUUID": str(uuid.uuid5(uuid.NAMESPACE_URL, f"mailstack:mail:{address}")).upper(),
        "PayloadDisplayName": f"{address}",
        "EmailAccountDescription": f"{settings.name_for(domain)} ({address})",
        "EmailAccountName": address,
        "EmailAccountType": "EmailTypeIMAP" if incoming.kind == "imap" else "EmailTypePOP",
        "EmailAddress": address,
        "IncomingMailServerAuthentication": "EmailAuthPassword",
        "IncomingMailServerHostName": settings.hostname,
        "IncomingMailServerPortNumber": incoming.port,
        "IncomingMailServerUseSSL": True,
        "IncomingMailServerUsername": address,
        "OutgoingMailServerAuthentication": "EmailAuthPassword",
        "OutgoingMailServerHostName": settings.hostname,
        "OutgoingMailServerPortNumber": outgoing.port,
        "OutgoingMailServerUseSSL": True,
        "OutgoingMailServerUsername": address,
        "OutgoingPasswordSameAsIncomingPassword": True,
        "SMIMEEnabled": False,
        "allowMailDrop": True,
    }
    profile = {
        "PayloadType": "Configuration",
        "PayloadVersion": 1,
        "PayloadIdentifier": f"{reverse}.mailstack.{address}",
        "PayloadUUID": str(uuid.uuid5(uuid.NAMESPACE_URL, f"mailstack:profile:{address}")).upper(),
        "PayloadDisplayName": f"Mail: {address}",
        "PayloadDescription": f"The mail account {address} on {settings.hostname}",
        "PayloadOrganization": settings.name_for(domain),
        "PayloadRemovalDisallowed": False,
        "PayloadContent": [account],
    }
    return plistlib.dumps(profile, fmt=plistlib.FMT_XML)
