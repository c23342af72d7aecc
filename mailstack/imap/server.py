"""The IMAP4rev1 server protocol, on ``twisted.mail.imap4.IMAP4Server``.

Kept from Twisted: the declarative command tables (``unauth_X``, ``auth_X``,
``select_X``: handler plus argument parsers), ``dispatchCommand``, the
response helpers and the timeout mixin. Replaced, each for a reason:

* Input (``dataReceived``): commands are framed whole, literals included,
  by ``parser.CommandReader`` (bounded; LITERAL+; TOOBIG) and run one at a
  time: while a command is answered, nothing else is read (RFC 3501 5.5
  ordering without Twisted's unbounded ``blocked`` queue, LIM-11), and
  STARTTLS drops whatever was pipelined behind it (TLS-3).
* Every argument parser (strict literal sizes, numbers < 2^32, modified
  UTF-7 names checked, APPEND with or without a flag list).
* Logins: LOGIN and AUTHENTICATE PLAIN (SASL-IR) only over TLS unless
  ``[auth] allow_plaintext_loopback`` allows loopback (LOGINDISABLED,
  ``NO [PRIVACYREQUIRED]``, AUTH-2); failures answered after a delay,
  limited per client address and per connection.
* Every mailbox command, FETCH, SEARCH, STORE, COPY, MOVE, EXPUNGE (see
  ``selected.py``) and LIST with its extensions; new: ID, ENABLE, UNSELECT,
  MOVE, UID EXPUNGE.
* Notifications: before each tagged reply, the selected mailbox is synced
  (``SelectedMailbox.sync``), so other sessions' and processes' changes
  arrive as EXISTS, EXPUNGE and FETCH; during IDLE they are pushed as soon
  as the folder watcher sees them.
"""

from __future__ import annotations

import base64
import binascii
import re

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import task
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.mail import imap4
from twisted.python.failure import Failure

import mailstack
from mailstack.auth.limiter import ADDRESS_LOCKED
from mailstack.connections import ConnectionLimits
from mailstack.imap.account import Account
from mailstack.imap.mailbox import SelectedMailbox
from mailstack.imap.mime import quote
from mailstack.imap.parser import BadName, Command, CommandReader, Parser, Rejected
from mailstack.imap.selected import SelectedCommands
from mailstack.store.folders import MailboxError, NoSuchMailbox, mutf7_decode, mutf7_encode
from mailstack.store.index import FolderGone, TooManyKeywords, to_stored

log = Logger(namespace="mailstack.imap")
_LOOPBACK = ("127.", "::1", "::ffff:127.")
_STATUS_ITEMS = (b"MESSAGES", b"RECENT", b"UIDNEXT", b"UIDVALIDITY", b"UNSEEN")
_PAUSE_AT = 1 << 20
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
CAPABILITIES = [b"IMAP4rev1", b"SASL-IR", b"LITERAL+", b"ID", b"ENABLE", b"IDLE",
                b"NAMESPACE", b"UIDPLUS", b"MOVE", b"SPECIAL-USE", b"LIST-EXTENDED",
                b"LIST-STATUS", b"CHILDREN", b"UNSELECT"]


def mailbox_name(name: str) -> bytes:
    return quote(mutf7_encode(name))


