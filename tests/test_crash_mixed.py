"""``kill -9`` under load from SMTP, IMAP and POP3 at once (DESIGN invariants 1 and 4).

A real ``twistd mailstack`` serves smtp, imap and pop3 on loopback. While
it runs, client threads keep it busy and write down every answer they got:

* SMTP senders (``tests.test_crash.Sender``) deliver to every user and note
  each message that got 250;
* one IMAP client per IMAP user APPENDs (noting the tagged OK and its
  APPENDUID), learns the UIDs of delivered mail with UID FETCH, and in turn
  sets ``\\Flagged``, expunges (``\\Deleted`` + UID EXPUNGE) or MOVEs a message
  to Archive (noting the COPYUID);
* one POP3 client per POP3 user RETRs a few messages, DELEs them and QUITs,
  noting which UIDLs a QUIT that got ``+OK`` removed.

The daemon is killed with SIGKILL at two points while all of this streams,
restarted on the same directory, and then:

* every acknowledged message (250 or APPEND OK) is in its user's mailbox
  exactly once, unless an acknowledged EXPUNGE, MOVE or POP3 QUIT says
  otherwise; an acknowledged deletion is gone; an acknowledged MOVE is in
  Archive and not in INBOX; an acknowledged ``+FLAGS`` is in the file name;
* a message whose answer never came (killed in flight) is there at most once;
* no file in ``new/`` or ``cur/`` is partial: its bytes are the message sent
  (after the Return-Path and trace headers for SMTP), its size its ``S=``;
* the uid lists hold together: UIDVALIDITY unchanged, one UID per message,
  no UID twice, the UID a client was told before the crash is the UID a
  fresh client's UID FETCH reports after it, and mail that arrives after the
  restart gets UIDs above every UID handed out before.
"""

from __future__ import annotations

import collections
import poplib
import random
import re
import smtplib
import socket
import threading
from pathlib import Path

from twisted.internet import defer
from twisted.trial import unittest

from mailstack.store.uidlist import UIDLIST, parse_uidlist
from tests.imap_support import Raw
from tests.support.instance import PASSWORD, DaemonProcess, free_port, in_thread, wait_for
from tests.test_crash import _NAME, SENDER, Ledger, Sender, make_message, spool_empty

IMAP_USERS = ("imap0@example.test", "imap1@example.test")
POP_USERS = ("pop0@example.test", "pop1@example.test")
USERS = IMAP_USERS + POP_USERS
INBOX, ARCHIVE = "INBOX", "Archive"
_DIRS = {INBOX: "", ARCHIVE: ".Archive"}
_MESSAGE_ID = re.compile(rb"^Message-ID: <(?P<token>[^@>]+)@crash\.test>\r?$", re.MULTILINE)
_FETCH = re.compile(rb"\* \d+ FETCH \((.*?)\)\r\n", re.DOTALL)
_UID = re.compile(rb"\bUID (\d+)")
_UIDVALIDITY = re.compile(rb"\[UIDVALIDITY (\d+)\]")
_APPENDUID = re.compile(rb"\[APPENDUID (\d+) (\d+)\]")
_COPYUID = re.compile(rb"\[COPYUID (\d+) (\d+) (\d+)\]")
GONE = None


