"""ARC (RFC 8617) verification at the end of data, with dkimpy.

The chain of ARC sets a message arrived with is validated and its result
recorded as ``arc=pass``, ``arc=fail`` or ``arc=none`` (RFC 8617 4.4), with
the reason for a fail. The result is information for the reader and for
later hops; it does not override DMARC here.

More than ``max_sets`` sets (RFC 8617 4.2.1 caps the instance at 50) is a
fail without any lookup, so a message cannot make us do unbounded DNS work.
A key lookup that timed out answers ``451 4.4.3`` unless the chain
validated anyway (DESIGN invariant 6).
"""

from __future__ import annotations

from dataclasses import dataclass

import dkim
from authres.arc import ARCAuthenticationResult
from twisted.internet.defer import Deferred

from mailstack.policy.dkim import _KeyLookup
from mailstack.policy.interface import (
    Checker, Connection, Environment, Message, Transaction, proceed, temperror)
from mailstack.policy.message import comment


@dataclass(frozen=True)
class ARCOutcome:
    #: pass, fail or none.
    result: str
    reason: str = ""
    temporary: bool = False
    sets: int = 0


def verify_chain(data: bytes, resolver, max_sets: int = 50, budget: float = 20.0) -> ARCOutcome:
    """Validate the ARC chain of ``data`` (blocking: run it in the pool)."""
    try:
        arc = dkim.ARC(data, timeout=resolver.timeout)
    except Exception:
        return ARCOutcome("fail", "malformed message header")
    seals = sum(1 for k, _ in arc.headers if k.lower() == b"arc-seal")
    if not seals:
        return ARCOutcome("none")
    if seals > max_sets:
        return ARCOutcome("fail", f"more than {max_sets} ARC sets", sets=seals)
    lookup = _KeyLookup(resolver, budget)
    temporary = False

    def dnsfunc(name, timeout=5):
        nonlocal temporary
        try:
            return lookup(name, timeout)
        except dkim.DnsTimeoutError:
            temporary = True
            raise

    try:
        cv, _, reason = arc.verify(dnsfunc=dnsfunc)
    except Exception as e:
        return ARCOutcome("fail", f"malformed ARC set ({type(e).__name__})", temporary, seals)
    if cv == dkim.CV_Pass:
        return ARCOutcome("pass", sets=seals)
    if cv == dkim.CV_None:
        return ARCOutcome("none", sets=seals)
    return ARCOutcome("fail", comment(str(reason), 80), temporary, seals)


class ARCChecker(Checker):
    name = "arc"
    stages = frozenset({"data"})

    def __init__(self, settings, env: Environment):
        self.settings = settings
        self.env = env

    def end_of_data(self, conn: Connection, txn: Transaction, message: Message) -> Deferred:
        d = self.env.run_blocking(verify_chain, message.data, self.env.resolver,
                                  self.settings.max_sets, self.settings.time_budget)
        return d.addCallback(self._verdict, txn)

    def _verdict(self, outcome: ARCOutcome, txn: Transaction):
        txn.state["arc"] = outcome
        clause = ARCAuthenticationResult(result=outcome.result,
                                         result_comment=outcome.reason or None)
        if outcome.temporary and outcome.result != "pass":
            return temperror("ARC key lookup failed temporarily (DNS), try again later",
                             results=[clause])
        return proceed(results=[clause])
