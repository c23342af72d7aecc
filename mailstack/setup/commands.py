"""``mailstack dns [DOMAIN...]`` and ``mailstack check [DOMAIN...]`` (added to mailstack.cli)."""

from __future__ import annotations

import sys

from mailstack.addresses import canonical_domain
from mailstack.config import Config


def add_commands(sub, common) -> None:
    p = sub.add_parser("dns", parents=[common],
                       help="print the DNS records to publish (zone-file syntax and a table)")
    p.add_argument("domains", nargs="*", metavar="DOMAIN",
                   help="a local domain (default: every domain in server.domains)")
    p.add_argument("--format", choices=("both", "zone", "table"), default="both",
                   help="zone: records only; table: the readable table; both (default): "
                        "the table as comments, then the records")
    p.set_defaults(run=cmd_dns)

    p = sub.add_parser("check", parents=[common],
                       help="look the records up now, probe the ports; exit 1 when "
                            "anything is wrong (for cron)")
    p.add_argument("domains", nargs="*", metavar="DOMAIN",
                   help="a local domain (default: every domain in server.domains)")
    p.add_argument("--port-map", action="append", default=[], metavar="PUBLIC=ACTUAL",
                   help="probe port ACTUAL instead of the public port PUBLIC, e.g. "
                        "25=2525,587=2587 (repeatable; for tests and port forwarding)")
    p.add_argument("--cafile", help="also trust these CA certificates (PEM) when checking "
                                    "certificates")
    p.add_argument("--timeout", type=float, default=10.0,
                   help="seconds per connection (default: %(default)s)")
    p.add_argument("--min-days", type=int, default=14,
                   help="a certificate with fewer days left is WRONG (default: %(default)s)")
    p.add_argument("--no-probe", action="store_true",
                   help="DNS only: do not connect to the ports or fetch the MTA-STS policy")
    p.add_argument("--quiet", "-q", action="store_true",
                   help="print only what is not OK (nothing when all is well)")
    p.add_argument("--verbose", "-v", action="store_true", help="do not shorten values")
    p.set_defaults(run=cmd_check)


def _domains(config: Config, given: list[str]) -> list[str]:
    from mailstack.cli import CommandError

    if not given:
        if not config.server.domains:
            raise CommandError(f"no domains in server.domains of {config.source}")
        return list(config.server.domains)
    domains = []
    for name in given:
        domain = canonical_domain(name)
        if domain not in config.server.domains:
            raise CommandError(f"{domain}: the domain is not in server.domains of "
                               f"{config.source}")
        domains.append(domain)
    return domains


def parse_port_map(values: list[str]) -> dict[int, int]:
    from mailstack.cli import CommandError

    mapping = {}
    for value in values:
        for item in filter(None, (v.strip() for v in value.split(","))):
            public, sep, actual = item.replace(":", "=").partition("=")
            if not (sep and public.isdigit() and actual.isdigit()
                    and 0 < int(public) < 65536 and 0 < int(actual) < 65536):
                raise CommandError(f"--port-map: {item!r} is not PUBLIC=ACTUAL (e.g. 25=2525)")
            mapping[int(public)] = int(actual)
    return mapping


def cmd_dns(config: Config, args) -> int:
    from mailstack.setup.records import records, table_lines, warnings, zone_text

    for i, domain in enumerate(_domains(config, args.domains)):
        if i:
            print()
        if args.format == "table":
            print("\n".join(table_lines(records(config, domain), domain)))
        else:
            sys.stdout.write(zone_text(config, domain, with_table=args.format == "both"))
        for warning in warnings(config, domain):
            print(f"mailstack: warning: {domain}: {warning}", file=sys.stderr)
    return 0


def cmd_check(config: Config, args) -> int:
    from mailstack.setup.check import OK, Check, render

    check = Check(config, port_map=parse_port_map(args.port_map), cafile=args.cafile,
                  timeout=args.timeout, min_days=args.min_days, probe=not args.no_probe)
    failed = 0
    for domain in _domains(config, args.domains):
        rows = check.domain(domain)
        bad = [r for r in rows if r.status != OK]
        failed += len(bad)
        shown = bad if args.quiet else rows
        if shown:
            print(f"== {domain}: {len(rows) - len(bad)} OK, {len(bad)} to fix")
            sys.stdout.write(render(shown, args.verbose))
    return 1 if failed else 0

