"""One ESMTP session (RFC 5321), from greeting to QUIT.

Why not a subclass of ``twisted.mail.smtp.ESMTP``: its framing is
``LineOnlyReceiver``, which buffers a line without bound (LIM-2) and, on an
over-long DATA line, drops back into command mode so the rest of the body
runs as commands (SMUG-11); its STARTTLS keeps plaintext pipelined before
the handshake (CVE-2011-0411 class) and the session state (TLS-1..4); and it
keeps reading pipelined commands while a ``validateTo`` Deferred is pending,
so replies can overtake each other. Fixing all of that would override nearly
every method, so the session is written here on ``Protocol`` with Twisted's
``TimeoutMixin``, and ``framing`` does the byte-level work.

Commands run one at a time, in order: a command whose work is asynchronous
(committing a message to the spool) pauses reading until its reply is sent,
so PIPELINING (RFC 2920) is safe and the input buffer stays bounded.

The idle timer restarts with each chunk of bytes that completes at least one
line, not with every chunk: a line that never ends (LIM-2) times out like
silence does, instead of holding a connection for as long as the client keeps
dripping bytes. It is stopped while the server itself is working (a commit),
which is not the client being idle.

DATA lines are read in runs where that is exactly the same as reading them
one at a time (``DataReader.feed_buffered``); the plain spool path takes the
run in one ``MessageWriter.write_block``, submission and the policy buffer
get the same lines through their line callbacks.
"""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import dataclass, field
from ipaddress import ip_address

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.python.failure import Failure

from mailstack.auth.limiter import ADDRESS_LOCKED
from mailstack.dates import header_date
from mailstack.policy.message import MessageBuffer
from mailstack.queue.dkimsign import load_keys, sign
from mailstack.queue.spool import Envelope, MessageWriter, Recipient, new_queue_id
from mailstack.smtp import reply, submission
from mailstack.smtp.address import AddressSyntax, Mailbox, parse_path_and_params
from mailstack.smtp.framing import MAX_BLOCK, DataReader, Line, LineSplitter
from mailstack.smtp.reply import Reply, printable

log = Logger(namespace="mailstack.smtpd")

#: Input kept, unprocessed, while a reply is pending (a commit, a DNS lookup);
#: past it the socket is not read until the reply is sent, and TCP flow
#: control holds the client back.
HOLD_WHILE_BUSY = MAX_BLOCK

# RFC 5321 4.1.1.1: a domain or an address literal; underscores are common in
# the wild and harmless here. Nothing that could break a Received header.
_HELO_NAME = re.compile(rb"[A-Za-z0-9._:\-\[\]]{1,255}\Z")
# RFC 5321 2.4: commands are ASCII. A "verb" that is empty or holds NUL,
# control or 8-bit bytes is not an unknown command but bad syntax (LIM-10).
_VERB = re.compile(rb"[\x21-\x7e]+\Z")
_HTTP_VERBS = {b"GET", b"POST", b"HEAD", b"PUT", b"CONNECT", b"OPTIONS", b"DELETE"}
#: Refused when sent ahead of their reply after HELO (DATA has its own, stricter check).
_TRANSACTION_VERBS = {b"MAIL", b"RCPT"}


@dataclass
class Transaction:
    """What MAIL, RCPT and DATA build up; RSET, HELO and STARTTLS discard it."""

    sender: Mailbox | None
    recipients: list[Recipient] = field(default_factory=list)
    #: RCPT TO arguments as given, for the log line.
    accepted: list[str] = field(default_factory=list)
    queue_id: str = ""
    #: Bytes of the Return-Path line in front of the message in the spool.
    body_offset: int = 0
    writer: MessageWriter | None = None
    reader: DataReader | None = None
    #: Submission: the message is held here until it is checked and signed.
    body: tempfile.SpooledTemporaryFile | None = None
    completer: submission.HeaderCompleter | None = None
    #: Submission: the domain of the From address (whose DKIM keys sign).
    from_domain: str = ""
    #: Inbound with the policy chain: the message is held here for the
    #: end-of-data checks, whose results go in front of it.
    checked: MessageBuffer | None = None

    @property
    def sender_text(self) -> str:
        return str(self.sender) if self.sender else ""


