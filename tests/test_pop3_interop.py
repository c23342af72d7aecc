"""POP3 with real mail programs from Debian: fetchmail and curl.

They run as subprocesses (in a thread, so the in-process server keeps
serving) against the same instances as ``test_pop3``. ``make test`` installs
them (the ``test-deps`` target); a missing program fails the test rather
than skipping it, so a CI run cannot pass without the interop checks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from twisted.internet import defer
from twisted.trial import unittest

from tests.support.instance import PASSWORD, Instance, in_thread
from tests.test_pop3 import ALICE, crlf, files, message, put, start

#: fetchmail's exit codes (fetchmail(1) "EXIT CODES").
FETCHED, NO_MAIL = 0, 1


def program(test: unittest.TestCase, name: str) -> str:
    path = shutil.which(name)
    if path is None:
        test.fail(f"{name} is not installed; `make test-deps` installs it")
    return path


class FetchmailTests(unittest.TestCase):
    """fetchmail, the classic "download and deliver" client, in keep and no-keep mode."""

    timeout = 90

    def setUp(self):
        self.fetchmail = program(self, "fetchmail")
        self.home = Path(self.mktemp()).absolute()
        self.home.mkdir()
        self.out = self.home / "delivered"
        self.ids = self.home / "fetchids"

    def fetch(self, instance: Instance, *options: str, protocol: str = "pop3"):
        """One fetchmail poll; returns (exit code, transcript). Messages go to ``self.out``."""
        rc = self.home / "fetchmailrc"
        rc.write_text(
            "set no syslog\n"
            f"poll 127.0.0.1 with proto POP3 port {instance.port(protocol)}\n"
            f'  user "{ALICE}" there with password "{PASSWORD}" is "nobody" here\n')
        rc.chmod(0o600)
        args = [self.fetchmail, "-f", str(rc), "--nodetach", "--verbose",
                "--pidfile", str(self.home / "pid"), "--idfile", str(self.ids),
                "--mda", f"cat >> {self.out}", *options]

        def run():
            done = subprocess.run(args, cwd=self.home, env={**os.environ, "HOME": str(self.home)},
                                  capture_output=True, timeout=60)
            return done.returncode, (done.stdout + done.stderr).decode("utf-8", "replace")

        return in_thread(run)

    def delivered(self) -> bytes:
        return self.out.read_bytes() if self.out.exists() else b""

    @defer.inlineCallbacks
    def test_keep_downloads_each_message_once(self):
        """Leave-on-server with UIDL: nothing twice, across a restart and a flag change."""
        root = Path(self.mktemp())
        instance = start(self, root)
        paths = [put(instance, ALICE, message(n) + b".dot line\n") for n in range(3)]
        before = files(instance, ALICE)

        code, log = yield self.fetch(instance, "--keep", "--uidl", "--sslproto", "")
        self.assertEqual(code, FETCHED, log)
        out = self.delivered()
        for n in range(3):
            self.assertEqual(out.count(b"Subject: message %d\n" % n), 1, out)
        self.assertEqual(out.count(b"\n.dot line\n"), 3)
        self.assertEqual(files(instance, ALICE), before)  # fetchmail --keep peeks with TOP

        # Another mail program sets flags (IMAP), then the server restarts.
        cur = paths[0].parent.parent / "cur"
        paths[0].rename(cur / (paths[0].name + ":2,FS"))
        yield instance.stop()
        instance = start(self, root)
        code, log = yield self.fetch(instance, "--keep", "--uidl", "--sslproto", "")
        self.assertEqual(code, NO_MAIL, log)
        self.assertEqual(self.delivered(), out)

        put(instance, ALICE, message(9))
        code, log = yield self.fetch(instance, "--keep", "--uidl", "--sslproto", "")
        self.assertEqual(code, FETCHED, log)
        new = self.delivered()[len(out):]
        self.assertEqual(new.count(b"Subject: "), 1)
        self.assertIn(b"Subject: message 9\n", new)

    @defer.inlineCallbacks
    def test_no_keep_over_stls_empties_the_maildrop(self):
        instance = start(self, plaintext=False)
        for n in range(3):
            put(instance, ALICE, message(n))
        code, log = yield self.fetch(instance, "--nokeep", "--sslproto", "tls1.2+",
                                     "--nosslcertck")
        self.assertEqual(code, FETCHED, log)
        self.assertIn("upgrade to TLS succeeded", log)
        self.assertEqual(files(instance, ALICE), [])
        out = self.delivered()
        for n in range(3):
            self.assertIn(b"Subject: message %d\n" % n, out)
        self.assertIn(b"body line 3 of message 2\n", out)

    @defer.inlineCallbacks
    def test_implicit_tls_fetchall_marks_seen(self):
        instance = start(self, plaintext=False)
        paths = [put(instance, ALICE, message(n)) for n in range(2)]
        code, log = yield self.fetch(instance, "--ssl", "--nosslcertck", "--keep", "--fetchall",
                                     protocol="pop3s")
        self.assertEqual(code, FETCHED, log)
        self.assertIn("RETR 1", log)
        self.assertEqual(files(instance, ALICE), sorted(f"cur/{p.name}:2,S" for p in paths))
        self.assertEqual(self.delivered().count(b"Subject: message "), 2)

    @defer.inlineCallbacks
    def test_plaintext_refused_without_tls(self):
        instance = start(self, plaintext=False)
        put(instance, ALICE, message(1))
        code, log = yield self.fetch(instance, "--sslproto", "")
        self.assertNotIn(code, (FETCHED, NO_MAIL), log)
        self.assertIn("[AUTH]", log)
        self.assertEqual(len(files(instance, ALICE)), 1)


class CurlTests(unittest.TestCase):
    """curl's POP3 support: a URL without a number is LIST, with one it is RETR."""

    timeout = 60

    def setUp(self):
        self.curl = program(self, "curl")

    def curl_run(self, url: str, *options: str, password: str = PASSWORD):
        args = [self.curl, "--silent", "--show-error", "--max-time", "30",
                "--user", f"{ALICE}:{password}", *options, url]

        def run():
            done = subprocess.run(args, capture_output=True, timeout=60)
            return done.returncode, done.stdout, done.stderr.decode("utf-8", "replace")

        return in_thread(run)

    @defer.inlineCallbacks
    def test_list_and_retr(self):
        instance = start(self)
        data = [message(1), b"Subject: dots\n\n.\n..two\nend\n"]
        for d in data:
            put(instance, ALICE, d)
        url = f"pop3://127.0.0.1:{instance.port('pop3')}/"
        code, listing, err = yield self.curl_run(url)
        self.assertEqual(code, 0, err)
        self.assertEqual(listing, b"1 %d\r\n2 %d\r\n" % tuple(len(crlf(d)) for d in data))
        for n, d in enumerate(data, 1):
            code, body, err = yield self.curl_run(url + str(n))
            self.assertEqual(code, 0, err)
            self.assertEqual(body, crlf(d))

    @defer.inlineCallbacks
    def test_tls(self):
        instance = start(self, plaintext=False)
        data = message(1)
        put(instance, ALICE, data)
        ca = str(instance.root / "cert.pem")
        # The certificate names mail.example.test; --resolve points it at loopback.
        stls = f"pop3://mail.example.test:{instance.port('pop3')}/1"
        pop3s = f"pop3s://mail.example.test:{instance.port('pop3s')}/1"
        for url, port, extra in ((stls, instance.port("pop3"), ["--ssl-reqd"]),
                                 (pop3s, instance.port("pop3s"), [])):
            code, body, err = yield self.curl_run(
                url, "--cacert", ca, "--resolve", f"mail.example.test:{port}:127.0.0.1", *extra)
            self.assertEqual(code, 0, (url, err))
            self.assertEqual(body, crlf(data))

    @defer.inlineCallbacks
    def test_wrong_password_and_plaintext_refused(self):
        instance = start(self, plaintext=False)
        put(instance, ALICE, message(1))
        port = instance.port("pop3s")
        code, _, err = yield self.curl_run(f"pop3s://127.0.0.1:{port}/", "--insecure",
                                           password="wrong")
        self.assertEqual(code, 67, err)  # CURLE_LOGIN_DENIED
        code, _, err = yield self.curl_run(f"pop3://127.0.0.1:{instance.port('pop3')}/")
        self.assertEqual(code, 67, err)
