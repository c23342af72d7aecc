"""IMAP parsing without sockets: command framing, argument grammar, MIME, names.

Property tests (hypothesis) feed arbitrary bytes to every parser of client
input: each either answers or raises its one documented error, within its
bounds (STYLE 12, SECURITY-TESTS 7).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.mail.imap4 import IllegalClientResponse
from twisted.trial import unittest

from mailstack.imap import fetch, search
from mailstack.imap.mime import Part, body_structure, crlf, envelope, section, sexp
from mailstack.imap.parser import BadName, Command, CommandReader, Parser, Rejected
from mailstack.store.folders import (BadMailboxName, disk_name, from_disk, mutf7_decode,
                                     mutf7_encode, normalize)
from mailstack.store.uidlist import UidList, parse_uidlist


def reader(**kw) -> CommandReader:
    return CommandReader(kw.get("max_line", 1000), kw.get("max_literal", 100),
                         kw.get("max_append", 1000), kw.get("max_literals", 5))


class ReaderTests(unittest.TestCase):
    def test_literals_sync_and_nonsync(self):
        r = reader()
        r.feed(b"a LOGIN {5}\r\n")
        self.assertIsNone(r.next())
        self.assertTrue(r.wants_continuation)
        r.feed(b"alice {6+}\r\nsecret\r\nb NOOP\r\n")
        self.assertEqual(r.next(), Command(b"a", b"LOGIN", b"{5}\r\nalice {6}\r\nsecret"))
        self.assertFalse(r.wants_continuation)
        self.assertEqual(r.next(), Command(b"b", b"NOOP", b""))

    def test_limits(self):
        r = reader()
        r.feed(b"a APPEND INBOX {1001}\r\n")
        self.assertEqual(r.next(), Rejected(b"a", b"NO [TOOBIG] Message too big (limit 1000 "
                                                  b"octets)"))
        r.feed(b"b LOGIN {101}\r\n")
        self.assertEqual(r.next(), Rejected(b"b", b"BAD [TOOBIG] Literal too big"))
        r.feed(b"c LOGIN {101+}\r\n")
        self.assertTrue(r.next().close)
        r = reader()
        r.feed(b"d X" + b" {1+}\r\nx" * 6 + b"\r\n")
        self.assertEqual(r.next(), Rejected(b"d", b"BYE [TOOBIG] Literal too big", close=True))
        r = reader()
        r.feed(b"e " + b"x" * 5000)
        self.assertIsNone(r.next())
        r.feed(b"more\r\nf NOOP\r\n")
        self.assertEqual(r.next(), Rejected(b"e", b"BAD Line too long"))
        self.assertEqual(r.next(), Command(b"f", b"NOOP", b""))

    def test_clear_drops_pipelined_input(self):
        r = reader()
        r.feed(b"a STARTTLS\r\nb LOGIN x y\r\n")
        self.assertEqual(r.next().verb, b"STARTTLS")
        r.clear()
        self.assertIsNone(r.next())

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.binary(max_size=300), max_size=8))
    def test_fuzz_reader(self, chunks):
        r = reader()
        for chunk in chunks:
            r.feed(chunk)
            for _ in range(50):
                item = r.next()
                if item is None:
                    break
                self.assertIsInstance(item, (Command, Rejected))
            self.assertLessEqual(r.buffered(), 1000 + 300 + 2)


class ArgumentTests(unittest.TestCase):
    def test_numbers_and_sets(self):
        self.assertEqual(Parser(b"1:3,5,*:7").seqset(), [(1, 3), (5, 5), (None, 7)])
        for bad in (b"0", b"4294967296", b"1:0", b"-1", b"a"):
            self.assertRaises(IllegalClientResponse, Parser(bad).seqset)

    def test_fetch_items(self):
        items = fetch.parse_items(Parser(b"(UID BODY.PEEK[1.2.HEADER.FIELDS (From \"X-A\")]"
                                         b"<0.10> BODY[]<5.20> BODY RFC822.SIZE)"))
        self.assertEqual([i.key() for i in items],
                         [b"UID", b"BODY[1.2.HEADER.FIELDS (From X-A)]<0>", b"BODY[]<5>",
                          b"BODY", b"RFC822.SIZE"])
        self.assertTrue(items[2].sets_seen and not items[1].sets_seen)
        for bad in (b"BODY[MIME]", b"BODY[1.]", b"BODY[X]", b"(FLAGS", b"FLAGSX",
                    b"BODY[" + b"1." * 100 + b"1]", b"BODY[]<1.0>"):
            self.assertRaises(IllegalClientResponse, fetch.parse_items, Parser(bad))

    def test_search_keys(self):
        keys = search.parse(Parser(b"CHARSET UTF-8 OR (FLAGGED UNSEEN) NOT UID 1:* "
                                   b"SUBJECT {2}\r\nhi SINCE 1-Feb-2024 2,4"))
        self.assertEqual(keys[0][0], "or")
        self.assertEqual(keys[1], ("subject", "hi"))
        self.assertEqual(keys[-1], ("seq", [(2, 2), (4, 4)]))
        self.assertRaises(search.BadCharset, search.parse, Parser(b"CHARSET KOI8-R ALL"))
        self.assertRaises(IllegalClientResponse, search.parse, Parser(b"(" * 100 + b"ALL"))

    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=200))
    def test_fuzz_arguments(self, data):
        for parse in (fetch.parse_items, search.parse, Parser.astring, Parser.seqset,
                      Parser.flag_list, Parser.date_time, Parser.mailbox):
            try:
                parse(Parser(data))
            except (IllegalClientResponse, BadName, search.BadCharset):
                pass


class NameTests(unittest.TestCase):
    def test_mutf7_round_trip_and_strictness(self):
        for name in ("Entwürfe", "日本語", "a&b", "~peter/mail/台北/日本語"):
            self.assertEqual(mutf7_decode(mutf7_encode(name)), name)
        for bad in (b"&AC4ALg-", b"&Jjo!", b"&", b"&U,BTF2XlZyyKng", b"caf\xc3\xa9"):
            self.assertRaises(ValueError, mutf7_decode, bad)

    def test_normalize_and_disk_names(self):
        self.assertEqual(normalize("inbox/Sub"), "INBOX/Sub")
        for bad in ("", ".", "a/../b", "a//b", "/a", "a/", "a\x00b", "a\u2028b", "e\u0301"):
            self.assertRaises(BadMailboxName, normalize, bad)
        self.assertEqual(disk_name("Archive/2024"), ".Archive.2024")
        self.assertEqual(disk_name("v1.2"), ".v1~2e2")
        self.assertNotEqual(disk_name("a.b"), disk_name("a/b"))
        self.assertEqual(from_disk(".v1~2e2"), "v1.2")
        self.assertIsNone(from_disk(".."))

    @settings(max_examples=300, deadline=None)
    @given(st.text(min_size=1, max_size=40))
    def test_fuzz_names(self, name):
        try:
            canonical = normalize(name)
            disk = disk_name(canonical)
        except BadMailboxName:
            return
        self.assertNotIn("/", disk)
        if canonical != "INBOX" and not canonical.startswith("INBOX/"):
            self.assertEqual(from_disk(disk), canonical)


MESSAGE = crlf(b"""From: "Joe Q. Public" <john@example.com>
To: Mary <mary@x.test>, group: a@b.test, c@d.test;
Subject: =?utf-8?q?caf=C3=A9?=
Content-Type: multipart/mixed; boundary="XX"

