"""The DNS records a mail domain needs, derived from the configuration.

``records(config, domain)`` is the one list that ``mailstack dns`` prints
(zone-file syntax and a table), ``mailstack check`` compares with what DNS
says, and the HTTP service's MTA-STS policy and client settings agree with:

- MX (RFC 5321 5.1) pointing at ``server.hostname``, and that host's A/AAAA
  (``server.public_ipv4``/``public_ipv6``) and, at the hosting provider,
  the PTR that matches it (forward-confirmed reverse DNS, which the big
  receivers require);
- SPF (RFC 7208) for the domain (``v=spf1 mx ... -all``) and for the host
  name, which is the identity of bounces (RFC 7208 2.3);
- a DKIM key record (RFC 6376 3.6.1) per signing key on disk, the public key
  derived from the private one;
- DMARC (RFC 7489 6.3) with ``rua`` for aggregate reports;
- MTA-STS (RFC 8461 3.1: ``_mta-sts`` TXT whose id changes with the policy,
  and the host ``mta-sts.<domain>`` that serves the policy over HTTPS) and
  TLS-RPT (RFC 8460 3);
- SRV records for client set-up (RFC 6186, RFC 8314 5.1), "." for a service
  that is not offered (RFC 6186 3.4), and the autoconfig/autodiscover host names.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from mailstack.config import Config
from mailstack.queue.dkimsign import Key, load_keys, txt_record_name

#: Client services: config protocol -> (SRV owner prefix, priority). RFC 8314
#: 5.1: implicit TLS is preferred; IMAP is preferred over POP3 (RFC 6186 3.4).
CLIENT_SERVICES = {
    "submissions": ("_submissions._tcp", 0),
    "submission": ("_submission._tcp", 10),
    "imaps": ("_imaps._tcp", 0),
    "imap": ("_imap._tcp", 10),
    "pop3s": ("_pop3s._tcp", 20),
    "pop3": ("_pop3._tcp", 30),
}
#: Protocols whose listeners speak STARTTLS/STLS: advertised only with a certificate.
_STARTTLS = {"submission", "imap", "pop3"}
#: The host names mail programs and senders look up, served by the HTTP service.
WEB_HOSTS = ("autoconfig", "autodiscover", "mta-sts")


@dataclass(frozen=True)
class Record:
    #: Owner name, absolute, without the final dot.
    name: str
    rtype: str
    #: The data in zone-file syntax, except TXT: the text itself (unquoted).
    value: str
    #: One line for the reader: why the record is needed.
    purpose: str
    #: What ``mailstack check`` compares: mx, a, aaaa, ptr, spf, dkim, dmarc,
    #: mta-sts, tlsrpt, srv, host (a name that must lead to this server).
    kind: str
    #: False: the record lives in another zone (reverse DNS, a host name
    #: outside the domain) and is printed as a comment.
    in_zone: bool = True
    #: For DKIM: the key on disk this record publishes.
    key: Key | None = None
    #: For PTR: the address whose reverse DNS this is.
    address: str = ""

    def rdata(self) -> str:
        if self.rtype != "TXT":
            return self.value
        # RFC 1035 3.3.14: character-strings of at most 255 octets.
        data = self.value
        chunks = [data[i:i + 255] for i in range(0, len(data), 255)] or [""]
        return " ".join('"' + c.replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks)

    def zone_line(self, ttl: int) -> str:
        return f"{self.name}. {ttl} IN {self.rtype} {self.rdata()}"


def advertised_ports(config: Config, bound=None) -> dict[str, int]:
    """The port mail programs use for each offered client protocol (and http/https).

    ``[clients] <protocol>_port`` wins; otherwise the port of the first
    listener of that protocol (``bound(protocol)`` when it is 0: tests).
    """
    tls = config.tls.certificate is not None
    ports = {}
    for protocol in (*CLIENT_SERVICES, "https", "http"):
        explicit = getattr(config.clients, f"{protocol}_port", 0)
        listener = next((l for l in config.listen if l.protocol == protocol), None)
        port = explicit
        if not port and listener is not None:
            port = listener.port
            if not port and bound is not None:
                try:
                    port = bound(protocol)
                except KeyError:
                    port = 0
        if not port or (protocol in _STARTTLS and not tls):
            continue
        ports[protocol] = port
    return ports


def public_addresses(config: Config) -> list[str]:
    return [a for a in (config.server.public_ipv4, config.server.public_ipv6) if a]


def in_zone(name: str, domain: str) -> bool:
    return name == domain or name.endswith("." + domain)


def dkim_public_key(key: Key) -> bytes:
    """The public key of a signing key, as DKIM's p= carries it (RFC 6376 3.6.1, RFC 8463)."""
    if key.algorithm == "ed25519":
        seed = base64.b64decode(key.private.strip())
        public = ed25519.Ed25519PrivateKey.from_private_bytes(seed).public_key()
        return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    private = serialization.load_pem_private_key(key.private, password=None)
    return private.public_key().public_bytes(serialization.Encoding.DER,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)


