"""``mailstack check``: what DNS and the network say now, against what they should say.

Every lookup goes through the one resolver (``mailstack.dns.Resolver``,
configured by ``[dns]``), so the check sees what this server's own mail
checks see. Each expected record of ``records.records`` becomes a row:
OK, WRONG or MISSING (ERROR when DNS could not answer), with what was found,
what is expected and a one-line fix. Beyond the records themselves:

- the MX host must resolve to this server's address, and each address must
  have a PTR naming the host (forward-confirmed reverse DNS);
- SPF must parse, stay within RFC 7208 4.6.4's 10 DNS-querying terms and
  give "pass" for this server's addresses (pyspf, as receivers evaluate it);
- each DKIM record must carry the public half of the key on disk;
- DMARC must parse (RFC 7489 6.3) with a policy at least as strict as
  ``[records] dmarc_policy``;
- the MTA-STS policy is fetched over HTTPS from ``mta-sts.<domain>``
  (RFC 8461 3.3) and compared;
- every listener's public port is reached on the MX host's address, TLS is
  negotiated there and the certificate must be valid for the host name with
  at least ``min_days`` left.
"""

from __future__ import annotations

import base64
import ipaddress
import ssl
from dataclasses import dataclass, field

from mailstack.config import Config
from mailstack.dns import NotFound, Resolver, TemporaryDNSError
from mailstack.setup import probe as probes
from mailstack.setup.records import (
    Record, advertised_ports, dkim_public_key, mta_sts_policy, public_addresses, records)

OK, WRONG, MISSING, ERROR = "OK", "WRONG", "MISSING", "ERROR"
_STRENGTH = {"none": 0, "quarantine": 1, "reject": 2}
#: RFC 7208 4.6.4: terms that cost a DNS lookup.
_LOOKUP_TERMS = ("include", "a", "mx", "ptr", "exists", "redirect")
#: TXT records named by what they are in the table.
_TXT_KINDS = ("spf", "dkim", "dmarc", "mta-sts", "tlsrpt")


@dataclass
class Row:
    check: str
    name: str
    status: str
    found: str
    expected: str
    fix: str = ""


class _Lookup:
    """The resolver's answers as text, with NXDOMAIN/NODATA as [] and failures kept."""

    def __init__(self, resolver: Resolver):
        self.resolver = resolver

    def records(self, name: str, rtype: str) -> list:
        try:
            return self.resolver.lookup(name, rtype)
        except NotFound:
            return []

    def txt(self, name: str) -> list[str]:
        return [b"".join(r.strings).decode("utf-8", "replace") for r in self.records(name, "TXT")]

    def addresses(self, name: str, hops: int = 8) -> list[str]:
        """A and AAAA of ``name``, following CNAMEs as a resolver would."""
        found = [r.address for t in ("A", "AAAA") for r in self.records(name, t)]
        if found or hops == 0:
            return found
        for cname in self.records(name, "CNAME"):
            return self.addresses(_host(cname.target), hops - 1)
        return []


def _host(name) -> str:
    return name.to_text(omit_final_dot=True).lower()


def _tags(text: str) -> dict[str, str]:
    tags = {}
    for part in text.split(";"):
        key, eq, value = part.partition("=")
        if eq:
            tags.setdefault(key.strip().lower(), "".join(value.split()))
    return tags


def _short(text: str, width: int = 48) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


