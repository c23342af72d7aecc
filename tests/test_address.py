"""MAIL FROM / RCPT TO arguments: parse_path_and_params (RFC 5321 4.1.2)."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from mailstack.smtp.address import AddressSyntax, Mailbox, parse_mailbox, parse_path_and_params


def parse(arg: bytes, allow_null: bool = False):
    return parse_path_and_params(arg, allow_null)


class PathTests(unittest.SynchronousTestCase):
    def assertSyntax(self, arg: bytes, reason: str, allow_null: bool = False) -> None:
        e = self.assertRaises(AddressSyntax, parse_path_and_params, arg, allow_null)
        self.assertIn(reason, str(e), arg)

    def test_plain(self):
        self.assertEqual(parse(b"<Bob.Smith@Example.TEST>"),
                         (Mailbox("Bob.Smith", "example.test"), {}))
        # The local part keeps its case (RFC 5321 2.4); the domain is canonical.
        self.assertEqual(str(parse(b"<Bob@Example.TEST.>")[0]), "Bob@example.test")

    def test_lenient_forms_of_real_clients(self):
        for arg in (b"<bob@example.test>", b" <bob@example.test>", b"bob@example.test",
                    b"<bob@example.test> ", b"  bob@example.test  "):
            self.assertEqual(parse(arg), (Mailbox("bob", "example.test"), {}), arg)

    def test_null_path(self):
        self.assertEqual(parse(b"<>", allow_null=True), (None, {}))
        self.assertEqual(parse(b"<> BODY=8BITMIME", allow_null=True), (None, {"BODY": "8BITMIME"}))
        self.assertSyntax(b"<>", "empty address")
        self.assertSyntax(b"", "empty address")

    def test_source_routes_are_dropped(self):
        # RFC 5321 3.6.1 and RELAY-7: the route is ignored, the mailbox kept.
        for arg in (b"<@local.test:v@evil.test>", b"<@local.test,@x.test:v@evil.test>",
                    b"<@[192.0.2.1]:v@evil.test>"):
            self.assertEqual(parse(arg)[0], Mailbox("v", "evil.test"), arg)
        self.assertSyntax(b"<@local.test:>", "missing @domain")

    def test_quoted_local_parts(self):
        # Dot-atom content needs no quotes: the same mailbox as unquoted.
        self.assertEqual(parse(b'<"bob"@example.test>')[0], Mailbox("bob", "example.test"))
        self.assertEqual(parse(b'<"bob.smith"@example.test>')[0],
                         Mailbox("bob.smith", "example.test"))
        # Anything else stays a quoted name, never re-parsed (RELAY-4).
        box = parse(b'<"v@evil.test"@local.test>')[0]
        self.assertEqual(box, Mailbox("v@evil.test", "local.test", quoted=True))
        self.assertEqual(str(box), '"v@evil.test"@local.test')
        box = parse(b'<"a \\"b\\" \\\\ c"@example.test>')[0]
        self.assertEqual(box, Mailbox('a "b" \\ c', "example.test", quoted=True))
        self.assertEqual(str(box), '"a \\"b\\" \\\\ c"@example.test')
        self.assertEqual(parse(b'<".bob"@example.test>')[0].quoted, True)
        self.assertEqual(parse(b'<"bob>"@example.test>')[0], Mailbox("bob>", "example.test", True))

    def test_bad_quoted_local_parts(self):
        self.assertSyntax(b'<"v@evil.test">', "expected @ after the quoted local part")  # RELAY-5
        self.assertSyntax(b'<"bob@example.test>', "unbalanced < >")
        self.assertSyntax(b'"bob@example.test', "unterminated quoted string")
        self.assertSyntax(b'<"bob"x@example.test>', "expected @ after the quoted local part")
        self.assertSyntax('<"bøb"@example.test>'.encode(), "bad quoted local part")

    def test_percent_hack_and_bang_paths_are_just_names(self):
        # RELAY-2, RELAY-8: not interpreted; no local user has such a name.
        self.assertEqual(parse(b"<v%evil.test@local.test>")[0],
                         Mailbox("v%evil.test", "local.test"))
        self.assertEqual(parse(b"<evil.test!v@local.test>")[0],
                         Mailbox("evil.test!v", "local.test"))
        self.assertSyntax(b"<v%evil.test>", "missing @domain")
        self.assertSyntax(b"<evil.test!v>", "missing @domain")

    def test_too_many_at_signs(self):
        # RELAY-6.
        self.assertSyntax(b"<v@evil.test@local.test>", "too many @")
        self.assertSyntax(b'<"v"@evil.test@local.test>', "too many @")

    def test_control_characters(self):
        for arg in (b"<bob@example.test>\r\nRSET", b"<bob\0@example.test>", b"<bob@exa\tmple.test>",
                    b"<bob@example.test>\x7f", b"<bob@example.test> SIZE=1\n", b'<"a\rb"@x.test>'):
            self.assertSyntax(arg, "control characters are not allowed")

    def test_bad_syntax(self):
        for arg, reason in [
            (b"<bob>", "missing @domain"),
            (b"<bob@>", "missing domain"),
            (b"<@example.test>", "bad local part"),
            (b"<.bob@example.test>", "bad local part"),
            (b"<bob.@example.test>", "bad local part"),
            (b"<bo..b@example.test>", "bad local part"),
            (b"<bob smith@example.test>", "bad local part"),
            (b"<bob@example..test>", "bad domain"),
            (b"<bob@-example.test>", "bad domain"),
            (b"<bob@exa_mple.test>", "bad domain"),
            (b"<bob@example.test", "unbalanced < >"),
            (b"<bob@example.test>>", "junk after the address"),
            (b"<bob@example.test>SIZE=1", "junk after the address"),
            ("<bøb@example.test>".encode(), "bad local part"),
        ]:
            self.assertSyntax(arg, reason)

    def test_non_ascii_domain_is_refused(self):
        # No SMTPUTF8 advertised (RFC 6531 3.4); the A-label form is fine.
        self.assertSyntax("<bob@bücher.example>".encode(), "non-ASCII domain without SMTPUTF8")
        self.assertEqual(parse(b"<bob@XN--BCHER-KVA.example>")[0],
                         Mailbox("bob", "xn--bcher-kva.example"))

    def test_length_limits(self):
        # LIM-3 (RFC 5321 4.5.3.1.1-3): local part 64, domain 255, path 256 with brackets.
        self.assertEqual(parse(b"<" + b"a" * 64 + b"@example.test>")[0].local, "a" * 64)
        self.assertSyntax(b"<" + b"a" * 65 + b"@example.test>", "local part longer than 64")
        self.assertSyntax(b'<"' + b"a b" * 21 + b'"@example.test>', "local part longer than 64")
        domain = b".".join([b"d" * 62] * 4)  # 251 octets
        self.assertEqual(len(parse(b"<a@" + domain + b">")[0].domain), 251)
        # Within a path the 256 limit comes first; parse_mailbox checks the domain too.
        self.assertSyntax(b"<a@" + domain + b".dddd>", "address too long")
        e = self.assertRaises(AddressSyntax, parse_mailbox, b"a@" + domain + b".dddd")
        self.assertIn("domain longer than 255", str(e))
        path = b"a" * 62 + b"@" + b".".join([b"d" * 62] * 3) + b"." + b"d" * 2  # 254 octets
        self.assertEqual(len(path), 254)
        self.assertIsNotNone(parse(b"<" + path + b">")[0])
        self.assertSyntax(b"<" + path + b"d>", "address too long")
        self.assertSyntax(b"<@" + b"r" * 250 + b":a@example.test>", "address too long")
        self.assertSyntax(b"x" * 100_000 + b"@example.test", "address too long")

    def test_address_literals(self):
        # RELAY-9: parsed into one spelling; the session then denies them.
        for arg, domain in [
            (b"<v@[192.0.2.1]>", "[192.0.2.1]"),
            (b"<v@[127.0.0.1]>", "[127.0.0.1]"),
            (b"<v@[IPv6:2001:db8::1]>", "[IPv6:2001:db8::1]"),
            (b"<v@[ipv6:2001:DB8:0:0::1]>", "[IPv6:2001:db8::1]"),
            (b"<v@[IPv6:::ffff:192.0.2.1]>", "[IPv6:::ffff:c000:201]"),
            (b"<v@[X-Tag:some-thing]>", "[x-tag:some-thing]"),
        ]:
            box = parse(arg)[0]
            self.assertEqual(box.domain, domain, arg)
            self.assertTrue(box.is_literal)
        self.assertFalse(parse(b"<v@example.test>")[0].is_literal)
        for arg in (b"<v@[]>", b"<v@[192.0.2]>", b"<v@[192.0.2.256]>", b"<v@[01.2.3.4]>",
                    b"<v@[foo]>", b"<v@[example.test]>", b"<v@[IPv6:2001:db8::g]>",
                    b"<v@[IPv6:fe80::1%eth0]>", b"<v@[IPv6:192.0.2.1]>", b"<v@[-tag:x]>",
                    b"<v@[a[b]>", b"<v@[192.0.2.1]x>", b"<v@[1.2.3.4>"):
            self.assertSyntax(arg, "")


class ParameterTests(unittest.SynchronousTestCase):
    def test_parameters(self):
        self.assertEqual(parse(b"<a@example.test> SIZE=1000 BODY=8BITMIME", True)[1],
                         {"SIZE": "1000", "BODY": "8BITMIME"})
        # Keywords are case-insensitive (RFC 5321 4.1.2), values are kept as sent.
        self.assertEqual(parse(b"<a@example.test>  size=12   body=7bit ", True)[1],
                         {"SIZE": "12", "BODY": "7bit"})
        self.assertEqual(parse(b"a@example.test SMTPUTF8", True)[1], {"SMTPUTF8": ""})
        self.assertEqual(parse(b"<a@example.test> X-FOO=a+b/c", True)[1], {"X-FOO": "a+b/c"})

    def test_bad_parameters(self):
        for rest in (b"SIZE=", b"=1000", b"SI_ZE=1", b"-SIZE=1", b"SIZE=a=b", b"SIZE==1",
                     "BODY=8BITMIMÉ".encode()):
            e = self.assertRaises(AddressSyntax, parse, b"<a@example.test> " + rest, True)
            self.assertIn("bad parameter", str(e))

    def test_bad_parameter_is_quoted_briefly(self):
        e = self.assertRaises(AddressSyntax, parse, b"<a@example.test> " + b"=" * 500, True)
        self.assertLess(len(str(e)), 80)


class FuzzTests(unittest.SynchronousTestCase):
    """STYLE.md 12: untrusted input raises AddressSyntax or parses, nothing else."""

    def check(self, arg: bytes) -> None:
        for allow_null in (False, True):
            try:
                mailbox, params = parse_path_and_params(arg, allow_null)
            except AddressSyntax:
                continue
            for key, value in params.items():
                self.assertEqual(key, key.upper())
                self.assertTrue(key.isascii() and value.isascii())
            if mailbox is None:
                self.assertTrue(allow_null)
                continue
            text = str(mailbox)
            self.assertTrue(text.isascii())
            self.assertFalse(any(ord(c) < 0x20 or ord(c) == 0x7F for c in text))
            self.assertLessEqual(len(mailbox.domain), 255)
            # What the session keeps parses back to the same mailbox.
            self.assertEqual(parse_mailbox(text.encode("ascii")), mailbox)

    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=300))
    @example(b"<\"\\")
    @example(b"<@:>")
    @example(b"<a@[IPv6:]>")
    def test_random_bytes(self, data):
        self.check(data)

    @settings(max_examples=500, deadline=None)
    @given(st.lists(st.sampled_from([b"<", b">", b"@", b'"', b"\\", b".", b":", b",", b"[", b"]",
                                     b" ", b"=", b"a", b"B", b"-", b"IPv6:", b"1", b"%", b"!",
                                     b"\xc3\xa9", b"\r\n", b"SIZE=1", b"example.test"]),
                    max_size=40).map(b"".join))
    def test_address_shaped_bytes(self, data):
        self.check(data)
