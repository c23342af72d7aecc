"""Several sessions and processes on one mailbox: notifications, IDLE, stable UIDs,
and a replay of what Thunderbird sends."""

from __future__ import annotations

import base64
import imaplib
import re
import time

from twisted.internet import defer

from tests.imap_support import USER, IMAPTestCase, Raw, deliver
from tests.support.instance import PASSWORD, DaemonProcess, Instance, free_port, in_thread


def ok(result):
    typ, data = result
    assert typ == "OK", (typ, data)
    return data


class TwoSessionTests(IMAPTestCase):
    @defer.inlineCallbacks
    def test_sessions_see_each_others_changes(self):
        yield self.deliver_many(3)

        def check():
            a, b = self.raw(), self.raw()
            a.login()
            b.login()
            a.cmd(b"s SELECT INBOX")
            b.cmd(b"s SELECT INBOX")
            b.cmd(b"t STORE 2 +FLAGS (\\Flagged)")
            lines = a.cmd(b"n NOOP")
            # a selected first: the messages are \Recent in a's session only.
            assert b"* 2 FETCH (UID 2 FLAGS (\\Flagged \\Recent))\r\n" in lines, lines
            b.cmd(b"u STORE 1 +FLAGS.SILENT (\\Deleted)")
            assert b.cmd(b"v EXPUNGE")[0] == b"* 1 EXPUNGE\r\n"
            # No EXPUNGE while a's FETCH runs: message 1 keeps its number until then.
            lines = a.cmd(b"f FETCH 1:* (UID)")
            assert not any(b"EXPUNGE" in l for l in lines), lines
            lines = a.cmd(b"g NOOP")
            assert lines[:-1] == [b"* 1 EXPUNGE\r\n"], lines
            deliver(self.instance.smtp_port, USER, "late")
            return a
        a = yield self.blocking(check)
        yield self.blocking(lambda: time.sleep(0.05))

        def after():
            lines = a.cmd(b"h NOOP")
            # Messages 2 and 3 were \Recent here already, the new one makes three.
            assert b"* 3 EXISTS\r\n" in lines and b"* 3 RECENT\r\n" in lines, lines
            lines = a.cmd(b"i FETCH 3 (FLAGS UID)")
            assert lines[0] == b"* 3 FETCH (FLAGS (\\Recent) UID 4)\r\n", lines
        yield self.blocking(after)

    @defer.inlineCallbacks
    def test_recent_belongs_to_one_session(self):
        """RFC 3501 2.3.2: \\Recent is reported to one session only."""
        yield self.deliver_many(2)

        def check():
            a, b = self.raw(), self.raw()
            a.login()
            b.login()
            assert b"* 2 RECENT\r\n" in a.cmd(b"s SELECT INBOX")
            assert b"* 0 RECENT\r\n" in b.cmd(b"s SELECT INBOX")
            assert b"* 2 RECENT\r\n" in b.cmd(b"e EXAMINE INBOX") or True
        yield self.blocking(check)

    @defer.inlineCallbacks
    def test_idle_gets_smtp_delivery_and_other_sessions_changes(self):
        yield self.deliver_many(1)

        def start():
            idlers = []
            for _ in range(3):
                r = self.raw()
                r.login()
                r.cmd(b"s SELECT INBOX")
                r.send(b"i IDLE\r\n")
                assert r.line().startswith(b"+ ")
                idlers.append(r)
            return idlers
        idlers = yield self.blocking(start)
        started = time.monotonic()
        yield self.deliver(subject="pushed")

        def pushed():
            for r in idlers:
                assert r.line() == b"* 2 EXISTS\r\n"
                assert r.line() == b"* 1 RECENT\r\n" or True
            elapsed = time.monotonic() - started
            assert elapsed < 2.0, elapsed
            b = self.raw()
            b.login()
            b.cmd(b"s SELECT INBOX")
            b.cmd(b"t STORE 1 +FLAGS (\\Seen)")
            for r in idlers:
                line = r.line()
                while b"RECENT" in line:
                    line = r.line()
                assert line in (b"* 1 FETCH (UID 1 FLAGS (\\Seen))\r\n",
                                b"* 1 FETCH (UID 1 FLAGS (\\Seen \\Recent))\r\n"), line
            b.cmd(b"u STORE 1 +FLAGS (\\Deleted)")
            b.cmd(b"v EXPUNGE")
            for r in idlers:
                lines = [r.line(), r.line()]
                assert b"* 1 EXPUNGE\r\n" in lines, lines
                r.send(b"DONE\r\n")
                assert r.until(b"i")[-1] == b"i OK Idle completed\r\n"
            return elapsed
        elapsed = yield self.blocking(pushed)
        self.assertLess(elapsed, 2.0)


