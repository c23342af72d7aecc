"""The POP3 server protocol: STLS, SASL PLAIN, RESP-CODES and exact sizes.

Built on ``twisted.mail.pop3.POP3`` for its reply helpers, timeouts and the
cred login flow, with these parts replaced, each for a reason:

* Input framing (``dataReceived``): the stock ``LineOnlyReceiver`` keeps
  running the other lines of a packet after STLS, so plaintext pipelined
  behind STLS would run inside TLS (SECURITY-TESTS TLS-3); and its ``blocked``
  queue of pipelined commands has no bound (LIM-11). Here commands are read
  one at a time from a bounded buffer, and reading pauses while a command's
  answer is pending, so PIPELINING (RFC 2449) keeps its order.
* The command table: only the commands of the current state (RFC 1939 4-6)
  are dispatched; APOP, RPOP and LAST are not offered (APOP needs plaintext
  equivalent passwords, RFC 2595).
* STAT, LIST, UIDL, RETR, TOP and DELE: message numbers are parsed strictly
  (ISO-2), deleted messages are not listed or counted (RFC 1939 5). RETR
  sends a message of up to ``wire.CHUNK`` octets in one write with its
  status line and terminator (one read, a few C-level passes, see
  ``Maildrop.wire_message``), at once rather than on the reactor's next
  turn, and prepares the next message's answer while the client reads;
  larger messages and TOP stream the file through ``wire.WireEncoder``
  (the stock chunk transformer misses a leading dot at a chunk boundary).
* Output flow control: the session is the transport's push producer. While
  the transport's send buffer is full, no file is read and no command is
  taken, so a client that pipelines RETRs without reading its answers
  cannot make the server buffer its mailbox (SECURITY-TESTS LIM-11).
* Logins: only over TLS unless the config allows plaintext on loopback,
  ``-ERR [AUTH]`` after a delay on failure, ``[IN-USE]`` when the maildrop is
  locked (RFC 2449 and RFC 3206 response codes), and a per-address limit on
  failures.
"""

from __future__ import annotations

import base64
import binascii
import re

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, ITCPTransport, IWriteDescriptor
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.mail import pop3
from twisted.mail.interfaces import IMailboxPOP3
from twisted.python.failure import Failure
from zope.interface import implementer

from mailstack.auth.limiter import ADDRESS_LOCKED
from mailstack.connections import ConnectionLimits
from mailstack.pop3.framing import CommandReader, LineTooLong
from mailstack.pop3.wire import CHUNK, WireEncoder, message_chunks, top_chunks
from mailstack.store.folder import MailboxInUse

log = Logger(namespace="mailstack.pop3")

MAX_LINE = 512  # RFC 2449 4: 255 octets per command, 40 per argument; SASL needs more
#: TOP's line count; clients send up to 2**31 - 2 to mean "all".
_COUNT = re.compile(rb"[0-9]{1,20}\Z")
_LOOPBACK = ("127.", "::1", "::ffff:127.")


def _commands(**arity: tuple[int, int]) -> dict[bytes, tuple[str, int, int]]:
    """verb -> (its handler, the fewest and the most arguments it takes)."""
    return {verb.encode(): ("do_" + verb, low, high) for verb, (low, high) in arity.items()}


_AUTHORIZATION = _commands(CAPA=(0, 0), USER=(1, 1), PASS=(1, 1), AUTH=(0, 2), STLS=(0, 0),
                           QUIT=(0, 0))
_TRANSACTION = _commands(CAPA=(0, 0), STAT=(0, 0), LIST=(0, 1), UIDL=(0, 1), RETR=(1, 1),
                         TOP=(2, 2), DELE=(1, 1), RSET=(0, 0), NOOP=(0, 0), QUIT=(0, 0))


class _Transfer:
    """A RETR or TOP answer being sent: the open file and where it has got to."""

    def __init__(self, index: int, file, chunks, retr: bool):
        self.index = index
        self.file = file
        self.chunks = chunks
        self.retr = retr
        self.encoder = WireEncoder()


