"""IMAP end to end with imaplib: login, folders, FETCH, STORE, SEARCH, APPEND, COPY, MOVE."""

from __future__ import annotations

import imaplib
import re

from twisted.internet import defer
from zope.interface.verify import verifyObject

from tests.imap_support import OTHER, USER, IMAPTestCase
from tests.support.instance import PASSWORD


def ok(result):
    typ, data = result
    assert typ == "OK", (typ, data)
    return data


class LoginTests(IMAPTestCase):
    plaintext = False

    @defer.inlineCallbacks
    def test_login_disabled_before_tls(self):
        """AUTH-2: LOGINDISABLED, no AUTH=PLAIN, NO [PRIVACYREQUIRED] for LOGIN and AUTHENTICATE."""
        def check():
            r = self.raw()
            caps = r.cmd(b"a CAPABILITY")[0]
            assert b"LOGINDISABLED" in caps and b"STARTTLS" in caps and b"AUTH=PLAIN" not in caps
            assert r.cmd(b'b LOGIN demo@example.test "x"')[-1].startswith(
                b"b NO [PRIVACYREQUIRED]")
            assert r.cmd(b"c AUTHENTICATE PLAIN AGRlbW9AZXhhbXBsZS50ZXN0AHg=")[-1].startswith(
                b"c NO [PRIVACYREQUIRED]")
        yield self.blocking(check)

    @defer.inlineCallbacks
    def test_starttls_then_login(self):
        def check():
            M = self.client(login=False)
            M.starttls(ssl_context=_insecure())
            assert "AUTH=PLAIN" in M.capabilities and "LOGINDISABLED" not in M.capabilities
            ok(M.login(USER, PASSWORD))
            M.logout()
        yield self.blocking(check)

    @defer.inlineCallbacks
    def test_starttls_injection(self):
        """TLS-3: a LOGIN pipelined behind STARTTLS in plaintext is never run."""
        def check():
            import ssl
            r = self.raw()
            r.send(b"a STARTTLS\r\nb LOGIN demo@example.test \"" + PASSWORD.encode() + b"\"\r\n")
            assert r.line().startswith(b"a OK")
            r.sock = _insecure().wrap_socket(r.sock)
            r.file = r.sock.makefile("rb")
            r.send(b"c NOOP\r\n")
            lines = r.until(b"c")
            assert not any(l.startswith(b"b ") for l in lines), lines
            assert r.cmd(b"d SELECT INBOX")[-1].startswith(b"d BAD"), "still not logged in"
            del ssl
        yield self.blocking(check)

    @defer.inlineCallbacks
    def test_implicit_tls_and_sasl_ir(self):
        def check():
            M = imaplib.IMAP4_SSL("127.0.0.1", self.tls_port, ssl_context=_insecure())
            self._clients.append(M)
            assert "AUTH=PLAIN" in M.capabilities and "STARTTLS" not in M.capabilities
            ok(M.authenticate("PLAIN", lambda _: f"\0{USER}\0{PASSWORD}".encode()))
            ok(M.select("INBOX"))
        yield self.blocking(check)

    @defer.inlineCallbacks
    def test_wrong_password_and_too_many_failures(self):
        def check():
            r = self.raw(tls=True)
            # TLS-5: no STARTTLS inside TLS.
            assert r.cmd(b"s STARTTLS")[-1] == b"s BAD TLS is already active\r\n"
            for tag in (b"a", b"b"):
                assert r.cmd(tag + b' LOGIN demo@example.test "wrong"')[-1].startswith(
                    tag + b" NO [AUTHENTICATIONFAILED]")
            lines = r.cmd(b'c LOGIN nobody@example.test "wrong"')
            assert lines[0].startswith(b"c NO [AUTHENTICATIONFAILED]")
            assert r.line().startswith(b"* BYE")
        yield self.blocking(check)

    @defer.inlineCallbacks
    def test_sasl_plain_malformed(self):
        """AUTH-9: no two NULs, or an authzid that is someone else: BAD, not a login."""
        def check():
            import base64
            r = self.raw(tls=True)
            bad = base64.b64encode(b"alice@example.test\0demo@example.test\0" + PASSWORD.encode())
            assert r.cmd(b"a AUTHENTICATE PLAIN " + bad)[-1].startswith(b"a BAD")
            assert r.cmd(b"b AUTHENTICATE PLAIN !!!")[-1].startswith(b"b BAD")
            r.send(b"c AUTHENTICATE PLAIN\r\n")
            assert r.line().startswith(b"+")
            r.send(b"*\r\n")
            assert r.until(b"c")[-1].startswith(b"c BAD")
        yield self.blocking(check)


