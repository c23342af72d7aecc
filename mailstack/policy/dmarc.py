"""DMARC (RFC 7489) at the end of data, after SPF and DKIM.

1. The author: the message must have exactly one From field holding exactly
   one address with a valid domain (RFC 7489 6.6.1; SECURITY-TESTS HDR-6,
   DMARC-5); otherwise ``550 5.7.1``, whatever the domain publishes.
2. The policy (6.6.3): the one ``v=DMARC1`` TXT record at
   ``_dmarc.<From domain>``, else at ``_dmarc.<organisational domain>``,
   found with the public suffix list including its private section
   (``publicsuffixlist``, DMARC-3). Several records, or none, mean no policy;
   a record without a valid ``p=`` counts as ``p=none`` if it has ``rua=``,
   else as no policy (DMARC-6).
3. Alignment (3.1): an SPF pass for the MAIL FROM identity (not HELO,
   DMARC-7) or a DKIM pass whose domain is the From domain (strict, ``s``)
   or shares its organisational domain (relaxed, ``r``; DMARC-1/2). Domains
   are compared lower case, in A-label form, without the root dot (DMARC-8).
4. The disposition for a fail: ``sp=`` when the policy came from the
   organisational domain (DMARC-4), else ``p=``; a message outside the
   ``pct=`` sample gets the next milder one (6.6.4). reject -> ``550 5.7.1``,
   quarantine -> the recipients' Junk folder, none -> delivered.

A DNS timeout or SERVFAIL on ``_dmarc`` answers ``451 4.4.3`` (DMARC-9).
Every evaluation is kept in ``<state_dir>/dmarc.sqlite`` (``evaluations``).
Allow-list entries never skip this check: a forged From is rejected even
from an allowed client.
"""

from __future__ import annotations

import functools
import random
import re
import threading
from dataclasses import dataclass
from email.errors import InvalidHeaderDefect
from email.headerregistry import HeaderRegistry

from authres.dmarc import DMARCAuthenticationResult
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger

from mailstack.addresses import BadAddress, canonical_domain
from mailstack.dns import NotFound, TemporaryDNSError
from mailstack.policy.evaluations import Evaluation, EvaluationStore
from mailstack.policy.interface import (
    Checker, Connection, Environment, Message, Transaction, proceed, quarantine, reject,
    temperror)

log = Logger(namespace="mailstack.policy.dmarc")

_POLICIES = ("none", "quarantine", "reject")
_MILDER = {"reject": "quarantine", "quarantine": "none", "none": "none"}
_psl = None
_psl_lock = threading.Lock()


@functools.lru_cache(maxsize=4096)
def organizational_domain(domain: str) -> str | None:
    """The registrable domain (RFC 7489 3.2), None for a public suffix itself."""
    global _psl
    if _psl is None:
        with _psl_lock:
            if _psl is None:
                from publicsuffixlist import PublicSuffixList
                _psl = PublicSuffixList()
    return _psl.privatesuffix(domain)


@functools.lru_cache(maxsize=4096)
def normalize(domain: str) -> str | None:
    try:
        return canonical_domain(domain.strip())
    except (BadAddress, UnicodeError):
        return None


def aligned(domain: str, author: str, mode: str) -> bool:
    """RFC 7489 3.1.1/3.1.2: strict means equal, relaxed means the same
    organisational domain (never a public suffix)."""
    domain = normalize(domain) if domain else None
    if not domain:
        return False
    if mode == "s":
        return domain == author
    org = organizational_domain(domain)
    return org is not None and org == organizational_domain(author)


class AuthorProblem(Exception):
    """The From field cannot name one author domain."""


_HEADERS = HeaderRegistry()
# The common, unambiguous shapes, parsed without the (slow) full RFC 5322
# parser: "addr@domain" alone, or a display name free of specials before
# "<addr@domain>". Anything else takes the full parser.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?"
_ADDR = rf"({_ATOM}(?:\.{_ATOM})*)@({_LABEL}(?:\.{_LABEL})*)"
_SIMPLE_FROM = re.compile(rf"\s*(?:[A-Za-z0-9 '_\-]*<{_ADDR}>|{_ADDR})\s*\Z")


