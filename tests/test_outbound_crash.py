"""The outbound queue under kill -9: after a restart every acknowledged message
still reaches the remote MX; a duplicate is possible only for a message whose
remote 250 had not been recorded yet."""

import smtplib
import threading

from twisted.internet import defer

from tests.support.dnsserver import DNSFixture
from tests.support.instance import DaemonProcess, in_thread, wait_for
from tests.support.sink import Sink
from tests.test_outbound import ZONE, OutboundTestCase


class OutboundCrashTests(OutboundTestCase):
    @defer.inlineCallbacks
    def test_kill_during_remote_delivery_loses_nothing(self):
        self.dns = DNSFixture(ZONE)
        self.dns.start()
        self.addCleanup(self.dns.stop)
        sink = Sink()
        sink.start()
        self.addCleanup(sink.stop)
        daemon = DaemonProcess(self.mktemp(), aliases={"fwd@example.test": ["bob@remote.test"]},
                               sections={"dns": self.dns.config,
                                         "outbound": {"port": sink.port, "allow_private": True},
                                         "queue": {"first_retry": 0.3,
                                                   "max_retry_interval": 0.6}})
        self.addCleanup(daemon.kill)
        yield in_thread(daemon.start)
        acked: list[str] = []
        lock = threading.Lock()
        stop = threading.Event()

        def client(n: int) -> None:
            for i in range(200):
                if stop.is_set():
                    return
                token = f"token-{n}-{i}"
                filler = ("x" * 70 + "\r\n") * 30
                body = f"Subject: {token}\r\n\r\n{token} start\r\n{filler}{token} end\r\n"
                try:
                    with smtplib.SMTP("127.0.0.1", daemon.port, timeout=5) as c:
                        c.sendmail("demo@example.test", ["fwd@example.test"], body.encode())
                except (OSError, smtplib.SMTPException):
                    return  # the daemon was killed under us
                with lock:
                    acked.append(token)

        clients = [in_thread(client, n) for n in range(4)]
        yield wait_for(lambda: len(acked) >= 40 and len(sink.state.messages) >= 5, timeout=30)
        yield in_thread(daemon.kill)
        stop.set()
        yield defer.DeferredList(clients)
        self.assertGreaterEqual(len(acked), 40)
        yield in_thread(daemon.start)
        queue = daemon.config.server.spool_dir / "queue"
        yield wait_for(lambda: not list(queue.glob("*.env")), timeout=60)
        yield in_thread(daemon.stop)
        seen: dict[str, int] = {}
        for message in sink.state.messages:
            token = message.data.split(b"Subject: ", 1)[1].split(b"\r\n", 1)[0].decode()
            self.assertTrue(message.data.endswith(f"{token} end\r\n".encode()), token)
            seen[token] = seen.get(token, 0) + 1
        missing = [t for t in acked if t not in seen]
        self.assertEqual(missing, [])
        # At most the few messages in flight at the kill can come twice.
        self.assertLessEqual(sum(n - 1 for n in seen.values()), 20)
