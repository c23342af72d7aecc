"""The log file: Twisted's classic line format, written at mail-server rates.

A busy MX writes five lines per message (connect, transaction, delivery,
removal, disconnect). Twisted's text observer formats every event with
``string.Formatter`` in Python and builds a timezone-aware datetime for every
timestamp, which took a quarter of the reactor thread's time per message.
``format_text`` formats with ``str.format_map`` (in C) whenever the format
allows, and ``LineObserver`` formats the timestamp once per second and
writes the lines of a reactor turn in one write. The lines
are the ones ``twistd --logfile`` writes (``2026-11-23T18:00:03+0000
[mailstack.smtpd#info] ...``), so the README's fail2ban filter and any
existing log tooling keep working.

``observer_for_twistd`` makes the observer for the destination twistd's own
options name (``--logfile``, or stdout with ``--nodaemon``); with
``--syslog`` or ``--logger`` twistd's choice stands. A log file is opened
for appending (``AppendFile``) rather than through Twisted's ``LogFile``,
because SMTP workers (mailstack.workers) append to the same file, and it is
not rotated by size: logrotate moves it and sends SIGUSR1 (see the README).
"""

from __future__ import annotations

import os
import sys

from twisted.logger import ILogObserver, eventAsText, formatTime
from twisted.python.threadable import isInIOThread
from zope.interface import implementer


def format_text(event: dict) -> str:
    """The event's message and any traceback, as Twisted would format it."""
    fmt = event.get("log_format")
    if type(fmt) is str and "log_failure" not in event and "()" not in fmt:
        try:
            return fmt.format_map(event)
        except Exception:
            pass  # attribute paths or conversions str.format does not know
    return eventAsText(event, includeTraceback=True, includeTimestamp=False,
                       includeSystem=False)


def system_of(event: dict) -> str:
    """``namespace#level``, or the event's own ``log_system`` (as Twisted)."""
    system = event.get("log_system")
    if system is not None:
        return str(system)
    level = event.get("log_level")
    return f"{event.get('log_namespace', '-')}#{level.name if level is not None else '-'}"


@implementer(ILogObserver)
class LineObserver:
    """Writes each event as one classic log line (continuation lines indented
    with a tab, as Twisted does).

    Given the ``reactor``, the lines logged on its thread while it runs are
    written together at the start of its next turn, in one write: a busy
    server logs several lines per turn, and a write and flush for each took
    7% of the reactor thread. A ``kill -9`` loses at most that one turn's
    lines. Other threads' lines, and every line before the reactor runs or
    once it has stopped, are written at once; ``flush`` writes what waits.
    """

    def __init__(self, out, reactor=None):
        self.out = out
        self._reactor = reactor
        self._pending: list[str] = []
        self._second: int | None = None
        self._stamp = ""
        if reactor is not None:
            reactor.addSystemEventTrigger("after", "shutdown", self.flush)

    def _time(self, when: float | None) -> str:
        if when is None:
            return "-"
        second = int(when)
        if second != self._second:
            self._second, self._stamp = second, formatTime(second)
        return self._stamp

    def __call__(self, event: dict) -> None:
        text = format_text(event)
        if not text:
            return
        line = f"{self._time(event.get('log_time'))} [{system_of(event)}] {text}"
        line = line.replace("\n", "\n\t") + "\n"
        if not isInIOThread():
            self._write(line)
        elif self._reactor is not None and self._reactor.running:
            if not self._pending:
                self._reactor.callLater(0, self.flush)
            self._pending.append(line)
        else:
            self.flush()
            self._write(line)

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def flush(self) -> None:
        """Write the lines held for the end of this reactor turn (its thread only)."""
        if self._pending:
            text, self._pending = "".join(self._pending), []
            self._write(text)

    def reopen(self) -> None:
        """After logrotate moved the file: what was logged before goes to the
        old one, what follows to the new one."""
        self.flush()
        if hasattr(self.out, "reopen"):
            self.out.reopen()


class AppendFile:
    """A log file opened for appending (O_APPEND), by path.

    Several processes (the main one and its SMTP workers) write to it at
    once; with O_APPEND each line, written in one ``write``, lands whole at
    the end whoever wrote before. ``reopen`` follows a logrotate rename.
    """

    def __init__(self, path: str):
        self.path = path
        self._file = self._open()

    def _open(self):
        return open(self.path, "a", encoding="utf-8", errors="replace")

    def write(self, text: str) -> None:
        self._file.write(text)

    def flush(self) -> None:
        self._file.flush()

    def reopen(self) -> None:
        old, self._file = self._file, self._open()
        old.close()

    def close(self) -> None:
        self._file.close()


def observer_for_twistd(options, reactor=None) -> LineObserver | None:
    """A ``LineObserver`` writing where twistd would, from twistd's options
    (the parent of the plugin's options); None to leave the choice to twistd."""
    if options is None or options.get("syslog") or options.get("logger"):
        return None
    name = options.get("logfile")
    if name == "-" or (options.get("nodaemon") and not name):
        return LineObserver(sys.stdout, reactor)
    return LineObserver(AppendFile(os.path.abspath(name or "twistd.log")), reactor)