def author_domain(fields: list[tuple[str, str]]) -> str:
    """The RFC5322.From domain, or AuthorProblem (RFC 7489 6.6.1)."""
    if any(name == "" for name, _ in fields):
        raise AuthorProblem("malformed header section")
    values = [value for name, value in fields if name.lower() == "from"]
    if not values:
        raise AuthorProblem("no From header")
    if len(values) > 1:
        raise AuthorProblem("more than one From header")
    simple = _SIMPLE_FROM.match(values[0])
    if simple is not None:
        domain = normalize(simple.group(2) or simple.group(4))
        if not domain:
            raise AuthorProblem("the From address has no valid domain")
        return domain
    try:
        header = _HEADERS("from", values[0])
        addresses = header.addresses
    except Exception:  # the stdlib parser has more failure modes than documented
        raise AuthorProblem("unparsable From header") from None
    if len(addresses) != 1 or any(isinstance(d, InvalidHeaderDefect) for d in header.defects):
        raise AuthorProblem("the From header must hold exactly one address")
    domain = normalize(addresses[0].domain) if addresses[0].domain else None
    if not domain or not addresses[0].username:
        raise AuthorProblem("the From address has no valid domain")
    return domain


@dataclass(frozen=True)
class Record:
    """A DMARC policy record (RFC 7489 6.3), as published at ``domain``."""

    domain: str
    p: str
    sp: str
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100
    rua: str = ""


def parse_record(text: bytes, domain: str) -> Record | None:
    """The policy of one TXT record, or None when it is not usable (6.6.3)."""
    try:
        value = text.decode("ascii")
    except UnicodeDecodeError:
        return None
    tags = {}
    for i, part in enumerate(p for p in value.split(";") if p.strip()):
        key, eq, val = part.partition("=")
        key, val = key.strip().lower(), val.strip()
        if i == 0 and (key != "v" or val != "DMARC1"):
            return None
        if eq and key not in tags:
            tags[key] = val
    if "v" not in tags:
        return None
    p = tags.get("p", "").lower()
    sp = tags.get("sp", p).lower()
    rua = tags.get("rua", "")
    if p not in _POLICIES or sp not in _POLICIES:
        if not rua.lower().startswith("mailto:"):
            return None
        p = "none" if p not in _POLICIES else p
        sp = p if sp not in _POLICIES else sp
    pct = tags.get("pct", "100")
    pct = int(pct) if pct.isdigit() and int(pct) <= 100 else 100
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    return Record(domain, p, sp, adkim if adkim in ("r", "s") else "r",
                  aspf if aspf in ("r", "s") else "r", pct, rua)


def _records_at(resolver, name: str, domain: str) -> list[Record] | None:
    try:
        texts = resolver.txt_bytes(name)
    except NotFound:
        return []
    candidates = [t for t in texts if t[:8].upper().startswith(b"V=DMARC1")]
    if len(candidates) > 1:
        return None  # RFC 7489 6.6.3 step 5: more than one: no DMARC processing
    records = [parse_record(t, domain) for t in candidates]
    return [r for r in records if r is not None]


def discover(resolver, author: str) -> Record | None:
    """The policy for ``author`` (blocking; raises TemporaryDNSError)."""
    found = _records_at(resolver, f"_dmarc.{author}", author)
    if found is None:
        return None
    if found:
        return found[0]
    org = organizational_domain(author)
    if org is None or org == author:
        return None
    found = _records_at(resolver, f"_dmarc.{org}", org)
    return found[0] if found else None


@dataclass(frozen=True)
class DMARCOutcome:
    #: pass, fail, none (no policy), temperror.
    result: str
    author: str
    record: Record | None = None
    #: What the policy asks for this message, and what was done.
    policy: str = "none"
    disposition: str = "none"
    reason: str = ""


