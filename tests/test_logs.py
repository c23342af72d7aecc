"""The log file's lines are Twisted's classic lines (mailstack.logs).

``LineObserver`` and ``format_text`` take shortcuts for speed; these tests
compare them with Twisted's own formatting of the same events, so log
tooling (the README's fail2ban filter among it) sees no difference.
"""

from __future__ import annotations

import io
import os
import signal
import threading
import time

from twisted.internet import defer, reactor, task
from twisted.logger import LogLevel, formatEventAsClassicLogText
from twisted.python.failure import Failure
from twisted.trial import unittest

from mailstack.logs import LineObserver, format_text, observer_for_twistd


class Thing:
    name = "thing"

    def __repr__(self) -> str:
        return "<Thing>"

    def describe(self) -> str:
        return "described"


def event(fmt, **fields) -> dict:
    return {"log_format": fmt, "log_time": 1_795_456_469.25, "log_namespace": "mailstack.smtpd",
            "log_level": LogLevel.info, **fields}


def failing() -> Failure:
    try:
        1 / 0
    except ZeroDivisionError:
        return Failure()


EVENTS = [
    event("{id}: client=[{ip}]:{port}, from=<{sender}>, size={size}", id="6B0481236920C",
          ip="127.0.0.1", port=4711, sender="a@b.example", size=10315),
    event("braces {{kept}} and {value!r} and {n:05d}", value=b"\x00bytes", n=42),
    event("attribute {thing.name} and index {items[1]}", thing=Thing(), items=["a", "b"]),
    event("a call {thing.describe()}", thing=Thing()),
    event("missing {nothere}"),
    event("two\nlines {x}", x="and\nmore"),
    event("failed {what}", what="delivery", log_failure=failing()),
    event("{log_text}", log_text="legacy text", log_system="-"),
    {"log_format": "no time or level"},
    {"log_namespace": "x", "log_time": 1.0},  # no format: nothing is written
]


class FormatTests(unittest.TestCase):
    def test_lines_are_twisteds_lines(self):
        for e in EVENTS:
            out = io.StringIO()
            LineObserver(out)(dict(e))
            expected = formatEventAsClassicLogText(dict(e)) or ""
            self.assertEqual(out.getvalue(), expected, e.get("log_format"))

    def test_fast_path_text_equals_twisteds(self):
        e = EVENTS[0]
        self.assertEqual(format_text(e), "6B0481236920C: client=[127.0.0.1]:4711, "
                                         "from=<a@b.example>, size=10315")

    def test_timestamp_follows_the_second(self):
        out = io.StringIO()
        observer = LineObserver(out)
        now = time.time()
        for when in (now, now + 0.5, now + 1.5, now + 3600):
            observer(event("tick", log_time=when))
        lines = out.getvalue().splitlines()
        expected = [formatEventAsClassicLogText(event("tick", log_time=w)).rstrip("\n")
                    for w in (now, now + 0.5, now + 1.5, now + 3600)]
        self.assertEqual(lines, expected)


class Writes(io.StringIO):
    """An output that counts its writes."""

    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def turn():
    """A Deferred that fires on the reactor's next turn."""
    return task.deferLater(reactor, 0, lambda: None)


class BatchTests(unittest.TestCase):
    """With the running reactor, one turn's lines are written in one write."""

    @defer.inlineCallbacks
    def test_one_write_per_reactor_turn(self):
        yield turn()  # trial starts a test before its reactor runs
        out = Writes()
        observer = LineObserver(out, reactor)
        for n in range(3):
            observer(event("line {n}", n=n))
        self.assertEqual(out.getvalue(), "", "held until the turn ends")
        yield turn()
        self.assertEqual(out.writes, 1)
        self.assertEqual(out.getvalue().splitlines(),
                         [formatEventAsClassicLogText(event("line {n}", n=n)).rstrip("\n")
                          for n in range(3)])

    @defer.inlineCallbacks
    def test_other_threads_write_at_once_and_flush_writes_what_waits(self):
        yield turn()
        out = Writes()
        observer = LineObserver(out, reactor)
        observer(event("held"))
        thread = threading.Thread(target=observer, args=(event("from a thread"),))
        thread.start()
        thread.join()
        self.assertTrue(out.getvalue().endswith("from a thread\n"), out.getvalue())
        self.assertNotIn("held", out.getvalue())
        observer.flush()
        self.assertTrue(out.getvalue().endswith("held\n"), out.getvalue())

    @defer.inlineCallbacks
    def test_reopen_writes_held_lines_to_the_old_file_first(self):
        yield turn()
        path = self.mktemp()
        observer = observer_for_twistd({"logfile": path}, reactor)
        self.addCleanup(lambda: observer.out.close())
        observer(event("before rotation"))
        moved = path + ".1"
        os.rename(path, moved)
        observer.reopen()
        observer(event("after rotation"))
        observer.flush()
        with open(moved) as f:
            self.assertIn("before rotation", f.read())
        with open(path) as f:
            self.assertEqual(f.read().count("\n"), 1)


class DestinationTests(unittest.TestCase):
    def test_logfile_option(self):
        previous = signal.getsignal(signal.SIGUSR1)
        self.addCleanup(signal.signal, signal.SIGUSR1, previous)
        path = self.mktemp()
        observer = observer_for_twistd({"logfile": path, "nodaemon": True})
        observer(event("to the file {n}", n=1))
        observer.out.close()
        with open(path) as f:
            self.assertIn("[mailstack.smtpd#info] to the file 1\n", f.read())

    def test_syslog_and_custom_loggers_stay_twisteds(self):
        self.assertIsNone(observer_for_twistd({"syslog": True}))
        self.assertIsNone(observer_for_twistd({"logger": "my.observer"}))
        self.assertIsNone(observer_for_twistd(None))