class Session(Protocol, TimeoutMixin):
    """An ESMTP server session; ``factory`` is an ``SMTPFactory``."""

    #: The only ALPN protocol a TLS client may offer here (mailstack.tls).
    ALPN = b"smtp"

    def __init__(self):
        self.helo: str | None = None
        self.esmtp = False
        self.tls = False
        self.transaction: Transaction | None = None
        #: The authenticated address (submission), None before AUTH.
        self.user: str | None = None
        self._sasl: submission.SaslExchange | None = None
        self._auth_failures = 0
        #: The policy chain for this session (mx role), and the 554 it gave
        #: at connect: then only QUIT is served (RFC 5321 3.1).
        self.policy = None
        self.refused: Reply | None = None
        self.errors = 0
        self.closing = False
        self._busy = False
        self._paused = False
        self._counts: dict[str, int] = {}

    # -- connection -------------------------------------------------------
    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.client_ip = getattr(peer, "host", str(peer))
        self.client_port = getattr(peer, "port", 0)
        self.limits = self.factory.config.smtp
        self.splitter = LineSplitter(self.limits.max_command_line)
        self.tls = self.factory.implicit_tls
        refusal = self.factory.admit(self)
        if refusal is not None:
            log.info("reject: connect from [{ip}]: {reply}", ip=self.client_ip,
                     reply=refusal.text)
            self.reply(refusal)
            self.close()
            return
        log.info("connect from [{ip}]:{port}", ip=self.client_ip, port=self.client_port)
        self.setTimeout(self.limits.idle_timeout)
        if self.factory.policy is not None:
            self.policy = self.factory.policy.session(self.client_ip, self.client_port, self.tls)
            if self.policy.active:
                self._wait_for(self.policy.connect().addCallback(self._greet))
                return
        self._greet(None)

    def _greet(self, refusal: Reply | None) -> None:
        if refusal is None:
            self.reply(self.factory.greeting)
            return
        log.info("reject: connect from [{ip}]: {code} {enhanced} {text}", ip=self.client_ip,
                 code=refusal.code, enhanced=refusal.enhanced, text=refusal.text)
        self.reply(refusal)
        if refusal.code == 421:
            self.close()
        else:
            self.refused = refusal

    def _checked(self, d: Deferred, ok: Reply | None, undo=None) -> Deferred:
        """Reply ``ok`` once the policy stage ``d`` passes, else its refusal
        (``undo`` runs first); 421 closes the connection."""
        def decided(refusal: Reply | None):
            if refusal is None:
                if ok is not None:
                    self.reply(ok() if callable(ok) else ok)
                return
            if undo is not None:
                undo()
            self.reply(refusal)
            if refusal.code == 421:
                self.close()

        return d.addCallback(decided)

    def connectionLost(self, reason: Failure = None) -> None:
        # A commit still pending must not restart the idle timer or run
        # pipelined commands when it finishes (``_wait_for``).
        self.closing = True
        self.setTimeout(None)
        self._abort_transaction()
        if self.factory.release(self):
            counts = " ".join(f"{k}={v}" for k, v in self._counts.items())
            log.info("disconnect from [{ip}]:{port} {counts}", ip=self.client_ip,
                     port=self.client_port, counts=counts)

    def timeoutConnection(self) -> None:
        log.info("timeout after {state} from [{ip}]", state=self._state_name(), ip=self.client_ip)
        self.reply(reply.TIMEOUT)
        self.close()

    def close(self) -> None:
        self.closing = True
        self.transport.loseConnection()

    # -- input ------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        if b"\n" in data:
            # RFC 5321 4.5.3.2.7: the server times out awaiting a command (or a
            # DATA line); a chunk that ends no line does not count (LIM-2).
            self.resetTimeout()
        self.splitter.feed(data)
        if not self._busy:
            self._process()
        elif not self._paused and self.splitter.buffered() > HOLD_WHILE_BUSY:
            # A client that keeps sending while its reply is pending waits in
            # the kernel's buffers, not in ours.
            self._paused = True
            self.transport.pauseProducing()

    def _process(self) -> None:
        while not self._busy and not self.closing:
            t = self.transaction
            if (self._sasl is None and t is not None and t.reader is not None
                    and t.reader.feed_buffered(self.splitter)):
                continue
            line = self.splitter.next_line()
            if line is None:
                return
            if self._sasl is not None:
                self._auth_line(line)
            elif t is not None and t.reader is not None:
                self._data_line(t, line)
            else:
                self._command_line(line)

    def _wait_for(self, d: Deferred) -> None:
        """Hold further input until ``d`` (which sends the reply) has fired.

        Input that arrives meanwhile is buffered, not read: only past
        ``HOLD_WHILE_BUSY`` bytes is the transport paused, so the usual
        commit costs no pause and resume (two epoll_ctl calls each)."""
        self._busy = True
        self.setTimeout(None)

        def resume(result):
            self._busy = False
            if self._paused:
                self._paused = False
                if not self.closing:
                    self.transport.resumeProducing()
            if not self.closing:
                self.setTimeout(self.limits.idle_timeout)
                self._process()
            return result

        d.addBoth(resume)

    def reply(self, r: Reply) -> None:
        """The one place replies are written; errors count toward the limit."""
        self.transport.write(r.wire)
        if r.is_error and r.code != 421:
            self.errors += 1
            if self.errors >= self.limits.max_errors:
                log.info("too many errors after {state} from [{ip}]",
                         state=self._state_name(), ip=self.client_ip)
                self.transport.write(reply.TOO_MANY_ERRORS.wire)
                self.close()

    # -- commands ---------------------------------------------------------
    def _command_line(self, line: Line) -> None:
        if line.overlong:
            self.reply(reply.LINE_TOO_LONG)
            return
        if not line.crlf:
            self.reply(reply.BARE_NEWLINE_CMD)
            return
        verb, _, arg = line.text.strip(b" ").partition(b" ")
        verb = verb.upper()
        name = verb.decode("ascii", "replace")
        handler = getattr(self, f"smtp_{name}", None) if verb.isalpha() else None
        if verb in _HTTP_VERBS:
            log.info("reject: HTTP command from [{ip}]", ip=self.client_ip)
            self.reply(reply.HTTP_COMMAND)
            self.close()
            return
        if self.refused is not None and verb != b"QUIT":
            self.reply(Reply(503, "5.5.1", "Error: service refused at connect, send QUIT"))
            return
        if handler is None:
            self._count("unknown")
            self.reply(reply.UNKNOWN_COMMAND if _VERB.match(verb) else reply.SYNTAX)
            return
        self._count(name.lower())
        if verb in _TRANSACTION_VERBS and not self.esmtp and self.splitter.pending():
            # After HELO the client was not offered PIPELINING (RFC 2920), yet
            # sent more before this command's reply: a bulk mailer's shortcut
            # (Postfix reject_unauth_pipelining, SECURITY-TESTS LIM-7).
            self.reply(reply.UNAUTH_PIPELINING)
            return
        try:
            result = handler(arg.strip(b" "))
        except Reply as r:
            self.reply(r)
            return
        if isinstance(result, Deferred):
            self._wait_for(result)
        elif result is not None:
            self.reply(result)

    def _count(self, name: str) -> None:
        self._counts[name] = self._counts.get(name, 0) + 1

    def _state_name(self) -> str:
        t = self.transaction
        if t is None:
            return "CONNECT" if self.helo is None else "HELO"
        if t.reader is not None:
            return "DATA"
        return "RCPT" if t.recipients else "MAIL"

    def smtp_HELO(self, arg: bytes) -> Reply:
        return self._hello(arg, esmtp=False)

    def smtp_EHLO(self, arg: bytes) -> Reply:
        return self._hello(arg, esmtp=True)

    def _hello(self, arg: bytes, esmtp: bool) -> Reply:
        if not arg:
            return Reply(501, "5.5.4", f"Syntax: {'EHLO' if esmtp else 'HELO'} hostname")
        if not _HELO_NAME.match(arg):
            return Reply(501, "5.5.2", "Error: invalid HELO/EHLO name")
        self._abort_transaction()
        self.helo = arg.decode("ascii")
        self.esmtp = esmtp
        greeting = f"{self.factory.hostname} Hello {self.helo} [{self.client_ip}]"
        answer = Reply(250, "", greeting if not esmtp else
                       "\n".join([greeting, *self.extensions()]))
        if self.policy is not None and self.policy.active:
            return self._checked(self.policy.helo(self.helo), answer,
                                 undo=lambda: setattr(self, "helo", None))
        return answer

    def extensions(self) -> list[str]:
        """What EHLO advertises: only what this session really does."""
        ext = [f"SIZE {self.limits.max_message_size}", "PIPELINING", "8BITMIME",
               "ENHANCEDSTATUSCODES"]
        if self.factory.tls_context is not None and not self.tls:
            ext.append("STARTTLS")
        if self.factory.role == "submission" and self.tls:
            # RFC 4954 4 and SECURITY-TESTS AUTH-1: never offered in plaintext.
            ext.append("AUTH " + " ".join(submission.MECHANISMS))
        return ext

    def smtp_STARTTLS(self, arg: bytes) -> Reply | None:
        if arg:
            return Reply(501, "5.5.4", "Syntax: STARTTLS")
        if self.tls:
            return Reply(503, "5.5.1", "Error: TLS already active")
        if self.factory.tls_context is None:
            return reply.TLS_NOT_AVAILABLE
        self.reply(Reply(220, "2.0.0", "Ready to start TLS"))
        # RFC 3207 4.2: forget everything, including commands the client
        # pipelined in plaintext after STARTTLS (CVE-2011-0411 class).
        self.splitter.clear()
        self._abort_transaction()
        self.helo = None
        self.esmtp = False
        self.tls = True
        self.transport.startTLS(self.factory.tls_context)
        return None

    def smtp_NOOP(self, arg: bytes) -> Reply:
        return reply.OK

    def smtp_RSET(self, arg: bytes) -> Reply:
        if arg:
            return Reply(501, "5.5.4", "Syntax: RSET")
        self._abort_transaction()
        return reply.OK

    def smtp_QUIT(self, arg: bytes) -> None:
        self.reply(reply.BYE)
        self.close()

    def smtp_HELP(self, arg: bytes) -> Reply:
        return Reply(214, "2.0.0", "See RFC 5321 and https://www.rfc-editor.org/rfc/rfc5321")

    def smtp_VRFY(self, arg: bytes) -> Reply:
        # Answering would let anyone list the users (Postfix disable_vrfy_command).
        return Reply(502, "5.5.1", "VRFY command is disabled")

    def smtp_EXPN(self, arg: bytes) -> Reply:
        return Reply(502, "5.5.1", "EXPN command is disabled")

    def smtp_BDAT(self, arg: bytes) -> Reply:
        # CHUNKING is not advertised; never read BDAT data (SMUG-7).
        return reply.NOT_IMPLEMENTED

    # -- AUTH (submission) -------------------------------------------------
    def smtp_AUTH(self, arg: bytes) -> Reply | Deferred | None:
        if self.factory.role != "submission":
            return reply.NOT_IMPLEMENTED
        if self.helo is None or not self.esmtp:
            return Reply(503, "5.5.1", "Error: send EHLO first")
        if self.user is not None:
            return Reply(503, "5.5.1", "Error: already authenticated")
        if self.transaction is not None:
            return Reply(503, "5.5.1", "Error: AUTH not allowed during a mail transaction")
        if not self.tls:
            return submission.ENCRYPTION_REQUIRED
        mechanism, _, initial = arg.partition(b" ")
        if not mechanism:
            return Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
        name = mechanism.decode("ascii", "replace").upper()
        if name not in submission.MECHANISMS:
            return Reply(504, "5.5.4", "Unrecognized authentication type")
        self._sasl = submission.SaslExchange(name)
        return self._auth_result(lambda: self._sasl.start(initial.strip() or None))

    def _auth_line(self, line: Line) -> None:
        if line.overlong or not line.crlf:
            self._sasl = None
            self.splitter.set_limit(self.limits.max_command_line)
            self.reply(Reply(500, "5.5.6", "Authentication exchange line is too long"))
            return
        result = self._auth_result(lambda: self._sasl.step(line.text))
        if isinstance(result, Deferred):
            self._wait_for(result)
        elif result is not None:
            self.reply(result)

    def _auth_result(self, advance) -> Reply | Deferred | None:
        try:
            outcome = advance()
        except submission.SaslError as e:
            self._sasl = None
            self.splitter.set_limit(self.limits.max_command_line)
            return e.reply
        if isinstance(outcome, str):
            self.splitter.set_limit(submission.MAX_AUTH_LINE)
            self.reply(Reply(334, "", outcome))
            return None
        self._sasl = None
        self.splitter.set_limit(self.limits.max_command_line)
        user, password = outcome
        refusal = self.factory.login_guard.refusal(self.client_ip, user)
        if refusal is not None:
            whose = "from your address" if refusal == ADDRESS_LOCKED else "for this account"
            return Reply(454, "4.7.0", f"Too many failed logins {whose}; try again later")
        d = self.factory.portal.login(UsernamePassword(user, password), None, submission.ISender)
        d.addCallbacks(self._authenticated, self._auth_failed, errbackArgs=(user,))
        return d

    def _authenticated(self, result) -> None:
        _, self.user, _ = result
        self.factory.login_guard.succeeded(self.client_ip)
        log.info("login: user=<{user}>, rip=[{ip}], tls={tls}", user=self.user,
                 ip=self.client_ip, tls=self._tls_version())
        self.reply(submission.AUTH_OK)

    def _auth_failed(self, failure: Failure, user: bytes) -> Deferred | None:
        if not failure.check(UnauthorizedLogin):
            log.failure("login error for {user}", failure, user=user)
            self.reply(reply.LOCAL_ERROR)
            return None
        self.factory.login_guard.failed(self.client_ip, user)
        self._auth_failures += 1
        # The delay grows with each failure in the session (chasquid, Postfix).
        delay = self.factory.config.auth.failure_delay * self._auth_failures
        return task.deferLater(self.factory.clock, delay, self._refuse_login)

    def _refuse_login(self) -> None:
        self.reply(submission.AUTH_FAILED)
        if self._auth_failures >= self.factory.config.submission.max_auth_failures:
            self.reply(Reply(421, "4.7.0", "Error: too many failed logins"))
            self.close()

    # -- the mail transaction ---------------------------------------------
    def smtp_MAIL(self, arg: bytes) -> Reply:
        if self.helo is None:
            return reply.NEED_HELO
        if self.transaction is not None:
            return reply.NESTED_MAIL
        if self.factory.role == "submission" and self.user is None:
            return submission.AUTH_REQUIRED
        if arg[:5].upper() != b"FROM:":
            return Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
        try:
            sender, params = parse_path_and_params(arg[5:], allow_null=True)
        except AddressSyntax as e:
            return Reply(501, "5.1.7", f"Bad sender address syntax: {e}")
        for key, value in params.items():
            if key == "SIZE":
                if not value.isdigit() or len(value) > 20:
                    return Reply(501, "5.5.4", "Bad SIZE parameter")
                if int(value) > self.limits.max_message_size:
                    return reply.MESSAGE_TOO_BIG
            elif key == "BODY":
                if value.upper() not in ("7BIT", "8BITMIME"):
                    return Reply(501, "5.5.4", "Bad BODY parameter")
            else:
                return reply.BAD_PARAMETER
        if self.user is not None and (sender is None or not submission.may_send_as(
                self.factory.directory, self.user, str(sender))):
            log.info("NOQUEUE: reject: MAIL from [{ip}]: sender <{sender}> not owned by "
                     "user <{user}>", ip=self.client_ip, sender=str(sender or ""), user=self.user)
            return Reply(553, "5.7.1", f"<{sender or ''}>: Sender address rejected: "
                                       f"not owned by user {self.user}")
        self.transaction = Transaction(sender)
        if self.policy is not None and self.policy.active:
            return self._checked(self.policy.mail(self.transaction.sender_text),
                                 reply.SENDER_OK, undo=self._refuse_mail)
        return reply.SENDER_OK

    def _refuse_mail(self) -> None:
        if self.transaction is not None:
            log.info("NOQUEUE: reject: MAIL from [{ip}] by policy; from=<{sender}> "
                     "helo=<{helo}>", ip=self.client_ip, sender=self.transaction.sender_text,
                     helo=self.helo)
        self._abort_transaction()

    def smtp_RCPT(self, arg: bytes) -> Reply:
        t = self.transaction
        if t is None:
            return reply.NEED_MAIL
        if arg[:3].upper() != b"TO:":
            return Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
        path = arg[3:].strip(b" ")
        if path.lower() in (b"<postmaster>", b"postmaster"):
            # RFC 5321 4.5.1: "Postmaster" without a domain must be accepted.
            path = b"<postmaster@" + self.factory.directory.primary_domain.encode() + b">"
        try:
            mailbox, params = parse_path_and_params(path, allow_null=False)
        except AddressSyntax as e:
            return self._reject_rcpt(Reply(501, "5.1.3", f"Bad recipient address syntax: {e}"),
                                     printable(path))
        if params:
            return reply.BAD_PARAMETER
        if len(t.accepted) >= self.limits.max_recipients:
            return reply.TOO_MANY_RECIPIENTS
        rcpt = str(mailbox)
        directory = self.factory.directory
        if mailbox.is_literal or not directory.is_local_domain(mailbox.domain):
            if self.user is None:
                return self._reject_rcpt(Reply(554, "5.7.1", f"<{rcpt}>: Relay access denied"),
                                         rcpt)
            if rcpt not in {r.address for r in t.recipients}:
                t.recipients.append(Recipient(rcpt, rcpt, False))
            t.accepted.append(rcpt)
            return reply.RECIPIENT_OK
        destinations = None if mailbox.quoted else directory.resolve(rcpt)
        if destinations is None:
            return self._reject_rcpt(
                Reply(550, "5.1.1", f"<{rcpt}>: Recipient address rejected: "
                                    "User unknown in local recipient table"), rcpt)
        if self.policy is not None and self.policy.active:
            d = self.policy.rcpt(rcpt)
            d.addCallback(lambda refusal: refusal and self.transaction is not None
                          and self._reject_rcpt(refusal, rcpt) or refusal)
            return self._checked(d, lambda: self._add_recipient(t, rcpt, destinations))
        return self._add_recipient(t, rcpt, destinations)

    def _add_recipient(self, t: Transaction, rcpt: str, destinations) -> Reply:
        known = {r.address for r in t.recipients}
        for dest in destinations:
            if dest.address not in known:
                known.add(dest.address)
                t.recipients.append(Recipient(dest.address, rcpt, dest.local))
        t.accepted.append(rcpt)
        return reply.RECIPIENT_OK

    def _reject_rcpt(self, r: Reply, rcpt: str) -> Reply:
        log.info("NOQUEUE: reject: RCPT from [{ip}]: {code} {enhanced} {text}; from=<{sender}> "
                 "to=<{rcpt}> helo=<{helo}>", ip=self.client_ip, code=r.code,
                 enhanced=r.enhanced, text=r.text, sender=self.transaction.sender_text,
                 rcpt=rcpt, helo=self.helo)
        return r

    def smtp_DATA(self, arg: bytes) -> Reply | None:
        t = self.transaction
        if arg:
            return Reply(501, "5.5.4", "Syntax: DATA")
        if self.splitter.pending() and (not self.esmtp or (t is not None and t.accepted)):
            # RFC 2920 3.1: the message may only follow the 354 (LIM-6); after
            # HELO nothing may be sent ahead, or the text of a DATA that fails
            # would run as commands (LIM-7).
            log.info("reject: DATA from [{ip}]: data sent before 354, helo=<{helo}>",
                     ip=self.client_ip, helo=self.helo)
            self.reply(reply.SYNC_ERROR)
            self.close()
            return None
        if t is None:
            return reply.NEED_MAIL
        if not t.accepted:
            return reply.NEED_RCPT
        t.queue_id = new_queue_id()
        if self.user is not None:
            # Held until the final dot: the From check and the DKIM
            # signature need the whole message before it is queued.
            t.body = tempfile.SpooledTemporaryFile(max_size=1 << 20)
            t.completer = submission.HeaderCompleter(
                self.factory.hostname, lambda text: t.body.write(text + b"\n"))
            t.reader = DataReader(self.limits.max_message_size, t.completer.line)
            self.splitter.set_limit(self.limits.max_text_line)
            return reply.START_DATA
        if self.policy is not None:
            t.checked = self.policy.message_buffer(self.factory.spool.tmp)
        if t.checked is not None:
            t.reader = DataReader(self.limits.max_message_size, t.checked.write_line)
            self.splitter.set_limit(self.limits.max_text_line)
            return reply.START_DATA
        try:
            t.writer = self.factory.spool.writer(t.queue_id)
            self._write_trace_headers(t)
        except OSError as e:
            log.error("{id}: cannot open spool file: {err}", id=t.queue_id, err=e)
            self._abort_transaction()
            return reply.storage_error(e)
        t.reader = DataReader(self.limits.max_message_size, t.writer.write_line,
                              t.writer.write_block)
        self.splitter.set_limit(self.limits.max_text_line)
        return reply.START_DATA

    def _write_trace_headers(self, t: Transaction, writer: MessageWriter | None = None,
                             extra: list[str] = ()) -> None:
        writer = writer or t.writer
        writer.write_line(f"Return-Path: <{t.sender_text}>".encode())
        t.body_offset = writer.size
        # Authentication-Results and Received-SPF above our Received (RFC 7208 9.1).
        for header_line in [*extra, *self._received(t)]:
            writer.write_line(header_line.encode())

    def _received(self, t: Transaction) -> list[str]:
        """The Received header (RFC 5321 4.4), in Postfix's layout."""
        ip = ip_address(self.client_ip) if self.client_ip else None
        literal = f"IPv6:{ip}" if ip is not None and ip.version == 6 else str(ip)
        # RFC 3848: ESMTP, ESMTPS, ESMTPA, ESMTPSA.
        protocol = (("ESMTP" if self.esmtp else "SMTP") + ("S" if self.tls else "")
                    + ("A" if self.user else ""))
        if self.user and self.factory.config.submission.hide_client_address:
            lines = [f"Received: by {self.factory.hostname} (mailstack) with {protocol} "
                     f"id {t.queue_id};", f"\t{header_date()}"]
            return lines
        lines = [f"Received: from {self.helo} ([{literal}])"]
        cipher = self._tls_description()
        if cipher:
            lines.append(f"\t({cipher})")
        by = f"\tby {self.factory.hostname} (mailstack) with {protocol} id {t.queue_id}"
        date = header_date()
        if len(t.accepted) == 1:
            # Only for a single recipient, so Bcc recipients are not revealed.
            lines += [by, f"\tfor <{t.accepted[0]}>; {date}"]
        else:
            lines += [by + ";", f"\t{date}"]
        return lines

    def _tls_connection(self):
        """The pyOpenSSL connection when TLS is up, else None."""
        if not self.tls:
            return None
        conn = self.transport.getHandle()
        return conn if hasattr(conn, "get_cipher_name") else None

    def _tls_version(self) -> str:
        conn = self._tls_connection()
        return conn.get_protocol_version_name() if conn is not None else ""

    def _tls_description(self) -> str:
        conn = self._tls_connection()
        if conn is None:
            return ""
        return (f"using {conn.get_protocol_version_name()} with cipher "
                f"{conn.get_cipher_name()} ({conn.get_cipher_bits()} bits)")

    # -- DATA -------------------------------------------------------------
    def _data_line(self, t: Transaction, line: Line) -> None:
        if not t.reader.feed(line):
            return
        self.splitter.set_limit(self.limits.max_command_line)
        if t.reader.error is not None:
            self._log_transaction(t, f"reject ({t.reader.error.code} {t.reader.error.text})")
            error = t.reader.error
            self._abort_transaction()
            self.reply(error)
            return
        envelope = Envelope(
            id=t.queue_id, sender=t.sender_text, recipients=t.recipients,
            arrival=time.time(), client=f"[{self.client_ip}]:{self.client_port}",
            helo=self.helo or "", body_offset=t.body_offset)
        if t.checked is not None:
            d = self.policy.end_of_data(t.checked)
            d.addCallbacks(self._policy_decided, self._policy_failed, callbackArgs=(t, envelope),
                           errbackArgs=(t,))
            self._wait_for(d)
            return
        if t.body is not None:
            refusal = self._check_submitted(t)
            if refusal is not None:
                self._log_transaction(t, f"reject ({refusal.code} {refusal.text})")
                self._abort_transaction()
                self.reply(refusal)
                return
            d = self.factory.run_blocking(self._signed, t, envelope)
            d.addCallback(self.factory.commits.commit, envelope)
            d.addCallbacks(self._committed, self._commit_failed,
                           callbackArgs=(t, envelope), errbackArgs=(t,))
            self._wait_for(d)
            return
        writer = t.writer
        t.writer = None
        d = self.factory.commits.commit(writer, envelope)
        d.addCallbacks(self._committed, self._commit_failed,
                       callbackArgs=(t, envelope), errbackArgs=(t,))
        self._wait_for(d)

    def _policy_decided(self, outcome, t: Transaction, envelope: Envelope) -> Deferred | None:
        if outcome.reply is not None:
            self._log_transaction(t, f"reject ({outcome.reply.code} {outcome.reply.enhanced} "
                                     f"{outcome.reply.text})")
            self._abort_transaction()
            self.reply(outcome.reply)
            if outcome.reply.code == 421:
                self.close()
            return None
        if outcome.folder:
            log.info("{id}: quarantined to {folder}: {reason}", id=t.queue_id,
                     folder=outcome.folder, reason=outcome.reason)
            for rcpt in t.recipients:
                if rcpt.local:
                    rcpt.folder = outcome.folder
        d = self.factory.run_blocking(self._write_checked, t, envelope, outcome)
        d.addCallback(self.factory.commits.commit, envelope)
        d.addCallbacks(self._committed, self._commit_failed,
                       callbackArgs=(t, envelope), errbackArgs=(t,))
        return d

    def _policy_failed(self, failure: Failure, t: Transaction) -> None:
        log.failure("{id}: policy checks failed", failure, id=t.queue_id)
        self._log_transaction(t, "deferred (policy checks failed)")
        self._abort_transaction()
        self.reply(reply.LOCAL_ERROR)

    def _write_checked(self, t: Transaction, envelope: Envelope, outcome) -> MessageWriter:
        """Blocking: the spool writer of the trace and policy headers, then the
        held message (without forged Authentication-Results)."""
        writer = self.factory.spool.writer(t.queue_id)
        try:
            self._write_trace_headers(t, writer, outcome.header_lines)
            t.checked.write_to(writer.write_line, outcome.drop)
            envelope.body_offset = t.body_offset
            return writer
        except BaseException:
            writer.abort()
            raise
        finally:
            t.checked.close()

    def _check_submitted(self, t: Transaction) -> Reply | None:
        """Every From address must belong to the user (RFC 6409 8.1, AUTH-13)."""
        t.completer.finish()
        addresses = t.completer.from_addresses()
        if not addresses:
            return Reply(550, "5.6.0", "Message needs exactly one readable From header "
                                       "(RFC 5322 3.6)")
        for address in addresses:
            if not submission.may_send_as(self.factory.directory, self.user, address):
                return Reply(553, "5.7.1", f"From address <{printable(address, 100)}> is not "
                                           f"owned by user {self.user}")
        t.from_domain = addresses[0].rpartition("@")[2].lower()
        return None

    def _signed(self, t: Transaction, envelope: Envelope) -> MessageWriter:
        """Blocking: the spool writer of the held message, DKIM-signed."""
        t.body.seek(0)
        message = t.body.read()
        keys = load_keys(self.factory.config.dkim.keys_dir, t.from_domain)
        signatures = sign(message, keys) if keys else []
        writer = self.factory.spool.writer(t.queue_id)
        try:
            self._write_trace_headers(t, writer)
            for header in signatures:
                for line in header.rstrip(b"\n").split(b"\n"):
                    writer.write_line(line)
            for line in message.rstrip(b"\n").split(b"\n") if message else []:
                writer.write_line(line)
            envelope.body_offset = t.body_offset
            return writer
        except BaseException:
            writer.abort()
            raise

    def _committed(self, _: None, t: Transaction, envelope: Envelope) -> None:
        self.transaction = None
        if t.body is not None:
            t.body.close()
        self._log_transaction(t, "queued", envelope.size)
        self.reply(Reply(250, "2.0.0", f"Ok: queued as {t.queue_id}"))
        self.factory.queued(envelope)

    def _commit_failed(self, failure: Failure, t: Transaction) -> None:
        """The commit failed (``GroupCommit`` has removed what it wrote)."""
        if failure.check(OSError):
            log.error("{id}: cannot commit to the spool: {err}", id=t.queue_id,
                      err=failure.value)
        else:
            log.failure("{id}: cannot commit to the spool", failure, id=t.queue_id)
        if t.body is not None:
            t.body.close()
        self.transaction = None
        self._log_transaction(t, "deferred (spool write failed)")
        error = failure.value
        self.reply(reply.storage_error(error) if isinstance(error, OSError)
                   else reply.LOCAL_ERROR)

    def _log_transaction(self, t: Transaction, result: str, size: int | None = None) -> None:
        self.factory.metrics.smtp_transaction(self.factory.role, result)
        log.info("{id}: client=[{ip}]:{port}, helo=<{helo}>, sasl_username=<{user}>, "
                 "from=<{sender}>, to=<{rcpts}>, size={size}, tls={tls}, result={result}",
                 id=t.queue_id or "NOQUEUE", user=self.user or "",
                 ip=self.client_ip, port=self.client_port, helo=self.helo,
                 sender=t.sender_text, rcpts=">,<".join(t.accepted),
                 size=size if size is not None else (t.reader.size if t.reader else 0),
                 tls=self._tls_version() or "no",
                 result=result)

    def _abort_transaction(self) -> None:
        t = self.transaction
        self.transaction = None
        if t is not None and t.writer is not None:
            t.writer.abort()
        if t is not None and t.body is not None:
            t.body.close()
        if t is not None and t.checked is not None:
            t.checked.close()
        self.splitter.set_limit(self.limits.max_command_line)
