"""The configuration: one TOML file loaded into frozen dataclasses.

Every key has its default here, in one place. Loading checks the whole file
and reports every problem at once (file, key and reason), so an operator fixes
a broken config in one round instead of one error per restart. Relative paths
are resolved against the directory of the config file, so an instance can be
moved as a whole.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from mailstack.addresses import BadAddress, canonical_domain

#: Listener kinds and what each one speaks. ``implicit_tls`` listeners start
#: TLS before the first byte (RFC 8314); the others offer STARTTLS/STLS.
PROTOCOLS = {
    "smtp": ("smtp", "mx", False),
    "submission": ("smtp", "submission", False),
    "submissions": ("smtp", "submission", True),
    "pop3": ("pop3", None, False),
    "pop3s": ("pop3", None, True),
    "imap": ("imap", None, False),
    "imaps": ("imap", None, True),
    # Autoconfig, autodiscover, MTA-STS policy, metrics (mailstack.web).
    "http": ("http", None, False),
    "https": ("http", None, True),
}


class ConfigError(Exception):
    """The config file cannot be used; ``problems`` lists every reason."""

    def __init__(self, path: Path | str, problems: list[str]):
        self.path = Path(path)
        self.problems = problems
        super().__init__(
            f"{path}: {len(problems)} problem(s) in the configuration:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )


@dataclass(frozen=True)
class ServerConfig:
    #: The name this server gives in its greeting, EHLO and Received headers.
    hostname: str = "localhost"
    #: Domains whose mail is delivered here (local domains).
    domains: tuple[str, ...] = ()
    #: Root of the users' Maildirs: <mail_root>/<domain>/<localpart>/Maildir.
    mail_root: Path = Path("maildirs")
    #: The durable queue every accepted message is written to first.
    spool_dir: Path = Path("spool")
    #: ``address:{ARGON2ID}hash`` lines, reloaded when the file changes.
    users_file: Path = Path("users")
    #: ``address: target, target`` lines (``@domain`` is a catch-all).
    aliases_file: Path = Path("aliases")
    #: Threads for blocking work (fsync, password hashing, DNS).
    threads: int = 16
    #: Make the fsyncs of SMTP commits and local delivery in a child process
    #: (mailstack.queue.fsync_process) rather than in the threads: the same
    #: fsyncs, with less CPU per message.
    fsync_process: bool = True
    #: The addresses the internet reaches this server at: the A/AAAA records
    #: of ``hostname``, its PTR and the SPF record (``mailstack dns``, ``mailstack check``).
    public_ipv4: str = ""
    public_ipv6: str = ""


@dataclass(frozen=True)
class TLSConfig:
    #: PEM certificate, possibly a full chain (certbot's fullchain.pem).
    certificate: Path | None = None
    #: PEM private key (certbot's privkey.pem).
    private_key: Path | None = None


@dataclass(frozen=True)
class Listener:
    #: One of PROTOCOLS.
    protocol: str = ""
    address: str = "127.0.0.1"
    port: int = 0

    @property
    def speaks(self) -> str:
        return PROTOCOLS[self.protocol][0]

    @property
    def role(self) -> str | None:
        return PROTOCOLS[self.protocol][1]

    @property
    def implicit_tls(self) -> bool:
        return PROTOCOLS[self.protocol][2]


@dataclass(frozen=True)
class SMTPConfig:
    #: Largest message accepted, in octets (advertised with SIZE, RFC 1870);
    #: RFC 5321 4.5.3.1.7: at least 64K octets.
    max_message_size: int = 26_214_400
    #: RFC 5321 4.5.3.1.8: at least 100 recipients must be accepted.
    max_recipients: int = 100
    #: RFC 5321 4.5.3.1.4: 512 octets including CRLF.
    max_command_line: int = 512
    #: RFC 5321 4.5.3.1.6: 1000 octets including CRLF.
    max_text_line: int = 1000
    #: Seconds without a command before 421 4.4.2 (RFC 5321 4.5.3.2 suggests 300).
    idle_timeout: float = 300.0
    #: Errors in one session before 421 and disconnect.
    max_errors: int = 20
    #: Simultaneous SMTP connections on one listener, and from one client IP.
    max_connections: int = 1000
    max_connections_per_ip: int = 20
    #: Processes serving the mx listeners: this one and ``processes - 1``
    #: workers accepting on the same sockets (mailstack.workers). One per CPU
    #: core lets a busy MX use every core; connection and rate limits are then
    #: counted in each process.
    processes: int = 1


@dataclass(frozen=True)
class AuthConfig:
    #: Allow passwords without TLS from 127.0.0.0/8 and ::1 (development only).
    allow_plaintext_loopback: bool = False
    #: Seconds before a failed login is answered (slows down guessing).
    failure_delay: float = 2.0
    #: Failed logins from one client address within failure_window before
    #: further attempts are refused for the rest of the window.
    max_failures_per_ip: int = 10
    failure_window: float = 300.0
    #: Failed logins for one account (from any address) within failure_window
    #: before IMAP and POP3 logins to it are refused for the rest of the window.
    max_failures_per_account: int = 20
    #: Password checks running at once (each takes argon2's 64 MiB briefly).
    max_concurrent_checks: int = 4


@dataclass(frozen=True)
class SubmissionConfig:
    #: Leave the client's address and HELO out of the Received header of
    #: submitted mail (it may be a home or office network).
    hide_client_address: bool = False
    #: Failed AUTH attempts in one session before 421 and disconnect.
    max_auth_failures: int = 3


@dataclass(frozen=True)
class POP3Config:
    #: Seconds without a command before the connection is closed (RFC 1939: at least 600).
    idle_timeout: float = 600.0
    #: Simultaneous POP3 connections on one listener, and from one client IP;
    #: more get -ERR [SYS/TEMP] and are closed.
    max_connections: int = 1000
    max_connections_per_ip: int = 20


@dataclass(frozen=True)
class IMAPConfig:
    #: Seconds a client may take to log in before it is disconnected.
    login_timeout: float = 60.0
    #: Seconds without a command after login before autologout (RFC 9051 5.4: at least 1800).
    idle_timeout: float = 1800.0
    #: Largest message APPEND accepts, in octets (advertised as APPENDLIMIT, RFC 7889).
    max_message_size: int = 26_214_400
    #: Longest command line, literals not counted, in octets.
    max_line: int = 65_536
    #: Largest literal in commands other than APPEND (LOGIN, SEARCH, ...), in octets.
    max_literal: int = 65_536
    #: Mailboxes one user may create.
    max_mailboxes: int = 1000
    #: Failed logins on one connection before it is closed.
    max_auth_failures: int = 3
    #: BAD replies in one session before it is closed.
    max_errors: int = 50
    #: Seconds between looks at an idling client's mailbox where inotify is missing.
    poll_interval: float = 1.0
    #: Simultaneous IMAP connections on one listener, and from one client IP;
    #: more get * BYE [UNAVAILABLE] and are closed.
    max_connections: int = 1000
    max_connections_per_ip: int = 20
    #: Logged-in IMAP sessions of one user (all IMAP listeners together);
    #: another login gets NO [LIMIT].
    max_sessions_per_user: int = 20


@dataclass(frozen=True)
class DNSConfig:
    #: Nameserver IP addresses; empty: those of /etc/resolv.conf.
    nameservers: tuple[str, ...] = ()
    port: int = 53
    #: Seconds a lookup may take before it counts as a temporary failure.
    timeout: float = 5.0


@dataclass(frozen=True)
class OutboundConfig:
    #: The SMTP port of other servers (25; tests and odd set-ups change it).
    port: int = 25
    #: Deliver to MX hosts with loopback or private addresses (tests, LANs).
    allow_private: bool = False
    #: Send everything through this smarthost ("host:port", STARTTLS required).
    relay: str = ""
    relay_username: str = ""
    relay_password: str = ""
    #: Check the relay's certificate against its name (turn off only for tests).
    relay_verify_certificate: bool = True
    connect_timeout: float = 30.0
    #: RFC 5321 4.5.3.2: 5 minutes for a reply, 10 for the reply to the final dot.
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    #: Simultaneous outbound connections.
    max_connections: int = 20
    #: Messages sent over one connection before it is closed (1: no reuse).
    messages_per_connection: int = 50


@dataclass(frozen=True)
class DKIMConfig:
    #: Signing keys: <keys_dir>/<domain>/<selector>.rsa.pem or .ed25519.key
    #: (``mailstack dkim keygen`` writes them).
    keys_dir: Path = Path("dkim")


@dataclass(frozen=True)
class QueueConfig:
    #: Seconds before a failed local delivery (disk full, ...) is tried again.
    retry_delay: float = 60.0
    #: Seconds before the first retry of a remote delivery; it doubles per
    #: attempt up to max_retry_interval.
    first_retry: float = 300.0
    max_retry_interval: float = 14_400.0
    #: A message not delivered after this many seconds is bounced (5 days).
    max_lifetime: float = 432_000.0
    #: Warn the sender once after this many seconds of delay (0: never).
    delay_warning: float = 0.0


@dataclass(frozen=True)
class RecordsConfig:
    """The DNS records ``mailstack dns`` prints and ``mailstack check`` expects."""

    ttl: int = 3600
    mx_preference: int = 10
    #: SPF terms besides "mx", before "-all" (a smarthost's "include:...").
    spf_extra: tuple[str, ...] = ()
    #: The DMARC policy to publish (RFC 7489 6.3): none, quarantine or reject.
    dmarc_policy: str = "quarantine"
    #: Where DMARC aggregate and TLS reports (RFC 8460) go; "": postmaster@<domain>.
    dmarc_rua: str = ""
    tlsrpt_rua: str = ""
    #: MTA-STS (RFC 8461): none, testing or enforce, and the policy's max_age.
    mta_sts_mode: str = "testing"
    mta_sts_max_age: int = 604_800


@dataclass(frozen=True)
class ClientsConfig:
    """What mail programs are told (autoconfig, autodiscover, Apple profile, SRV).

    A port 0 is the port of the listener of that protocol; set the port
    clients really use when it differs (NAT, port forwarding). A service
    with neither a listener nor a port here is not advertised.
    """

    submission_port: int = 0
    submissions_port: int = 0
    imap_port: int = 0
    imaps_port: int = 0
    pop3_port: int = 0
    pop3s_port: int = 0
    https_port: int = 0
    http_port: int = 0
    #: The account's name in mail programs; "": the domain.
    display_name: str = ""


@dataclass(frozen=True)
class HTTPConfig:
    #: Clients that may read /metrics (Prometheus); others get 403.
    metrics_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    #: Served as /.well-known/acme-challenge/ (certbot --webroot -w DIR); "": not served.
    acme_challenge_dir: Path | None = None


#: The policy checkers run when no ``[policy] checkers`` list is given, in order.
DEFAULT_CHECKERS = ("lists", "ratelimit", "dnsbl", "spf", "dkim", "arc", "dmarc")


@dataclass(frozen=True)
class SPFPolicy:
    #: Refuse mail whose SPF result is fail with 550 5.7.23 (RFC 7372). Off by
    #: default: the result is recorded and DMARC decides (RFC 7489 10.1).
    reject_on_fail: bool = False
    #: Seconds the whole SPF evaluation may take (RFC 7208 4.6.4: at least 20).
    time_budget: float = 20.0


@dataclass(frozen=True)
class DKIMPolicy:
    #: Signatures verified per message; more are reported as not checked
    #: (SECURITY-TESTS DKIM-9: bounds the DNS work a message can cause).
    max_signatures: int = 5
    #: Smaller RSA keys fail (RFC 8301 3.2: at least 1024 bits).
    min_rsa_bits: int = 1024
    #: Seconds all key lookups of one message may take; then temperror.
    time_budget: float = 20.0


@dataclass(frozen=True)
class ARCPolicy:
    #: RFC 8617 4.2.1: at most 50 ARC sets; more is a fail.
    max_sets: int = 50
    #: Seconds all key lookups of one message may take; then temperror.
    time_budget: float = 20.0


@dataclass(frozen=True)
class DMARCPolicy:
    #: Act on the domain's policy: p=reject -> 550 5.7.1, p=quarantine -> the
    #: Junk folder. False: evaluate and record only (monitoring).
    enforce: bool = True
    #: Keep every evaluation in <state_dir>/dmarc.sqlite for aggregate reports.
    record: bool = True
    #: Days evaluations are kept.
    keep_days: float = 31.0


@dataclass(frozen=True)
class GreylistPolicy:
    #: Seconds a new (client network, sender, recipient) triplet must wait.
    delay: float = 300.0
    #: Seconds a first attempt waits for its retry before it is forgotten.
    retry_window: float = 172_800.0
    #: Seconds a triplet, or a sender from a client network, that passed
    #: once is remembered after its last message (35 days).
    expiry: float = 3_024_000.0
    #: The client network of a triplet: /24 for IPv4, /64 for IPv6.
    ipv4_prefix: int = 24
    ipv6_prefix: int = 64


@dataclass(frozen=True)
class DNSBLPolicy:
    #: DNS block lists to look the client address up in, e.g. "zen.spamhaus.org".
    zones: tuple[str, ...] = ()


@dataclass(frozen=True)
class RateLimitPolicy:
    #: The counting window, in seconds.
    window: float = 60.0
    #: Per client address and window; 0 turns a limit off. (Failed logins per
    #: address are limited for every protocol by [auth] max_failures_per_ip.)
    max_connections: int = 60
    max_messages: int = 120
    #: Recipients per message for unauthenticated clients (0: only smtp.max_recipients).
    max_recipients: int = 0


@dataclass(frozen=True)
class ListsPolicy:
    #: Allow- and block-list file ("allow ip 192.0.2.0/24", "block sender
    #: @spam.example", ...); re-read when it changes. Empty: no lists.
    file: Path | None = None


@dataclass(frozen=True)
class PolicyConfig:
    #: Checkers in the order they run: built-in names or dotted paths of
    #: third-party classes (README "Writing a policy checker").
    checkers: tuple[str, ...] = DEFAULT_CHECKERS
    #: Clients that skip the inbound checks (Postfix's mynetworks).
    trusted_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    #: The authserv-id of Authentication-Results (RFC 8601 2.5); empty: server.hostname.
    authserv_id: str = ""
    #: Greylisting and DMARC state; empty: <spool_dir>/policy.
    state_dir: Path | None = None
    #: Seconds all checks of one SMTP stage may take before 451 4.4.3.
    stage_timeout: float = 60.0
    spf: SPFPolicy = field(default_factory=SPFPolicy)
    dkim: DKIMPolicy = field(default_factory=DKIMPolicy)
    arc: ARCPolicy = field(default_factory=ARCPolicy)
    dmarc: DMARCPolicy = field(default_factory=DMARCPolicy)
    greylist: GreylistPolicy = field(default_factory=GreylistPolicy)
    dnsbl: DNSBLPolicy = field(default_factory=DNSBLPolicy)
    ratelimit: RateLimitPolicy = field(default_factory=RateLimitPolicy)
    lists: ListsPolicy = field(default_factory=ListsPolicy)
    #: Settings of third-party checkers (``[policy."dotted.path"]`` tables), as given.
    plugins: dict = field(default_factory=dict)


_POLICY_TABLES = {"spf": SPFPolicy, "dkim": DKIMPolicy, "arc": ARCPolicy, "dmarc": DMARCPolicy,
                  "greylist": GreylistPolicy, "dnsbl": DNSBLPolicy,
                  "ratelimit": RateLimitPolicy, "lists": ListsPolicy}


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    smtp: SMTPConfig = field(default_factory=SMTPConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    submission: SubmissionConfig = field(default_factory=SubmissionConfig)
    pop3: POP3Config = field(default_factory=POP3Config)
    imap: IMAPConfig = field(default_factory=IMAPConfig)
    dns: DNSConfig = field(default_factory=DNSConfig)
    outbound: OutboundConfig = field(default_factory=OutboundConfig)
    dkim: DKIMConfig = field(default_factory=DKIMConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    records: RecordsConfig = field(default_factory=RecordsConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    http: HTTPConfig = field(default_factory=HTTPConfig)
    listen: tuple[Listener, ...] = ()
    #: The file this was loaded from (None for built-in defaults).
    source: Path | None = None


_SECTIONS = {"server": ServerConfig, "tls": TLSConfig, "smtp": SMTPConfig, "auth": AuthConfig,
             "submission": SubmissionConfig, "pop3": POP3Config, "imap": IMAPConfig,
             "dns": DNSConfig, "outbound": OutboundConfig, "dkim": DKIMConfig,
             "queue": QueueConfig, "records": RecordsConfig, "clients": ClientsConfig,
             "http": HTTPConfig}


def load(path: Path | str) -> Config:
    """Read and check the config file; raise ConfigError naming every problem."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ConfigError(path, [f"cannot read the file: {e.strerror}"]) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(path, [f"not valid TOML: {e}"]) from None
    except UnicodeDecodeError as e:
        # TOML files are UTF-8 (TOML 1.0 "Spec"); tomllib lets the decode error through.
        raise ConfigError(path, [f"not valid TOML: not UTF-8 at byte {e.start}"]) from None
    return from_dict(raw, path)


