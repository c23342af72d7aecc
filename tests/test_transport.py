"""mailstack.transport: a reply reaches the socket when it is written, in order."""

from __future__ import annotations

import socket

from twisted.internet import defer, reactor
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.trial import unittest

from mailstack import transport


class _Writer(Protocol):
    """Writes what the test asks for as soon as it is connected, and records
    whether the client could already read the first bytes before the reactor
    took another turn."""

    def connectionMade(self):
        f = self.factory
        for chunk in f.chunks:
            self.transport.write(chunk)
        f.client.setblocking(False)
        try:
            f.seen_at_once = f.client.recv(len(f.chunks[0]))
        except BlockingIOError:
            f.seen_at_once = b""
        f.connected.callback(self.transport)


class TransportTests(unittest.TestCase):
    def _serve(self, chunks: list[bytes]):
        factory = ServerFactory.forProtocol(_Writer)
        factory.chunks = chunks
        factory.connected = defer.Deferred()
        port = transport.Port(0, factory, 50, "127.0.0.1", reactor)
        port.startListening()
        self.addCleanup(port.stopListening)
        client = socket.socket()
        self.addCleanup(client.close)
        factory.client = client
        client.connect(("127.0.0.1", port.getHost().port))
        return factory

    @defer.inlineCallbacks
    def test_small_write_is_on_the_wire_before_the_next_reactor_turn(self):
        factory = self._serve([b"220 ready\r\n"])
        server_transport = yield factory.connected
        self.assertIsInstance(server_transport, transport.Server)
        # Twisted's own tcp.Server would still hold these bytes in its buffer.
        self.assertEqual(factory.seen_at_once, b"220 ready\r\n")
        server_transport.loseConnection()

    @defer.inlineCallbacks
    def test_what_the_socket_cannot_take_is_sent_later_in_order(self):
        big = bytes(range(256)) * (16 * 1024)  # 4 MiB, more than a loopback send buffer
        factory = self._serve([b"first", big, b"last"])
        server_transport = yield factory.connected
        server_transport.loseConnection()
        received = [factory.seen_at_once]
        client = factory.client
        for _ in range(100_000):
            try:
                data = client.recv(1 << 16)
            except BlockingIOError:
                yield task_sleep(0.001)
                continue
            if not data:
                break
            received.append(data)
        self.assertEqual(b"".join(received), b"first" + big + b"last")


def task_sleep(seconds: float) -> defer.Deferred:
    d = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d
