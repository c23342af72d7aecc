"""The outbound client against a next hop that injects a reply around STARTTLS
(SECURITY-TESTS TLS-7): what the server sent behind its 220 must be ignored."""

import socket
import ssl
import threading
from pathlib import Path

from twisted.internet import defer

from mailstack.tls import make_self_signed
from tests.support.instance import in_thread, wait_for
from tests.test_outbound import OutboundTestCase


class InjectingServer:
    """One-connection SMTP server: ``220 go ahead\\r\\n250 injected`` in one write
    to STARTTLS, then an honest dialogue over TLS. Records the commands."""

    def __init__(self, cert: str, key: str):
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(20)
        self.port = self.listener.getsockname()[1]
        self.commands: list[bytes] = []
        self.message = b""
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        conn, _ = self.listener.accept()
        conn.settimeout(20)
        with conn:
            reader = conn.makefile("rb")
            conn.sendall(b"220 evil ESMTP\r\n")
            self.commands.append(reader.readline())                      # EHLO
            conn.sendall(b"250-evil\r\n250 STARTTLS\r\n")
            self.commands.append(reader.readline())                      # STARTTLS
            conn.sendall(b"220 go ahead\r\n250 injected\r\n")
            tls = self.context.wrap_socket(conn, server_side=True)
            reader = tls.makefile("rb")
            answers = {b"EHLO": b"250-evil\r\n250 8BITMIME\r\n", b"MAIL": b"250 2.1.0 Ok\r\n",
                       b"RCPT": b"250 2.1.5 Ok\r\n", b"DATA": b"354 go on\r\n",
                       b"QUIT": b"221 bye\r\n", b"RSET": b"250 Ok\r\n"}
            while line := reader.readline():
                self.commands.append(line)
                verb = line[:4].upper()
                tls.sendall(answers.get(verb, b"502 no\r\n"))
                if verb == b"DATA":
                    while (data := reader.readline()) != b".\r\n":
                        self.message += data
                    tls.sendall(b"250 2.0.0 queued\r\n")
                if verb == b"QUIT":
                    break

    def close(self) -> None:
        self.listener.close()
        self.thread.join(20)


class ResponseInjectionTests(OutboundTestCase):
    @defer.inlineCallbacks
    def test_reply_injected_before_the_tls_handshake_is_ignored(self):
        self.start_dns()
        certs = Path(self.mktemp())
        make_self_signed("mx.remote.test", certs / "cert.pem", certs / "key.pem")
        server = InjectingServer(str(certs / "cert.pem"), str(certs / "key.pem"))
        self.addCleanup(server.close)
        sender = self.start_sender(server.port, {"fwd@example.test": ["bob@remote.test"]})
        yield self.send(sender, "demo@example.test", ["fwd@example.test"],
                        b"Subject: tls7\r\n\r\nbody\r\n")
        yield wait_for(lambda: server.message, timeout=15)
        yield in_thread(server.thread.join, 20)
        verbs = [c.split(b" ", 1)[0].strip().upper() for c in server.commands]
        self.assertEqual(verbs, [b"EHLO", b"STARTTLS", b"EHLO", b"MAIL", b"RCPT", b"DATA",
                                 b"QUIT"])
        self.assertTrue(server.message.endswith(b"Subject: tls7\r\n\r\nbody\r\n"))
        yield wait_for(lambda: not self.queued(sender))