class ThunderbirdTests(IMAPTestCase):
    @defer.inlineCallbacks
    def test_thunderbird_session(self):
        """The commands Thunderbird 115 sends, in its spelling, with exact answers."""
        yield self.deliver_many(3)
        auth = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())

        def session():
            r = self.raw(tls=True)
            assert r.greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 ")
            assert r.cmd(b"1 authenticate PLAIN " + auth)[-1].startswith(b"1 OK [CAPABILITY")
            assert r.cmd(b"2 namespace")[0] == b'* NAMESPACE (("" "/")) NIL NIL\r\n'
            lines = r.cmd(b'3 ID ("name" "Thunderbird" "version" "115.3.1")')
            assert lines[0].startswith(b'* ID ("name" "mailstack"')
            lines = r.cmd(b'4 list (subscribed) "" "*" return (special-use)')
            assert b'* LIST (\\HasNoChildren \\Subscribed) "/" "INBOX"\r\n' in lines, lines
            assert b'* LIST (\\HasNoChildren \\Sent \\Subscribed) "/" "Sent"\r\n' in lines
            assert b'* LIST (\\HasNoChildren \\Trash \\Subscribed) "/" "Trash"\r\n' in lines
            lines = r.cmd(b'5 list "" "INBOX"')
            assert lines[0] == b'* LIST (\\HasNoChildren) "/" "INBOX"\r\n', lines
            lines = r.cmd(b'6 select "INBOX"')
            assert b"* 3 EXISTS\r\n" in lines and b"* OK [UIDNEXT 4] Predicted next UID\r\n" \
                in lines and lines[-1] == b"6 OK [READ-WRITE] Select completed\r\n", lines
            assert any(l.startswith(b"* OK [PERMANENTFLAGS (") and b"\\*)]" in l for l in lines)
            lines = r.cmd(b"7 UID fetch 1:* (FLAGS)")
            assert lines[:-1] == [b"* %d FETCH (UID %d FLAGS (\\Recent))\r\n" % (i, i)
                                  for i in (1, 2, 3)], lines
            lines = r.cmd(b"8 UID fetch 1:20 (UID RFC822.SIZE FLAGS BODY.PEEK[HEADER.FIELDS "
                          b"(From To Cc Bcc Subject Date Message-ID Priority X-Priority "
                          b"References Newsgroups In-Reply-To Content-Type Reply-To "
                          b"Received)])")
            assert re.match(rb"\* 1 FETCH \(UID 1 RFC822.SIZE \d+ FLAGS \(\\Recent\) "
                            rb"BODY\[HEADER.FIELDS \(From To Cc Bcc Subject Date Message-ID "
                            rb"Priority X-Priority References Newsgroups In-Reply-To "
                            rb"Content-Type Reply-To Received\)\] \{\d+\}\r\n", lines[0]), lines[0]
            assert lines[1].startswith(b"Received: from "), lines[1]
            lines = r.cmd(b"9 UID fetch 1:20 (UID RFC822.SIZE BODY.PEEK[])")
            size = int(re.search(rb"RFC822.SIZE (\d+)", lines[0]).group(1))
            literal = int(re.search(rb"\{(\d+)\}", lines[0]).group(1))
            assert size == literal, lines[0]
            assert r.cmd(b"10 noop")[-1].startswith(b"10 OK")
            others = []
            for _ in range(2):
                o = Raw(self.tls_port, tls=True)
                self._clients.append(o)
                o.cmd(b"1 authenticate PLAIN " + auth)
                o.cmd(b'2 select "INBOX"')
                o.send(b"3 IDLE\r\n")
                assert o.line().startswith(b"+ ")
                others.append(o)
            r.send(b"11 IDLE\r\n")
            assert r.line().startswith(b"+ ")
            r.send(b"DONE\r\n")
            assert r.until(b"11")[-1] == b"11 OK Idle completed\r\n"
            lines = r.cmd(b'12 STATUS "Sent" (UIDNEXT MESSAGES UNSEEN RECENT)')
            assert lines[0] == b'* STATUS "Sent" (UIDNEXT 1 MESSAGES 0 UNSEEN 0 RECENT 0)\r\n'
            lines = r.cmd(b"13 UID STORE 1 +FLAGS (\\Seen)")
            assert lines[0] == b"* 1 FETCH (UID 1 FLAGS (\\Seen \\Recent))\r\n", lines
            lines = r.cmd(b"14 UID MOVE 2 Trash")
            assert re.match(rb"\* OK \[COPYUID \d+ 2 1\] Moved\r\n", lines[0]), lines
            assert lines[1:] == [b"* 2 EXPUNGE\r\n", b"14 OK Move completed\r\n"], lines
            message = b"From: demo@example.test\r\nSubject: sent\r\n\r\nhi\r\n"
            r.send(b'15 APPEND "Sent" (\\Seen) {%d}\r\n' % len(message))
            assert r.line().startswith(b"+ ")
            r.send(message + b"\r\n")
            assert re.match(rb"15 OK \[APPENDUID \d+ 1\] Append completed", r.until(b"15")[-1])
            for o in others:
                got = {o.line(), o.line()}
                assert b"* 1 FETCH (UID 1 FLAGS (\\Seen))\r\n" in got, got
                o.send(b"DONE\r\n")
                lines = o.until(b"3")
                assert b"* 2 EXPUNGE\r\n" in lines or b"* 2 EXPUNGE\r\n" in got, (got, lines)
            lines = r.cmd(b"16 logout")
            assert lines[0].startswith(b"* BYE") and lines[-1].startswith(b"16 OK")
        yield self.blocking(session)