class Check:
    """Checks one domain at a time; ``rows`` collects the results."""

    def __init__(self, config: Config, resolver: Resolver | None = None,
                 port_map: dict[int, int] | None = None, cafile: str | None = None,
                 timeout: float = 10.0, min_days: int = 14, probe: bool = True):
        self.config = config
        self.resolver = resolver or Resolver(config.dns)
        self.dns = _Lookup(self.resolver)
        self.port_map = port_map or {}
        self.context = probes.tls_context(cafile)
        self.timeout = timeout
        self.min_days = min_days
        self.probe = probe
        self.host = config.server.hostname.lower().rstrip(".")
        self.ttl = config.records.ttl

    def domain(self, domain: str) -> list[Row]:
        rows: list[Row] = []
        expected = records(self.config, domain)
        if not public_addresses(self.config):
            rows.append(Row("address", self.host, MISSING, "", "[server] public_ipv4",
                            "set [server] public_ipv4 (and public_ipv6) to this server's "
                            "public address in the config"))
        errors = 0
        for record in expected:
            if errors >= 3:
                # A resolver that does not answer would cost a timeout per row.
                rows.append(Row("DNS", domain, ERROR, "stopped after 3 failed lookups", "",
                                "check [dns] nameservers and the domain's name servers"))
                return rows
            method = getattr(self, f"_check_{record.kind.replace('-', '_')}")
            try:
                rows.extend(method(record, domain))
            except TemporaryDNSError as e:
                errors += 1
                rows.append(Row(record.rtype, record.name, ERROR, f"DNS lookup failed: {e}",
                                record.value, "try again; if it persists, check [dns] and the "
                                              "domain's name servers"))
        if not self.config.server.public_ipv6:
            rows.extend(self._guarded(self._check_stray_aaaa, domain))
        if not any(r.kind == "dkim" for r in expected):
            rows.append(Row("DKIM", f"*._domainkey.{domain}", MISSING, "no key on disk",
                            "a signing key", f"run `mailstack dkim keygen {domain}` and publish "
                                             "the record it prints"))
        if self.probe:
            rows.extend(self._guarded(self._check_policy_file, domain))
            rows.extend(self._guarded(self._check_ports, domain))
        if not any(l.protocol == "smtp" for l in self.config.listen):
            rows.append(Row("listener", "smtp", MISSING, "no smtp listener", "port 25",
                            'add [[listen]] protocol = "smtp" port = 25 to the config'))
        return rows

    def _guarded(self, method, domain: str) -> list[Row]:
        try:
            return method(domain)
        except TemporaryDNSError as e:
            return [Row(method.__name__.removeprefix("_check_"), domain, ERROR,
                        f"DNS lookup failed: {e}", "", "try again later")]

    def _publish(self, record: Record) -> str:
        if record.rtype == "TXT" and len(record.value) > 60:
            return (f"publish the {record.rtype} record for {record.name} that "
                    f"`mailstack dns` prints")
        return f"publish: {record.zone_line(self.ttl)}"

    def _row(self, record: Record, status: str, found: str, fix: str = "") -> Row:
        if status != OK and not fix:
            fix = self._publish(record)
        check = record.kind.upper() if record.kind in _TXT_KINDS else record.rtype
        # Reverse DNS is known by its address, not by the in-addr.arpa name.
        return Row(check, record.address or record.name, status, found, record.value, fix)

    # -- records -------------------------------------------------------------
    def _check_mx(self, record: Record, domain: str) -> list[Row]:
        found = self.dns.records(domain, "MX")
        text = ", ".join(f"{r.preference} {r.exchange}" for r in found)
        hosts = {_host(r.exchange) for r in found}
        if not found:
            return [self._row(record, MISSING, "")]
        if self.host not in hosts:
            return [self._row(record, WRONG, text,
                              f"point the MX of {domain} at {self.host}: "
                              f"{record.zone_line(self.ttl)}")]
        return [self._row(record, OK, text)]

    def _check_a(self, record: Record, domain: str) -> list[Row]:
        return self._address(record, "A")

    def _check_aaaa(self, record: Record, domain: str) -> list[Row]:
        return self._address(record, "AAAA")

    def _address(self, record: Record, rtype: str) -> list[Row]:
        found = [ipaddress.ip_address(r.address) for r in self.dns.records(record.name, rtype)]
        text = ", ".join(str(a) for a in found)
        if not found:
            return [self._row(record, MISSING, "")]
        if found != [ipaddress.ip_address(record.value)]:
            return [self._row(record, WRONG, text,
                              f"{record.name} must resolve to this server only: "
                              f"{record.zone_line(self.ttl)}")]
        return [self._row(record, OK, text)]

    def _check_stray_aaaa(self, domain: str) -> list[Row]:
        """An AAAA record while [server] public_ipv6 is unset: senders using IPv6
        would try an address this server may not answer on."""
        found = [r.address for r in self.dns.records(self.host, "AAAA")]
        if not found:
            return []
        return [Row("AAAA", self.host, WRONG, ", ".join(found), "(none: public_ipv6 is unset)",
                    "remove the AAAA record, or set [server] public_ipv6 and listen on IPv6")]

    def _check_ptr(self, record: Record, domain: str) -> list[Row]:
        targets = {_host(r.target) for r in self.dns.records(record.name, "PTR")}
        fix = (f"ask your hosting provider to set the reverse DNS (PTR) of {record.address} "
               f"to {self.host}")
        if not targets:
            return [self._row(record, MISSING, "", fix)]
        if targets != {self.host}:
            return [self._row(record, WRONG, ", ".join(sorted(targets)), fix)]
        return [self._row(record, OK, self.host)]

    def _check_spf(self, record: Record, domain: str) -> list[Row]:
        from mailstack.policy.spf import evaluate

        found = [t for t in self.dns.txt(record.name)
                 if t.lower() == "v=spf1" or t.lower().startswith("v=spf1 ")]
        if not found:
            return [self._row(record, MISSING, "")]
        if len(found) > 1:
            return [self._row(record, WRONG, " | ".join(found),
                              "keep exactly one v=spf1 record (RFC 7208 3.2: two are a "
                              "permerror)")]
        text = found[0]
        lookups = self._spf_lookups(text, set())
        if lookups > 10:
            return [self._row(record, WRONG, f"{text} ({lookups} lookups)",
                              "SPF allows at most 10 DNS lookups (RFC 7208 4.6.4): use ip4:/ip6: "
                              "instead of includes")]
        helo = record.name != domain
        for address in public_addresses(self.config):
            outcome = evaluate(self.resolver, address, "" if helo else f"postmaster@{domain}",
                               self.host if helo else "mailstack-check.invalid", self.host,
                               self.resolver.timeout * 4)
            if outcome.result == "temperror":
                raise TemporaryDNSError(f"SPF of {record.name}: {outcome.explanation}")
            if outcome.result != "pass":
                return [self._row(record, WRONG, f"{text} ({outcome.result} for {address})",
                                  f"the SPF record must allow {address}: "
                                  f"{record.zone_line(self.ttl)}")]
        return [self._row(record, OK, f"{text} ({lookups} lookups)")]

    def _spf_lookups(self, text: str, seen: set[str], depth: int = 0) -> int:
        """DNS-querying terms of a record and its includes/redirect (RFC 7208 4.6.4)."""
        count = 0
        for term in text.split()[1:]:
            term = term.lstrip("+-~?").lower()
            name, _, target = term.replace("=", ":", 1).partition(":")
            if name not in _LOOKUP_TERMS:
                continue
            count += 1
            if name in ("include", "redirect") and target and "%" not in target \
                    and target not in seen and depth < 10:
                seen.add(target)
                nested = [t for t in self.dns.txt(target) if t.lower().startswith("v=spf1")]
                if len(nested) == 1:
                    count += self._spf_lookups(nested[0], seen, depth + 1)
        return count

    def _check_dkim(self, record: Record, domain: str) -> list[Row]:
        found = [t for t in self.dns.txt(record.name) if "p=" in t]
        if not found:
            return [self._row(record, MISSING, "")]
        tags = _tags(found[0])
        text = _short(found[0])
        try:
            published = base64.b64decode(tags.get("p", ""), validate=True)
        except ValueError:
            return [self._row(record, WRONG, text, "the p= value is not base64: "
                              + self._publish(record))]
        if tags.get("k", "rsa") != record.key.algorithm or published != dkim_public_key(record.key):
            return [self._row(record, WRONG, text,
                              f"the published key is not the one in {record.key.path}: "
                              + self._publish(record))]
        return [self._row(record, OK, f"matches {record.key.path.name}")]

    def _check_dmarc(self, record: Record, domain: str) -> list[Row]:
        from mailstack.policy.dmarc import parse_record

        found = [t for t in self.dns.txt(record.name) if t[:8].upper() == "V=DMARC1"]
        if not found:
            return [self._row(record, MISSING, "")]
        if len(found) > 1:
            return [self._row(record, WRONG, " | ".join(found),
                              "keep exactly one v=DMARC1 record (RFC 7489 6.6.3)")]
        parsed = parse_record(found[0].encode(), domain)
        if parsed is None:
            return [self._row(record, WRONG, found[0], "the record does not parse: "
                              + self._publish(record))]
        wanted = self.config.records.dmarc_policy
        if _STRENGTH[parsed.p] < _STRENGTH[wanted]:
            return [self._row(record, WRONG, found[0],
                              f"p={parsed.p} is weaker than [records] dmarc_policy = "
                              f"{wanted!r}: " + self._publish(record))]
        return [self._row(record, OK, found[0])]

    def _check_mta_sts(self, record: Record, domain: str) -> list[Row]:
        found = [t for t in self.dns.txt(record.name) if t.startswith("v=STSv1")]
        if not found:
            return [self._row(record, MISSING, "")]
        if len(found) > 1:
            return [self._row(record, WRONG, " | ".join(found),
                              "keep exactly one v=STSv1 record (RFC 8461 3.1)")]
        if _tags(found[0]).get("id") != _tags(record.value).get("id"):
            return [self._row(record, WRONG, found[0],
                              "the policy changed, so its id must change: "
                              + self._publish(record))]
        return [self._row(record, OK, found[0])]

    def _check_tlsrpt(self, record: Record, domain: str) -> list[Row]:
        found = [t for t in self.dns.txt(record.name) if t.startswith("v=TLSRPTv1")]
        if not found:
            return [self._row(record, MISSING, "")]
        rua = _tags(found[0]).get("rua", "")
        if len(found) > 1 or not rua.startswith(("mailto:", "https://")):
            return [self._row(record, WRONG, " | ".join(found),
                              "one v=TLSRPTv1 record with rua=mailto:... (RFC 8460 3): "
                              + self._publish(record))]
        return [self._row(record, OK, found[0])]

    def _check_srv(self, record: Record, domain: str) -> list[Row]:
        found = self.dns.records(record.name, "SRV")
        text = ", ".join(f"{r.priority} {r.weight} {r.port} {r.target}" for r in found)
        _, _, port, target = record.value.split()
        if target == ".":
            # Not offered: no record, or the explicit "." (RFC 6186 3.4), are both right.
            if any(_host(r.target) for r in found):
                return [self._row(record, WRONG, text,
                                  "this service is not offered here: " + self._publish(record))]
            return [self._row(record, OK, text or "(none)")]
        if not found:
            return [self._row(record, MISSING, "")]
        if not any(_host(r.target) == self.host and r.port == int(port) for r in found):
            return [self._row(record, WRONG, text)]
        return [self._row(record, OK, text)]

    def _check_host(self, record: Record, domain: str) -> list[Row]:
        cnames = {_host(r.target) for r in self.dns.records(record.name, "CNAME")}
        if self.host in cnames:
            return [self._row(record, OK, f"CNAME {self.host}.")]
        found = self.dns.addresses(record.name)
        if not found:
            return [self._row(record, MISSING, "")]
        ours = set(public_addresses(self.config))
        if ours and set(found) <= ours:
            return [self._row(record, OK, ", ".join(found))]
        return [self._row(record, WRONG, ", ".join(found) or ", ".join(sorted(cnames)))]

    # -- HTTPS and ports -------------------------------------------------------
    def _mapped(self, port: int) -> int:
        return self.port_map.get(port, port)

    def _check_policy_file(self, domain: str) -> list[Row]:
        name = f"mta-sts.{domain}"
        url = f"https://{name}/.well-known/mta-sts.txt"
        expected = mta_sts_policy(self.config)
        shown = expected.strip().replace("\n", "; ")
        addresses = self.dns.addresses(name)
        if not addresses:
            return [Row("MTA-STS policy", url, MISSING, f"{name} does not resolve", shown,
                        f"publish: {name}. {self.ttl} IN CNAME {self.host}.")]
        listening = "https" in advertised_ports(self.config)
        try:
            status, headers, body = probes.fetch_https(
                addresses[0], self._mapped(443), name, "/.well-known/mta-sts.txt",
                self.context, self.timeout)
        except ssl.SSLCertVerificationError as e:
            return [Row("MTA-STS policy", url, WRONG, f"certificate: {e.verify_message}", shown,
                        f"the certificate on port 443 must also name {name} "
                        f"(certbot -d {self.host} -d {name} ...)")]
        except (OSError, ssl.SSLError, probes.ProbeError) as e:
            return [Row("MTA-STS policy", url, MISSING, f"cannot fetch: {e}", shown,
                        "check the https listener and that port 443 is open" if listening
                        else 'add [[listen]] protocol = "https" port = 443 to serve it')]
        if status != 200:
            return [Row("MTA-STS policy", url, WRONG, f"HTTP {status}", shown,
                        "the https listener must serve /.well-known/mta-sts.txt (RFC 8461 3.3)")]
        policy = parse_policy(body.decode("utf-8", "replace"))
        want = parse_policy(expected)
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        got = body.decode("utf-8", "replace").strip().replace("\n", "; ")
        if policy is None or policy != want or ctype != "text/plain":
            return [Row("MTA-STS policy", url, WRONG, _short(got), shown,
                        "serve the policy with mailstack's https listener (RFC 8461 3.2)")]
        return [Row("MTA-STS policy", url, OK, got, shown)]

    def _check_ports(self, domain: str) -> list[Row]:
        try:
            addresses = self.dns.addresses(self.host)
        except TemporaryDNSError:
            addresses = []
        addresses = addresses or public_addresses(self.config)
        if not addresses:
            return [Row("ports", self.host, ERROR, f"{self.host} has no address", "",
                        "publish the A record of the host name")]
        wanted = []
        if any(l.protocol == "smtp" for l in self.config.listen):
            wanted.append(("smtp", 25))
        wanted += [(p, port) for p, port in advertised_ports(self.config).items()]
        rows = []
        for address in addresses:
            for protocol, port in wanted:
                result = probes.probe(address, self._mapped(port), protocol, self.host,
                                      self.context, self.timeout, self.min_days)
                rows.append(Row(f"port {port}", f"{protocol} on {address}",
                                OK if result.ok else WRONG, result.found,
                                "reachable, TLS, valid certificate" if protocol != "http"
                                else "reachable", result.fix))
        return rows


