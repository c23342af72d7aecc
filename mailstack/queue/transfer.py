"""One outbound SMTP connection: EHLO, STARTTLS, optional AUTH, then the messages.

Several messages for the same destination share the connection (with RSET
between them after a failure). Each recipient ends with an ``Attempt``:
``sent`` (2xx), ``perm`` (5xx: bounce) or ``temp`` (4xx, timeouts, lost
connections: retry, possibly at the next MX host).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

from twisted.internet import defer, endpoints

from mailstack.config import OutboundConfig
from mailstack.queue.client import ClientConnection, ServerReply
from mailstack.queue.routes import Route
from mailstack.queue.spool import Envelope, Recipient


@dataclass
class Item:
    """A message and those of its recipients that this connection should reach."""

    envelope: Envelope
    recipients: list[tuple[int, Recipient]]
    message: bytes


@dataclass(frozen=True)
class Attempt:
    kind: str  # sent, perm or temp
    reply: str
    relay: str = ""
    tls: str = ""


@dataclass
class Results:
    """Attempts by (queue id, recipient index); later hosts overwrite temp results."""

    attempts: dict[tuple[str, int], Attempt] = field(default_factory=dict)

    def set(self, item: Item, index: int, attempt: Attempt) -> None:
        self.attempts[(item.envelope.id, index)] = attempt

    def get(self, envelope_id: str, index: int) -> Attempt | None:
        return self.attempts.get((envelope_id, index))

    def unfinished(self, items: list[Item]) -> list[Item]:
        """The items with recipients not yet sent or refused for good."""
        out = []
        for item in items:
            rest = [(i, r) for i, r in item.recipients
                    if (a := self.get(item.envelope.id, i)) is None or a.kind == "temp"]
            if rest:
                out.append(Item(item.envelope, rest, item.message))
        return out

    def fail_all(self, items: list[Item], reply: str, kind: str = "temp", relay: str = "") -> None:
        for item in items:
            for index, _ in item.recipients:
                self.set(item, index, Attempt(kind, reply, relay))


def _kind(reply: ServerReply) -> str:
    if reply.ok:
        return "sent"
    return "perm" if reply.permanent else "temp"


class SessionAborted(Exception):
    """The server refused the session itself (greeting, EHLO, TLS or AUTH)."""


@defer.inlineCallbacks
def transfer(reactor, route: Route, address: str, items: list[Item], hostname: str,
             config: OutboundConfig, tls_context, results: Results):
    """Deliver ``items`` over one connection to ``address``; fills ``results``.

    Raises only when no connection could be made (the caller tries the next
    address); every other failure becomes a ``temp`` or ``perm`` result.
    """
    relay = route.label(address)
    if ":" in address:
        endpoint = endpoints.TCP6ClientEndpoint(reactor, address, route.port,
                                                timeout=config.connect_timeout)
    else:
        endpoint = endpoints.TCP4ClientEndpoint(reactor, address, route.port,
                                                timeout=config.connect_timeout)
    conn = ClientConnection(reactor, config.command_timeout, config.data_timeout)
    yield endpoints.connectProtocol(endpoint, conn)
    try:
        ext = yield _open_session(conn, hostname, config, tls_context)
        for item in items:
            yield _send_message(conn, item, ext, relay, results)
        conn.quit()
    except SessionAborted as e:
        reply = e.args[0]
        kind = "perm" if isinstance(reply, ServerReply) and reply.permanent and not config.relay \
            else "temp"
        results.fail_all(results.unfinished(items), f"host {relay} said: {reply}", kind, relay)
        conn.quit()
    except Exception as e:  # lost connection, timeout, protocol error: retry later
        results.fail_all(results.unfinished(items),
                         f"lost connection with {relay}: {e.__class__.__name__}: {e}", "temp", relay)
        conn.transport.abortConnection()


@defer.inlineCallbacks
def _open_session(conn: ClientConnection, hostname: str, config: OutboundConfig, tls_context):
    greeting = yield conn.greeting
    if greeting.code != 220:
        raise SessionAborted(greeting)
    ehlo = yield conn.command(f"EHLO {hostname}")
    if not ehlo.ok:
        helo = yield conn.command(f"HELO {hostname}")
        if not helo.ok:
            raise SessionAborted(helo)
        ext: set[str] = set()
    else:
        ext = ehlo.keywords()
    if "STARTTLS" in ext and tls_context is not None:
        reply = yield conn.command("STARTTLS")
        if reply.code == 220:
            conn.start_tls(tls_context)
            ehlo = yield conn.command(f"EHLO {hostname}")
            if not ehlo.ok:
                raise SessionAborted(ehlo)
            ext = ehlo.keywords()
        elif config.relay:
            raise SessionAborted(reply)
    if config.relay and not conn.tls:
        raise SessionAborted("the relay host does not offer STARTTLS, which is required")
    if config.relay and config.relay_username:
        token = base64.b64encode(
            b"\0" + config.relay_username.encode() + b"\0" + config.relay_password.encode())
        reply = yield conn.command("AUTH PLAIN " + token.decode("ascii"))
        if reply.code != 235:
            raise SessionAborted(reply)
    return ext


@defer.inlineCallbacks
def _send_message(conn: ClientConnection, item: Item, ext: set[str], relay: str,
                  results: Results):
    tls = conn.tls_version()
    mail = f"MAIL FROM:<{item.envelope.sender}>"
    if "SIZE" in ext:
        mail += f" SIZE={len(item.message)}"
    if "8BITMIME" in ext and any(b > 0x7F for b in item.message):
        mail += " BODY=8BITMIME"
    rcpt_lines = [f"RCPT TO:<{r.address}>" for _, r in item.recipients]

    def record(index: int, reply: ServerReply) -> None:
        results.set(item, index, Attempt(_kind(reply), f"host {relay} said: {reply}", relay, tls))

    if "PIPELINING" in ext:  # RFC 2920: all at once, then the replies in order
        pending = [conn.command(line) for line in [mail, *rcpt_lines, "DATA"]]
        replies = []
        for d in pending:
            replies.append((yield d))
        mail_reply, rcpt_replies, data_reply = replies[0], replies[1:-1], replies[-1]
    else:
        mail_reply, rcpt_replies, data_reply = (yield conn.command(mail)), [], None
        if mail_reply.ok:
            for line in rcpt_lines:
                rcpt_replies.append((yield conn.command(line)))
            if any(r.ok for r in rcpt_replies):
                data_reply = yield conn.command("DATA")
    if not mail_reply.ok:
        for index, _ in item.recipients:
            record(index, mail_reply)
    else:
        accepted = []
        for (index, _), reply in zip(item.recipients, rcpt_replies):
            if reply.ok:
                accepted.append(index)
            else:
                record(index, reply)
        if data_reply is not None and data_reply.code == 354:
            final = yield conn.data(item.message if accepted else b"")
            for index in accepted:
                record(index, final)
        elif accepted:
            for index in accepted:
                record(index, data_reply)
    if any(results.get(item.envelope.id, i).kind != "sent" for i, _ in item.recipients):
        yield conn.command("RSET")