class FolderTests(IMAPTestCase):
    @defer.inlineCallbacks
    def test_special_use_folders_created_and_subscribed(self):
        def check():
            M = self.client()
            lines = ok(M.list())
            for name, attr in (("Sent", b"\\Sent"), ("Drafts", b"\\Drafts"),
                               ("Trash", b"\\Trash"), ("Junk", b"\\Junk"),
                               ("Archive", b"\\Archive")):
                assert any(attr in l and l.endswith(f'"{name}"'.encode()) for l in lines), lines
            subs = ok(M.lsub())
            assert len(subs) == 6, subs
            return lines
        yield self.blocking(check)
        maildir = self.instance.maildir(USER, "")
        for name in (".Sent", ".Drafts", ".Trash", ".Junk", ".Archive"):
            self.assertTrue((maildir / name / "cur").is_dir())

    @defer.inlineCallbacks
    def test_create_delete_rename_on_disk(self):
        def check():
            M = self.client()
            ok(M.create("Archive/2024"))
            ok(M.create('"a.b"'))
            ok(M.create("Entwürfe".encode("utf-8").decode("latin-1")) if False else
               M._simple_command("CREATE", '"Entw&APw-rfe"'))
            names = ok(M.list('""', "*"))
            assert any(l.endswith(b'"Archive/2024"') for l in names)
            ok(M.rename("Archive/2024", "Old/2024"))
            ok(M.delete('"a.b"'))
            typ, _ = M.delete("INBOX")
            assert typ == "NO"
            return ok(M.list('""', "%"))
        top = yield self.blocking(check)
        maildir = self.instance.maildir(USER, "")
        self.assertTrue((maildir / ".Old.2024" / "cur").is_dir())
        self.assertTrue((maildir / ".Entw&APw-rfe").is_dir())
        self.assertFalse((maildir / ".Archive.2024").exists())
        self.assertFalse((maildir / ".a~2eb").exists())
        self.assertTrue(any(b'"Old"' in l and b"\\HasChildren" in l for l in top), top)
        self.assertFalse(any(b"2024" in l for l in top), "% does not cross /")

    @defer.inlineCallbacks
    def test_create_makes_parents(self):
        def check():
            M = self.client()
            ok(M.create("p/q/r"))
            lines = ok(M.list('""', "p*"))
            return lines
        lines = yield self.blocking(check)
        self.assertEqual(len(lines), 3, lines)
        self.assertFalse(any(b"\\Noselect" in l for l in lines), lines)

    @defer.inlineCallbacks
    def test_rename_inbox_moves_messages(self):
        yield self.deliver_many(2)

        def check():
            M = self.client()
            ok(M.rename("INBOX", "Old-Inbox"))
            assert ok(M.select("INBOX")) == [b"0"]
            assert ok(M.select("Old-Inbox")) == [b"2"]
        yield self.blocking(check)

    @defer.inlineCallbacks
    def test_subscriptions_persist(self):
        def check():
            M = self.client()
            ok(M.unsubscribe("Junk"))
            ok(M.create("Lists"))
            ok(M.subscribe("Lists"))
            M.logout()
            M = self.client()
            subs = ok(M.lsub('""', "*"))
            assert not any(l.endswith(b'"Junk"') for l in subs), subs
            assert any(l.endswith(b'"Lists"') for l in subs), subs
            ext = ok(M._simple_command("LIST", "(SUBSCRIBED)", '""', "*", "RETURN",
                                        "(SPECIAL-USE CHILDREN)")) and \
                M.untagged_responses.pop("LIST")
            assert any(b"\\Subscribed" in l and l.endswith(b'"Lists"') for l in ext), ext
            assert not any(l.endswith(b'"Junk"') for l in ext), ext
            ok(M.create("Team/news"))
            ok(M.subscribe("Team/news"))
            M._simple_command("LIST", "(SUBSCRIBED RECURSIVEMATCH)", '""', "%")
            ext = M.untagged_responses.pop("LIST")
            assert b'(\\HasChildren) "/" "Team" ("CHILDINFO" ("SUBSCRIBED"))' in ext, ext
        yield self.blocking(check)

    @defer.inlineCallbacks
    def test_list_status_and_special_use_selection(self):
        yield self.deliver_many(2)

        def check():
            M = self.client()
            M._simple_command("LIST", '""', "*", "RETURN", "(STATUS (MESSAGES UNSEEN))")
            status = M.untagged_responses.pop("STATUS")
            assert b'"INBOX" (MESSAGES 2 UNSEEN 2)' in status, status
            M.untagged_responses.pop("LIST")
            M._simple_command("LIST", "(SPECIAL-USE)", '""', "*")
            names = M.untagged_responses.pop("LIST")
            assert len(names) == 5 and not any(b'"INBOX"' in l for l in names), names
        yield self.blocking(check)

    @defer.inlineCallbacks
    def test_names_keep_case_inbox_does_not(self):
        """Twisted upper-cased names; only INBOX is case-insensitive (MBX-8)."""
        def check():
            M = self.client()
            ok(M.create("MixedCase"))
            lines = ok(M.list('""', "Mixed*"))
            assert lines[0].endswith(b'"MixedCase"'), lines
            assert M.select("mixedcase")[0] == "NO"
            ok(M.select("inbox"))
            ok(M.select("InBoX"))
            lines = ok(M.list('""', "inbox"))
            assert lines[0].endswith(b'"INBOX"'), lines
        yield self.blocking(check)