def dkim_txt(key: Key) -> str:
    return f"v=DKIM1; k={key.algorithm}; p={base64.b64encode(dkim_public_key(key)).decode()}"


def spf_txt(config: Config) -> str:
    """The domain's SPF record: its MX hosts (this server) may send, nobody else."""
    return " ".join(["v=spf1", "mx", *config.records.spf_extra, "-all"])


#: The host name's own SPF record (RFC 7208 2.3: the HELO identity, used for bounces).
HELO_SPF = "v=spf1 a -all"


def report_address(value: str, domain: str) -> str:
    """A rua= URI: the configured one, or postmaster@<domain>."""
    if not value:
        return f"mailto:postmaster@{domain}"
    if value.startswith(("mailto:", "https://")):
        return value
    return f"mailto:{value}"


def dmarc_txt(config: Config, domain: str) -> str:
    rua = report_address(config.records.dmarc_rua, domain)
    return f"v=DMARC1; p={config.records.dmarc_policy}; rua={rua}"


def tlsrpt_txt(config: Config, domain: str) -> str:
    return f"v=TLSRPTv1; rua={report_address(config.records.tlsrpt_rua, domain)}"


def mta_sts_policy(config: Config) -> str:
    """The policy file served at https://mta-sts.<domain>/.well-known/mta-sts.txt (RFC 8461 3.2)."""
    r = config.records
    return (f"version: STSv1\nmode: {r.mta_sts_mode}\nmx: {config.server.hostname}\n"
            f"max_age: {r.mta_sts_max_age}\n")


def mta_sts_id(config: Config) -> str:
    """RFC 8461 3.1: the id changes whenever the policy does (1-32 alphanumerics)."""
    return hashlib.sha256(mta_sts_policy(config).encode()).hexdigest()[:20]


def reverse_name(address: str) -> str:
    return ipaddress.ip_address(address).reverse_pointer


def records(config: Config, domain: str) -> list[Record]:
    """Every record ``domain`` needs, in the order they are explained."""
    host = config.server.hostname.lower().rstrip(".")
    r = config.records
    out = [Record(domain, "MX", f"{r.mx_preference} {host}.",
                  f"mail for {domain} is delivered to {host}", "mx")]
    host_in_zone = in_zone(host, domain)
    v4, v6 = config.server.public_ipv4, config.server.public_ipv6
    if v4:
        out.append(Record(host, "A", v4, f"the address of {host}", "a", host_in_zone))
    if v6:
        out.append(Record(host, "AAAA", str(ipaddress.ip_address(v6)),
                          f"the IPv6 address of {host}", "aaaa", host_in_zone))
    for address in public_addresses(config):
        out.append(Record(reverse_name(address), "PTR", f"{host}.",
                          f"reverse DNS of {address}: set by your hosting provider",
                          "ptr", False, address=address))
    out.append(Record(domain, "TXT", spf_txt(config),
                      f"SPF: only the MX hosts of {domain} send its mail", "spf"))
    out.append(Record(host, "TXT", HELO_SPF,
                      f"SPF for {host} itself (bounces and the HELO name)", "spf", host_in_zone))
    for key in load_keys(config.dkim.keys_dir, domain):
        out.append(Record(txt_record_name(domain, key.selector), "TXT", dkim_txt(key),
                          f"DKIM public key of {key.path.name} ({key.algorithm})", "dkim",
                          key=key))
    out.append(Record(f"_dmarc.{domain}", "TXT", dmarc_txt(config, domain),
                      "DMARC: what receivers do with mail failing SPF and DKIM, and where "
                      "reports go", "dmarc"))
    out.append(Record(f"_mta-sts.{domain}", "TXT", f"v=STSv1; id={mta_sts_id(config)}",
                      "MTA-STS: senders must use TLS; the id changes with the policy", "mta-sts"))
    out.append(Record(f"_smtp._tls.{domain}", "TXT", tlsrpt_txt(config, domain),
                      "TLS-RPT: where senders report TLS problems", "tlsrpt"))
    ports = advertised_ports(config)
    for protocol, (prefix, priority) in CLIENT_SERVICES.items():
        if protocol in ports:
            value = f"{priority} 1 {ports[protocol]} {host}."
            why = f"mail programs find {protocol} on port {ports[protocol]}"
        else:
            value = "0 0 0 ."
            why = f"{protocol} is not offered (RFC 6186 3.4)"
        out.append(Record(f"{prefix}.{domain}", "SRV", value, why, "srv"))
    if "https" in ports:
        out.append(Record(f"_autodiscover._tcp.{domain}", "SRV", f"0 1 {ports['https']} {host}.",
                          "Outlook finds its autodiscover service", "srv"))
    for label in WEB_HOSTS:
        name = f"{label}.{domain}"
        if name != host:
            why = {"autoconfig": "Thunderbird's automatic set-up",
                   "autodiscover": "Outlook's automatic set-up",
                   "mta-sts": "serves the MTA-STS policy (the certificate must name it)"}[label]
            out.append(Record(name, "CNAME", f"{host}.", why, "host"))
    return out