class Book:
    """What the clients were told, and so what must hold after the crash.

    ``places[token]`` is the set of places (INBOX, Archive, or GONE) where a
    message may be: one place once an answer said so, two while a MOVE or a
    deletion was sent and its answer never came.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.smtp = Ledger()
        self.appended: dict[str, str] = {}  # token -> user
        self.appending: dict[str, str] = {}
        self.places: dict[str, set] = {}
        self.flagged: set[str] = set()
        self.uids: dict[str, tuple[str, int]] = {}  # token -> (folder, uid) a client was told
        self.uidvalidity: dict[tuple[str, str], int] = {}
        self.top_uid: collections.Counter = collections.Counter()  # (user, folder) -> uid
        self.pop_uidls: dict[str, bytes] = {}
        self.acks = collections.Counter()  # kind -> acknowledged operations

    def note_uid(self, user: str, folder: str, token: str, uid: int) -> None:
        with self.lock:
            self.uids[token] = (folder, uid)
            self.top_uid[user, folder] = max(self.top_uid[user, folder], uid)

    def note_uidvalidity(self, user: str, folder: str, value: int) -> None:
        with self.lock:
            known = self.uidvalidity.setdefault((user, folder), value)
        if known != value:
            raise AssertionError(f"UIDVALIDITY of {user} {folder} changed: {known} -> {value}")

    def sending(self, token: str, user: str) -> None:
        with self.lock:
            self.appending[token] = user

    def append_acked(self, token: str, user: str, uid: int) -> None:
        with self.lock:
            del self.appending[token]
            self.appended[token] = user
            self.places[token] = {INBOX}
            self.acks["append"] += 1
        self.note_uid(user, INBOX, token, uid)

    def pending(self, token: str, place) -> None:
        with self.lock:
            self.places.setdefault(token, {INBOX}).add(place)

    def settled(self, token: str, kind: str, place) -> None:
        with self.lock:
            self.places[token] = {place}
            self.acks[kind] += 1
            if place is GONE:
                self.uids.pop(token, None)

    def flag_acked(self, token: str) -> None:
        with self.lock:
            self.flagged.add(token)
            self.acks["flag"] += 1

    def snapshot(self) -> dict:
        with self.lock:
            return dict(self.acks, smtp=len(self.smtp.acked))


class Client(threading.Thread):
    """A client thread: ``session`` runs until ``stop`` or until the daemon dies."""

    def __init__(self, port: int, user: str, prefix: str, book: Book, stop: threading.Event):
        super().__init__(daemon=True)
        self.port, self.user, self.prefix = port, user, prefix
        self.book, self.stop_event = book, stop
        self.rng = random.Random(prefix)
        self.errors: list[str] = []

    def run(self) -> None:
        try:
            self.session()
        except (OSError, EOFError):
            pass  # the daemon was killed under us
        except poplib.error_proto as e:
            if "EOF" not in str(e.args[0]) and not self.stop_event.is_set():
                self.errors.append(repr(e))
        except AssertionError as e:
            if not self.stop_event.is_set():
                self.errors.append(str(e))


class IMAPClient(Client):
    def command(self, r: Raw, line: bytes, literal: bytes | None = None) -> list[bytes]:
        self.tag += 1
        tag = b"t%d" % self.tag
        if literal is None:
            r.send(tag + b" " + line + b"\r\n")
        else:  # LITERAL+: no continuation round trip
            r.send(tag + b" " + line + b" {%d+}\r\n" % len(literal) + literal + b"\r\n")
        lines = r.until(tag)
        if not lines[-1].startswith(tag + b" OK"):
            raise AssertionError(f"{self.user}: {line[:60]!r} -> {lines[-1]!r}")
        return lines

    def session(self) -> None:
        self.tag = 0
        r = Raw(self.port)
        try:
            self.command(r, b"LOGIN " + self.user.encode() + b' "' + PASSWORD.encode() + b'"')
            selected = b"".join(self.command(r, b"SELECT INBOX"))
            self.book.note_uidvalidity(self.user, INBOX,
                                       int(_UIDVALIDITY.search(selected)[1]))
            known: dict[str, int] = {}  # token -> uid in INBOX, as far as this session knows
            seen = 0
            ops = ("flag", "expunge", "move")
            n = 0
            while not self.stop_event.is_set():
                token = f"{self.prefix}-{n}"
                self.book.sending(token, self.user)
                lines = self.command(r, b"APPEND INBOX", make_message(token, self.user))
                value, uid = map(int, _APPENDUID.search(lines[-1]).groups())
                self.book.note_uidvalidity(self.user, INBOX, value)
                self.book.append_acked(token, self.user, uid)
                known[token] = uid
                # Learn the UIDs of what SMTP delivered meanwhile.
                for item in _FETCH.findall(b"".join(self.command(
                        r, b"UID FETCH %d:* (UID BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])"
                           % (seen + 1)))):
                    uid = int(_UID.search(item)[1])
                    found = _MESSAGE_ID.search(item)
                    if found is not None:
                        learned = found["token"].decode()
                        known[learned] = uid
                        self.book.note_uid(self.user, INBOX, learned, uid)
                    seen = max(seen, uid)
                token = self.rng.choice(sorted(known))
                uid = known[token]
                op = ops[n % len(ops)]
                n += 1
                if op == "flag":
                    self.command(r, b"UID STORE %d +FLAGS.SILENT (\\Flagged)" % uid)
                    self.book.flag_acked(token)
                elif op == "expunge":
                    del known[token]
                    self.book.pending(token, GONE)
                    self.command(r, b"UID STORE %d +FLAGS.SILENT (\\Deleted)" % uid)
                    self.command(r, b"UID EXPUNGE %d" % uid)
                    self.book.settled(token, "expunge", GONE)
                else:
                    del known[token]
                    self.book.pending(token, ARCHIVE)
                    lines = b"".join(self.command(r, b"UID MOVE %d Archive" % uid))
                    value, old, new = map(int, _COPYUID.search(lines).groups())
                    if old != uid:
                        raise AssertionError(f"COPYUID names UID {old}, not {uid}")
                    self.book.note_uidvalidity(self.user, ARCHIVE, value)
                    self.book.settled(token, "move", ARCHIVE)
                    self.book.note_uid(self.user, ARCHIVE, token, new)
        finally:
            r.close()


class POP3Client(Client):
    def session(self) -> None:
        while not self.stop_event.is_set():
            p = poplib.POP3("127.0.0.1", self.port, timeout=10)
            try:
                p.user(self.user)
                p.pass_(PASSWORD)
                listing = [line.split() for line in p.uidl()[1]]
                chosen = self.rng.sample(listing, min(2, len(listing)))
                tokens = []
                for number, uidl in chosen:
                    data = b"\n".join(p.retr(int(number))[1]) + b"\n"
                    token = _MESSAGE_ID.search(data)["token"].decode()
                    if not data.endswith(f"end {token}\n".encode()):
                        raise AssertionError(f"RETR of {token} is partial")
                    self.book.pop_uidls.setdefault(token, uidl)
                    p.dele(int(number))
                    tokens.append(token)
                    self.book.pending(token, GONE)
                p.quit()  # error_proto unless +OK
            finally:
                p.close()
            for token in tokens:
                self.book.settled(token, "pop3", GONE)
            if not tokens:
                self.stop_event.wait(0.05)  # an empty maildrop: let mail arrive


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


class MixedKillTests(unittest.TestCase):
    """``kill -9`` while SMTP, IMAP and POP3 clients all work, at two points."""

    timeout = 120

    def setUp(self):
        self.ports = {name: free_port() for name in ("smtp", "imap", "pop3")}
        self.daemon = DaemonProcess(
            Path(self.mktemp()).absolute(), users=USERS, tls=False,
            listen=tuple(self.ports.items()),
            sections={"auth": {"allow_plaintext_loopback": True, "failure_delay": 0.05}})
        self.daemon.port = self.ports["smtp"]  # start() waits until this one listens
        self.addCleanup(self.daemon.kill)
        self.mail_root = self.daemon.config.server.mail_root
        self.book = Book()

    @defer.inlineCallbacks
    def start(self):
        yield in_thread(self.daemon.start)
        yield wait_for(lambda: listening(self.ports["imap"]) and listening(self.ports["pop3"]),
                       timeout=10)

    @defer.inlineCallbacks
    def run_and_kill(self, phase: int, wanted: dict):
        """Start the daemon and every client; SIGKILL it once each kind of
        operation got ``wanted`` more acknowledgements."""
        yield self.start()
        stop = threading.Event()
        self.addCleanup(stop.set)
        book = self.book
        clients = [Sender(self.ports["smtp"], f"s{phase}.{i}", book.smtp, stop, users=USERS)
                   for i in range(3)]
        clients += [IMAPClient(self.ports["imap"], user, f"a{phase}.{i}", book, stop)
                    for i, user in enumerate(IMAP_USERS)]
        clients += [POP3Client(self.ports["pop3"], user, f"p{phase}.{i}", book, stop)
                    for i, user in enumerate(POP_USERS)]
        base = book.snapshot()
        for client in clients:
            client.start()

        def progressed():
            now = book.snapshot()
            if not all(c.is_alive() for c in clients):
                raise AssertionError(f"a client stopped early: {[c.errors for c in clients]}")
            return all(now.get(k, 0) - base.get(k, 0) >= n for k, n in wanted.items())

        try:
            yield wait_for(progressed, timeout=30)
        finally:
            yield in_thread(self.daemon.kill)
            stop.set()
            yield wait_for(lambda: not any(c.is_alive() for c in clients), timeout=20)
        self.assertEqual([e for c in clients for e in getattr(c, "errors", [])], [])

    @defer.inlineCallbacks
    def test_kill_under_mixed_load(self):
        yield self.run_and_kill(0, {"smtp": 40, "append": 12, "flag": 2, "expunge": 2,
                                    "move": 2, "pop3": 3})
        yield self.run_and_kill(1, {"smtp": 10, "append": 4, "expunge": 1, "pop3": 1})
        yield self.start()
        spool = self.daemon.config.server.spool_dir
        yield wait_for(lambda: spool_empty(spool), timeout=20)
        # What a fresh client sees after the crashes.
        views = {}
        for user in IMAP_USERS:
            views[user] = yield in_thread(imap_view, self.ports["imap"], user)
        self.check_uids(views)
        # New mail after the restart: UIDs above everything handed out before.
        for user in IMAP_USERS:
            yield in_thread(self.deliver_after, user)
        yield wait_for(lambda: all(self.tokens_on_disk(u).get(after(u)[0]) for u in IMAP_USERS),
                       timeout=10)
        for user in IMAP_USERS:
            view = yield in_thread(imap_view, self.ports["imap"], user)
            inbox = view[INBOX][1]
            new = after(user)
            before = max((u for t, u in inbox.items() if t not in new), default=0)
            for token in new:
                self.assertGreater(inbox[token], self.book.top_uid[user, INBOX],
                                   f"{token}: a UID handed out before the crash came again")
                self.assertGreater(inbox[token], before)
        yield in_thread(self.daemon.stop)
        self.check_files()
        acks = self.book.snapshot()
        for kind in ("smtp", "append", "flag", "expunge", "move", "pop3"):
            self.assertGreater(acks.get(kind, 0), 0, f"no {kind} was acknowledged")

    def deliver_after(self, user: str) -> None:
        token, appended = after(user)
        with smtplib.SMTP("127.0.0.1", self.ports["smtp"], timeout=10) as client:
            client.sendmail(SENDER, [user], make_message(token, user))
        self.book.smtp.ack(token)
        r = Raw(self.ports["imap"])
        try:
            r.login(user)
            token = appended
            data = make_message(token, user)
            lines = r.cmd(b"a APPEND INBOX {%d+}\r\n" % len(data) + data)
            assert lines[-1].startswith(b"a OK [APPENDUID"), lines
            self.book.appended[token] = user
        finally:
            r.close()

    # -- the checks ------------------------------------------------------------------
    def check_uids(self, views: dict) -> None:
        """UIDVALIDITY kept, UIDs told before the crash kept, none twice."""
        for user, folders in views.items():
            for folder, (validity, uids) in folders.items():
                known = self.book.uidvalidity.get((user, folder))
                if known is not None:
                    self.assertEqual(validity, known, f"{user} {folder}: UIDVALIDITY changed")
                values = list(uids.values())
                self.assertEqual(len(values), len(set(values)), f"{user} {folder}: a UID twice")
                for token, uid in uids.items():
                    told = self.book.uids.get(token)
                    if told is not None and told[0] == folder:
                        self.assertEqual(uid, told[1], f"{token}: UID changed by the crash")

    def tokens_on_disk(self, user: str) -> collections.Counter:
        return collections.Counter(token for _, token, _ in self.files(user))

    def folder_dir(self, user: str, folder: str) -> Path:
        local, _, domain = user.partition("@")
        return self.mail_root / domain / local / "Maildir" / _DIRS[folder]

    def files(self, user: str):
        """(folder, token, path) of every message file of ``user``, checked whole."""
        found = []
        for folder in (INBOX, ARCHIVE):
            for sub in ("new", "cur"):
                d = self.folder_dir(user, folder) / sub
                for path in sorted(d.iterdir()) if d.is_dir() else []:
                    data = path.read_bytes()
                    m = _MESSAGE_ID.search(data)
                    self.assertIsNotNone(m, f"{path}: no token: {data[:200]!r}")
                    found.append((folder, m["token"].decode(), path))
        return found

    def check_files(self) -> None:
        book = self.book
        acked = book.smtp.acked | set(book.appended)
        maybe = book.smtp.inflight | set(book.appending)
        where: dict[str, list] = collections.defaultdict(list)
        for user in USERS:
            for folder, token, path in self.files(user):
                where[token].append((user, folder, path))
                m = _NAME.match(path.name)
                self.assertIsNotNone(m, f"not a Maildir name with S= and W=: {path.name}")
                data = path.read_bytes()
                self.assertEqual(len(data), int(m["size"]), f"{path}: size is not its S=")
                self.assertEqual(len(data) + data.count(b"\n"), int(m["wsize"]), path)
                # The bytes sent, to the mailbox's owner (To: is in them).
                sent = make_message(token, user).replace(b"\r\n", b"\n")
                if token in book.appended or token in book.appending:
                    self.assertEqual(data, sent, f"{path}: not the bytes APPENDed")
                else:
                    self.assertTrue(data.startswith(f"Return-Path: <{SENDER}>\n".encode()))
                    head, body = sent.split(b"\n\n", 1)
                    self.assertTrue(data.endswith(b"\n\n" + body), f"{path}: partial or damaged")
                    self.assertIn(b"\n" + head + b"\n\n", data, f"{path}: damaged header")
                flags = path.name.partition(":2,")[2]
                if token in book.flagged:
                    self.assertIn("F", flags, f"{token}: acknowledged \\Flagged lost")
                if token in book.pop_uidls:
                    self.assertEqual(path.name.split(",", 1)[0].encode(), book.pop_uidls[token],
                                     f"{token}: its UIDL changed")
        for token, places in where.items():
            self.assertIn(token, acked | maybe, f"{token} was never sent")
            self.assertEqual(len(places), 1, f"{token} stored {len(places)} times: {places}")
            expected = book.places.get(token, {INBOX})
            self.assertIn(places[0][1], expected,
                          f"{token} is in {places[0][1]}; the clients were told {expected}")
        for token in acked:
            expected = book.places.get(token, {INBOX})
            if GONE not in expected:
                self.assertIn(token, where, f"acknowledged {token} lost")
            elif expected == {GONE}:
                self.assertNotIn(token, where, f"{token}: acknowledged as deleted, but back")
        for user in USERS:
            mine = {t: [(f, p) for u, f, p in places if u == user] for t, places in where.items()}
            self.check_uidlists(user, {t: p for t, p in mine.items() if p})

    def check_uidlists(self, user: str, where: dict) -> None:
        for folder in (INBOX, ARCHIVE):
            top = self.folder_dir(user, folder)
            if not (top / UIDLIST).exists():
                continue
            uidlist = parse_uidlist((top / UIDLIST).read_bytes())
            known = self.book.uidvalidity.get((user, folder))
            if known is not None:
                self.assertEqual(uidlist.uidvalidity, known, f"{top}: UIDVALIDITY changed")
            bases = {path.name.split(",", 1)[0]: token for token, places in where.items()
                     for f, path in places if f == folder}
            missing = set(bases) - set(uidlist.uids)
            self.assertEqual(missing, set(), f"{top}: messages without a UID")
            uids = [uidlist.uids[b] for b in bases]
            self.assertEqual(len(uids), len(set(uids)), f"{top}: a UID twice")
            self.assertLess(max(uids, default=0), uidlist.uidnext)
            for base, token in bases.items():
                told = self.book.uids.get(token)
                if told is not None and told[0] == folder:
                    self.assertEqual(uidlist.uids[base], told[1], f"{token}: UID in {top}")


def after(user: str) -> tuple[str, str]:
    """The tokens of the SMTP delivery and the APPEND made after the last restart."""
    local = user.partition("@")[0]
    return f"after-{local}", f"append-after-{local}"


def imap_view(port: int, user: str) -> dict:
    """{folder: (UIDVALIDITY, {token: uid})} as a fresh IMAP session sees it."""
    r = Raw(port)
    view = {}
    try:
        r.login(user)
        for folder in (INBOX, ARCHIVE):
            selected = b"".join(r.cmd(b"s SELECT " + folder.encode()))
            lines = r.cmd(b"f UID FETCH 1:* (UID BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
            assert lines[-1].startswith(b"f OK"), lines[-1]
            uids = {}
            for item in _FETCH.findall(b"".join(lines)):
                token = _MESSAGE_ID.search(item)["token"].decode()
                assert token not in uids, f"{token} twice in {user} {folder}"
                uids[token] = int(_UID.search(item)[1])
            view[folder] = (int(_UIDVALIDITY.search(selected)[1]), uids)
    finally:
        r.close()
    return view
