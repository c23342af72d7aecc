"""Real IMAP clients against the server: mbsync, curl, mutt; and a Maildir as Dovecot writes it.

The clients come from Debian (``make test-deps`` installs isync, curl and
mutt); a test is skipped where its program is missing.
"""

from __future__ import annotations

import imaplib
import os
import shutil
import subprocess
from pathlib import Path

from twisted.internet import defer
from twisted.trial import unittest

from tests.imap_support import USER, IMAPTestCase
from tests.support.instance import PASSWORD


def need(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise unittest.SkipTest(f"{program} is not installed (make test-deps)")
    return path


def ok(result):
    typ, data = result
    assert typ == "OK", (typ, data)
    return data


class MbsyncTests(IMAPTestCase):
    @defer.inlineCallbacks
    def test_two_way_sync(self):
        mbsync = need("mbsync")
        yield self.deliver_many(3)
        work = Path(self.mktemp())
        local = work / "local"
        local.mkdir(parents=True)
        rc = work / "mbsyncrc"
        rc.write_text(f"""IMAPAccount test
Host 127.0.0.1
Port {self.tls_port}
User {USER}
Pass "{PASSWORD}"
SSLType IMAPS
CertificateFile {self.instance.root / "cert.pem"}

IMAPStore remote
Account test

MaildirStore local
Path {local}/
Inbox {local}/INBOX
SubFolders Verbatim

Channel sync
Far :remote:
Near :local:
Patterns *
Create Both
Expunge Both
SyncState *
Sync All
""")

        def sync():
            done = subprocess.run([mbsync, "-c", str(rc), "-a"], capture_output=True, timeout=60,
                                  env={**os.environ, "HOME": str(work)})
            assert done.returncode == 0, done.stderr

        yield self.blocking(sync)
        inbox = sorted((local / "INBOX" / "new").iterdir()) + \
            sorted((local / "INBOX" / "cur").iterdir())
        self.assertEqual(len(inbox), 3)
        for name in ("Sent", "Drafts", "Trash", "Junk", "Archive"):
            self.assertTrue((local / name / "cur").is_dir(), name)
        # Local changes: a new draft, a message read, one deleted; a new local folder.
        draft = local / "Drafts" / "cur" / "1700000000.1_1.laptop:2,D"
        draft.write_bytes(b"Subject: draft\n\nwork in progress\n")
        first, second = inbox[0], inbox[1]
        first.rename(local / "INBOX" / "cur" / (first.name.split(":")[0] + ":2,S"))
        second.rename(local / "INBOX" / "cur" / (second.name.split(":")[0] + ":2,T"))
        (local / "Projects" / "cur").mkdir(parents=True)
        (local / "Projects" / "new").mkdir()
        (local / "Projects" / "tmp").mkdir()
        yield self.deliver(subject="while away")
        yield self.blocking(sync)

        def server_side():
            M = self.client()
            ok(M.select("Drafts"))
            data = ok(M.fetch("1", "(FLAGS BODY.PEEK[])"))
            assert b"\\Draft" in data[0][0] and data[0][1].endswith(b"work in progress\r\n")
            ok(M.select("INBOX"))
            flags = ok(M.fetch("1:*", "(UID FLAGS)"))
            assert any(b"\\Seen" in f for f in flags), flags
            assert len(flags) == 3, flags  # the deleted one was expunged by mbsync
            names = ok(M.list())
            assert any(l.endswith(b'"Projects"') for l in names), names
        yield self.blocking(server_side)
        files = list((local / "INBOX" / "new").iterdir()) + list((local / "INBOX" / "cur").iterdir())
        self.assertEqual(len(files), 3)
        self.assertTrue(any(b"while away" in f.read_bytes() for f in files))


class CurlTests(IMAPTestCase):
    @defer.inlineCallbacks
    def test_curl_fetch_list_search(self):
        curl = need("curl")
        yield self.deliver_many(2)
        user = f"{USER}:{PASSWORD}"

        def run(url: str, *extra: str) -> bytes:
            done = subprocess.run([curl, "-s", "-S", "--user", user, *extra, url],
                                  capture_output=True, timeout=30)
            assert done.returncode == 0, done.stderr
            return done.stdout

        def check():
            body = run(f"imap://127.0.0.1:{self.port}/INBOX;UID=2")
            assert b"Subject: message 1\r\n" in body and body.endswith(b"body\r\n"), body
            head = run(f"imaps://127.0.0.1:{self.tls_port}/INBOX;UID=1;SECTION=HEADER.FIELDS"
                       "%20(SUBJECT)", "-k")
            assert head == b"Subject: message 0\r\n\r\n", head
            listing = run(f"imap://127.0.0.1:{self.port}/")
            assert b'* LIST (\\HasNoChildren \\Sent) "/" "Sent"' in listing, listing
            found = run(f"imap://127.0.0.1:{self.port}/INBOX?SUBJECT%20%22message%201%22")
            assert found.strip() == b"* SEARCH 2", found
        yield self.blocking(check)


class MuttTests(IMAPTestCase):
    @defer.inlineCallbacks
    def test_mutt_reads_a_message(self):
        mutt = need("mutt")
        script = need("script")
        yield self.deliver_many(1)
        work = Path(self.mktemp())
        work.mkdir(parents=True)
        out = work / "message.txt"
        rc = work / "muttrc"
        rc.write_text(f"""set folder="imap://demo%40example.test@127.0.0.1:{self.port}/"
set imap_pass="{PASSWORD}"
set spoolfile="+INBOX"
set ssl_starttls=no
set ssl_force_tls=no
set move=no
set quit=yes
set mark_old=no
set header_cache=""
set message_cachedir=""
set wait_key=no
""")
        keys = f"<pipe-message>cat > {out}<enter><quit>"

        def read():
            done = subprocess.run(
                [script, "-qec", f"{mutt} -n -F {rc} -e 'push \"{keys}\"'", "/dev/null"],
                capture_output=True, timeout=60,
                env={**os.environ, "TERM": "dumb", "HOME": str(work)})
            assert done.returncode == 0, done.stdout[-500:]

        yield self.blocking(read)
        data = out.read_bytes()
        self.assertIn(b"Subject: message 0", data)
        self.assertTrue(data.rstrip().endswith(b"body"), data)


class DovecotTreeTests(IMAPTestCase):
    """A Maildir++ tree with Dovecot's own index files, copied in as it is."""

    def setUp(self):
        super().setUp()
        root = self.instance.config.server.mail_root / "example.test" / "demo" / "Maildir"
        for folder in ("", ".Sent", ".Archive.2024", ".Entw&APw-rfe"):
            for sub in ("cur", "new", "tmp"):
                (root / folder / sub).mkdir(parents=True, exist_ok=True)
        m1 = b"From: a@example.org\nSubject: one\n\nfirst\n"
        m2 = b"From: b@example.org\nSubject: two\n\nsecond\nline\n"
        m3 = b"From: c@example.org\nSubject: three\n\nthird\n"
        (root / "cur" / f"1600000001.M1P1.dovecot,S={len(m1)},W={len(m1) + 3}:2,Sa").write_bytes(m1)
        (root / "cur" / f"1600000002.M2P1.dovecot,S={len(m2)}:2,RSb").write_bytes(m2)
        (root / "new" / "1600000003.M3P1.dovecot").write_bytes(m3)
        (root / "dovecot-uidlist").write_text(
            "3 V1600000000 N42 Gabcdef\n"
            f"7 :1600000001.M1P1.dovecot,S={len(m1)},W={len(m1) + 3}\n"
            f"9 W{len(m2) + 5} :1600000002.M2P1.dovecot,S={len(m2)}\n")
        (root / "dovecot-keywords").write_text("0 $Junk\n1 Work\n")
        (root / "subscriptions").write_text("V\t2\n\nSent\nArchive\t2024\n")
        (root / ".Archive.2024" / "cur" / "1600000009.M9P1.dovecot:2,").write_bytes(m1)
        self.root = root

    @defer.inlineCallbacks
    def test_served_as_dovecot_did(self):
        def check():
            M = self.client()
            ok(M.select("INBOX"))
            assert M.untagged_responses["UIDVALIDITY"] == [b"1600000000"]
            data = ok(M.fetch("1:*", "(UID FLAGS RFC822.SIZE)"))
            # W= from the name; counted where the name has none. Messages in
            # Dovecot's list are not \Recent any more, the new one is.
            assert data[0] == b"1 (UID 7 FLAGS (\\Seen $Junk) RFC822.SIZE 43)", data
            assert data[1] == b"2 (UID 9 FLAGS (\\Answered \\Seen Work) RFC822.SIZE 51)", data
            assert data[2] == b"3 (UID 42 FLAGS (\\Recent) RFC822.SIZE 46)", data
            body = ok(M.fetch("2", "(BODY.PEEK[TEXT])"))
            assert body[0][1] == b"second\r\nline\r\n", body
            names = ok(M.list())
            for name in (b'"Archive/2024"', b'"Entw&APw-rfe"', b'"Sent"', b'"Trash"'):
                assert any(l.endswith(name) for l in names), (name, names)
            subs = ok(M.lsub('""', "*"))
            assert any(l.endswith(b'"Archive/2024"') for l in subs), subs
            ok(M.select('"Archive/2024"'))
            assert M.untagged_responses["EXISTS"] == [b"1"]
            M.logout()
        yield self.blocking(check)
        uidlist = (self.root / "mailstack-uidlist").read_text().splitlines()
        self.assertEqual(uidlist[0], "3 V1600000000 N43 R42")
        self.assertIn("42 :1600000003.M3P1.dovecot", uidlist)
