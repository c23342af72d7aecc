"""A small sqlite3 database for policy state (greylisting, DMARC evaluations).

One connection per database, used from the pool threads under a lock
(sqlite3 connections are not to be used by two threads at once). WAL mode
and ``synchronous=NORMAL``: a crash may lose the last moments of state,
never corrupt the file; greylisting and report data tolerate that, and a
restart keeps everything else (the state is on disk, not in memory).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from pathlib import Path


class Database:
    def __init__(self, path: Path, schema: str):
        self.path = Path(path)
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, timeout=10.0,
                                     isolation_level=None)
        os.chmod(self.path, 0o600)
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.executescript(schema)

    def execute(self, sql: str, params=()) -> list[tuple]:
        """Run one statement (blocking) and return its rows."""
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def transaction(self, work):
        """Run ``work(connection)`` in one transaction (blocking); returns its result."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                result = work(self._conn)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            return result

    def close(self) -> None:
        with self._lock:
            self._conn.close()
