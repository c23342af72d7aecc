"""Hardening: connection limits on IMAP and POP3, sessions per IMAP user,
per-account login failure limits (SECURITY-TESTS LIM, AUTH-5).

Real sockets on loopback against an in-process instance. Other loopback
addresses (127.0.0.2) stand in for a second client address.
"""

from __future__ import annotations

import datetime
import imaplib
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest

from mailstack.auth.limiter import FailureLimiter, account_key

from tests.support.instance import (HOSTNAME, PASSWORD, DaemonProcess, Instance, free_port,
                                    in_thread, wait_for, write_instance)

ALICE = "alice@example.test"
DEMO = "demo@example.test"


def start(test, listen, **sections) -> Instance:
    sections.setdefault("auth", {})
    sections["auth"] = {"allow_plaintext_loopback": True, "failure_delay": 0.01,
                        **sections["auth"]}
    instance = Instance(test.mktemp(), listen=listen, sections=sections)
    instance.start()
    test.addCleanup(lambda: instance.stop() if instance.service.running else None)
    return instance


class Peer:
    """A line client from a chosen loopback source address."""

    def __init__(self, port: int, source: str = "127.0.0.1", tls: bool = False):
        sock = socket.socket()
        sock.settimeout(10)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
        if tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            sock = ctx.wrap_socket(sock)
        self.sock = sock
        self.file = sock.makefile("rb")
        self.greeting = self.line()

    def line(self) -> bytes:
        return self.file.readline()

    def cmd(self, command: bytes, tag: bytes | None = None) -> list[bytes]:
        """Send a command; IMAP: lines up to the tagged reply, POP3: the one reply line."""
        self.sock.sendall(command + b"\r\n")
        if tag is None:
            return [self.line()]
        lines = []
        while True:
            line = self.line()
            if not line:
                raise EOFError(b"".join(lines))
            lines.append(line)
            if line.startswith(tag + b" "):
                return lines

    def closed(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, ssl.SSLError):
            return True

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class _LimitTests:
    listen: tuple
    section: str
    plain: str
    tls: str

    def refused(self, peer: Peer) -> bool:
        raise NotImplementedError

    def accepted(self, peer: Peer) -> bool:
        raise NotImplementedError

    @defer.inlineCallbacks
    def test_per_ip_limit(self):
        instance = start(self, self.listen, **{self.section: {"max_connections_per_ip": 2}})
        port = instance.port(self.plain)

        def check():
            a, b = Peer(port), Peer(port)
            assert self.accepted(a) and self.accepted(b)
            c = Peer(port)
            assert self.refused(c), c.greeting
            assert c.closed()
            # Another address is not affected.
            d = Peer(port, "127.0.0.2")
            assert self.accepted(d), d.greeting
            # Each listener counts its own connections (as SMTP's do).
            e = Peer(instance.port(self.tls), tls=True)
            assert self.accepted(e), e.greeting
            a.close()
            return b, d, e

        kept = yield in_thread(check)
        # The closed connection is released; a new one from the address is accepted.

        def again():
            import time
            deadline = time.monotonic() + 10
            while True:
                p = Peer(port)
                if self.accepted(p):
                    return p
                assert time.monotonic() < deadline, p.greeting
                p.close()
                time.sleep(0.05)

        p = yield in_thread(again)
        for peer in (*kept, p):
            peer.close()

    @defer.inlineCallbacks
    def test_total_limit(self):
        instance = start(self, self.listen, **{self.section: {"max_connections": 2}})
        port = instance.port(self.plain)

        def check():
            a, b = Peer(port), Peer(port, "127.0.0.2")
            assert self.accepted(a) and self.accepted(b)
            c = Peer(port, "127.0.0.3")
            assert self.refused(c), c.greeting
            assert c.closed()
            for p in (a, b):
                p.close()

        yield in_thread(check)


