"""The log file: Twisted's classic line format, written at mail-server rates.

A busy MX writes five lines per message (connect, transaction, delivery,
removal, disconnect). Twisted's text observer formats every event with
``string.Formatter`` in Python and builds a timezone-aware datetime for every
timestamp, which took a quarter of the reactor thread's time per message.
``format_text`` formats with ``str.format_map`` (in C) whenever the format
allows, and ``LineObserver`` formats the timestamp once per second. The lines
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
    with a tab, as Twisted does) and flushes it."""

    def __init__(self, out):
        self.out = out
        self._second: int | None = None
        self._stamp = ""

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
        self.out.write(line.replace("\n", "\n\t") + "\n")
        self.out.flush()


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


def observer_for_twistd(options) -> LineObserver | None:
    """A ``LineObserver`` writing where twistd would, from twistd's options
    (the parent of the plugin's options); None to leave the choice to twistd."""
    if options is None or options.get("syslog") or options.get("logger"):
        return None
    name = options.get("logfile")
    if name == "-" or (options.get("nodaemon") and not name):
        return LineObserver(sys.stdout)
    return LineObserver(AppendFile(os.path.abspath(name or "twistd.log")))