preamble
--XX
Content-Type: text/plain; charset=UTF-8

hello
--XX
Content-Type: message/rfc822

Subject: inner
Content-Type: multipart/alternative; boundary=YY

--YY
Content-Type: text/plain

inner text
--YY
Content-Type: text/html

<b>x</b>
--YY--
--XX
Content-Type: application/pdf; name="a b.pdf"
Content-Disposition: attachment; filename="a b.pdf"
Content-Transfer-Encoding: base64

AAAA
--XX--
""")


class MimeTests(unittest.TestCase):
    def test_sections(self):
        self.assertEqual(section(MESSAGE, (1,), ""), b"hello")
        self.assertEqual(section(MESSAGE, (2,), "HEADER"),
                         b"Subject: inner\r\nContent-Type: multipart/alternative; boundary=YY"
                         b"\r\n\r\n")
        self.assertEqual(section(MESSAGE, (2, 1), ""), b"inner text")
        self.assertEqual(section(MESSAGE, (2, 2), "MIME"), b"Content-Type: text/html\r\n\r\n")
        self.assertEqual(section(MESSAGE, (3,), ""), b"AAAA")
        self.assertIsNone(section(MESSAGE, (4,), ""))
        self.assertIsNone(section(MESSAGE, (1, 1), ""))
        self.assertEqual(section(MESSAGE, (), "HEADER.FIELDS", [b"subject"]),
                         b"Subject: =?utf-8?q?caf=C3=A9?=\r\n\r\n")
        single = crlf(b"Subject: x\n\nbody\n")
        self.assertEqual(section(single, (1,), ""), b"body\r\n")
        self.assertIsNone(section(single, (2,), ""))

    def test_bodystructure_and_envelope(self):
        root = Part(MESSAGE, 0, len(MESSAGE))
        self.assertEqual(sexp(body_structure(root, False)),
                         b'(("TEXT" "PLAIN" ("CHARSET" "UTF-8") NIL NIL "7BIT" 5 1)'
                         b'("MESSAGE" "RFC822" NIL NIL NIL "7BIT" 163 (NIL "inner" NIL NIL NIL '
                         b'NIL NIL NIL NIL NIL) (("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL '
                         b'NIL "7BIT" 10 1)("TEXT" "HTML" ("CHARSET" "us-ascii") NIL NIL "7BIT" 8'
                         b' 1) "ALTERNATIVE") 12)("APPLICATION" "PDF" ("NAME" "a b.pdf") NIL '
                         b'NIL "BASE64" 4) "MIXED")'.replace(b")(", b") ("))
        env = sexp(envelope(root))
        self.assertIn(b'(("Joe Q. Public" NIL "john" "example.com"))', env)
        self.assertIn(b'(NIL NIL "group" NIL) (NIL NIL "a" "b.test") (NIL NIL "c" "d.test") '
                      b'(NIL NIL NIL NIL)', env)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=400))
    def test_fuzz_mime(self, data):
        data = crlf(data)
        root = Part(data, 0, len(data))
        sexp(body_structure(root, True))
        sexp(envelope(root))
        for numbers in ((), (1,), (2, 1), (1, 1, 1)):
            for spec in ("", "HEADER", "TEXT", "MIME" if numbers else ""):
                section(data, numbers, spec)


class UidListTests(unittest.TestCase):
    def test_round_trip_and_dovecot_formats(self):
        ul = UidList(uidvalidity=5, uidnext=10, recent=8, uids={"a": 3, "b": 9})
        self.assertEqual(parse_uidlist(ul.render()), ul)
        dovecot = parse_uidlist(b"3 V1600000000 N42 Gabc\n7 :a,S=1\n9 W5 :b,S=2:2,S\nbad\n")
        self.assertEqual((dovecot.uidvalidity, dovecot.uidnext, dovecot.uids, dovecot.recent),
                         (1600000000, 42, {"a": 7, "b": 9}, 9))
        old = parse_uidlist(b"1 1234 5\n1 x.host\n")
        self.assertEqual((old.uidvalidity, old.uidnext, old.uids), (1234, 5, {"x.host": 1}))