class IMAPServer(SelectedCommands, imap4.IMAP4Server):
    """One IMAP connection; ``factory`` is an ``IMAPFactory``."""

    IDENT = b"mailstack IMAP4rev1 ready"
    #: The only ALPN protocol a TLS client may offer here (mailstack.tls).
    ALPN = b"imap"

    def __init__(self, factory: IMAPFactory):
        imap4.IMAP4Server.__init__(self, chal={}, contextFactory=factory.tls_context)
        self.factory = factory

    # -- connection ---------------------------------------------------------------
    def connectionMade(self) -> None:
        cfg = self.factory.config.imap
        peer = self.transport.getPeer()
        self.client_ip = getattr(peer, "host", str(peer))
        self.tls = self.factory.implicit_tls
        self.startedTLS = self.tls
        self.tags = {}
        self.reader = CommandReader(cfg.max_line, cfg.max_literal, cfg.max_message_size)
        self.timeOut = cfg.login_timeout
        self.POSTAUTH_TIMEOUT = cfg.idle_timeout
        self.user: str | None = None
        self._current: Command | None = None
        self._line_handler = None
        self._processing = False
        self._paused = False
        self._producer = None
        self._idle_tag = None
        self._push = None
        self._auth_failures = 0
        self._errors = 0
        self._counted_user: str | None = None
        refusal = self.factory.admit(self)
        if refusal is not None:
            log.info("connection refused: {why}, rip=[{ip}]", why=refusal, ip=self.client_ip)
            self.sendLine(b"* BYE [UNAVAILABLE] " + refusal.encode() + b", try again later")
            self.transport.loseConnection()
            return
        self.setTimeout(self.timeOut)
        self.sendServerGreeting()

    def connectionLost(self, reason=None) -> None:
        if self._producer is not None:
            producer, self._producer = self._producer, None
            try:
                producer.task.stop()
            except (task.TaskDone, task.TaskFailed):
                pass
        self._deselect()
        if self.user is not None:
            log.info("logout: user=<{user}>, rip=[{ip}]", user=self.user, ip=self.client_ip)
        self.factory.connection_lost(self)
        imap4.IMAP4Server.connectionLost(self, reason)

    def timeoutConnection(self) -> None:
        self.sendLine(b"* BYE Autologout; idle for too long")
        self._deselect()
        self.transport.loseConnection()

    def listCapabilities(self) -> list[bytes]:
        caps = list(CAPABILITIES)
        caps.append(b"APPENDLIMIT=%d" % self.factory.config.imap.max_message_size)
        if self.state == "unauth":
            if not self.tls and self.factory.tls_context is not None:
                caps.append(b"STARTTLS")
            caps.append(b"AUTH=PLAIN" if self._plaintext_allowed() else b"LOGINDISABLED")
        return caps

    # -- input -----------------------------------------------------------------------
    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        self.reader.feed(data)
        self._process()

    def _process(self) -> None:
        if self._processing:
            return
        self._processing = True
        try:
            while not self.transport.disconnecting:
                if self._line_handler is not None:
                    line = self.reader.next_line()
                    if line is None:
                        break
                    self._line_handler(line)
                    continue
                if self._current is not None:
                    break
                item = self.reader.next()
                if self.reader.wants_continuation:
                    self.sendContinuationRequest(b"Ready for literal data")
                    # The literal may be buffered already (a client that did
                    # not wait for the "+", or input held while a command ran).
                    continue
                if item is None:
                    break
                if isinstance(item, Rejected):
                    # BYE is untagged (RFC 3501 7.1.5); the others answer the command.
                    tag = b"*" if item.response.startswith(b"BYE") else item.tag
                    self.sendLine(tag + b" " + item.response)
                    if item.close:
                        self.transport.loseConnection()
                    elif item.response.startswith(b"BAD"):
                        self._count_error()
                    continue
                self._run(item)
        finally:
            self._processing = False
        busy = self._current is not None and self._line_handler is None
        if busy and self.reader.buffered() > _PAUSE_AT and not self._paused:
            self._paused = True
            self.transport.pauseProducing()
        elif not busy and self._paused:
            self._paused = False
            self.transport.resumeProducing()

    def _run(self, cmd: Command) -> None:
        self._current = cmd
        tag = cmd.tag
        if not cmd.verb.isalpha():
            self.sendBadResponse(tag, b"Unknown command")
            return
        try:
            self.dispatchCommand(tag, cmd.verb, cmd.rest)
        except imap4.IllegalClientResponse as e:
            self.sendBadResponse(tag, _text(e))
        except BadName as e:
            self.sendNegativeResponse(tag, b"[CANNOT] " + _text(e))
        except MailboxError as e:
            code = b"[%s] " % e.code.encode() if e.code else b""
            self.sendNegativeResponse(tag, code + _text(e))
        except FolderGone:
            self.sendNegativeResponse(tag, b"[NONEXISTENT] Mailbox no longer exists")
        except OSError:
            # A file the command writes at once (a new mailbox's UIDVALIDITY)
            # cannot be: answered as when the thread pool meets it, disk full
            # or quota as NO [OVERQUOTA] (RFC 9208, SECURITY-TESTS MD-6).
            self._failed(Failure(), tag, cmd.verb.decode("ascii", "replace"))
        except Exception:
            log.failure("IMAP command {verb} failed", verb=cmd.verb)
            self.sendNegativeResponse(tag, b"[SERVERBUG] Internal error")

    def lookupCommand(self, cmd):
        found = getattr(self, f"{self.state}_{cmd.decode('ascii')}", None)
        return found

    def dispatchCommand(self, tag, cmd, rest, uid=None):
        """Run a table entry: its argument parsers in order, then the handler.

        Synchronous, unlike Twisted's (the whole command, literals included,
        is already here), so every error reaches ``_run``.
        """
        entry = self.lookupCommand(cmd)
        if entry is None:
            known = any(getattr(self, f"{s}_{cmd.decode('ascii')}", None)
                        for s in ("unauth", "auth", "select"))
            self.sendBadResponse(tag, b"Command not valid in this state" if known
                                 else b"Unknown command")
            return
        handler, *parsers = entry
        args = [self, tag]
        for parser in parsers:
            value, rest = parser(self, rest)
            args.append(value)
        if rest:
            raise imap4.IllegalClientResponse("Too many arguments")
        if uid is not None:
            handler(*args, uid=uid)
        else:
            handler(*args)

    # -- output ----------------------------------------------------------------------
    def _respond(self, state, tag, message):
        final = tag is not None and state in (b"OK", b"NO", b"BAD")
        if final and self.mbox is not None and not self.transport.disconnecting:
            verb = self._current.verb if self._current else b""
            # RFC 3501 7.4.1: no EXPUNGE while answering FETCH, STORE or SEARCH.
            try:
                for line in self.mbox.sync(expunge=verb not in (b"FETCH", b"STORE", b"SEARCH")):
                    self.sendLine(line)
            except Exception:
                log.failure("mailbox sync failed")
        imap4.IMAP4Server._respond(self, state, tag, message)
        if final and state == b"BAD":
            self._count_error()
        if final and self._current is not None and tag == self._current.tag:
            self._current = None
            if not self._processing:
                self._process()

    def _count_error(self) -> None:
        """A BAD answer; past [imap] max_errors the connection is closed."""
        self._errors += 1
        if self._errors > self.factory.config.imap.max_errors:
            self.sendLine(b"* BYE Too many errors")
            self.transport.loseConnection()

    # -- argument parsers (Twisted's arg_* protocol: line -> (value, rest)) --------------
    def _parse(self, line, fn):
        p = Parser(line)
        value = fn(p)
        if not p.at_end():
            p.sp()
        return value, p.rest()

    def arg_astring(self, line, final=False):
        return self._parse(line, Parser.astring)

    arg_finalastring = arg_astring

    def arg_atom(self, line):
        return self._parse(line, Parser.atom)

    def arg_mailbox(self, line):
        return self._parse(line, Parser.mailbox)

    def arg_seqset(self, line):
        return self._parse(line, Parser.seqset)

    def arg_list_mailbox(self, line):
        return self._parse(line, Parser.list_mailbox)

    def arg_line(self, line):
        return line, b""

    def arg_status_items(self, line):
        return self._parse(line, _status_items)

    # -- any state ------------------------------------------------------------------------
    def do_CAPABILITY(self, tag):
        self.sendUntaggedResponse(b"CAPABILITY " + b" ".join(self.listCapabilities()))
        self.sendPositiveResponse(tag, b"Capability completed")

    def do_NOOP(self, tag):
        self.sendPositiveResponse(tag, b"NOOP completed")

    def do_LOGOUT(self, tag):
        self.sendUntaggedResponse(b"BYE Logging out")
        self._deselect()
        self.sendPositiveResponse(tag, b"Logout completed")
        self.state = "logout"
        self.transport.loseConnection()

    def do_ID(self, tag, rest):
        # RFC 2971: the client's parameters are parsed but not needed.
        p = Parser(rest)
        if not p.take(b"NIL"):
            p.expect(b"(")
            count = 0
            while not p.take(b")"):
                if count:
                    p.sp()
                if not p.take(b"NIL"):
                    p.string()
                count += 1
                if count > 60:
                    p.fail("Too many ID fields")
        p.end()
        self.sendUntaggedResponse(b'ID ("name" "mailstack" "version" ' +
                                  quote(mailstack.__version__.encode()) + b")")
        self.sendPositiveResponse(tag, b"ID completed")

    # -- not authenticated ------------------------------------------------------------------
    def _plaintext_allowed(self) -> bool:
        if self.tls:
            return True
        return (self.factory.config.auth.allow_plaintext_loopback
                and self.client_ip.startswith(_LOOPBACK))

    def _refuse_plaintext(self, tag) -> bool:
        if self._plaintext_allowed():
            return False
        # RFC 9051 6.2.3, RFC 5530.
        self.sendNegativeResponse(tag, b"[PRIVACYREQUIRED] Log in only over TLS: "
                                       b"use STARTTLS or port 993")
        return True

    def do_STARTTLS(self, tag):
        if self.tls:
            self.sendBadResponse(tag, b"TLS is already active")
            return
        if self.factory.tls_context is None:
            self.sendNegativeResponse(tag, b"TLS not available")
            return
        self.sendPositiveResponse(tag, b"Begin TLS negotiation now")
        # RFC 3501 6.2.1 / TLS-3: anything the client sent after STARTTLS in
        # plaintext is dropped, not run inside the TLS session.
        self.reader.clear()
        self.tls = self.startedTLS = True
        self.transport.startTLS(self.factory.tls_context)

    def do_LOGIN(self, tag, user, password):
        if self._refuse_plaintext(tag):
            return
        self._login(tag, user, password, "LOGIN")

    def do_AUTHENTICATE(self, tag, mechanism, rest):
        if mechanism.upper() != b"PLAIN":
            self.sendNegativeResponse(tag, b"Unsupported authentication mechanism")
            return
        if self._refuse_plaintext(tag):
            return
        if rest:
            # RFC 4959 SASL-IR: "=" stands for an empty initial response.
            self._sasl_plain(tag, b"" if rest == b"=" else rest)
            return
        # RFC 3501 7.5: continue-req = "+" SP (resp-text / base64); Twisted's
        # sendContinuationRequest leaves out the SP of an empty challenge.
        self.sendLine(b"+ ")

        def response(line):
            self._line_handler = None
            if line.strip() == b"*":
                self.sendBadResponse(tag, b"Authentication cancelled")
            else:
                self._sasl_plain(tag, line.strip())

        self._line_handler = response

    def _sasl_plain(self, tag, encoded: bytes) -> None:
        """RFC 4616: [authzid] NUL authcid NUL passwd (AUTH-9)."""
        try:
            decoded = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            self.sendBadResponse(tag, b"Invalid base64")
            return
        parts = decoded.split(b"\0")
        if len(parts) != 3 or not parts[1] or not parts[2] or parts[0] not in (b"", parts[1]):
            self.sendBadResponse(tag, b"Malformed SASL PLAIN response")
            return
        self._login(tag, parts[1], parts[2], "PLAIN")

    def _login(self, tag, user: bytes, password: bytes, method: str) -> None:
        refusal = self.factory.login_guard.refusal(self.client_ip, user)
        if refusal is not None:
            whose = b"from your address" if refusal == ADDRESS_LOCKED else b"for this account"
            self.sendNegativeResponse(tag, b"[UNAVAILABLE] Too many failed logins " + whose
                                      + b"; try again later")
            return
        d = self.factory.portal.login(UsernamePassword(user, password), None, imap4.IAccount)
        d.addCallbacks(self._logged_in, self._login_failed, callbackArgs=(tag, method),
                       errbackArgs=(tag, user))

    def _logged_in(self, result, tag, method: str) -> None:
        _, self.account, self._onLogout = result
        if self.transport.disconnecting:
            return
        if not self.factory.add_user_session(self, self.account.address):
            log.info("login refused: too many sessions, user=<{user}>, rip=[{ip}]",
                     user=self.account.address, ip=self.client_ip)
            logout, self._onLogout, self.account = self._onLogout, None, None
            logout()
            self.sendNegativeResponse(tag, b"[LIMIT] Too many IMAP sessions for this user; "
                                           b"close another one first")
            return
        self.user = self.account.address
        self.factory.login_guard.succeeded(self.client_ip)
        log.info("login: user=<{user}>, method={method}, rip=[{ip}], tls={tls}",
                 user=self.user, method=method, ip=self.client_ip,
                 tls="yes" if self.tls else "no")
        self.state = "auth"
        self.setTimeout(self.POSTAUTH_TIMEOUT)
        self.sendPositiveResponse(tag, b"[CAPABILITY " + b" ".join(self.listCapabilities())
                                  + b"] Logged in")

    def _login_failed(self, failure: Failure, tag, user: bytes):
        if not failure.check(UnauthorizedLogin):
            log.failure("login error for {user}", failure, user=user)
            self.sendNegativeResponse(tag, b"[UNAVAILABLE] Internal error, try again later")
            return None
        self.factory.login_guard.failed(self.client_ip, user)
        self._auth_failures += 1

        def answer():
            if self.transport.disconnecting:
                return
            self.sendNegativeResponse(tag, b"[AUTHENTICATIONFAILED] Authentication failed")
            if self._auth_failures >= self.factory.config.imap.max_auth_failures:
                self.sendLine(b"* BYE Too many failed logins")
                self.transport.loseConnection()

        return task.deferLater(self.factory.clock, self.factory.config.auth.failure_delay,
                               answer)

    # -- authenticated -------------------------------------------------------------------------
    def do_NAMESPACE(self, tag):
        self.sendUntaggedResponse(b'NAMESPACE (("" "/")) NIL NIL')
        self.sendPositiveResponse(tag, b"Namespace completed")

    def do_ENABLE(self, tag, rest):
        # RFC 5161: none of the extensions ENABLE can turn on is implemented.
        Parser(rest).atom()
        self.sendUntaggedResponse(b"ENABLED")
        self.sendPositiveResponse(tag, b"Enable completed")

    def _deselect(self) -> None:
        if self.mbox is not None:
            self._stop_idle_push()
            self.mbox.close()
            self.mbox = None
            if self.state == "select":
                self.state = "auth"

    def do_SELECT(self, tag, name, readwrite=True):
        if self.mbox is not None:
            self._deselect()
            self.sendUntaggedResponse(b"OK [CLOSED] Previous mailbox closed")
        try:
            index = self.account.mailboxes.index(name)
        except MailboxError:
            self.sendNegativeResponse(tag, b"[NONEXISTENT] No such mailbox")
            return
        mbox = SelectedMailbox(name, index, not readwrite, self.factory.run_blocking)
        for line in mbox.flag_lines():
            self.sendLine(line)
        self.sendUntaggedResponse(b"%d EXISTS" % len(mbox.uids))
        self.sendUntaggedResponse(b"%d RECENT" % len(mbox.recent))
        entries = index.entries
        for seq, uid in enumerate(mbox.uids, 1):
            if "S" not in entries[uid].msg.flags:
                self.sendUntaggedResponse(b"OK [UNSEEN %d] First unseen" % seq)
                break
        self.sendUntaggedResponse(b"OK [UIDVALIDITY %d] UIDs valid" % index.uidvalidity)
        self.sendUntaggedResponse(b"OK [UIDNEXT %d] Predicted next UID" % index.uidnext)
        self.mbox = mbox
        self.state = "select"
        self.sendPositiveResponse(tag, b"[READ-WRITE] Select completed" if readwrite
                                  else b"[READ-ONLY] Examine completed")

    def do_EXAMINE(self, tag, name):
        self.do_SELECT(tag, name, readwrite=False)

    def do_CREATE(self, tag, name):
        self.account.mailboxes.create(name)
        self.sendPositiveResponse(tag, b"Create completed")

    def do_DELETE(self, tag, name):
        self.account.mailboxes.delete(name)
        self.sendPositiveResponse(tag, b"Delete completed")

    def do_RENAME(self, tag, old, new):
        self.account.mailboxes.rename(old, new)
        self.sendPositiveResponse(tag, b"Rename completed")

    def do_SUBSCRIBE(self, tag, name):
        self.account.mailboxes.set_subscribed(name, True)
        self.sendPositiveResponse(tag, b"Subscribe completed")

    def do_UNSUBSCRIBE(self, tag, name):
        self.account.mailboxes.set_subscribed(name, False)
        self.sendPositiveResponse(tag, b"Unsubscribe completed")

    def do_LIST(self, tag, rest):
        """RFC 3501 6.3.8 with RFC 5258 LIST-EXTENDED and RFC 5819 LIST-STATUS."""
        p = Parser(rest)
        select, returns, status = set(), set(), []
        if p.take(b"("):
            while not p.take(b")"):
                if select:
                    p.sp()
                select.add(p.atom().upper())
            p.sp()
        reference = _pattern(p.astring())
        p.sp()
        if p.take(b"("):
            patterns = [_pattern(p.list_mailbox())]
            while not p.take(b")"):
                p.sp()
                patterns.append(_pattern(p.list_mailbox()))
        else:
            patterns = [_pattern(p.list_mailbox())]
        if not p.at_end():
            p.sp()
            p.expect(b"RETURN (")
            while not p.take(b")"):
                if returns:
                    p.sp()
                option = p.atom().upper()
                returns.add(option)
                if option == b"STATUS":
                    p.sp()
                    status = _status_items(p)
        p.end()
        unknown = select - {b"SUBSCRIBED", b"REMOTE", b"RECURSIVEMATCH", b"SPECIAL-USE"}
        if unknown or (b"RECURSIVEMATCH" in select and not select & {b"SUBSCRIBED",
                                                                      b"SPECIAL-USE"}):
            self.sendBadResponse(tag, b"Unsupported LIST selection option")
            return
        if patterns == [""]:
            self.sendUntaggedResponse(b'LIST (\\Noselect) "/" ""')
            self.sendPositiveResponse(tag, b"List completed")
            return
        entries = self.account.list(reference, patterns, subscribed=b"SUBSCRIBED" in select,
                                    recursive=b"RECURSIVEMATCH" in select,
                                    special_only=b"SPECIAL-USE" in select,
                                    return_subscribed=b"SUBSCRIBED" in returns)
        for entry in entries:
            line = b"LIST (" + " ".join(entry.attributes).encode() + b') "/" ' + \
                mailbox_name(entry.name)
            if entry.childinfo:
                line += b' ("CHILDINFO" ("SUBSCRIBED"))'
            self.sendUntaggedResponse(line)
            if status and "\\Noselect" not in entry.attributes and \
                    "\\NonExistent" not in entry.attributes:
                try:
                    self.sendUntaggedResponse(self._status_line(entry.name, status))
                except (MailboxError, FolderGone):
                    pass
        self.sendPositiveResponse(tag, b"List completed")

    def do_LSUB(self, tag, reference, pattern):
        for entry in self.account.lsub(_pattern(reference), _pattern(pattern)):
            self.sendUntaggedResponse(b"LSUB (" + " ".join(entry.attributes).encode()
                                      + b') "/" ' + mailbox_name(entry.name))
        self.sendPositiveResponse(tag, b"Lsub completed")

    def _status_line(self, name: str, items) -> bytes:
        index = self.account.mailboxes.index(name)
        values = []
        for item in items:
            if item == b"MESSAGES":
                value = len(index.uids)
            elif item == b"RECENT":
                value = index.recent_count()
            elif item == b"UIDNEXT":
                value = index.uidnext
            elif item == b"UIDVALIDITY":
                value = index.uidvalidity
            else:
                entries = index.entries
                value = sum(1 for u in index.uids if "S" not in entries[u].msg.flags)
            values.append(b"%s %d" % (item, value))
        return b"STATUS " + mailbox_name(name) + b" (" + b" ".join(values) + b")"

    def do_STATUS(self, tag, name, items):
        try:
            line = self._status_line(name, items)
        except NoSuchMailbox:
            self.sendNegativeResponse(tag, b"[NONEXISTENT] No such mailbox")
            return
        self.sendUntaggedResponse(line)
        self.sendPositiveResponse(tag, b"Status completed")

    def do_APPEND(self, tag, rest):
        p = Parser(rest)
        name = p.mailbox()
        p.sp()
        flags, when = [], None
        if p.peek() == b"(":
            flags = p.flag_list()
            p.sp()
        if p.peek() == b'"':
            when = p.date_time()
            p.sp()
        data = p.literal()
        p.end()
        if not data:
            self.sendNegativeResponse(tag, b"Empty messages are not stored")
            return
        try:
            index = self.account.mailboxes.index(name)
        except MailboxError:
            self.sendNegativeResponse(tag, b"[TRYCREATE] No such mailbox")
            return
        try:
            letters = index.letters_of(f for f in flags if f != "\\Recent")
        except TooManyKeywords:
            self.sendNegativeResponse(tag, b"[LIMIT] Too many keywords in this mailbox")
            return
        d = self.factory.run_blocking(index.write_message, to_stored(data), letters, when)

        def stored(base):
            uid = index.uids_of([base])[0]
            code = b"[APPENDUID %d %d] " % (index.uidvalidity, uid) if uid else b""
            self.sendPositiveResponse(tag, code + b"Append completed")

        d.addCallback(stored)
        d.addErrback(self._failed, tag, "APPEND")

    def do_IDLE(self, tag):
        """RFC 2177: changes are pushed until the client sends DONE."""
        self.sendContinuationRequest(b"idling")
        self._idle_tag = tag

        def line(data):
            self._line_handler = None
            self._stop_idle_push()
            if data.strip().upper() == b"DONE":
                self.sendPositiveResponse(tag, b"Idle completed")
            else:
                self.sendBadResponse(tag, b"Expected DONE")  # IMAP-10

        self._line_handler = line
        if self.mbox is not None:
            index = self.mbox.index
            self._push = self._idle_changed
            index.listeners.add(self._push)
            self.factory.watcher.watch(index)
            self._push_now()

    def _idle_changed(self) -> None:
        # Later, not inside the index refresh that called us.
        self.factory.clock.callLater(0, self._push_now)

    def _push_now(self) -> None:
        if self._push is None or self.mbox is None or self.transport.disconnecting:
            return
        for line in self.mbox.sync():
            self.sendLine(line)

    def _stop_idle_push(self) -> None:
        if self._push is not None and self.mbox is not None:
            self.mbox.index.listeners.discard(self._push)
            self.factory.watcher.unwatch(self.mbox.index)
        self._push = None

    # -- command tables (RFC 3501 6: what each state allows) ------------------------------------
    _any = {"CAPABILITY": (do_CAPABILITY,), "NOOP": (do_NOOP,), "LOGOUT": (do_LOGOUT,),
            "ID": (do_ID, arg_line)}
    _unauth = {"STARTTLS": (do_STARTTLS,), "LOGIN": (do_LOGIN, arg_astring, arg_astring),
               "AUTHENTICATE": (do_AUTHENTICATE, arg_atom, arg_line)}
    _auth = {"ENABLE": (do_ENABLE, arg_line), "NAMESPACE": (do_NAMESPACE,),
             "SELECT": (do_SELECT, arg_mailbox), "EXAMINE": (do_EXAMINE, arg_mailbox),
             "CREATE": (do_CREATE, arg_mailbox), "DELETE": (do_DELETE, arg_mailbox),
             "RENAME": (do_RENAME, arg_mailbox, arg_mailbox),
             "SUBSCRIBE": (do_SUBSCRIBE, arg_mailbox),
             "UNSUBSCRIBE": (do_UNSUBSCRIBE, arg_mailbox),
             "LIST": (do_LIST, arg_line), "LSUB": (do_LSUB, arg_astring, arg_list_mailbox),
             "STATUS": (do_STATUS, arg_mailbox, arg_status_items),
             "APPEND": (do_APPEND, arg_line), "IDLE": (do_IDLE,)}
    _select = {"CHECK": (SelectedCommands.do_CHECK,), "CLOSE": (SelectedCommands.do_CLOSE,),
               "UNSELECT": (SelectedCommands.do_UNSELECT,),
               "EXPUNGE": (SelectedCommands.do_EXPUNGE,),
               "SEARCH": (SelectedCommands.do_SEARCH, SelectedCommands.arg_search),
               "FETCH": (SelectedCommands.do_FETCH, arg_seqset, SelectedCommands.arg_fetch),
               "STORE": (SelectedCommands.do_STORE, arg_seqset, SelectedCommands.arg_store),
               "COPY": (SelectedCommands.do_COPY, arg_seqset, arg_mailbox),
               "MOVE": (SelectedCommands.do_MOVE, arg_seqset, arg_mailbox),
               "UID": (SelectedCommands.do_UID, arg_atom, arg_line)}