def from_dict(raw: dict, path: Path | str) -> Config:
    """Build a Config from parsed TOML; paths are relative to ``path``'s directory."""
    path = Path(path)
    base = path.resolve().parent
    problems: list[str] = []
    sections: dict[str, object] = {}
    for key, cls in _SECTIONS.items():
        # Absent sections are built too, so that default paths get resolved.
        value = raw.get(key, {})
        if not isinstance(value, dict):
            problems.append(f"[{key}]: must be a table")
            value = {}
        sections[key] = _build(cls, value, key, base, problems)
    for key, value in raw.items():
        if key in _SECTIONS:
            continue
        if key == "listen":
            if not isinstance(value, list):
                problems.append("listen: must be an array of tables ([[listen]])")
                continue
            listeners = []
            for i, item in enumerate(value):
                if not isinstance(item, dict):
                    problems.append(f"listen[{i}]: must be a table")
                    continue
                listeners.append(_build(Listener, item, f"listen[{i}]", base, problems))
            sections["listen"] = tuple(listeners)
        elif key == "policy":
            sections["policy"] = _build_policy(value, base, problems)
        else:
            problems.append(f"{key}: unknown section")
    if "policy" not in sections:
        sections["policy"] = _build_policy({}, base, problems)
    config = Config(**sections, source=path)
    problems.extend(_check(config))
    if problems:
        raise ConfigError(path, problems)
    return config