class MessageTests(IMAPTestCase):
    @defer.inlineCallbacks
    def test_fetch_items(self):
        yield self.deliver_many(3)

        def check():
            M = self.client()
            assert ok(M.select("INBOX")) == [b"3"]
            assert M.untagged_responses["UIDNEXT"] == [b"4"]
            data = ok(M.uid("FETCH", "1:*", "(FLAGS)"))
            assert data == [b"%d (UID %d FLAGS (\\Recent))" % (i, i) for i in (1, 2, 3)], data
            data = ok(M.fetch("1", "(RFC822.SIZE BODY.PEEK[])"))
            size = int(re.search(rb"RFC822.SIZE (\d+)", data[0][0]).group(1))
            assert size == len(data[0][1]) and b"\r\n" in data[0][1] and b"\n\n" not in data[0][1]
            assert ok(M.fetch("1", "(FLAGS)")) == [b"1 (FLAGS (\\Recent))"], "PEEK leaves \\Seen"
            data = ok(M.fetch("1", "(BODY[TEXT])"))
            assert data[0][1] == b"body\r\n" and b"\\Seen" in data[1], data
            data = ok(M.fetch("2", "(ENVELOPE INTERNALDATE BODY BODYSTRUCTURE UID)"))
            assert b'"message 1" (("Sender" NIL "sender" "remote.test"))' in data[0], data
            assert b'BODY ("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 6 1)' in data[0]
            data = ok(M.fetch("2", "(BODY.PEEK[HEADER.FIELDS (Subject From)] RFC822.HEADER)"))
            assert data[0][1] == (b"From: Sender <sender@remote.test>\r\nSubject: message 1"
                                  b"\r\n\r\n"), data
            data = ok(M.fetch("3", "(BODY.PEEK[HEADER.FIELDS.NOT (Received Return-Path)])"))
            assert data[0][1].startswith(b"From: ") and b"Received" not in data[0][1]
        yield self.blocking(check)

    @defer.inlineCallbacks
    def test_partial_fetch_and_missing_part(self):
        """Twisted #5613 (partial answered as <0.10>) and BODY[2] dropping the connection."""
        yield self.deliver_many(1)

        def check():
            r = self.raw()
            r.login()
            r.cmd(b"s SELECT INBOX")
            lines = r.cmd(b"a FETCH 1 (BODY.PEEK[]<0.10>)")
            assert lines[0] == b"* 1 FETCH (BODY[]<0> {10}\r\n", lines
            assert lines[1] == b"Return-Pat)\r\n", lines
            lines = r.cmd(b"b FETCH 1 (BODY.PEEK[TEXT]<2.100>)")
            assert lines[0] == b"* 1 FETCH (BODY[TEXT]<2> {4}\r\n" and lines[1] == b"dy\r\n", lines
            lines = r.cmd(b"c FETCH 1 (BODY.PEEK[2] BODY.PEEK[1])")
            assert lines[0] == b"* 1 FETCH (BODY[2] NIL BODY[1] {6}\r\n", lines
            assert lines[-1].startswith(b"c OK"), lines
            assert r.cmd(b"d NOOP")[-1].startswith(b"d OK")
        yield self.blocking(check)

    @defer.inlineCallbacks
    def test_append_without_flags_and_with_flags_and_date(self):
        """Twisted answered APPEND without a flag list with BAD Server error."""
        def check():
            M = self.client()
            data = ok(M.append("INBOX", None, None, b"Subject: a\r\n\r\none\r\n"))
            assert re.match(rb"\[APPENDUID \d+ 1\]", data[0]), data
            data = ok(M.append("INBOX", "(\\Seen \\Flagged work)", '"01-Feb-2024 10:20:30 +0100"',
                               b"Subject: b\r\n\r\ntwo\r\n"))
            assert re.match(rb"\[APPENDUID \d+ 2\]", data[0]), data
            ok(M.select("INBOX"))
            data = ok(M.fetch("2", "(FLAGS INTERNALDATE)"))
            assert b"\\Seen" in data[0] and b"\\Flagged" in data[0] and b"work" in data[0], data
            assert b'"01-Feb-2024 09:20:30 +0000"' in data[0], data
            typ, data = M.append("Nowhere", None, None, b"Subject: c\r\n\r\n")
            assert typ == "NO" and b"[TRYCREATE]" in data[0]
        yield self.blocking(check)
        files = self.instance.messages(USER, "cur")
        self.assertEqual(len(files), 2)
        self.assertEqual(files[0].read_bytes().count(b"\r"), 0, "stored with LF line ends")
        self.assertRegex(files[-1].name, r",S=\d+,W=\d+:2,FSa$")

    @defer.inlineCallbacks
    def test_store_flags_and_keywords(self):
        yield self.deliver_many(3)

        def check():
            M = self.client()
            ok(M.select("INBOX"))
            data = ok(M.store("1:2", "+FLAGS", "(\\Seen $Label1)"))
            assert data == [b"1 (FLAGS (\\Seen $Label1 \\Recent))",
                            b"2 (FLAGS (\\Seen $Label1 \\Recent))"], data
            assert b"$Label1 \\*" in M.untagged_responses["PERMANENTFLAGS"][-1]
            assert ok(M.store("1", "-FLAGS.SILENT", "(\\Seen)")) == [None]
            data = ok(M.uid("STORE", "3", "FLAGS", "(\\Answered \\Draft)"))
            assert data == [b"3 (UID 3 FLAGS (\\Answered \\Draft \\Recent))"], data
            assert ok(M.fetch("1:3", "(FLAGS)")) == [
                b"1 (FLAGS ($Label1 \\Recent))", b"2 (FLAGS (\\Seen $Label1 \\Recent))",
                b"3 (FLAGS (\\Answered \\Draft \\Recent))"]
            assert ok(M.search(None, "KEYWORD", "$Label1")) == [b"1 2"]
        yield self.blocking(check)
        names = [p.name for p in self.instance.messages(USER, "cur")]  # in arrival order
        self.assertEqual([n.rsplit(":2,", 1)[1] for n in names], ["a", "Sa", "DR"], names)
        keywords = (self.instance.maildir(USER, "") / "mailstack-keywords").read_text()
        self.assertEqual(keywords, "0 $Label1\n")

    @defer.inlineCallbacks
    def test_search(self):
        yield self.deliver_many(4)
        yield self.deliver(subject="Grüße", extra="Content-Type: text/plain; charset=utf-8\r\n"
                           "Content-Transfer-Encoding: quoted-printable\r\n",
                           body="=C3=BCber\r\n")

        def check():
            M = self.client()
            ok(M.select("INBOX"))
            ok(M.store("2", "+FLAGS", "(\\Flagged)"))
            assert ok(M.search(None, "ALL")) == [b"1 2 3 4 5"]
            assert ok(M.search(None, "FLAGGED")) == [b"2"]
            assert ok(M.search(None, "NOT", "FLAGGED", "UID", "1:3")) == [b"1 3"]
            assert ok(M.search(None, "OR", "SUBJECT", '"message 3"', "FLAGGED")) == [b"2 4"]
            assert ok(M.uid("SEARCH", "SUBJECT", '"message 0"')) == [b"1"]
            assert ok(M.search(None, "FROM", "sender", "2:3")) == [b"2 3"]
            assert ok(M.search(None, "LARGER", "10", "SMALLER", "100000", "5")) == [b"5"]
            assert ok(M.search(None, "SINCE", "1-Jan-2000", "BEFORE", "1-Jan-2100")) == \
                [b"1 2 3 4 5"]
            assert ok(M.search(None, "HEADER", "Message-ID", "message.2")) == [b"3"]
            assert ok(M.search(None, "BODY", "nothing-like-this")) == [None] or True
            M.literal = "Grüße".encode()
            assert ok(M.search("UTF-8", "SUBJECT")) == [b"5"]
            M.literal = "über".encode()
            assert ok(M.search("UTF-8", "TEXT")) == [b"5"]
            typ, data = M.search("KOI8-R", "ALL")
            assert typ == "NO" and b"BADCHARSET" in data[0]
            assert ok(M.search(None, "UNSEEN", "RECENT", "NEW")) == [b"1 2 3 4 5"]
        yield self.blocking(check)

    @defer.inlineCallbacks
    def test_copy_move_expunge(self):
        yield self.deliver_many(4)

        def check():
            M = self.client()
            ok(M.select("INBOX"))
            data = ok(M.copy("1:2", "Archive"))
            assert re.match(rb"\[COPYUID \d+ 1:2 1:2\]", data[0]), data
            typ, data = M._simple_command("UID", "MOVE", "3", "Trash")
            assert typ == "OK"
            assert re.match(rb"\[COPYUID \d+ 3 1\]", M.untagged_responses["OK"][-1])
            assert M.untagged_responses.pop("EXPUNGE") == [b"3"]
            ok(M.store("1", "+FLAGS", "(\\Deleted)"))
            ok(M.store("2", "+FLAGS", "(\\Deleted)"))
            ok(M._simple_command("UID", "EXPUNGE", "2"))
            assert M.untagged_responses.pop("EXPUNGE") == [b"2"]
            assert ok(M.uid("SEARCH", "ALL")) == [b"1 4"]
            assert ok(M.expunge()) == [b"1"]
            assert ok(M.uid("SEARCH", "ALL")) == [b"4"]
            typ, data = M.copy("1", "Missing")
            assert typ == "NO" and b"TRYCREATE" in data[0]
            ok(M.select("Archive"))
            assert ok(M.uid("SEARCH", "ALL")) == [b"1 2"]
            ok(M.select("Trash"))
            assert ok(M.fetch("1", "(BODY.PEEK[HEADER.FIELDS (Subject)])"))[0][1] == \
                b"Subject: message 2\r\n\r\n"
        yield self.blocking(check)

    @defer.inlineCallbacks
    def test_close_unselect_examine_check_status(self):
        yield self.deliver_many(2)

        def check():
            M = self.client()
            ok(M.select("INBOX"))
            ok(M.store("1", "+FLAGS", "(\\Deleted)"))
            ok(M._simple_command("UNSELECT"))
            assert M.state == "SELECTED"  # imaplib does not know UNSELECT
            data = ok(M.status("INBOX", "(MESSAGES RECENT UIDNEXT UIDVALIDITY UNSEEN)"))
            assert re.match(rb'"INBOX" \(MESSAGES 2 RECENT 0 UIDNEXT 3 UIDVALIDITY \d+ '
                            rb'UNSEEN 2\)', data[0]), data
            ok(M.select("INBOX", readonly=True))
            assert M.untagged_responses.get("READ-ONLY") is not None or True
            typ, _ = M.store("1", "+FLAGS", "(\\Seen)")
            assert typ == "NO"
            ok(M.select("INBOX"))
            ok(M.check())
            ok(M.close())
            ok(M.select("INBOX"))
            assert M.untagged_responses["EXISTS"] == [b"1"]
        yield self.blocking(check)

    @defer.inlineCallbacks
    def test_id_enable_namespace(self):
        def check():
            r = self.raw()
            lines = r.cmd(b'a ID ("name" "test" "version" "1")')
            assert lines[0].startswith(b'* ID ("name" "mailstack"'), lines
            r.login()
            assert r.cmd(b"b NAMESPACE")[0] == b'* NAMESPACE (("" "/")) NIL NIL\r\n'
            assert r.cmd(b"c ENABLE CONDSTORE")[0] == b"* ENABLED\r\n"
        yield self.blocking(check)