@implementer(IPushProducer)
class POP3Session(pop3.POP3):
    """One POP3 connection; ``factory`` is a ``POP3Factory``."""

    #: The only ALPN protocol a TLS client may offer here (mailstack.tls).
    ALPN = b"pop3"

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.client_ip = getattr(peer, "host", str(peer))
        self.tls = self.factory.implicit_tls
        self.timeOut = self.factory.config.pop3.idle_timeout
        self.commands = CommandReader(MAX_LINE)
        self.user: str | None = None
        self._lost = False
        self._reading_paused = False
        self._output_paused = False
        self._transfer: _Transfer | None = None
        #: (index, answer) of the message RETR is expected to ask for next.
        self._ahead: tuple[int, bytes] | None = None
        self._stats = {"retr": 0, "retr_bytes": 0, "top": 0, "dele": 0}
        refusal = self.factory.admit(self)
        if refusal is not None:
            log.info("connection refused: {why}, rip=[{ip}]", why=refusal, ip=self.client_ip)
            self.failResponse(b"[SYS/TEMP] " + refusal.encode() + b", try again later")
            self.transport.loseConnection()
            return
        self.transport.registerProducer(self, True)
        if ITCPTransport.providedBy(self.transport):
            # Every answer is whole in one write, so Nagle's algorithm has
            # nothing to gather; it would only hold the tail of a write back
            # until the client acknowledges the one before (pipelined RETRs
            # were a third slower with it).
            self.transport.setTcpNoDelay(True)
        self.successResponse(b"mailstack POP3 server ready")
        self.setTimeout(self.timeOut)

    def connectionLost(self, reason=None) -> None:
        self._lost = True
        self.factory.release(self)
        self._end_transfer()
        if self.user is not None:
            s = self._stats
            log.info("logout: user=<{user}>, rip=[{ip}], retr={retr}/{rb}, top={top}, "
                     "dele={dele}", user=self.user, ip=self.client_ip, retr=s["retr"],
                     rb=s["retr_bytes"], top=s["top"], dele=s["dele"])
        super().connectionLost(reason)

    # -- input ------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        self.commands.feed(data)
        self._process()

    def _busy(self) -> bool:
        """Whether the next command must wait: a login, a transfer, a full send buffer."""
        return self.blocked is not None or self._transfer is not None or self._output_paused

    def _process(self) -> None:
        while not self._busy() and not self.transport.disconnecting:
            try:
                line = self.commands.next_line()
            except LineTooLong:
                # Also the end of an AUTH exchange whose response was too long:
                # what follows is a command again.
                self.state = "COMMAND"
                self.failResponse(b"Line too long")
                continue
            if line is None:
                break
            self.lineReceived(line)
        # While busy, read no more: the kernel's buffers and TCP flow control
        # hold what the client pipelines, not this process.
        busy = self._busy() and not self._lost
        if busy != self._reading_paused:
            self._reading_paused = busy
            if busy:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    def _wait(self, d: Deferred) -> Deferred:
        """Hold further commands until ``d`` has fired (and answered)."""
        self.blocked = []
        return d.addBoth(self._unblock)

    def _unblock(self, result):
        self.blocked = None
        self._process()
        return None

    # -- IPushProducer: the transport's send buffer is full, or drained ----
    def pauseProducing(self) -> None:
        self._output_paused = True

    def resumeProducing(self) -> None:
        self._output_paused = False
        # The client is reading: a long download is not an idle connection.
        self.resetTimeout()
        if self._transfer is not None:
            self._pump()
        self._process()

    def stopProducing(self) -> None:
        self._end_transfer()

    def state_COMMAND(self, line: bytes) -> None:
        verb, _, rest = line.partition(b" ")
        verb = verb.upper()
        command = (_TRANSACTION if self.mbox is not None else _AUTHORIZATION).get(verb)
        if command is None:
            known = verb in _TRANSACTION or verb in _AUTHORIZATION
            self.failResponse(b"Command not valid in this state" if known else b"Unknown command")
            return
        handler, low, high = command
        if verb == b"PASS":
            args = [rest] if rest else []  # a password may contain spaces
        else:
            args = rest.split()
        if not low <= len(args) <= high:
            self.failResponse(b"Wrong number of arguments")
            return
        getattr(self, handler)(*args)

    # -- AUTHORIZATION state ----------------------------------------------
    def _plaintext_allowed(self) -> bool:
        if self.tls:
            return True
        return (self.factory.config.auth.allow_plaintext_loopback
                and self.client_ip.startswith(_LOOPBACK))

    def listCapabilities(self) -> list[bytes]:
        caps = [b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING",
                b"EXPIRE NEVER", b"IMPLEMENTATION mailstack"]
        if self.mbox is None:
            if self._plaintext_allowed():
                caps += [b"USER", b"SASL PLAIN"]
            if not self.tls and self.factory.tls_context is not None:
                caps.append(b"STLS")
        return caps

    def do_CAPA(self) -> None:
        lines = [b"+OK Capability list follows", *self.listCapabilities(), b"."]
        self.transport.write(b"\r\n".join(lines) + b"\r\n")

    def do_STLS(self) -> None:
        if self.tls:
            self.failResponse(b"Command not permitted when TLS active")
            return
        if self.factory.tls_context is None:
            self.failResponse(b"TLS not available")
            return
        self.successResponse(b"Begin TLS negotiation now")
        # RFC 2595 4: nothing sent before the handshake may count.
        self.commands.clear()
        self._userIs = None
        self.tls = True
        self.transport.startTLS(self.factory.tls_context)

    def _refuse_plaintext(self) -> bool:
        if self._plaintext_allowed():
            return False
        self.failResponse(b"[AUTH] Plaintext authentication disallowed on non-secure "
                          b"connections; use STLS or port 995")
        return True

    def do_USER(self, user: bytes) -> None:
        if self._refuse_plaintext():
            return
        self._userIs = user
        self.successResponse(b"Send PASS")

    def do_PASS(self, password: bytes) -> None:
        if self._refuse_plaintext():
            return
        if self._userIs is None:
            self.failResponse(b"Send USER first")
            return
        user, self._userIs = self._userIs, None
        self._login(user, password, "USER")

    def do_AUTH(self, mechanism: bytes | None = None, initial: bytes | None = None) -> None:
        if mechanism is None:
            # The pre-RFC 5034 mechanism list that some clients still ask for.
            mechs = [b"PLAIN"] if self._plaintext_allowed() else []
            self.transport.write(b"\r\n".join([b"+OK", *mechs, b"."]) + b"\r\n")
            return
        if mechanism.upper() != b"PLAIN":
            self.failResponse(b"Unsupported authentication mechanism")
            return
        if self._refuse_plaintext():
            return
        if initial is None:
            self.state = "AUTH"
            self.transport.write(b"+ \r\n")
            return
        self._sasl_plain(b"" if initial == b"=" else initial)

    def state_AUTH(self, line: bytes) -> None:
        self.state = "COMMAND"
        if line.strip() == b"*":
            self.failResponse(b"Authentication cancelled")
            return
        self._sasl_plain(line.strip())

    def _sasl_plain(self, encoded: bytes) -> None:
        """RFC 4616: [authzid] NUL authcid NUL passwd, base64-encoded."""
        try:
            decoded = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            self.failResponse(b"Invalid base64 in SASL response")
            return
        parts = decoded.split(b"\0")
        if len(parts) != 3 or not parts[1] or not parts[2] or parts[0] not in (b"", parts[1]):
            self.failResponse(b"Malformed SASL PLAIN response")
            return
        self._login(parts[1], parts[2], "PLAIN")

    def _login(self, user: bytes, password: bytes, method: str) -> None:
        refusal = self.factory.login_guard.refusal(self.client_ip, user)
        if refusal is not None:
            whose = b"from your address" if refusal == ADDRESS_LOCKED else b"for this account"
            self.failResponse(b"[SYS/TEMP] Too many failed logins " + whose
                              + b"; try again later")
            return
        d = self.factory.portal.login(UsernamePassword(user, password), None, IMailboxPOP3)
        d.addCallbacks(self._logged_in, self._login_failed, callbackArgs=(method,),
                       errbackArgs=(user,))
        self._wait(d)

    def _logged_in(self, result, method: str) -> None:
        _, mbox, logout = result
        if self._lost:
            # Gone while the password was checked: nobody will log out.
            logout()
            return
        self.mbox, self._onLogout = mbox, logout
        self.user = self.mbox.address
        self.factory.login_guard.succeeded(self.client_ip)
        log.info("login: user=<{user}>, method={method}, rip=[{ip}], tls={tls}, messages={n}",
                 user=self.user, method=method, ip=self.client_ip, tls="yes" if self.tls else "no",
                 n=len(self.mbox.messages))
        self.successResponse(b"Logged in")

    def _login_failed(self, failure: Failure, user: bytes) -> Deferred | None:
        if failure.check(MailboxInUse):
            self.failResponse(b"[IN-USE] Mailbox is locked by another POP3 session")
            return None
        if not failure.check(UnauthorizedLogin):
            log.failure("login error for {user}", failure, user=user)
            self.failResponse(b"[SYS/TEMP] Internal error, try again later")
            return None
        self.factory.login_guard.failed(self.client_ip, user)
        return task.deferLater(self.factory.clock, self.factory.config.auth.failure_delay,
                               self.failResponse, b"[AUTH] Authentication failed")

    # -- TRANSACTION state ------------------------------------------------
    def _index(self, arg: bytes) -> int | None:
        """The 0-based index of a live message, or None after answering -ERR."""
        # 1 to 9 ASCII digits: bytes.isdigit knows no others and is false for b"".
        if len(arg) <= 9 and arg.isdigit():
            n = int(arg) - 1
            if 0 <= n < len(self.mbox.messages) and n not in self.mbox.deleted:
                return n
        self.failResponse(b"No such message")
        return None

    def _live(self) -> list[int]:
        """Indexes of the messages not marked deleted (RFC 1939 5: the others are not listed)."""
        return [i for i in range(len(self.mbox.messages)) if i not in self.mbox.deleted]

    def do_STAT(self) -> None:
        live = self._live()
        self.successResponse(b"%d %d" % (len(live), sum(self.mbox.sizes[i] for i in live)))

    def do_LIST(self, arg: bytes | None = None) -> None:
        if arg is not None:
            n = self._index(arg)
            if n is not None:
                self.successResponse(b"%d %d" % (n + 1, self.mbox.sizes[n]))
            return
        lines = [b"+OK scan listing follows"]
        lines += [b"%d %d" % (i + 1, self.mbox.sizes[i]) for i in self._live()]
        self.transport.write(b"\r\n".join([*lines, b"."]) + b"\r\n")

    def do_UIDL(self, arg: bytes | None = None) -> None:
        if arg is not None:
            n = self._index(arg)
            if n is not None:
                self.successResponse(b"%d %s" % (n + 1, self.mbox.getUidl(n)))
            return
        lines = [b"+OK unique-id listing follows"]
        lines += [b"%d %s" % (i + 1, self.mbox.getUidl(i)) for i in self._live()]
        self.transport.write(b"\r\n".join([*lines, b"."]) + b"\r\n")

    def do_RETR(self, arg: bytes) -> None:
        n = self._index(arg)
        if n is None:
            return
        ahead, self._ahead = self._ahead, None
        try:
            answer = ahead[1] if ahead is not None and ahead[0] == n else self._whole_answer(n)
        except OSError:
            self.failResponse(b"[SYS/TEMP] Message no longer available")
            return
        if answer is not None:
            self.transport.write(answer)
            if not self.commands.pending():
                self._send_now()
                self._read_ahead(n + 1)
            self._retrieved(n)
            return
        # Unbuffered: a large message is read in large chunks.
        f = self._open(n, 0)
        if f is not None:
            self._transfer = _Transfer(n, f, message_chunks(f), retr=True)
            self._pump(self._retr_status(n))

    def _retr_status(self, n: int) -> bytes:
        """RETR's status line, with the size LIST gave (as RFC 1939 7's example shows)."""
        return b"+OK %d octets\r\n" % self.mbox.sizes[n]

    def _whole_answer(self, n: int) -> bytes | None:
        """RETR's answer for a message of up to CHUNK octets on disk, else None.

        The usual message is read whole and sent in one write with its
        status line and terminator, with no transfer to keep.
        """
        wire = self.mbox.wire_message(n, CHUNK)
        return None if wire is None else self._retr_status(n) + wire + b".\r\n"

    def _send_now(self) -> None:
        """Hand the answer just written to the kernel now, not on the reactor's next turn.

        Twisted sends buffered output when the reactor next polls, and a
        client that waits for each answer before its next command (poplib,
        fetchmail, most clients) would wait that extra turn on every RETR.
        The transport's ``doWrite`` is what the reactor would call: it sends
        what the socket takes and leaves the rest, and any error, to the
        reactor, for which the descriptor stays registered while output
        remains. Not while closing (that ``doWrite`` ends the connection) or
        once closed.
        """
        if (IWriteDescriptor.providedBy(self.transport) and not self._lost
                and not self.transport.disconnecting):
            self.transport.doWrite()

    def _read_ahead(self, n: int) -> None:
        """Prepare RETR's answer for message ``n`` while the client takes in the last one.

        Clients fetch in order, so the next RETR finds its answer ready and
        reading it is off the client's path. One answer of at most about
        CHUNK octets is held; a read error is left to the RETR that needs it.
        The message is flagged seen only when RETR sends it; if another
        session removes it in between, it is still sent, as a message of the
        login's snapshot that was read.
        """
        if n < len(self.mbox.messages) and n not in self.mbox.deleted:
            try:
                answer = self._whole_answer(n)
            except OSError:
                return
            if answer is not None:
                self._ahead = (n, answer)

    def do_TOP(self, arg: bytes, lines: bytes) -> None:
        if not _COUNT.match(lines):
            self.failResponse(b"Invalid line count")
            return
        n = self._index(arg)
        if n is None:
            return
        # Buffered: TOP reads the header line by line.
        f = self._open(n, -1)
        if f is not None:
            self._transfer = _Transfer(n, f, top_chunks(f, int(lines)), retr=False)
            self._pump(b"+OK top of message follows\r\n")

    def _open(self, n: int, buffering: int):
        """Message ``n`` open for reading, or None after answering -ERR."""
        try:
            return self.mbox.getMessage(n, buffering)
        except OSError:
            self.failResponse(b"[SYS/TEMP] Message no longer available")
            return None

    def _pump(self, pending: bytes = b"") -> None:
        """Send the transfer on until it ends or the send buffer is full.

        Writes are gathered to about CHUNK octets, so the top of a small
        message is one write with its status line and terminator.
        """
        t = self._transfer
        try:
            while not self._output_paused:
                chunk = next(t.chunks, None)
                if chunk is None:
                    self.transport.write(pending + t.encoder.finish() + b".\r\n")
                    self._finish_transfer(t)
                    return
                pending += t.encoder.feed(chunk)
                if len(pending) >= CHUNK:
                    self.transport.write(pending)
                    pending = b""
        except OSError as e:
            # Part of the answer is sent; no -ERR can follow it. Closing makes
            # the client retry later rather than keep a truncated message.
            log.warn("read error sending a message of {user}: {err}", user=self.user, err=e)
            self._end_transfer()
            self.transport.abortConnection()
            return
        if pending:
            self.transport.write(pending)

    def _finish_transfer(self, t: _Transfer) -> None:
        self._end_transfer()
        if t.retr:
            self._retrieved(t.index)
        else:
            self._stats["top"] += 1

    def _retrieved(self, n: int) -> None:
        """Message ``n`` was sent whole by RETR: count it and flag it seen."""
        self._stats["retr"] += 1
        self._stats["retr_bytes"] += self.mbox.sizes[n]
        try:
            self.mbox.mark_seen(n)
        except OSError as e:
            log.warn("cannot flag {user} message as seen: {err}", user=self.user, err=e)

    def _end_transfer(self) -> None:
        if self._transfer is not None:
            self._transfer.file.close()
            self._transfer = None

    def do_DELE(self, arg: bytes) -> None:
        n = self._index(arg)
        if n is not None:
            self.mbox.deleteMessage(n)
            self._stats["dele"] += 1
            self.successResponse(b"Marked to be deleted")

    def do_RSET(self) -> None:
        self.mbox.undeleteMessages()
        self._stats["dele"] = 0
        self.successResponse(b"Maildrop has %d messages" % len(self.mbox.messages))

    def do_NOOP(self) -> None:
        self.successResponse(b"")

    def do_QUIT(self) -> None:
        if self.mbox is None:
            self.successResponse(b"Bye")
            self._close()
            return
        try:
            removed = self.mbox.sync()
        except OSError as e:
            log.warn("cannot delete messages of {user}: {err}", user=self.user, err=e)
            reply = b"-ERR [SYS/TEMP] Some deleted messages were not removed\r\n"
        else:
            reply = b"+OK Bye, %d message(s) deleted\r\n" % removed
        # Unlock before answering: a client that logs in again as soon as
        # it reads the reply must not find its own old session in the way.
        logout, self._onLogout = self._onLogout, None
        logout()
        self.transport.write(reply)
        self._close()

    def timeoutConnection(self) -> None:
        log.info("timeout: rip=[{ip}], user=<{user}>", ip=self.client_ip, user=self.user or "")
        self._close()

    def _close(self) -> None:
        """Close once what is written is sent. The session is registered as
        the transport's producer (for flow control), and TLS would not close
        while it is: unregister first."""
        self.transport.unregisterProducer()
        self.transport.loseConnection()


class POP3Factory(ServerFactory):
    protocol = POP3Session
    noisy = False

    def __init__(self, config, portal, login_guard, clock, tls_context=None,
                 implicit_tls: bool = False):
        self.config = config
        self.portal = portal
        #: Failed logins per address and account (mailstack.auth.limiter), shared with IMAP.
        self.login_guard = login_guard
        self.clock = clock
        self.tls_context = tls_context
        self.implicit_tls = implicit_tls
        self.limits = ConnectionLimits(config.pop3.max_connections,
                                       config.pop3.max_connections_per_ip)

    def admit(self, session: POP3Session) -> str | None:
        """Register a new session, or say why it is refused ([pop3] limits)."""
        return self.limits.admit(session, session.client_ip)

    def release(self, session: POP3Session) -> None:
        """Forget a closed session (nothing if it was refused)."""
        self.limits.release(session)
