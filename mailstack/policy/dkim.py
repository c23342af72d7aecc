"""DKIM verification (RFC 6376) at the end of data, with dkimpy.

Every DKIM-Signature is verified, up to ``max_signatures`` (SECURITY-TESTS
DKIM-9), each with its own result for Authentication-Results (RFC 8601
2.7.1: ``header.d``, ``header.s``, ``header.a``) and for DMARC:

* ``pass``: the signature verifies, with an acceptable key and algorithm;
* ``fail``: the body hash or the signature does not verify (a message
  changed after signing);
* ``permerror``: no key (NXDOMAIN), a revoked key (empty ``p=``, RFC 6376
  3.6.1), an RSA key under ``min_rsa_bits`` (RFC 8301 3.2, DKIM-4), a key
  whose ``k=`` or ``h=`` does not fit the signature (DKIM-7), a malformed or
  expired signature, ``h=`` without From (RFC 6376 5.4, DKIM-3);
* ``temperror``: the key lookup timed out or got SERVFAIL (DKIM-10);
* ``policy``: verified, but not acceptable here: ``a=rsa-sha1`` (RFC 8301
  3.1, DKIM-5), or an ``l=`` that leaves part of the body unsigned (content
  appended after signing is not authenticated; RFC 6376 8.2, DKIM-1);
* ``neutral``: the key is in testing mode (``t=y``, RFC 6376 3.6.1: treat as
  unsigned).

Only ``pass`` counts for DMARC. A temperror with no passing signature
answers ``451 4.4.3``: never a pass, never a permanent failure (DESIGN
invariant 6).

dkimpy turns a DNS timeout into a plain "does not verify"; the key lookups
therefore go through ``_KeyLookup``, which records what DNS said so the
result can be told apart.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import dkim
from authres import DKIMAuthenticationResult
from dkim.canonicalization import CanonicalizationPolicy
from dkim.util import parse_tag_value
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mailstack.policy.interface import (
    Checker, Connection, Environment, Message, Transaction, proceed, temperror)
from mailstack.policy.message import comment

log = Logger(namespace="mailstack.policy.dkim")

_ALGORITHMS = {b"rsa-sha256": b"rsa", b"ed25519-sha256": b"ed25519", b"rsa-sha1": b"rsa"}


@dataclass(frozen=True)
class SignatureResult:
    #: pass, fail, permerror, temperror, policy, neutral.
    result: str
    #: The signing domain (d=), selector (s=) and algorithm (a=), lower case.
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    #: Why, when not pass.
    reason: str = ""

    def clause(self) -> DKIMAuthenticationResult:
        clause = DKIMAuthenticationResult(result=self.result,
                                          result_comment=self.reason or None)
        # Set one by one: the properties print in the order they are set.
        for name in ("header_d", "header_s", "header_a"):
            value = getattr(self, {"header_d": "domain", "header_s": "selector",
                                   "header_a": "algorithm"}[name])
            if value:
                setattr(clause, name, value)
        return clause


class _KeyLookup:
    """dkimpy's ``dnsfunc``, remembering what the lookup found.

    All lookups for one message share a deadline (SECURITY-TESTS DNS-1): past
    it, a lookup fails at once as temporary, so a message with many
    signatures on slow names cannot hold a pool thread for long.
    """

    def __init__(self, resolver, budget: float = 20.0):
        self.resolver = resolver
        self.deadline = time.monotonic() + budget
        self.reset()

    def reset(self) -> None:
        #: ok, temporary, missing; and the record.
        self.status = ""
        self.record: bytes | None = None

    def __call__(self, name, timeout=5):
        left = self.deadline - time.monotonic()
        try:
            if left <= 0:
                raise dkim.DnsTimeoutError("the message's DNS time budget is spent")
            record = self.resolver.dkim_txt(name, left)
        except dkim.DnsTimeoutError:
            self.status = "temporary"
            raise
        self.status = "ok" if record is not None else "missing"
        self.record = record
        return record


def _key_problem(record: bytes, algorithm: bytes, min_bits: int) -> tuple[str, str] | None:
    """(result, reason) when the key record makes the signature unusable."""
    try:
        tags = parse_tag_value(record)
    except Exception:
        return "permerror", "malformed key record"
    if tags.get(b"v", b"DKIM1") != b"DKIM1":
        return "permerror", "malformed key record"
    if not tags.get(b"p", b"").strip():
        return "permerror", "key revoked"
    wanted = _ALGORITHMS.get(algorithm, b"")
    if tags.get(b"k", b"rsa") != wanted:
        return "permerror", "key type does not match a="
    hashes = tags.get(b"h")
    if hashes is not None and algorithm.split(b"-")[-1] not in [
            h.strip() for h in hashes.split(b":")]:
        return "permerror", "key does not allow this hash"
    try:
        _, bits, _, _ = dkim.evaluate_pk(b"key", record)
    except Exception:
        return "permerror", "unusable key"
    if wanted == b"rsa" and bits < min_bits:
        return "permerror", f"key too small: {bits} bits"
    return None


def verify_message(data: bytes, resolver, max_signatures: int = 5,
                   min_rsa_bits: int = 1024, budget: float = 20.0) -> list[SignatureResult]:
    """Verify each DKIM signature of ``data`` (blocking: run it in the pool)."""
    try:
        verifier = dkim.DKIM(data, minkey=min_rsa_bits, timeout=resolver.timeout)
    except Exception:
        # dkimpy refuses a header section it cannot parse; so do we.
        return [SignatureResult("permerror", reason="malformed message header")]
    signatures = [v for k, v in verifier.headers if k.lower() == b"dkim-signature"]
    lookup = _KeyLookup(resolver, budget)
    results = []
    for index, value in enumerate(signatures[:max_signatures]):
        results.append(_verify_one(verifier, index, value, lookup, min_rsa_bits))
    if len(signatures) > max_signatures:
        log.info("DKIM: {n} signatures, only the first {max} verified", n=len(signatures),
                 max=max_signatures)
    return results


def _text(value: bytes | None) -> str:
    if not value:
        return ""
    text = re.sub(rb"\s+", b"", value).decode("ascii", "replace").lower()
    return text if re.fullmatch(r"[a-z0-9._\-]{1,253}", text) else ""


def _verify_one(verifier, index: int, value: bytes, lookup: _KeyLookup,
                min_bits: int) -> SignatureResult:
    try:
        tags = parse_tag_value(value)
    except Exception:
        return SignatureResult("permerror", reason="malformed signature")
    algorithm = re.sub(rb"\s+", b"", tags.get(b"a", b"")).lower()
    base = dict(domain=_text(tags.get(b"d")), selector=_text(tags.get(b"s")),
                algorithm=_text(algorithm))

    def result(name: str, reason: str = "") -> SignatureResult:
        return SignatureResult(name, reason=reason, **base)

    signed = [h.strip().lower() for h in re.sub(rb"\s+", b"", tags.get(b"h", b"")).split(b":")]
    if b"from" not in signed:
        return result("permerror", "From is not signed")
    if algorithm not in _ALGORITHMS:
        return result("permerror", "unknown algorithm")
    lookup.reset()
    error = None
    try:
        verified = verifier.verify(index, dnsfunc=lookup)
    except Exception as e:
        verified, error = False, e
    # What DNS said comes first: dkimpy reports a timeout as "does not verify"
    # and checks the key size only after a good signature.
    if lookup.status == "temporary":
        return result("temperror", "key lookup failed temporarily")
    if lookup.status == "missing":
        return result("permerror", "no key")
    if lookup.record is not None:
        problem = _key_problem(lookup.record, algorithm, min_bits)
        if problem is not None:
            return result(*problem)
    if isinstance(error, dkim.ValidationError) and "body hash mismatch" in str(error):
        return result("fail", "body hash did not verify")
    if isinstance(error, dkim.DKIMException):
        # dkimpy formats tag values as Python bytes ("x= value is past (b'1')").
        text = re.sub(r"""\bb'([^']*)'""", r"\1", str(error))
        return result("permerror", comment(text, 80) or "bad signature")
    if error is not None:
        return result("permerror", f"bad signature ({type(error).__name__})")
    if not verified:
        return result("fail", "signature did not verify")
    key_tags = parse_tag_value(lookup.record)
    if b"y" in [f.strip() for f in key_tags.get(b"t", b"").split(b":")]:
        return result("neutral", "key in testing mode")
    if algorithm == b"rsa-sha1":
        return result("policy", "rsa-sha1 is not accepted")
    if b"l" in tags:
        canon = CanonicalizationPolicy.from_c_value(tags.get(b"c", b"simple/simple"))
        body = len(canon.canonicalize_body(verifier.body))
        if int(tags[b"l"]) < body:
            return result("policy", f"l= leaves {body - int(tags[b'l'])} body octets unsigned")
    return result("pass")


class DKIMChecker(Checker):
    name = "dkim"
    stages = frozenset({"data"})

    def __init__(self, settings, env: Environment):
        self.settings = settings
        self.env = env

    def end_of_data(self, conn: Connection, txn: Transaction, message: Message) -> Deferred:
        d = self.env.run_blocking(verify_message, message.data, self.env.resolver,
                                  self.settings.max_signatures, self.settings.min_rsa_bits,
                                  self.settings.time_budget)
        return d.addCallback(self._verdict, txn)

    def _verdict(self, results: list[SignatureResult], txn: Transaction):
        txn.state["dkim"] = results
        clauses = [r.clause() for r in results] or [DKIMAuthenticationResult(result="none")]
        if any(r.result == "temperror" for r in results) and \
                not any(r.result == "pass" for r in results):
            return temperror("DKIM key lookup failed temporarily (DNS), try again later",
                             results=clauses)
        return proceed(results=clauses)
