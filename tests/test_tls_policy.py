"""TLS policy on every listener (SECURITY-TESTS TLSV-1..5, TLSV-7).

A real handshake with the standard library's ``ssl`` module against an
in-process instance: old protocol versions and suites without forward
secrecy or AEAD are refused, TLS 1.2 with ECDHE-AEAD and TLS 1.3 succeed,
and a client offering ALPN must offer the port's own protocol (ALPACA).
The client is opened up (``@SECLEVEL=0``, minimum TLS 1.0) so that a refusal
is the server's doing, not the client's.
"""

from __future__ import annotations

import socket
import ssl

from twisted.internet import defer
from twisted.trial import unittest

from tests.support.instance import Instance, in_thread

IMPLICIT = ("submissions", "imaps", "pop3s")
OWN_ALPN = {"submissions": "smtp", "imaps": "imap", "pop3s": "pop3", "smtp": "smtp"}


def client_context(version: ssl.TLSVersion | None = None, ciphers: str | None = None,
                   alpn: list[str] | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_ciphers((ciphers or "ALL") + ":@SECLEVEL=0")
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def handshake(port: int, ctx: ssl.SSLContext, starttls: bool = False) -> ssl.SSLSocket:
    """A TLS socket on ``port`` (after EHLO/STARTTLS when ``starttls``); raises
    ssl.SSLError or ConnectionError when the server refuses the handshake."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        if starttls:
            f = sock.makefile("rb")
            assert f.readline().startswith(b"220"), "no greeting"
            sock.sendall(b"EHLO client.example\r\n")
            while not f.readline().startswith(b"250 "):
                pass
            sock.sendall(b"STARTTLS\r\n")
            assert f.readline().startswith(b"220"), "STARTTLS refused"
        return ctx.wrap_socket(sock)
    except BaseException:
        sock.close()
        raise


class TLSPolicyTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        listen = [(name, 0) for name in ("smtp",) + IMPLICIT]
        self.instance = Instance(self.mktemp(), listen=listen)
        self.instance.start()
        self.addCleanup(self.instance.stop)

    def accepted(self, name: str, ctx: ssl.SSLContext) -> ssl.SSLSocket:
        return handshake(self.instance.port(name), ctx, starttls=name == "smtp")

    def refused(self, name: str, ctx: ssl.SSLContext) -> str:
        try:
            sock = self.accepted(name, ctx)
        except (ssl.SSLError, ConnectionError) as e:
            return str(e)
        try:
            # TLS 1.3: a refusal by the server arrives after the client's Finished.
            sock.settimeout(5)
            sock.recv(1)
        except (ssl.SSLError, ConnectionError) as e:
            return str(e)
        finally:
            sock.close()
        raise AssertionError(f"{name}: handshake accepted, {sock.version()} {sock.cipher()}")

    @defer.inlineCallbacks
    def test_old_versions_refused(self):
        """TLSV-1: TLS 1.0 and 1.1 fail the handshake (RFC 8996)."""
        def check():
            for name in ("smtp",) + IMPLICIT:
                for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
                    self.refused(name, client_context(version))
        yield in_thread(check)

    @defer.inlineCallbacks
    def test_tls12_only_forward_secret_aead_suites(self):
        """TLSV-2: TLS 1.2 suites without ECDHE or without AEAD are refused."""
        weak = ["AES128-GCM-SHA256", "AES256-SHA", "ECDHE-RSA-AES128-SHA",
                "ECDHE-RSA-AES256-SHA384", "DES-CBC3-SHA", "aNULL", "eNULL"]

        def check():
            for name in ("smtp",) + IMPLICIT:
                for suite in weak:
                    try:
                        ctx = client_context(ssl.TLSVersion.TLSv1_2, suite)
                    except ssl.SSLError:
                        continue  # this OpenSSL no longer has the suite at all
                    self.refused(name, ctx)
                for suite in ("ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-CHACHA20-POLY1305"):
                    with self.accepted(name, client_context(ssl.TLSVersion.TLSv1_2,
                                                            suite)) as sock:
                        assert sock.cipher()[0] == suite, sock.cipher()
        yield in_thread(check)

    @defer.inlineCallbacks
    def test_tls13_and_no_compression(self):
        """TLSV-3 and TLSV-4: TLS 1.3 succeeds, nothing is compressed."""
        def check():
            for name in ("smtp",) + IMPLICIT:
                with self.accepted(name, client_context(ssl.TLSVersion.TLSv1_3)) as sock:
                    assert sock.version() == "TLSv1.3", sock.version()
                    assert sock.compression() is None
        yield in_thread(check)

    @defer.inlineCallbacks
    def test_alpn_must_name_the_ports_protocol(self):
        """TLSV-5: ALPN ``http/1.1`` (or another mail protocol) is refused on
        every TLS port; the port's own name is selected; no ALPN is fine."""
        def check():
            for name in ("smtp",) + IMPLICIT:
                own = OWN_ALPN[name]
                for alpn in (["http/1.1"], ["h2", "http/1.1"],
                             [p for p in ("smtp", "imap", "pop3") if p != own]):
                    reason = self.refused(name, client_context(alpn=alpn))
                    assert "no application protocol" in reason.lower().replace("_", " "), (name, alpn, reason)
                with self.accepted(name, client_context(alpn=["http/1.1", own])) as sock:
                    assert sock.selected_alpn_protocol() == own, (name, sock.selected_alpn_protocol())
                    if name != "smtp":
                        assert sock.recv(100)[:1] in (b"2", b"*", b"+"), "no greeting"
                with self.accepted(name, client_context()) as sock:
                    assert sock.selected_alpn_protocol() is None
        yield in_thread(check)

    @defer.inlineCallbacks
    def test_plaintext_on_an_implicit_tls_port(self):
        """TLSV-7: no plaintext banner on 465/993/995; the connection closes."""
        def check():
            for name in IMPLICIT:
                with socket.create_connection(("127.0.0.1", self.instance.port(name)),
                                              timeout=10) as sock:
                    sock.sendall(b"EHLO client.example\r\nCAPA\r\na CAPABILITY\r\n")
                    data = b""
                    while True:
                        try:
                            chunk = sock.recv(4096)
                        except ConnectionResetError:
                            break
                        if not chunk:
                            break
                        data += chunk
                    # At most a TLS alert record (content type 21), never text.
                    assert data == b"" or data[:1] == b"\x15", (name, data[:40])
        yield in_thread(check)
