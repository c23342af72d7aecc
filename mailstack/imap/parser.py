"""IMAP input: command framing with literals, and the argument grammar.

``CommandReader`` turns bytes into whole commands, literals included, before
anything is parsed (RFC 3501 4.3, RFC 7888 LITERAL+). It replaces Twisted's
line-at-a-time parsing, whose literal handling trusts ``int()`` (which takes
``-5``, ``+5``, `` 5``, ``1_0`` and non-ASCII digits: SECURITY-TESTS IMAP-3),
has no size cap on APPEND (IMAP-2), does not know ``{N+}`` (IMAP-5) and
never sends a continuation for a literal inside SEARCH. Here:

* a literal size is ``[0-9]{1,10}`` and at most the configured limit; a
  synchronising literal over the limit gets ``NO [TOOBIG]`` (APPEND) or
  ``BAD [TOOBIG]`` without a ``+`` (IMAP-1, IMAP-2); a non-synchronising
  one, whose bytes are already on their way, ends the connection with
  ``BYE`` (RFC 7888 4); a malformed size ends it too (IMAP-3);
* one command holds at most ``max_literals`` literals and
  ``max_command`` octets (IMAP-6); a line without its CRLF is not buffered
  past ``max_line``.

``Parser`` reads the arguments of one assembled command, in which a literal
appears as ``{N}`` CRLF and its N octets. Numbers are at most 2^32-1
(IMAP-8), nesting and section depth are bounded (IMAP-7).
"""

from __future__ import annotations

import calendar
import datetime
import re
from dataclasses import dataclass, field

from twisted.mail.imap4 import IllegalClientResponse

from mailstack.store.folders import BadMailboxName, mutf7_decode, normalize

_LITERAL_END = re.compile(rb"\{([0-9]{1,10})(\+?)\}\Z")
_LOOKS_LITERAL = re.compile(rb"\{[^{}]*\}\Z")
# RFC 3501 9: tag = 1*<any ASTRING-CHAR except "+">, that is any CHAR but
# CTL, SP, ( ) { % * " and backslash.
_TAG = re.compile(rb'[^\x00-\x20\x7f-\xff(){%*"\\+]{1,99}')
MAX_NUMBER = 2 ** 32 - 1
MAX_DEPTH = 64


@dataclass
class Command:
    tag: bytes
    verb: bytes
    rest: bytes


@dataclass
class Rejected:
    """A command refused while it was being read; ``close`` ends the connection."""

    tag: bytes
    response: bytes
    close: bool = False


@dataclass
class _Partial:
    tag: bytes
    verb: bytes
    data: bytearray = field(default_factory=bytearray)
    literals: int = 0


class CommandReader:
    """Bounded framing of IMAP commands; feed() bytes, then take next()."""

    def __init__(self, max_line: int, max_literal: int, max_append: int,
                 max_literals: int = 1000):
        self.max_line = max_line
        self.max_literal = max_literal
        self.max_append = max_append
        self.max_literals = max_literals
        self.max_command = max_append + max_line * 4
        self._buffer = bytearray()
        self._partial: _Partial | None = None
        self._literal_left = 0
        self._discarding = False
        self._discard_tag = b"*"
        #: Set by next() when a synchronising literal is to be announced with "+".
        self.wants_continuation = False

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def clear(self) -> None:
        """Forget everything buffered (STARTTLS, RFC 3501 6.2.1; TLS-3)."""
        self._buffer.clear()
        self._partial = None
        self._literal_left = 0
        self._discarding = False

    def buffered(self) -> int:
        return len(self._buffer)

    def next_line(self) -> bytes | None:
        """A plain line (an AUTHENTICATE response, IDLE's DONE), without CRLF."""
        end = self._buffer.find(b"\n")
        if end < 0:
            if len(self._buffer) > self.max_line:
                line = bytes(self._buffer)
                self._buffer.clear()
                return line  # overlong: the caller rejects it
            return None
        line = bytes(self._buffer[:end]).rstrip(b"\r")
        del self._buffer[:end + 1]
        return line

    def next(self) -> Command | Rejected | None:
        self.wants_continuation = False
        while True:
            if self._literal_left:
                if not self._take_literal():
                    return None
                continue
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > self.max_line:
                    # Keep reading to the end of the line, then reject it.
                    if not self._discarding:
                        self._discard_tag = (self._partial.tag if self._partial
                                             else _tag_of(bytes(self._buffer[:200])))
                    self._discarding = True
                    self._buffer.clear()
                return None
            line = bytes(self._buffer[:end])
            del self._buffer[:end + 1]
            if line.endswith(b"\r"):
                line = line[:-1]
            if self._discarding or len(line) > self.max_line:
                tag = (self._discard_tag if self._discarding else
                       self._partial.tag if self._partial else _tag_of(line))
                self._discarding = False
                self._partial = None
                return Rejected(tag, b"BAD Line too long")
            result = self._line(line)
            if result is not None:
                return result
            if self.wants_continuation:
                return None

    def _line(self, line: bytes):
        partial = self._partial
        if partial is None:
            if not line.strip():
                return None  # RFC 3501 does not allow empty lines; be lenient
            words = line.split(b" ", 2)
            partial = self._partial = _Partial(_tag_of(line),
                                               words[1].upper() if len(words) > 1 else b"")
        if len(partial.data) + len(line) > self.max_command:
            self._partial = None
            return Rejected(partial.tag, b"BAD [TOOBIG] Command too long", close=True)
        m = _LITERAL_END.search(line)
        if m is None:
            if _LOOKS_LITERAL.search(line):
                self._partial = None
                return Rejected(partial.tag, b"BAD Invalid literal size", close=True)
            partial.data += line
            self._partial = None
            if partial.tag == b"*":
                # Echoing it would forge an untagged line ("*"), a continuation
                # request ("+") or put NUL and 8-bit bytes into a response.
                return Rejected(b"*", b"BAD Invalid tag")
            parts = bytes(partial.data).split(b" ", 2)
            if len(parts) < 2 or not parts[1]:
                return Rejected(partial.tag, b"BAD Missing command")
            return Command(parts[0], parts[1].upper(), parts[2] if len(parts) > 2 else b"")
        size, sync = int(m.group(1)), not m.group(2)
        limit = self.max_append if partial.verb == b"APPEND" else self.max_literal
        partial.literals += 1
        if (size > limit or partial.literals > self.max_literals
                or len(partial.data) + size > self.max_command):
            self._partial = None
            if not sync:
                # The client sends the octets anyway (RFC 7888 4).
                return Rejected(partial.tag, b"BYE [TOOBIG] Literal too big", close=True)
            if partial.verb == b"APPEND":
                return Rejected(partial.tag, b"NO [TOOBIG] Message too big (limit %d octets)"
                                % limit)
            return Rejected(partial.tag, b"BAD [TOOBIG] Literal too big")
        # Stored as "{N}" CRLF data whatever the client wrote ({N+} too); the
        # text after the literal continues the same logical line.
        partial.data += line[:m.start()] + b"{%d}\r\n" % size
        self._literal_left = size
        if sync:
            self.wants_continuation = True
        return None

    def _take_literal(self) -> bool:
        take = min(self._literal_left, len(self._buffer))
        if take:
            self._partial.data += self._buffer[:take]
            del self._buffer[:take]
            self._literal_left -= take
        return not self._literal_left