def _build_policy(table, base: Path, problems: list[str]) -> PolicyConfig:
    """[policy] with a sub-table per built-in checker ([policy.spf], ...) and
    the raw settings of third-party checkers ([policy."package.Checker"])."""
    if not isinstance(table, dict):
        problems.append("[policy]: must be a table")
        table = {}
    top, tables, plugins = {}, {}, {}
    for key, value in table.items():
        if key in _POLICY_TABLES or "." in key:
            if not isinstance(value, dict):
                problems.append(f"policy.{key}: must be a table")
            elif key in _POLICY_TABLES:
                tables[key] = _build(_POLICY_TABLES[key], value, f"policy.{key}", base, problems)
            else:
                plugins[key] = dict(value)
        elif key == "plugins":
            problems.append(f"policy.{key}: unknown key")
        else:
            top[key] = value
    for key, cls in _POLICY_TABLES.items():
        if key not in tables:
            tables[key] = _build(cls, {}, f"policy.{key}", base, problems)
    policy = _build(PolicyConfig, top, "policy", base, problems)
    return dataclasses.replace(policy, plugins=plugins, **tables)


def _build(cls, table: dict, where: str, base: Path, problems: list[str]):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values = {}
    for key, value in table.items():
        if key not in names:
            problems.append(f"{where}.{key}: unknown key")
            continue
        converted = _convert(value, hints[key], base)
        if converted is _BAD:
            problems.append(
                f"{where}.{key}: expected {_describe(hints[key])}, got {type(value).__name__} {value!r}"
            )
            continue
        values[key] = converted
    for f in dataclasses.fields(cls):
        # A default path is relative to the config file like a written one, so
        # the daemon and the CLI agree whatever their working directory.
        if f.name not in values and isinstance(f.default, Path):
            values[f.name] = base / f.default
    return cls(**values)


