"""SEARCH keys (RFC 3501 6.4.4): parsed into a tree, evaluated per message.

Keys that need only the index (flags, UID, sequence numbers, size) never
open a file; header keys read the header, BODY and TEXT the whole message,
decoded (quoted-printable, base64, charsets, RFC 2047 words) and compared
case-insensitively. Dates compare calendar days: internal dates in the
server's time zone, sent dates in the Date header's own. Nesting is bounded
(SECURITY-TESTS IMAP-7).
"""

from __future__ import annotations

import datetime
import email
import email.header
import email.policy
import email.utils
import time

from mailstack.imap.mime import crlf, header_block, parse_fields
from mailstack.imap.parser import MAX_DEPTH, Parser

CHARSETS = ("UTF-8", "US-ASCII")
_FLAG_KEYS = {b"ANSWERED": ("R", True), b"DELETED": ("T", True), b"DRAFT": ("D", True),
              b"FLAGGED": ("F", True), b"SEEN": ("S", True), b"UNANSWERED": ("R", False),
              b"UNDELETED": ("T", False), b"UNDRAFT": ("D", False),
              b"UNFLAGGED": ("F", False), b"UNSEEN": ("S", False)}
_STRING_KEYS = (b"BCC", b"BODY", b"CC", b"FROM", b"SUBJECT", b"TEXT", b"TO")
_DATE_KEYS = (b"BEFORE", b"ON", b"SINCE", b"SENTBEFORE", b"SENTON", b"SENTSINCE")


class BadCharset(Exception):
    pass


def parse(p: Parser) -> list:
    """``[CHARSET x] key *(SP key)`` -> a list of keys (ANDed)."""
    charset = "UTF-8"
    if p.take(b"CHARSET "):
        charset = p.astring().decode("ascii", "replace").upper()
        if charset not in CHARSETS:
            raise BadCharset(charset)
        p.sp()
    keys = [_key(p, charset, 0)]
    while not p.at_end():
        p.sp()
        keys.append(_key(p, charset, 0))
    return keys


def _key(p: Parser, charset: str, depth: int):
    if depth > MAX_DEPTH:
        p.fail("Search keys nested too deeply")
    if p.take(b"("):
        keys = [_key(p, charset, depth + 1)]
        while not p.take(b")"):
            p.sp()
            keys.append(_key(p, charset, depth + 1))
        return ("and", keys)
    c = p.peek()
    if c.isdigit() or c == b"*":
        return ("seq", p.seqset())
    word = p.atom().upper()

    def arg_string():
        p.sp()
        raw = p.astring()
        try:
            return raw.decode("utf-8" if charset == "UTF-8" else "ascii").casefold()
        except UnicodeDecodeError:
            p.fail("Search string not in the given charset")

    if word in _FLAG_KEYS:
        return ("flag",) + _FLAG_KEYS[word]
    if word in (b"ALL", b"NEW", b"OLD", b"RECENT"):
        return (word.decode().lower(),)
    if word in _STRING_KEYS:
        return (word.decode().lower(), arg_string())
    if word in _DATE_KEYS:
        p.sp()
        return ("date", word.decode(), datetime.date(*p.date()))
    if word == b"HEADER":
        p.sp()
        name = p.astring().lower()
        return ("header", name, arg_string())
    if word in (b"KEYWORD", b"UNKEYWORD"):
        p.sp()
        return ("keyword", p.atom().decode("ascii"), word == b"KEYWORD")
    if word in (b"LARGER", b"SMALLER"):
        p.sp()
        return (word.decode().lower(), p.number())
    if word == b"NOT":
        p.sp()
        return ("not", _key(p, charset, depth + 1))
    if word == b"OR":
        p.sp()
        a = _key(p, charset, depth + 1)
        p.sp()
        return ("or", a, _key(p, charset, depth + 1))
    if word == b"UID":
        p.sp()
        return ("uid", p.seqset())
    p.fail(f"Unknown search key {word.decode('ascii', 'replace')}")


def needs_content(keys) -> bool:
    for key in keys:
        kind = key[0]
        if kind in ("and",) and needs_content(key[1]):
            return True
        if kind == "not" and needs_content([key[1]]):
            return True
        if kind == "or" and needs_content([key[1], key[2]]):
            return True
        if kind in ("bcc", "body", "cc", "from", "subject", "text", "to", "header", "date"):
            return True
    return False


