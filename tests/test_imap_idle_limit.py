"""IMAP IDLE is not forever: ``[imap] idle_timeout`` (30 minutes by default,
RFC 9051 5.4) ends a session that sent nothing for that long, IDLE or not,
with ``* BYE``; a client that ends its IDLE with DONE and sends a command
before the limit keeps its session (RFC 2177: re-issue IDLE at least every
29 minutes).

The limit is set to three seconds here; the well-behaved client talks every
half second, so a loaded machine has two and a half seconds of slack.
"""

from __future__ import annotations

import time

from twisted.internet import defer

from mailstack.config import IMAPConfig
from tests.imap_support import USER, IMAPTestCase

LIMIT = 3.0


class IdleLimitTests(IMAPTestCase):
    sections = {"imap": {"idle_timeout": LIMIT}}

    def test_default_is_thirty_minutes(self):
        self.assertEqual(IMAPConfig().idle_timeout, 1800.0)

    def idler(self):
        r = self.raw()
        r.login()
        r.cmd(b"s SELECT INBOX")
        r.send(b"i IDLE\r\n")
        assert r.line().startswith(b"+ "), "no IDLE continuation"
        return r

    @defer.inlineCallbacks
    def test_idle_client_gets_bye_and_is_closed(self):
        """A notification pushed during IDLE is the server talking: it does not
        extend the limit."""
        yield self.deliver_many(1)
        r = yield self.blocking(self.idler)
        started = time.monotonic()
        yield self.deliver(subject="while idling")

        def read_until_closed():
            lines = []
            while line := r.line():
                lines.append(line)
            return lines

        lines = yield self.blocking(read_until_closed)
        elapsed = time.monotonic() - started
        self.assertEqual(lines[0], b"* 2 EXISTS\r\n")
        self.assertEqual(lines[-1], b"* BYE Autologout; idle for too long\r\n")
        self.assertEqual([line for line in lines if line.startswith(b"* BYE")], lines[-1:])
        self.assertFalse(any(line.startswith(b"i ") for line in lines), lines)
        self.assertGreaterEqual(elapsed, LIMIT - 0.5)

    @defer.inlineCallbacks
    def test_done_and_noop_before_the_limit_keep_the_session(self):
        def keep_alive():
            r = self.idler()
            started = time.monotonic()
            rounds = 0
            # Longer than the limit, never silent for more than a sixth of it.
            while time.monotonic() - started < 1.5 * LIMIT:
                time.sleep(LIMIT / 6)
                r.send(b"DONE\r\n")
                assert r.until(b"i")[-1] == b"i OK Idle completed\r\n"
                time.sleep(LIMIT / 6)
                assert r.cmd(b"n NOOP")[-1] == b"n OK NOOP completed\r\n"
                r.send(b"i IDLE\r\n")
                assert r.line().startswith(b"+ ")
                rounds += 1
            r.send(b"DONE\r\n")
            done = r.until(b"i")
            lines = done + r.cmd(b"f UID FETCH 1:* (FLAGS)") + r.cmd(b"z LOGOUT")
            return rounds, lines

        rounds, lines = yield self.blocking(keep_alive)
        self.assertGreaterEqual(rounds, 2)
        self.assertFalse(any(line.startswith(b"* BYE Autologout") for line in lines), lines)
        self.assertIn(b"f OK", b"".join(lines))
        self.assertEqual(lines[-1], b"z OK Logout completed\r\n")

    @defer.inlineCallbacks
    def test_limit_counts_from_login_not_from_idle_only(self):
        """A logged-in session that sends nothing at all also gets BYE."""
        def silent():
            r = self.raw()
            r.login(USER)
            started = time.monotonic()
            lines = []
            while True:
                line = r.line()
                if not line:
                    return lines, time.monotonic() - started
                lines.append(line)

        lines, elapsed = yield self.blocking(silent)
        self.assertEqual(lines, [b"* BYE Autologout; idle for too long\r\n"])
        self.assertGreaterEqual(elapsed, LIMIT - 0.2)
