"""TCP listeners whose connections send a reply the moment it is written.

Twisted's ``tcp.Connection.write`` only buffers: it registers the socket for
writing (one ``epoll_ctl``), sends on the next turn of the reactor loop and,
with the buffer empty again, unregisters it (a second ``epoll_ctl``). A mail
protocol's replies are small and the socket's send buffer is nearly always
empty when one is written, so for each reply that is two system calls and a
loop turn of work for nothing: a fifth of the reactor thread's time on a busy
port 25. Here ``write`` sends at once when nothing is already waiting, and
leaves only what the kernel did not take to Twisted's buffer and its usual
path (which also finds and reports a broken connection).

Order is kept: bytes go straight to the socket only while Twisted's buffer is
empty, so they can never overtake earlier ones. The same holds below TLS,
where the encrypted records take this path (STARTTLS as ``startTLS``'s bypass,
implicit TLS because its TLS layer is a protocol on top of this transport).

``ServerEndpoint`` and ``adopt`` are Twisted's TCP/SSL server endpoints and
``reactor.adoptStreamPort`` with this transport.

This leans on Twisted internals (``FileDescriptor``'s buffer attributes,
``_newtls.startTLS``, ``Port._fromListeningDescriptor``; read against Twisted
26.10): after a Twisted upgrade, tests/test_transport.py and the STARTTLS and
implicit-TLS tests are the check.
"""

from __future__ import annotations

from twisted.internet import _newtls, abstract, defer, tcp
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer


class SendAtOnce(abstract.FileDescriptor):
    """``write`` that tries the socket before the buffer (see the module)."""

    def write(self, data: bytes) -> None:
        if (data and self.connected and not self._writeDisconnected
                and not self._tempDataBuffer and self.offset == len(self.dataBuffer)):
            try:
                sent = self.socket.send(data)
            except OSError:
                sent = 0  # full (EAGAIN) or broken: the buffered path handles both
            if sent == len(data):
                return
            data = data[sent:]
        abstract.FileDescriptor.write(self, data)


class Server(tcp.Server):
    def write(self, data: bytes) -> None:
        if self.TLS:
            tcp.Server.write(self, data)  # into the TLS layer, which writes through SendAtOnce
        else:
            SendAtOnce.write(self, data)

    def startTLS(self, ctx, normal: bool = True) -> None:
        _newtls.startTLS(self, ctx, normal, SendAtOnce)


class Port(tcp.Port):
    transport = Server


@implementer(IStreamServerEndpoint)
class ServerEndpoint:
    """``interface:port`` (IPv4 or IPv6); with ``tls_context``, TLS from the first byte."""

    def __init__(self, reactor, port: int, interface: str = "", tls_context=None,
                 backlog: int = 50):
        self.reactor = reactor
        self.port = port
        self.interface = interface
        self.tls_context = tls_context
        self.backlog = backlog

    def listen(self, factory) -> defer.Deferred:
        return defer.execute(self._listen, factory)

    def _listen(self, factory) -> Port:
        if self.tls_context is not None:
            factory = TLSMemoryBIOFactory(self.tls_context, False, factory)
        listening = Port(self.port, factory, self.backlog, self.interface, self.reactor)
        if self.tls_context is not None:
            listening._type = "TLS"  # as reactor.listenSSL sets it (its log lines say TLS)
        listening.startListening()
        return listening


def adopt(reactor, fd: int, family: int, factory) -> Port:
    """Listen on an inherited listening socket (the descriptor is duplicated)."""
    listening = Port._fromListeningDescriptor(reactor, fd, family, factory)
    listening.startListening()
    return listening