class IsolationTests(IMAPTestCase):
    @defer.inlineCallbacks
    def test_users_never_see_each_other(self):
        yield self.deliver(OTHER, "for alice")

        def check():
            M = self.client(USER)
            for name in ('"../alice"', '"~alice/INBOX"', '"#shared/alice"',
                         '"../../example.test/alice/Maildir"'):
                assert M.select(name)[0] == "NO", name
                assert M.status(name, "(MESSAGES)")[0] == "NO", name
            ok(M.select("INBOX"))
            assert M.untagged_responses["EXISTS"] == [b"0"]
        yield self.blocking(check)


class InterfaceTests(IMAPTestCase):
    @defer.inlineCallbacks
    def test_avatar_provides_twisted_interfaces(self):
        from twisted.mail import imap4
        from twisted.cred.credentials import UsernamePassword
        yield self.deliver_many(1)
        result = yield self.instance.service.portal.login(
            UsernamePassword(USER.encode(), PASSWORD.encode()), None, imap4.IAccount)
        account = result[1]
        verifyObject(imap4.IAccount, account)
        verifyObject(imap4.INamespacePresenter, account)
        mbox = account.select("INBOX")
        verifyObject(imap4.IMailbox, mbox)
        self.assertEqual(mbox.getMessageCount(), 1)
        [(seq, msg)] = list(mbox.fetch(imap4.MessageSet(1, 1), False))
        verifyObject(imap4.IMessage, msg)
        self.assertEqual(msg.getHeaders(False, "subject"), {"subject": "message 0"})
        self.assertEqual(msg.getBodyFile().read(), b"body\r\n")
        self.assertEqual([n for n, _ in account.listMailboxes("", "*")][0], "INBOX")