_BAD = object()


def _convert(value, hint, base: Path):
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    if optional and value == "":
        return None
    if hint is bool:
        return value if isinstance(value, bool) else _BAD
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _BAD
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return float(value) if ok else _BAD
    if hint is str:
        return value if isinstance(value, str) else _BAD
    if hint is Path:
        return base / value if isinstance(value, str) and value else _BAD
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return _BAD
        return tuple(value)
    raise TypeError(f"unsupported config type {hint!r}")


def _describe(hint) -> str:
    if typing.get_origin(hint) is tuple:
        return "a list of strings"
    if isinstance(hint, types.UnionType):
        hint = typing.get_args(hint)[0]
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            Path: "a path (string)"}.get(hint, str(hint))


def _check(config: Config) -> list[str]:
    """Rules that involve values, not just types."""
    problems = []
    s = config.server
    if not s.hostname or any(c in s.hostname for c in " \t\r\n/"):
        problems.append(f"server.hostname: {s.hostname!r} is not a host name")
    for d in s.domains:
        # Recipients are compared in canonical form (RELAY-10/11), so the
        # configured names must be written in it too.
        try:
            wanted = canonical_domain(d)
        except BadAddress:
            problems.append(f"server.domains: {d!r} is not a domain name")
            continue
        if wanted != d:
            problems.append(f"server.domains: write {d!r} as {wanted!r} "
                            "(lower case, A-labels, no trailing dot)")
    if s.threads < 1:
        problems.append("server.threads: must be at least 1")
    if (config.tls.certificate is None) != (config.tls.private_key is None):
        problems.append("tls: certificate and private_key must be given together")
    for key in ("max_errors", "max_connections", "max_connections_per_ip"):
        if getattr(config.smtp, key) < 1:
            problems.append(f"smtp.{key}: must be at least 1")
    if config.smtp.max_message_size < 65536:
        problems.append("smtp.max_message_size: RFC 5321 requires at least 65536")
    if config.smtp.max_recipients < 100:
        problems.append("smtp.max_recipients: RFC 5321 requires at least 100")
    if config.smtp.max_command_line < 512:
        problems.append("smtp.max_command_line: RFC 5321 requires at least 512")
    if config.smtp.max_text_line < 1000:
        problems.append("smtp.max_text_line: RFC 5321 requires at least 1000")
    if config.auth.failure_delay < 0:
        problems.append("auth.failure_delay: must not be negative")
    if config.auth.failure_window <= 0:
        problems.append("auth.failure_window: must be positive")
    if config.submission.max_auth_failures < 1:
        problems.append("submission.max_auth_failures: must be at least 1")
    if config.auth.max_concurrent_checks < 1:
        problems.append("auth.max_concurrent_checks: must be at least 1")
    if config.auth.max_failures_per_ip < 1:
        problems.append("auth.max_failures_per_ip: must be at least 1")
    if config.auth.max_failures_per_account < 1:
        problems.append("auth.max_failures_per_account: must be at least 1")
    if config.pop3.idle_timeout <= 0:
        problems.append("pop3.idle_timeout: must be positive")
    for key in ("max_connections", "max_connections_per_ip"):
        if getattr(config.pop3, key) < 1:
            problems.append(f"pop3.{key}: must be at least 1")
    for key in ("login_timeout", "idle_timeout", "poll_interval"):
        if getattr(config.imap, key) <= 0:
            problems.append(f"imap.{key}: must be positive")
    for key in ("max_mailboxes", "max_auth_failures", "max_errors", "max_connections",
                "max_connections_per_ip", "max_sessions_per_user"):
        if getattr(config.imap, key) < 1:
            problems.append(f"imap.{key}: must be at least 1")
    if config.imap.max_line < 1000:
        problems.append("imap.max_line: must be at least 1000")
    if config.imap.max_literal < 4096:
        problems.append("imap.max_literal: must be at least 4096")
    if config.imap.max_message_size < 65536:
        problems.append("imap.max_message_size: must be at least 65536")
    for ns in config.dns.nameservers:
        try:
            ipaddress.ip_address(ns)
        except ValueError:
            problems.append(f"dns.nameservers: {ns!r} is not an IP address")
    for key, port in (("dns.port", config.dns.port), ("outbound.port", config.outbound.port)):
        if not 0 < port <= 65535:
            problems.append(f"{key}: {port} is not a port number")
    if config.dns.timeout <= 0:
        problems.append("dns.timeout: must be positive")
    relay = config.outbound.relay
    if relay and not re.fullmatch(r"[A-Za-z0-9.\-]+:[0-9]{1,5}|\[[0-9a-fA-F:.]+\]:[0-9]{1,5}", relay):
        problems.append(f"outbound.relay: {relay!r} is not host:port")
    for key in ("max_connections", "messages_per_connection"):
        if getattr(config.outbound, key) < 1:
            problems.append(f"outbound.{key}: must be at least 1")
    for key in ("first_retry", "max_retry_interval", "max_lifetime"):
        if getattr(config.queue, key) <= 0:
            problems.append(f"queue.{key}: must be positive")
    if config.queue.retry_delay <= 0:
        problems.append("queue.retry_delay: must be positive")
    if config.smtp.idle_timeout <= 0:
        problems.append("smtp.idle_timeout: must be positive")
    if not 1 <= config.smtp.processes <= 64:
        problems.append("smtp.processes: must be between 1 and 64")
    problems.extend(_check_policy(config.policy))
    problems.extend(_check_setup(config))
    seen = set()
    for i, lst in enumerate(config.listen):
        if lst.protocol not in PROTOCOLS:
            problems.append(
                f"listen[{i}].protocol: {lst.protocol!r} is not one of {', '.join(PROTOCOLS)}")
            continue
        if not 0 <= lst.port <= 65535:
            problems.append(f"listen[{i}].port: {lst.port} is not a port number")
        try:
            # Compared as addresses, so "::1" and "0::1" are the same socket.
            ip = ipaddress.ip_address(lst.address)
        except ValueError:
            problems.append(f"listen[{i}].address: {lst.address!r} is not an IP address")
            ip = lst.address
        if (ip, lst.port) in seen and lst.port:
            problems.append(f"listen[{i}]: {lst.address}:{lst.port} is used twice")
        seen.add((ip, lst.port))
        needs_tls = lst.implicit_tls or lst.role == "submission"
        if needs_tls and config.tls.certificate is None:
            problems.append(f"listen[{i}]: {lst.protocol} needs [tls] certificate and private_key")
    return problems