class _Message:
    """Lazily read facts about one message."""

    def __init__(self, mailbox, seq: int, uid: int):
        self.mailbox = mailbox
        self.index = mailbox.index
        self.seq = seq
        self.uid = uid
        self._header = None
        self._fields = None
        self._text = None

    @property
    def letters(self) -> str:
        return self.index.entries[self.uid].msg.flags

    def header(self) -> bytes:
        if self._header is None:
            self._header = header_block(crlf(self.index.read_header(self.uid)))
        return self._header

    def field(self, name: bytes) -> list[str]:
        if self._fields is None:
            self._fields = {}
            for n, value, _ in parse_fields(self.header()):
                self._fields.setdefault(n, []).append(_decode_header(value).casefold())
        return self._fields.get(name, [])

    def body_text(self) -> str:
        if self._text is None:
            msg = email.message_from_bytes(self.index.read(self.uid), policy=email.policy.compat32)
            texts = []
            for part in msg.walk():
                if part.get_content_maintype() != "text":
                    continue
                payload = part.get_payload(decode=True) or b""
                charset = part.get_content_charset() or "utf-8"
                try:
                    texts.append(payload.decode(charset, "replace"))
                except LookupError:
                    texts.append(payload.decode("utf-8", "replace"))
            self._text = "\n".join(texts).casefold()
        return self._text


def _decode_header(value: bytes) -> str:
    text = value.decode("utf-8", "replace")
    if "=?" not in text:
        return text
    try:
        return str(email.header.make_header(email.header.decode_header(text)))
    except Exception:
        return text


def _sent_date(m: _Message) -> datetime.date | None:
    values = m.field(b"date")
    if not values:
        return None
    parsed = email.utils.parsedate_tz(values[0])
    if not parsed:
        return None
    try:
        return datetime.date(parsed[0], parsed[1], parsed[2])
    except ValueError:
        return None


def _match(key, m: _Message, ctx) -> bool:
    kind = key[0]
    if kind == "flag":
        return (key[1] in m.letters) == key[2]
    if kind == "all":
        return True
    if kind == "and":
        return all(_match(k, m, ctx) for k in key[1])
    if kind == "not":
        return not _match(key[1], m, ctx)
    if kind == "or":
        return _match(key[1], m, ctx) or _match(key[2], m, ctx)
    if kind == "recent":
        return m.uid in m.mailbox.recent
    if kind == "new":
        return m.uid in m.mailbox.recent and "S" not in m.letters
    if kind == "old":
        return m.uid not in m.mailbox.recent
    if kind == "seq":
        return _in_set(key[1], m.seq, len(ctx.uids))
    if kind == "uid":
        return _in_set(key[1], m.uid, ctx.uids[-1] if ctx.uids else 0)
    if kind == "keyword":
        letters = m.index.letters_of([key[1]], create=False)
        present = bool(letters) and all(c in m.letters for c in letters)
        return present == key[2]
    if kind == "larger":
        return m.index.wsize(m.uid) > key[1]
    if kind == "smaller":
        return m.index.wsize(m.uid) < key[1]
    if kind == "date":
        which, day = key[1], key[2]
        if which.startswith("SENT"):
            value = _sent_date(m)
            if value is None:
                return False
            which = which[4:]
        else:
            value = datetime.date(*time.localtime(m.index.mtime(m.uid))[:3])
        return value < day if which == "BEFORE" else value == day if which == "ON" \
            else value >= day
    if kind in ("from", "to", "cc", "bcc", "subject"):
        return any(key[1] in v for v in m.field(kind.encode()))
    if kind == "header":
        values = m.field(key[1])
        return bool(values) and (not key[2] or any(key[2] in v for v in values))
    if kind == "body":
        return key[1] in m.body_text()
    if kind == "text":
        return key[1] in _decode_header(m.header()).casefold() or key[1] in m.body_text()
    raise ValueError(kind)


def _in_set(ranges, value: int, top: int) -> bool:
    for lo, hi in ranges:
        lo = top if lo is None else lo
        hi = top if hi is None else hi
        if lo > hi:
            lo, hi = hi, lo
        if lo <= value <= hi:
            return True
    return False


class _Context:
    def __init__(self, uids):
        self.uids = uids


def run(mailbox, keys, uids: list[int]) -> list[tuple[int, int]]:
    """(seq, uid) of the messages of the view ``uids`` that match all ``keys``."""
    ctx = _Context(uids)
    result = []
    entries = mailbox.index.entries
    for i, uid in enumerate(uids):
        if uid not in entries:
            continue
        m = _Message(mailbox, i + 1, uid)
        try:
            if all(_match(k, m, ctx) for k in keys):
                result.append((i + 1, uid))
        except (OSError, KeyError):
            continue  # expunged meanwhile
    return result