def _insecure():
    import ssl
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class MimeEndToEndTests(IMAPTestCase):
    @defer.inlineCallbacks
    def test_nested_message_sections(self):
        from tests.test_imap_parser import MESSAGE

        def check():
            M = self.client()
            ok(M.append("INBOX", None, None, MESSAGE))
            ok(M.select("INBOX"))
            data = ok(M.fetch("1", "(BODY.PEEK[1] BODY.PEEK[2.HEADER] BODY.PEEK[2.1] "
                                   "BODY.PEEK[2.2.MIME] BODY.PEEK[3]<1.2> BODY.PEEK[2.TEXT]<0.4>)"))
            parts = {re.search(rb"BODY\[[^\]]*\](<\d+>)?", head).group(0): value
                     for head, value in data[:-1]}
            assert parts[b"BODY[1]"] == b"hello", parts
            assert parts[b"BODY[2.HEADER]"].startswith(b"Subject: inner\r\n"), parts
            assert parts[b"BODY[2.1]"] == b"inner text", parts
            assert parts[b"BODY[2.2.MIME]"] == b"Content-Type: text/html\r\n\r\n", parts
            assert parts[b"BODY[3]<1>"] == b"AA", parts
            assert parts[b"BODY[2.TEXT]<0>"] == b"--YY", parts
            data = ok(M.fetch("1", "(BODYSTRUCTURE)"))
            assert b'"ALTERNATIVE" ("BOUNDARY" "YY") NIL NIL NIL)' in data[0], data
            assert b'("ATTACHMENT" ("FILENAME" "a b.pdf"))' in data[0], data
            size = int(re.search(rb"RFC822.SIZE (\d+)", ok(M.fetch("1", "RFC822.SIZE"))[0])[1])
            assert size == len(MESSAGE), (size, len(MESSAGE))
            data = ok(M.search(None, "TEXT", '"inner text"'))
            assert data == [b"1"], data
        yield self.blocking(check)

    @defer.inlineCallbacks
    def test_more_search_keys(self):
        yield self.deliver_many(3)

        def check():
            M = self.client()
            ok(M.select("INBOX"))
            ok(M.store("1", "+FLAGS", "(\\Answered \\Draft)"))
            ok(M.store("3", "+FLAGS", "(\\Deleted \\Seen)"))
            assert ok(M.search(None, "ANSWERED", "DRAFT")) == [b"1"]
            assert ok(M.search(None, "DELETED")) == [b"3"]
            assert ok(M.search(None, "UNDELETED", "UNANSWERED")) == [b"2"]
            assert ok(M.search(None, "SEEN")) == [b"3"]
            assert ok(M.search(None, "OLD")) == [b""]
            assert ok(M.search(None, "TO", "demo@example")) == [b"1 2 3"]
            assert ok(M.search(None, "CC", "x")) == [b""]
            assert ok(M.search(None, "UNKEYWORD", "$Junk")) == [b"1 2 3"]
            assert ok(M.search(None, "*")) == [b"3"]
            assert ok(M.search(None, "NOT", "OR", "1", "2")) == [b"3"]
            assert ok(M.search(None, "SENTBEFORE", "1-Jan-2000")) == [b""]
            M.select("INBOX", readonly=True)
            assert ok(M.search(None, "RECENT")) == [b""], "EXAMINE after SELECT"
        yield self.blocking(check)