def parse_policy(text: str) -> dict | None:
    """An MTA-STS policy (RFC 8461 3.2) as {version, mode, mx (sorted), max_age}, or None."""
    fields: dict = {"mx": []}
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            return None
        key, value = key.strip(), value.strip()
        if key == "mx":
            fields["mx"].append(value.lower())
        else:
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1" or fields.get("mode") not in ("enforce", "testing", "none"):
        return None
    age = fields.get("max_age", "")
    if not age.isdigit() or int(age) > 31_557_600:
        return None
    if fields["mode"] != "none" and not fields["mx"]:
        return None
    return {"version": "STSv1", "mode": fields["mode"], "mx": sorted(fields["mx"]),
            "max_age": int(age)}


def render(rows: list[Row], verbose: bool = False) -> str:
    """The table of rows; a fix line under each row that is not OK."""
    width = 48 if not verbose else 10_000
    header = ("CHECK", "NAME", "STATUS", "FOUND", "EXPECTED")
    table = [header] + [(r.check, r.name, r.status, _short(r.found, width),
                         _short(r.expected, width)) for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(4)]
    out = []
    for i, t in enumerate(table):
        out.append("  ".join(f"{t[j]:<{widths[j]}}" for j in range(4)) + "  " + t[4])
        if i and rows[i - 1].status != OK and rows[i - 1].fix:
            out.append(f"    fix: {rows[i - 1].fix}")
    return "\n".join(line.rstrip() for line in out) + "\n"
