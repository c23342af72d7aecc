"""Every DMARC evaluation, kept for aggregate reports (RFC 7489 7.2).

``<state_dir>/dmarc.sqlite``, table ``evaluations``, one row per message
evaluated. The columns are what an aggregate report's ``<record>`` needs
(RFC 7489 Appendix C): the source IP, the identifiers (header_from,
envelope_from, envelope_to), the published policy (policy_domain, p, sp,
pct, adkim, aspf, rua), the results (spf_*, dkim as JSON, result) and the
policy evaluated (disposition, reason: ``sampled_out`` for pct,
``local_policy`` when enforcement is off). ``time`` is in epoch seconds.

A report generator reads it with ``EvaluationStore.between`` (or any sqlite
client); rows older than ``keep_days`` are removed as new ones arrive.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from mailstack.policy.sqlite import Database

SCHEMA = """
CREATE TABLE IF NOT EXISTS evaluations (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    source_ip TEXT NOT NULL,
    header_from TEXT NOT NULL,
    envelope_from TEXT NOT NULL,
    envelope_to TEXT NOT NULL,
    policy_domain TEXT NOT NULL,
    p TEXT NOT NULL,
    sp TEXT NOT NULL,
    pct INTEGER NOT NULL,
    adkim TEXT NOT NULL,
    aspf TEXT NOT NULL,
    rua TEXT NOT NULL,
    spf_domain TEXT NOT NULL,
    spf_scope TEXT NOT NULL,
    spf_result TEXT NOT NULL,
    spf_aligned INTEGER NOT NULL,
    dkim TEXT NOT NULL,
    dkim_aligned INTEGER NOT NULL,
    result TEXT NOT NULL,
    disposition TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS evaluations_by_domain ON evaluations (policy_domain, time);
"""


@dataclass(frozen=True)
class Evaluation:
    time: float
    source_ip: str
    header_from: str
    envelope_from: str
    envelope_to: str
    policy_domain: str = ""
    p: str = ""
    sp: str = ""
    pct: int = 100
    adkim: str = "r"
    aspf: str = "r"
    rua: str = ""
    spf_domain: str = ""
    spf_scope: str = "mfrom"
    spf_result: str = "none"
    spf_aligned: bool = False
    #: [{"domain", "selector", "result", "aligned"}, ...]
    dkim: tuple = ()
    dkim_aligned: bool = False
    #: pass, fail, none (no policy published).
    result: str = "none"
    #: none, quarantine, reject: what was done.
    disposition: str = "none"
    #: Why the disposition differs from the policy ("sampled_out", "local_policy").
    reason: str = ""


_COLUMNS = tuple(f.name for f in fields(Evaluation))


class EvaluationStore:
    def __init__(self, path: Path, keep_days: float = 31.0):
        self.db = Database(path, SCHEMA)
        self.keep = keep_days * 86400.0
        self._pruned = 0.0

    def add(self, evaluation: Evaluation) -> None:
        """Record one evaluation (blocking)."""
        row = asdict(evaluation)
        row["dkim"] = json.dumps(list(evaluation.dkim), sort_keys=True)
        row["spf_aligned"] = int(evaluation.spf_aligned)
        row["dkim_aligned"] = int(evaluation.dkim_aligned)
        marks = ", ".join("?" for _ in _COLUMNS)
        self.db.execute(f"INSERT INTO evaluations ({', '.join(_COLUMNS)}) VALUES ({marks})",
                        [row[c] for c in _COLUMNS])
        if evaluation.time - self._pruned > 3600:
            self._pruned = evaluation.time
            self.db.execute("DELETE FROM evaluations WHERE time < ?",
                            (evaluation.time - self.keep,))

    def between(self, start: float, end: float, policy_domain: str | None = None) -> list[Evaluation]:
        """Evaluations with ``start <= time < end`` (blocking), oldest first."""
        sql = f"SELECT {', '.join(_COLUMNS)} FROM evaluations WHERE time >= ? AND time < ?"
        params: list = [start, end]
        if policy_domain is not None:
            sql += " AND policy_domain = ?"
            params.append(policy_domain)
        rows = self.db.execute(sql + " ORDER BY time, id", params)
        out = []
        for row in rows:
            values = dict(zip(_COLUMNS, row))
            values["dkim"] = tuple(json.loads(values["dkim"]))
            values["spf_aligned"] = bool(values["spf_aligned"])
            values["dkim_aligned"] = bool(values["dkim_aligned"])
            out.append(Evaluation(**values))
        return out

    def close(self) -> None:
        self.db.close()