def _text(error: Exception) -> bytes:
    """An error message as resp-text (RFC 3501 9): one line, no CR, LF or NUL."""
    return _CONTROL.sub(b"?", str(error).encode("utf-8", "replace"))[:200]


def _status_items(p: Parser) -> list[bytes]:
    p.expect(b"(")
    items = []
    while not p.take(b")"):
        if items:
            p.sp()
        item = p.atom().upper()
        if item not in _STATUS_ITEMS:
            p.fail("Unknown STATUS item")
        items.append(item)
    return items


def _pattern(raw: bytes) -> str:
    """A LIST reference or pattern: modified UTF-7 decoded, wildcards kept."""
    try:
        return mutf7_decode(raw)
    except ValueError as e:
        raise BadName(f"Bad mailbox name encoding: {e}") from None


def _install_tables(cls) -> None:
    """Set every ``<state>_<VERB>`` attribute from the tables above, and
    disable each one Twisted defines that is not in them."""
    for attr in dir(imap4.IMAP4Server):
        state, _, verb = attr.partition("_")
        if state in ("unauth", "auth", "select", "logout") and verb.isupper():
            setattr(cls, attr, None)
    tables = {"unauth": [cls._any, cls._unauth], "auth": [cls._any, cls._auth],
              "select": [cls._any, cls._auth, cls._select], "logout": [cls._any]}
    for state, parts in tables.items():
        for part in parts:
            for verb, entry in part.items():
                setattr(cls, f"{state}_{verb}", entry)