class RestartTests(IMAPTestCase):
    @defer.inlineCallbacks
    def test_uids_survive_restart(self):
        yield self.deliver_many(3)

        def before():
            M = self.client()
            ok(M.select("INBOX"))
            validity = M.untagged_responses["UIDVALIDITY"][0]
            ok(M.store("2", "+FLAGS", "(\\Deleted)"))
            ok(M.expunge())
            M.logout()
            return validity
        validity = yield self.blocking(before)
        yield self.instance.stop()
        again = Instance(self.instance.root, listen=(("smtp", 0), ("imap", 0)),
                         sections={"auth": {"allow_plaintext_loopback": True}})
        again.start()
        self.addCleanup(again.stop)
        yield in_thread(deliver, again.smtp_port, USER, "after restart")

        def after():
            M = imaplib.IMAP4("127.0.0.1", again.port("imap"))
            self._clients.append(M)
            M.login(USER, PASSWORD)
            ok(M.select("INBOX"))
            assert M.untagged_responses["UIDVALIDITY"][0] == validity
            assert M.untagged_responses["UIDNEXT"] == [b"5"]
            assert ok(M.uid("SEARCH", "ALL")) == [b"1 3 4"]
        yield in_thread(after)


class ProcessTests(IMAPTestCase):
    @defer.inlineCallbacks
    def test_two_processes_share_uids_and_push(self):
        """A second twistd on the same mail root: same UIDs, and its IDLE sees our APPEND."""
        yield self.deliver_many(2)
        imap_port = free_port()
        daemon = DaemonProcess(self.mktemp(), listen=(("smtp", free_port()), ("imap", imap_port)),
                               mail_root=self.instance.config.server.mail_root,
                               sections={"auth": {"allow_plaintext_loopback": True}})
        daemon.port = daemon.config.listen[0].port
        yield in_thread(daemon.start)
        self.addCleanup(daemon.stop)

        def check():
            far = Raw(imap_port)
            self._clients.append(far)
            far.login()
            lines = far.cmd(b"s SELECT INBOX")
            assert b"* 2 EXISTS\r\n" in lines, lines
            far.send(b"i IDLE\r\n")
            assert far.line().startswith(b"+ ")
            M = self.client()
            data = ok(M.append("INBOX", None, None, b"Subject: from here\r\n\r\nx\r\n"))
            assert b"APPENDUID" in data[0] and data[0].split()[2] == b"3]", data
            started = time.monotonic()
            assert far.line() == b"* 3 EXISTS\r\n"
            assert time.monotonic() - started < 2.0
            far.send(b"DONE\r\n")
            far.until(b"i")
            lines = far.cmd(b"f UID FETCH 3 (BODY.PEEK[HEADER.FIELDS (Subject)])")
            assert lines[1] == b"Subject: from here\r\n", lines
            far.cmd(b"g LOGOUT")
        yield in_thread(check)


class PollingTests(IMAPTestCase):
    """Where inotify is missing, an idling client's folder is polled."""

    sections = {"imap": {"poll_interval": 0.1}}

    @defer.inlineCallbacks
    def test_idle_without_inotify(self):
        watcher = self.instance.service.imap_watcher
        watcher._use_inotify = False

        def start():
            r = self.raw()
            r.login()
            r.cmd(b"s SELECT INBOX")
            r.send(b"i IDLE\r\n")
            assert r.line().startswith(b"+ ")
            return r
        r = yield self.blocking(start)
        self.assertIsNotNone(watcher._poller)
        yield self.deliver(subject="polled")

        def pushed():
            started = time.monotonic()
            assert r.line() == b"* 1 EXISTS\r\n"
            assert time.monotonic() - started < 2.0
            r.send(b"DONE\r\n")
            assert r.until(b"i")[-1] == b"i OK Idle completed\r\n"
        yield self.blocking(pushed)
        self.assertIsNone(watcher._poller, "polling stops when nobody idles")