class DMARCChecker(Checker):
    name = "dmarc"
    stages = frozenset({"data"})

    def __init__(self, settings, env: Environment, rng: random.Random | None = None):
        self.settings = settings
        self.env = env
        self.rng = rng or random.SystemRandom()
        self.store = (EvaluationStore(env.state_dir / "dmarc.sqlite", settings.keep_days)
                      if settings.record else None)

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    @inlineCallbacks
    def end_of_data(self, conn: Connection, txn: Transaction, message: Message) -> Deferred:
        try:
            author = author_domain(message.header_fields())
        except AuthorProblem as e:
            return reject(f"Message refused: {e} (RFC 5322 3.6.2, RFC 7489 6.6.1)",
                          results=[DMARCAuthenticationResult(result="permerror",
                                                             result_comment=str(e))])
        try:
            record = yield self.env.run_blocking(discover, self.env.resolver, author)
        except TemporaryDNSError:
            clause = DMARCAuthenticationResult(result="temperror", header_from=author)
            return temperror(f"DMARC policy lookup for {author} failed temporarily (DNS), "
                             "try again later", results=[clause])
        outcome, evaluation = self.evaluate(conn, txn, author, record)
        txn.state["dmarc"] = outcome
        if self.store is not None and record is not None:
            try:
                yield self.env.run_blocking(self.store.add, evaluation)
            except Exception:
                log.failure("DMARC: cannot record the evaluation")
        clause = DMARCAuthenticationResult(result=outcome.result, header_from=author)
        if record is not None:
            clause.result_comment = (f"p={record.p.upper()} sp={record.sp.upper()} "
                                     f"dis={outcome.disposition.upper()}")
        if outcome.disposition == "reject":
            return reject(f"Message rejected per the DMARC policy of {author}",
                          results=[clause])
        if outcome.disposition == "quarantine":
            return quarantine(f"DMARC policy of {author}: quarantine", results=[clause])
        return proceed(results=[clause])

    def evaluate(self, conn: Connection, txn: Transaction, author: str,
                 record: Record | None) -> tuple[DMARCOutcome, Evaluation]:
        spf = txn.state.get("spf")
        signatures = txn.state.get("dkim", [])
        adkim = record.adkim if record else "r"
        aspf = record.aspf if record else "r"
        spf_aligned = bool(spf is not None and spf.identity == "mailfrom"
                           and spf.result == "pass" and aligned(spf.domain, author, aspf))
        dkim_rows = []
        dkim_aligned = False
        for sig in signatures:
            ok = sig.result == "pass" and aligned(sig.domain, author, adkim)
            dkim_aligned = dkim_aligned or ok
            dkim_rows.append({"domain": sig.domain, "selector": sig.selector,
                              "result": sig.result, "aligned": ok})
        if record is None:
            result, policy, disposition, reason = "none", "none", "none", ""
        elif spf_aligned or dkim_aligned:
            result, policy, disposition, reason = "pass", "none", "none", ""
        else:
            result = "fail"
            policy = record.sp if author != record.domain else record.p
            disposition, reason = policy, ""
            if disposition != "none" and self.rng.random() * 100 >= record.pct:
                disposition, reason = _MILDER[disposition], "sampled_out"
            if disposition != "none" and not self.settings.enforce:
                disposition, reason = "none", "local_policy"
        outcome = DMARCOutcome(result, author, record, policy, disposition, reason)
        evaluation = Evaluation(
            time=self.env.clock.seconds(), source_ip=conn.client_ip, header_from=author,
            envelope_from=txn.sender_domain,
            envelope_to=",".join(sorted({r.rpartition("@")[2].lower() for r in txn.recipients})),
            policy_domain=record.domain if record else "", p=record.p if record else "",
            sp=record.sp if record else "", pct=record.pct if record else 100,
            adkim=adkim, aspf=aspf, rua=record.rua if record else "",
            spf_domain=spf.domain if spf else "",
            spf_scope="helo" if spf is not None and spf.identity == "helo" else "mfrom",
            spf_result=spf.result if spf else "none", spf_aligned=spf_aligned,
            dkim=tuple(dkim_rows), dkim_aligned=dkim_aligned, result=result,
            disposition=disposition, reason=reason)
        return outcome, evaluation