class POP3LimitTests(_LimitTests, unittest.TestCase):
    timeout = 60
    listen = (("smtp", 0), ("pop3", 0), ("pop3s", 0))
    section, plain, tls = "pop3", "pop3", "pop3s"

    def accepted(self, peer):
        return peer.greeting.startswith(b"+OK")

    def refused(self, peer):
        return peer.greeting.startswith(b"-ERR [SYS/TEMP] Too many connections")


class IMAPLimitTests(_LimitTests, unittest.TestCase):
    timeout = 60
    listen = (("smtp", 0), ("imap", 0), ("imaps", 0))
    section, plain, tls = "imap", "imap", "imaps"

    def accepted(self, peer):
        return peer.greeting.startswith(b"* OK")

    def refused(self, peer):
        return peer.greeting.startswith(b"* BYE [UNAVAILABLE] Too many connections")

    @defer.inlineCallbacks
    def test_sessions_per_user(self):
        instance = start(self, self.listen, imap={"max_sessions_per_user": 2})
        port, tls_port = instance.port("imap"), instance.port("imaps")
        login = b' "' + PASSWORD.encode() + b'"'

        def check():
            a = Peer(port)
            assert a.cmd(b"a LOGIN " + DEMO.encode() + login, b"a")[-1].startswith(b"a OK")
            b = Peer(tls_port, tls=True)
            assert b.cmd(b"b LOGIN " + DEMO.encode() + login, b"b")[-1].startswith(b"b OK")
            # A third session, on either listener: NO [LIMIT], still not logged in.
            c = Peer(port)
            reply = c.cmd(b"c LOGIN " + DEMO.encode() + login, b"c")[-1]
            assert reply.startswith(b"c NO [LIMIT] "), reply
            assert c.cmd(b"c2 SELECT INBOX", b"c2")[-1].startswith(b"c2 BAD"), "not logged in"
            # Another user is not affected.
            assert c.cmd(b"c3 LOGIN " + ALICE.encode() + login, b"c3")[-1].startswith(b"c3 OK")
            # A LOGOUT frees a place.
            assert b.cmd(b"b2 LOGOUT", b"b2")[-1].startswith(b"b2 OK")
            b.close()
            return a, c

        a, c = yield in_thread(check)
        yield wait_for(lambda: instance.service.imap_user_sessions.get(DEMO) == 1)

        def again():
            d = Peer(port)
            reply = d.cmd(b"d LOGIN " + DEMO.encode() + login, b"d")[-1]
            assert reply.startswith(b"d OK"), reply
            for p in (a, c, d):
                p.close()

        yield in_thread(again)
        yield wait_for(lambda: not instance.service.imap_user_sessions)