def _tag_of(line: bytes) -> bytes:
    """The tag that starts ``line``, or "*" when it is not a valid tag."""
    tag = line.split(b" ", 1)[0]
    return tag if _TAG.fullmatch(tag) else b"*"


# -- argument grammar (RFC 3501 9) -------------------------------------------
_ATOM = re.compile(rb"[^\x00-\x20\x7f-\xff(){%*\"\\\]]+")
_ASTRING_CHARS = re.compile(rb"[^\x00-\x20\x7f-\xff(){%*\"\\]+")
_LIST_CHARS = re.compile(rb"[^\x00-\x20\x7f-\xff(){\"\\]+")  # atom plus % * ]
_NUMBER = re.compile(rb"[0-9]{1,10}")
_SEQ = re.compile(rb"(?:[0-9]{1,10}|\*)(?::(?:[0-9]{1,10}|\*))?(?:,(?:[0-9]{1,10}|\*)"
                  rb"(?::(?:[0-9]{1,10}|\*))?)*")
_MONTHS = {m.lower().encode(): i for i, m in enumerate(calendar.month_abbr) if m}
_DATE_TIME = re.compile(rb"([ 0-9]?[0-9])-([A-Za-z]{3})-([0-9]{4}) ([0-9]{2}):([0-9]{2}):"
                        rb"([0-9]{2}) ([+-])([0-9]{2})([0-9]{2})\Z")
_DATE = re.compile(rb"([0-9]{1,2})-([A-Za-z]{3})-([0-9]{4})\Z")


class BadName(Exception):
    """A mailbox name that is well-formed syntax but not acceptable (answer NO)."""