_install_tables(IMAPServer)


class IMAPFactory(ServerFactory):
    noisy = False

    def __init__(self, config, portal, login_guard, clock, run_blocking, watcher,
                 tls_context=None, implicit_tls: bool = False, user_sessions=None):
        self.config = config
        self.portal = portal
        #: Failed logins per address and account (mailstack.auth.limiter), shared with POP3.
        self.login_guard = login_guard
        self.clock = clock
        self.run_blocking = run_blocking
        self.watcher = watcher
        self.tls_context = tls_context
        self.implicit_tls = implicit_tls
        self.limits = ConnectionLimits(config.imap.max_connections,
                                       config.imap.max_connections_per_ip)
        #: Logged-in sessions by user; the service shares one dict between
        #: its IMAP listeners, so [imap] max_sessions_per_user counts them all.
        self.user_sessions: dict[str, int] = {} if user_sessions is None else user_sessions
        self._closing: list[Deferred] = []

    def buildProtocol(self, addr):
        return IMAPServer(self)

    @property
    def connections(self):
        """The open (admitted) connections."""
        return self.limits.connections.keys()

    def admit(self, protocol: IMAPServer) -> str | None:
        """Register a new connection, or say why it is refused ([imap] limits)."""
        return self.limits.admit(protocol, protocol.client_ip)

    def add_user_session(self, protocol: IMAPServer, user: str) -> bool:
        """Count a login of ``user``; False if the user has too many sessions."""
        if self.user_sessions.get(user, 0) >= self.config.imap.max_sessions_per_user:
            return False
        self.user_sessions[user] = self.user_sessions.get(user, 0) + 1
        protocol._counted_user = user
        return True

    def connection_lost(self, protocol: IMAPServer) -> None:
        user, protocol._counted_user = getattr(protocol, "_counted_user", None), None
        if user is not None:
            left = self.user_sessions.get(user, 1) - 1
            if left > 0:
                self.user_sessions[user] = left
            else:
                self.user_sessions.pop(user, None)
        self.limits.release(protocol)
        if not self.connections:
            waiting, self._closing = self._closing, []
            for d in waiting:
                d.callback(None)

    def shutdown(self, grace: float = 2.0) -> Deferred:
        """Say BYE to every client (RFC 3501 7.1.5) and close; fires when all are gone."""
        if not self.connections:
            return succeed(None)
        d = Deferred()
        self._closing.append(d)
        for protocol in list(self.connections):
            if not protocol.transport.disconnecting:
                protocol.sendLine(b"* BYE Server shutting down")
            protocol.transport.loseConnection()
        late = self.clock.callLater(grace, self._abort)
        return d.addBoth(lambda r: (late.cancel() if late.active() else None, r)[1])

    def _abort(self) -> None:
        for protocol in list(self.connections):
            protocol.transport.abortConnection()


def open_account(address: str, mailboxes, run_blocking) -> Account:
    """The IAccount avatar (blocking: creates the default mailboxes on first login)."""
    mailboxes.ensure_defaults()
    return Account(address, mailboxes, run_blocking)

