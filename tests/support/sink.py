"""A scriptable SMTP server for outbound tests: it records what it receives.

It is deliberately not mailstack: it answers what a test tells it to (451
twice then 250, 550, a greeting refusal), so the outbound queue can be
watched against a remote that misbehaves. ``replies`` maps a command verb to
a list of replies used in turn (the last one repeats).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twisted.internet import reactor
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes
    tls: bool = False


@dataclass
class SinkState:
    replies: dict[str, list[bytes]] = field(default_factory=dict)
    messages: list[Received] = field(default_factory=list)
    commands: list[bytes] = field(default_factory=list)
    #: Every byte received, on all connections, exactly as it came.
    raw: bytearray = field(default_factory=bytearray)
    connections: int = 0
    ehlo: bytes = b"250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 100000000"

    def reply(self, verb: str, default: bytes) -> bytes:
        script = self.replies.get(verb)
        if not script:
            return default
        return script.pop(0) if len(script) > 1 else script[0]


class SinkProtocol(LineOnlyReceiver):
    MAX_LENGTH = 1 << 20

    def connectionMade(self):
        self.state.connections += 1
        self.mail, self.rcpts, self.data, self.in_data = None, [], [], False
        self.transport.write(self.state.reply("GREETING", b"220 sink ESMTP") + b"\r\n")

    def dataReceived(self, data):
        self.state.raw += data
        super().dataReceived(data)

    def lineReceived(self, line):
        if self.in_data:
            if line == b".":
                self.in_data = False
                answer = self.state.reply("DOT", b"250 2.0.0 Ok: queued")
                if answer.startswith(b"2"):
                    self.state.messages.append(Received(self.mail, self.rcpts,
                                                        b"\r\n".join(self.data) + b"\r\n"))
                self.mail, self.rcpts, self.data = None, [], []
                self.sendLine(answer)
            else:
                self.data.append(line[1:] if line.startswith(b".") else line)
            return
        self.state.commands.append(line)
        verb = line.split(b" ", 1)[0].upper().decode()
        if verb == "EHLO":
            self.sendLine(self.state.reply("EHLO", self.state.ehlo))
        elif verb == "MAIL":
            answer = self.state.reply("MAIL", b"250 2.1.0 Ok")
            if answer.startswith(b"2"):
                self.mail = line.split(b"<", 1)[1].split(b">", 1)[0].decode()
            self.sendLine(answer)
        elif verb == "RCPT":
            answer = self.state.reply("RCPT", b"250 2.1.5 Ok")
            if answer.startswith(b"2"):
                self.rcpts.append(line.split(b"<", 1)[1].split(b">", 1)[0].decode())
            self.sendLine(answer)
        elif verb == "DATA":
            if self.mail is None or not self.rcpts:
                self.sendLine(b"554 5.5.1 Error: no valid recipients")
            else:
                self.in_data = True
                self.sendLine(b"354 go ahead")
        elif verb == "RSET":
            self.mail, self.rcpts = None, []
            self.sendLine(b"250 2.0.0 Ok")
        elif verb == "QUIT":
            self.sendLine(b"221 2.0.0 Bye")
            self.transport.loseConnection()
        else:
            self.sendLine(b"502 5.5.1 not implemented")


class Sink:
    def __init__(self, interface: str = "127.0.0.1", port: int = 0):
        self.state = SinkState()
        self.factory = Factory.forProtocol(SinkProtocol)
        self.factory.noisy = False
        self.interface = interface
        self._port = None
        self.port = port

    def start(self) -> int:
        proto_state = self.state

        class Bound(SinkProtocol):
            state = proto_state

        self.factory.protocol = Bound
        self._port = reactor.listenTCP(self.port, self.factory, interface=self.interface)
        self.port = self._port.getHost().port
        return self.port

    def stop(self):
        if self._port is None:
            return None
        port, self._port = self._port, None
        return port.stopListening()