def relative_name(name: str, domain: str) -> str:
    """The name as DNS providers' web forms want it: "@", "mail", "_dmarc"."""
    if name == domain:
        return "@"
    if name.endswith("." + domain):
        return name[: -len(domain) - 1]
    return name + "."


def warnings(config: Config, domain: str) -> list[str]:
    """What makes the printed records incomplete or wrong for the internet."""
    out = []
    if not public_addresses(config):
        out.append("[server] public_ipv4/public_ipv6 are not set: no A/AAAA or PTR records "
                   "are printed")
    for address in public_addresses(config):
        ip = ipaddress.ip_address(address)
        if not ip.is_global:
            out.append(f"{address} is not a public address: the internet cannot reach it")
    if not load_keys(config.dkim.keys_dir, domain):
        out.append(f"no DKIM key for {domain} in {config.dkim.keys_dir}: "
                   f"run `mailstack dkim keygen {domain}`")
    if config.outbound.relay and not config.records.spf_extra:
        out.append(f"mail leaves through the relay {config.outbound.relay}: add the relay's "
                   "SPF include to [records] spf_extra")
    ports = advertised_ports(config)
    if "https" not in ports:
        out.append("no https listener: the MTA-STS policy and Outlook's autodiscover need one "
                   "(port 443)")
    if not any(l.protocol == "smtp" for l in config.listen):
        out.append("no smtp listener: mail from the internet cannot arrive (port 25)")
    return out


def zone_text(config: Config, domain: str, with_table: bool = True) -> str:
    """The records in zone-file syntax (RFC 1035 5.1); everything else is a comment."""
    ttl = config.records.ttl
    found = records(config, domain)
    lines = [f"; DNS records for {domain}, made by `mailstack dns` from {config.source}.",
             f"; Publish them at your DNS provider, then run `mailstack check {domain}`."]
    if with_table:
        lines += [";"] + ["; " + row for row in table_lines(found, domain)]
    lines += [";", f"$ORIGIN {domain}.", f"$TTL {ttl}"]
    outside = []
    for record in found:
        if not record.in_zone:
            outside.append(record)
            continue
        lines += ["", f"; {record.purpose}", record.zone_line(ttl)]
    if outside:
        lines += ["", "; Not in this zone: set these where the name is managed (the PTR"
                  " records at your hosting provider, in its control panel)."]
        for record in outside:
            lines.append(f";   {record.zone_line(ttl)}")
    policy = mta_sts_policy(config)
    lines += ["", f"; The MTA-STS policy, served by mailstack's https listener at "
                  f"https://mta-sts.{domain}/.well-known/mta-sts.txt:"]
    lines += [f";   {line}" for line in policy.splitlines()]
    return "\n".join(lines) + "\n"


def table_lines(found: list[Record], domain: str) -> list[str]:
    """A readable table: type, name as DNS providers' forms want it, value."""
    rows = [("TYPE", "NAME", "VALUE")]
    for record in found:
        name = relative_name(record.name, domain)
        if record.kind == "ptr":
            name = f"reverse DNS of {record.address} (hosting provider)"
        elif not record.in_zone:
            name += " (in its own zone)"
        rows.append((record.rtype, name, record.value))
    width = max(len(name) for _, name, _ in rows)
    return [f"{rtype:<6} {name:<{width}}  {value}".rstrip() for rtype, name, value in rows]