class AccountLockTests(unittest.TestCase):
    """AUTH-5: failures for one account from many addresses lock it for the window."""

    timeout = 60
    listen = (("smtp", 0), ("imap", 0), ("pop3", 0))

    def setUp(self):
        self.instance = start(self, self.listen,
                              auth={"max_failures_per_account": 3, "max_failures_per_ip": 100,
                                    "failure_window": 60.0})
        self.logged: list[str] = []

        def observer(event):
            if event.get("log_namespace", "").startswith("mailstack"):
                self.logged.append(formatEvent(event))

        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def imap_login(self, user: str, password: str, source: str) -> bytes:
        p = Peer(self.instance.port("imap"), source)
        try:
            return p.cmd(b'a LOGIN "' + user.encode() + b'" "' + password.encode() + b'"',
                         b"a")[-1]
        finally:
            p.close()

    def pop3_login(self, user: str, password: str, source: str) -> bytes:
        p = Peer(self.instance.port("pop3"), source)
        try:
            assert p.cmd(b"USER " + user.encode())[0].startswith(b"+OK")
            return p.cmd(b"PASS " + password.encode())[0]
        finally:
            p.close()

    @defer.inlineCallbacks
    def test_lock_out_across_addresses_and_protocols(self):
        def check():
            # Three wrong passwords from three addresses, over both protocols.
            assert self.imap_login(ALICE, "bad1", "127.0.0.1").startswith(
                b"a NO [AUTHENTICATIONFAILED]")
            assert self.pop3_login(ALICE, "bad2", "127.0.0.2").startswith(b"-ERR [AUTH]")
            assert self.imap_login("Alice@EXAMPLE.test", "bad3", "127.0.0.3").startswith(
                b"a NO [AUTHENTICATIONFAILED]")
            # Now even the right password is refused, from a new address, in any spelling.
            reply = self.imap_login(ALICE, PASSWORD, "127.0.0.4")
            assert reply.startswith(b"a NO [UNAVAILABLE] Too many failed logins for this "
                                    b"account"), reply
            reply = self.pop3_login("ALICE@example.test", PASSWORD, "127.0.0.5")
            assert reply.startswith(b"-ERR [SYS/TEMP] Too many failed logins for this "
                                    b"account"), reply
            # Other accounts are not affected.
            assert self.imap_login(DEMO, PASSWORD, "127.0.0.4").startswith(b"a OK")
            assert self.pop3_login(DEMO, PASSWORD, "127.0.0.5").startswith(b"+OK")
            # Unknown accounts lock the same way (the reply does not tell them apart).
            for source in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
                self.imap_login("nobody@example.test", PASSWORD, source)
            reply = self.imap_login("nobody@example.test", PASSWORD, "127.0.0.6")
            assert reply.startswith(b"a NO [UNAVAILABLE] Too many failed logins for this "
                                    b"account"), reply

        yield in_thread(check)
        self.assertIn("auth failed: rip=[127.0.0.2], user=<alice@example.test>", self.logged)
        self.assertIn("auth locked: rip=[127.0.0.4], user=<alice@example.test>", self.logged)
        self.assertIn("auth locked: rip=[127.0.0.5], user=<alice@example.test>", self.logged)
        # The fail2ban filter of the README matches both kinds of line.
        pattern = re.compile(r"\] auth (?:failed|locked): rip=\[(?P<host>[0-9.]+)\], user=")
        hosts = {m.group("host") for line in self.logged
                 for m in [pattern.search("[mailstack.auth#info" + "] " + line)] if m}
        self.assertTrue({"127.0.0.1", "127.0.0.2", "127.0.0.4", "127.0.0.5"} <= hosts, hosts)

    @defer.inlineCallbacks
    def test_lock_expires_with_the_window(self):
        limiter = self.instance.service.login_guard.per_account
        clock = Clock()
        limiter._clock = clock
        for _ in range(3):
            limiter.failed(ALICE)

        def locked():
            return self.imap_login(ALICE, PASSWORD, "127.0.0.1")

        reply = yield in_thread(locked)
        self.assertTrue(reply.startswith(b"a NO [UNAVAILABLE]"), reply)
        clock.advance(61)
        reply = yield in_thread(locked)
        self.assertTrue(reply.startswith(b"a OK"), reply)


class AccountKeyTests(unittest.TestCase):
    def test_names(self):
        self.assertEqual(account_key(b"Alice@Example.TEST"), "alice@example.test")
        self.assertEqual(account_key(" alice@example.test"), "alice@example.test")
        for bad in (b"\xff@x.test", b"alice", b"../bob@x.test", b"a\0b@x.test"):
            self.assertIsNone(account_key(bad), bad)

    def test_bounded_bookkeeping(self):
        clock = Clock()
        limiter = FailureLimiter(2, 60.0, clock, max_entries=100)
        for i in range(1000):
            limiter.failed(f"user{i}@example.test")
        self.assertEqual(len(limiter._failures), 100)
        limiter.failed("user999@example.test")
        self.assertTrue(limiter.blocked("user999@example.test"))
        clock.advance(61)
        self.assertFalse(limiter.blocked("user999@example.test"))


