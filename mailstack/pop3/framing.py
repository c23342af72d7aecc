"""POP3 command lines from the client's bytes (RFC 1939 3), tested on byte strings.

A command ends at LF; one CR before the LF is not part of it (RFC 1939 asks
for CRLF, and a bare LF is taken as clients and Dovecot do). At most
``limit`` octets of a line are held: a longer line is reported once, as
``LineTooLong``, and the rest of it is dropped up to its LF, so memory stays
bounded whatever the client sends (SECURITY-TESTS LIM-2). Lines are taken
one at a time, so the session can stop reading at STLS (TLS-3) or while an
answer is pending (LIM-11).

SMTP's ``LineSplitter`` follows the same limits but also says how each line
ended, which SMTP needs against smuggling and POP3 does not; a command here
is a plain ``bytes``, which keeps the per-command cost of a session small.
"""

from __future__ import annotations


class LineTooLong(Exception):
    """A command line longer than the limit; the rest of it is dropped."""


class CommandReader:
    def __init__(self, limit: int):
        self.limit = limit
        self._buffer = b""
        self._pos = 0
        #: An over-long line was reported and its rest is being dropped.
        self._discarding = False

    def feed(self, data: bytes) -> None:
        if self._pos:
            self._buffer = self._buffer[self._pos:]
            self._pos = 0
        self._buffer += data

    def clear(self) -> None:
        """Forget buffered input (STLS: nothing sent before it may count)."""
        self._buffer = b""
        self._pos = 0
        self._discarding = False

    def pending(self) -> bool:
        return self._pos < len(self._buffer)

    def next_line(self) -> bytes | None:
        """The next command line, or None when more input is needed.

        Raises ``LineTooLong`` once for each line over the limit.
        """
        while True:
            buffer, start = self._buffer, self._pos
            end = buffer.find(b"\n", start)
            if end < 0:
                if len(buffer) - start < self.limit:
                    return None
                # Already too long without its end: keep none of it.
                self._buffer, self._pos = b"", 0
                if self._discarding:
                    return None
                self._discarding = True
                raise LineTooLong
            self._pos = end + 1
            if self._discarding:
                self._discarding = False
                continue
            if end - start >= self.limit:
                raise LineTooLong
            if end > start and buffer[end - 1] == 13:  # CR
                end -= 1
            return buffer[start:end]