class Parser:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def fail(self, what: str):
        raise IllegalClientResponse(what)

    def at_end(self) -> bool:
        return self.pos >= len(self.data)

    def rest(self) -> bytes:
        return self.data[self.pos:]

    def peek(self, n: int = 1) -> bytes:
        return self.data[self.pos:self.pos + n]

    def sp(self) -> None:
        if self.peek() != b" ":
            self.fail("Expected a space")
        self.pos += 1

    def take(self, literal: bytes) -> bool:
        """Consume ``literal`` (case-insensitive) if it is next."""
        if self.data[self.pos:self.pos + len(literal)].upper() == literal.upper():
            self.pos += len(literal)
            return True
        return False

    def expect(self, literal: bytes) -> None:
        if not self.take(literal):
            self.fail(f"Expected {literal.decode()}")

    def end(self) -> None:
        if not self.at_end():
            self.fail("Too many arguments")

    def _match(self, pattern, what: str) -> bytes:
        m = pattern.match(self.data, self.pos)
        if not m:
            self.fail(f"Expected {what}")
        self.pos = m.end()
        return m.group(0)

    def atom(self) -> bytes:
        return self._match(_ATOM, "an atom")

    def number(self) -> int:
        value = int(self._match(_NUMBER, "a number"))
        if value > MAX_NUMBER:
            self.fail("Number too large")
        return value

    def nz_number(self) -> int:
        value = self.number()
        if not value:
            self.fail("Zero is not allowed here")
        return value

    def quoted(self) -> bytes:
        self.expect(b'"')
        out = bytearray()
        data = self.data
        while True:
            if self.pos >= len(data):
                self.fail("Unterminated quoted string")
            c = data[self.pos]
            self.pos += 1
            if c == 0x22:
                return bytes(out)
            if c == 0x5C:
                if self.pos >= len(data) or data[self.pos] not in (0x22, 0x5C):
                    self.fail("Bad escape in quoted string")
                out.append(data[self.pos])
                self.pos += 1
            elif c in (0x0D, 0x0A, 0x00):
                self.fail("CR, LF or NUL in quoted string")
            else:
                out.append(c)

    def literal(self) -> bytes:
        self.expect(b"{")
        size = int(self._match(_NUMBER, "a literal size"))
        if not self.take(b"}\r\n"):
            self.fail("Expected } and CRLF after a literal size")
        if self.pos + size > len(self.data):
            self.fail("Truncated literal")
        value = self.data[self.pos:self.pos + size]
        self.pos += size
        return value

    def string(self) -> bytes:
        c = self.peek()
        if c == b'"':
            return self.quoted()
        if c == b"{":
            return self.literal()
        self.fail("Expected a string")

    def astring(self) -> bytes:
        c = self.peek()
        if c in (b'"', b"{"):
            return self.string()
        return self._match(_ASTRING_CHARS, "a string")

    def nstring_or_atom(self) -> bytes:
        return self.astring()

    def list_mailbox(self) -> bytes:
        """RFC 3501 list-mailbox: an atom that may hold % and *, or a string."""
        c = self.peek()
        if c in (b'"', b"{"):
            return self.string()
        return self._match(_LIST_CHARS, "a mailbox pattern")

    def mailbox(self) -> str:
        """A mailbox name, decoded from modified UTF-7 and checked (BadName: NO)."""
        raw = self.astring()
        return decode_mailbox(raw)

    def seqset(self) -> list[tuple[int | None, int | None]]:
        """A sequence set as (low, high) pairs; None stands for "*"."""
        text = self._match(_SEQ, "a sequence set")
        ranges = []
        for item in text.split(b","):
            low, _, high = item.partition(b":")
            lo = None if low == b"*" else int(low)
            hi = lo if not high else (None if high == b"*" else int(high))
            for v in (lo, hi):
                if v is not None and not 0 < v <= MAX_NUMBER:
                    self.fail("Bad message number")
            ranges.append((lo, hi))
        return ranges

    def flag(self) -> str:
        if self.take(b"\\"):
            if self.take(b"*"):
                return "\\*"
            return "\\" + self.atom().decode("ascii")
        return self.atom().decode("ascii")

    def flag_list(self, parens_optional: bool = False) -> list[str]:
        if not self.take(b"("):
            if parens_optional:
                flags = [self.flag()]
                while self.peek() == b" ":
                    self.sp()
                    flags.append(self.flag())
                return flags
            self.fail("Expected a flag list")
        flags = []
        while not self.take(b")"):
            if flags:
                self.sp()
            flags.append(self.flag())
        return flags

    def date_time(self) -> float:
        """RFC 3501 date-time ("01-Jan-2024 10:00:00 +0100") as a POSIX time."""
        raw = self.quoted()
        m = _DATE_TIME.match(raw)
        if not m or m.group(2).lower() not in _MONTHS:
            self.fail("Bad date-time")
        day, mon, year, hh, mm, ss, sign, zh, zm = m.groups()
        try:
            t = calendar.timegm((int(year), _MONTHS[mon.lower()], int(day), int(hh), int(mm),
                                 int(ss), 0, 0, 0))
        except (ValueError, OverflowError):
            self.fail("Bad date-time")
        offset = (int(zh) * 60 + int(zm)) * 60
        return t - offset if sign == b"+" else t + offset

    def date(self) -> tuple[int, int, int]:
        raw = self.quoted() if self.peek() == b'"' else self.atom()
        m = _DATE.match(raw)
        if not m or m.group(2).lower() not in _MONTHS:
            self.fail("Bad date")
        value = int(m.group(3)), _MONTHS[m.group(2).lower()], int(m.group(1))
        try:
            datetime.date(*value)  # 31-Feb-2024, 0-Jan-2024, 1-Jan-0000
        except ValueError:
            self.fail("Bad date")
        return value


def decode_mailbox(raw: bytes) -> str:
    try:
        name = mutf7_decode(raw)
    except ValueError as e:
        raise BadName(f"Bad mailbox name encoding: {e}") from None
    try:
        return normalize(name)
    except BadMailboxName as e:
        raise BadName(str(e)) from None