def _certbot_pair(directory: Path, hostname: str, n: int) -> tuple[Path, Path, bytes]:
    """A certificate issued by a throw-away CA, written the way certbot does:
    ``archive/fullchainN.pem`` (leaf then CA) and ``archive/privkeyN.pem``
    (PKCS#8). Returns the two paths and the leaf in DER."""
    now = datetime.datetime.now(datetime.timezone.utc)

    def build(subject, issuer, public_key, signer, ca):
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                .public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=90))
                .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                .sign(signer, hashes.SHA256()))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Test CA {n}")])
    ca = build(ca_name, ca_name, ca_key.public_key(), ca_key, True)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]), ca_name,
                 key.public_key(), ca_key, False)
    archive = directory / "archive"
    archive.mkdir(exist_ok=True, mode=0o700)
    fullchain, privkey = archive / f"fullchain{n}.pem", archive / f"privkey{n}.pem"
    fullchain.write_bytes(leaf.public_bytes(serialization.Encoding.PEM)
                          + ca.public_bytes(serialization.Encoding.PEM))
    fd = os.open(privkey, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return fullchain, privkey, leaf.public_bytes(serialization.Encoding.DER)


def _point(link: Path, target: Path) -> None:
    """Replace ``link`` by a symlink to ``target`` atomically (as certbot renews live/)."""
    tmp = link.with_name(link.name + ".new")
    tmp.symlink_to(target)
    os.replace(tmp, link)


class TLSReloadTests(unittest.TestCase):
    """SIGHUP: new handshakes get the new certificate, sessions in TLS stay."""

    timeout = 120

    def served(self, port: int) -> bytes:
        return ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate(("127.0.0.1", port),
                                                                    timeout=10))

    def wait_served(self, port: int, der: bytes) -> None:
        deadline = time.monotonic() + 15
        while self.served(port) != der:
            assert time.monotonic() < deadline, "the new certificate is not served"
            time.sleep(0.1)

    @staticmethod
    def _close(session) -> None:
        try:
            session.shutdown()
        except OSError:
            pass

    def test_sighup_reloads_certificate_and_key(self):
        root = Path(self.mktemp()).resolve()
        smtp_port, imaps_port = free_port(), free_port()
        daemon = DaemonProcess(root, listen=(("smtp", smtp_port), ("imaps", imaps_port)))
        daemon.port = smtp_port
        daemon.start()
        self.addCleanup(daemon.stop)
        cert, key = root / "cert.pem", root / "key.pem"
        first = self.served(imaps_port)

        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        session = imaplib.IMAP4_SSL("127.0.0.1", imaps_port, ssl_context=ctx, timeout=10)
        self.addCleanup(self._close, session)
        session.login(DEMO, PASSWORD)
        self.assertEqual(session.select("INBOX")[0], "OK")

        # certbot renews: new files in archive/, the configured names become
        # symlinks to them, and a deploy hook sends SIGHUP.
        fullchain, privkey, second = _certbot_pair(root, HOSTNAME, 2)
        _point(cert, fullchain)
        _point(key, privkey)
        self.assertEqual(self.served(imaps_port), first, "nothing changes before SIGHUP")
        os.kill(daemon.proc.pid, signal.SIGHUP)
        self.wait_served(imaps_port, second)

        # The session opened before the reload goes on working.
        self.assertEqual(session.noop()[0], "OK")
        self.assertEqual(session.select("INBOX")[0], "OK")
        self.assertEqual(session.list()[0], "OK")

        # A broken renewal (key of another certificate) is refused; the
        # server keeps the certificate it had and logs why.
        _, other_key, _ = _certbot_pair(root, HOSTNAME, 3)
        _point(key, other_key)
        os.kill(daemon.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 15
        while "TLS reload failed" not in daemon.log.read_text():
            self.assertLess(time.monotonic(), deadline, "no reload error logged")
            time.sleep(0.1)
        self.assertEqual(self.served(imaps_port), second)
        self.assertEqual(session.noop()[0], "OK")
        self.assertIsNone(daemon.proc.poll(), "the server is still running")
        session.logout()


class ModeTests(unittest.TestCase):
    """What `mailstack init`, the store and the queue create is the owner's alone."""

    timeout = 120

    def test_init_under_a_lax_umask(self):
        root = Path(self.mktemp()).resolve()
        config = write_instance(root, users=(), tls=False,
                                server={"mail_root": "data/mail", "spool_dir": "data/spool"})
        # A mail root that exists already, as in a checkout (maildirs/.gitkeep).
        (root / "data" / "mail").mkdir(mode=0o755, parents=True)
        os.chmod(root / "data" / "mail", 0o755)
        with open(config, "a") as f:
            f.write('[tls]\ncertificate = "tls/cert.pem"\nprivate_key = "tls/key.pem"\n')
        done = subprocess.run([sys.executable, "-m", "mailstack.cli", "init", "--user",
                               DEMO, "--config", str(config)],
                              capture_output=True, text=True, timeout=60, cwd=root,
                              preexec_fn=lambda: os.umask(0o022))
        self.assertEqual(done.returncode, 0, done.stderr)

        def mode(path: Path) -> int:
            return path.stat().st_mode & 0o777

        self.assertEqual(mode(root / "data" / "mail"), 0o700)
        for sub in ("", "tmp", "queue"):
            self.assertEqual(mode(root / "data" / "spool" / sub), 0o700, sub)
        self.assertEqual(mode(root / "users"), 0o600)
        self.assertEqual(mode(root / "tls" / "key.pem"), 0o600)
        domain_keys = root / "dkim" / "example.test"
        self.assertEqual(mode(domain_keys), 0o700)
        keys = list(domain_keys.iterdir())
        self.assertTrue(keys)
        for key in keys:
            self.assertEqual(mode(key), 0o600, key)

    @defer.inlineCallbacks
    def test_delivered_mail_and_start_up_warnings(self):
        old = os.umask(0o022)
        self.addCleanup(os.umask, old)
        instance = Instance(self.mktemp(), listen=(("smtp", 0),))
        self.assertEqual(instance.service.check_modes(), [])
        instance.start()
        self.addCleanup(instance.stop)

        def send():
            import smtplib
            with smtplib.SMTP("127.0.0.1", instance.smtp_port, timeout=10) as client:
                client.sendmail("sender@remote.test", [DEMO],
                                b"From: <sender@remote.test>\r\nSubject: x\r\n\r\nbody\r\n")

        yield in_thread(send)
        yield wait_for(lambda: instance.messages(DEMO))
        mail_root = instance.config.server.mail_root
        for path in [mail_root, *mail_root.rglob("*")]:
            want = 0o700 if path.is_dir() else 0o600
            self.assertEqual(path.stat().st_mode & 0o777, want, path)
        spool = instance.config.server.spool_dir
        for path in [spool, *spool.rglob("*")]:
            if path.is_dir():
                self.assertEqual(path.stat().st_mode & 0o777, 0o700, path)
            else:
                self.assertEqual(path.stat().st_mode & 0o077, 0, path)

        # Made lax by hand: each one is named at start-up.
        mail_root.chmod(0o755)
        instance.config.server.users_file.chmod(0o644)
        instance.config.tls.private_key.chmod(0o644)
        problems = instance.service.check_modes()
        self.assertEqual(len(problems), 3, problems)
        self.assertIn(f"mail root directory {mail_root} has mode 0755; use 0700", problems)
        self.assertTrue(any("users file" in p and "use 0600" in p for p in problems))
        self.assertTrue(any("TLS private key" in p for p in problems))
        # root:mail 0640 for the TLS key (the README's certbot hook) is fine.
        instance.config.tls.private_key.chmod(0o640)
        self.assertEqual(len(instance.service.check_modes()), 2)