def _check_policy(policy: PolicyConfig) -> list[str]:
    problems = []
    seen = set()
    for name in policy.checkers:
        if name in seen:
            problems.append(f"policy.checkers: {name!r} is listed twice")
        seen.add(name)
        if name not in _POLICY_TABLES and name != "lists" and not re.fullmatch(
                r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", name):
            problems.append(f"policy.checkers: {name!r} is neither a built-in checker "
                            f"({', '.join(_POLICY_TABLES)}) nor a dotted path")
    for name in policy.plugins:
        if name not in policy.checkers:
            problems.append(f"policy.{name}: settings for a checker not in policy.checkers")
    for net in policy.trusted_networks:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            problems.append(f"policy.trusted_networks: {net!r} is not an address or network")
    if policy.authserv_id and not re.fullmatch(r"[A-Za-z0-9.\-]+", policy.authserv_id):
        problems.append(f"policy.authserv_id: {policy.authserv_id!r} is not a host name")
    for key, value in (("stage_timeout", policy.stage_timeout),
                       ("spf.time_budget", policy.spf.time_budget),
                       ("dkim.time_budget", policy.dkim.time_budget),
                       ("arc.time_budget", policy.arc.time_budget),
                       ("greylist.retry_window", policy.greylist.retry_window),
                       ("greylist.expiry", policy.greylist.expiry),
                       ("ratelimit.window", policy.ratelimit.window),
                       ("dmarc.keep_days", policy.dmarc.keep_days)):
        if value <= 0:
            problems.append(f"policy.{key}: must be positive")
    if policy.greylist.delay < 0:
        problems.append("policy.greylist.delay: must not be negative")
    if policy.dkim.max_signatures < 1:
        problems.append("policy.dkim.max_signatures: must be at least 1")
    if policy.dkim.min_rsa_bits < 1024:
        problems.append("policy.dkim.min_rsa_bits: RFC 8301 requires at least 1024")
    if not 1 <= policy.arc.max_sets <= 50:
        problems.append("policy.arc.max_sets: must be between 1 and 50 (RFC 8617 4.2.1)")
    if not 8 <= policy.greylist.ipv4_prefix <= 32:
        problems.append("policy.greylist.ipv4_prefix: must be between 8 and 32")
    if not 16 <= policy.greylist.ipv6_prefix <= 128:
        problems.append("policy.greylist.ipv6_prefix: must be between 16 and 128")
    for key in ("max_connections", "max_messages", "max_recipients"):
        if getattr(policy.ratelimit, key) < 0:
            problems.append(f"policy.ratelimit.{key}: must not be negative")
    for zone in policy.dnsbl.zones:
        if not re.fullmatch(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)+\.?", zone):
            problems.append(f"policy.dnsbl.zones: {zone!r} is not a DNS zone name")
    return problems


def _check_setup(config: Config) -> list[str]:
    """[server] public addresses, [records], [clients] and [http]."""
    problems = []
    for key, version in (("public_ipv4", 4), ("public_ipv6", 6)):
        value = getattr(config.server, key)
        try:
            if value and ipaddress.ip_address(value).version != version:
                raise ValueError
        except ValueError:
            problems.append(f"server.{key}: {value!r} is not an IPv{version} address")
    r = config.records
    if not 60 <= r.ttl <= 604_800:
        problems.append("records.ttl: must be between 60 and 604800 seconds")
    if not 0 <= r.mx_preference <= 65535:
        problems.append("records.mx_preference: must be between 0 and 65535")
    for term in r.spf_extra:
        if not re.fullmatch(r"[+\-~?]?(include:|exists:|ip4:|ip6:|a\b|mx\b)[!-~]*", term):
            problems.append(f"records.spf_extra: {term!r} is not an SPF mechanism "
                            "(include:, ip4:, ip6:, a, mx, exists:)")
    if r.dmarc_policy not in ("none", "quarantine", "reject"):
        problems.append("records.dmarc_policy: must be none, quarantine or reject")
    if r.mta_sts_mode not in ("none", "testing", "enforce"):
        problems.append("records.mta_sts_mode: must be none, testing or enforce")
    if not 0 < r.mta_sts_max_age <= 31_557_600:
        problems.append("records.mta_sts_max_age: must be between 1 and 31557600 (RFC 8461 3.2)")
    for key in ("dmarc_rua", "tlsrpt_rua"):
        value = getattr(r, key)
        web = key == "tlsrpt_rua" and value.startswith("https://")
        if value and not web and not re.fullmatch(r"(mailto:)?[^@\s;,!]+@[A-Za-z0-9.\-]+", value):
            problems.append(f"records.{key}: {value!r} is not a mail address")
    for f in dataclasses.fields(ClientsConfig):
        value = getattr(config.clients, f.name)
        if f.name.endswith("_port") and not 0 <= value <= 65535:
            problems.append(f"clients.{f.name}: {value} is not a port number")
    for net in config.http.metrics_networks:
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            problems.append(f"http.metrics_networks: {net!r} is not an address or network")
    return problems
