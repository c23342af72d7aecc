"""SMTP framing: splitting the byte stream into lines, and reading DATA.

Both are small state machines over bytes, tested without sockets
(STYLE.md 2). The rules, and the attacks they close:

* Lines end at LF. A line that does not end in CRLF is reported as such and
  never treated as a command or as the end of data, so ``\\n.\\n``,
  ``\\n.\\r\\n``, ``\\r.\\r`` and friends cannot end a message early
  (SMTP smuggling, SECURITY-TESTS SMUG-1..5).
* A line longer than the limit is reported once and its remainder discarded
  up to the next LF: memory stays bounded whatever the client sends (LIM-2),
  and during DATA an over-long line never switches back to command mode
  (SMUG-11, LIM-4); the error is answered after the final dot.
* DATA ends only at a line that is exactly ``.`` CRLF and follows a CRLF:
  the end of data is ``<CRLF>.<CRLF>`` (RFC 5321 4.1.1.4), so ``\\n.\\r\\n``
  is not one (SMUG-2). Leading dots are unstuffed (RFC 5321 4.5.2); after an
  error the reader keeps consuming up to that final dot so the dialogue stays
  in step (SMUG-8).
* ``DataReader.feed_buffered`` is a fast path for ordinary DATA lines, taken
  only where it gives exactly what the line path gives; anything unusual is
  left to the line path (see its docstring).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from mailstack.smtp import reply
from mailstack.smtp.reply import Reply


@dataclass(frozen=True)
class Line:
    #: The line without its terminator (and without the CR of a CRLF).
    text: bytes
    #: Ended with CRLF (False: bare LF, or a CR inside the line).
    crlf: bool = True
    #: Longer than the limit; ``text`` holds only the start.
    overlong: bool = False
    #: The line before this one ended with CRLF (True for the first line), even
    #: if it was over-long or held a bare CR: only then can "." end DATA.
    after_crlf: bool = True


class LineSplitter:
    """Turns received chunks into Lines, holding at most ``limit`` bytes of a line."""

    def __init__(self, limit: int):
        self.limit = limit
        self._buffer = b""
        self._pos = 0
        self._discarding = False
        self._after_crlf = True
        # The last byte dropped of a line being discarded was a CR.
        self._dropped_cr = False

    def set_limit(self, limit: int) -> None:
        self.limit = limit

    def clear(self) -> None:
        """Forget buffered input (STARTTLS: nothing sent before it may count)."""
        self._buffer = b""
        self._pos = 0
        self._discarding = False
        self._after_crlf = True
        self._dropped_cr = False

    def pending(self) -> bool:
        return self._pos < len(self._buffer)

    def buffered(self) -> int:
        """Bytes received and not yet taken as lines."""
        return len(self._buffer) - self._pos

    def feed(self, data: bytes) -> None:
        if self._pos:
            self._buffer = self._buffer[self._pos:]
            self._pos = 0
        self._buffer += data

    def next_line(self) -> Line | None:
        """The next complete line, or None when more input is needed."""
        while True:
            end = self._buffer.find(b"\n", self._pos)
            if end < 0:
                if len(self._buffer) - self._pos >= self.limit:
                    # Keep nothing of a line that is already too long.
                    head = self._buffer[self._pos:self._pos + self.limit]
                    self._dropped_cr = self._buffer.endswith(b"\r")
                    self._buffer = b""
                    self._pos = 0
                    if self._discarding:
                        return None
                    self._discarding = True
                    return Line(head, crlf=False, overlong=True, after_crlf=self._after_crlf)
                return None
            raw = self._buffer[self._pos:end]
            self._pos = end + 1
            after_crlf = self._after_crlf
            self._after_crlf = raw.endswith(b"\r") or (
                not raw and self._discarding and self._dropped_cr)
            if self._discarding:
                # The end of an over-long line already reported.
                self._discarding = False
                continue
            if len(raw) + 1 > self.limit:
                return Line(raw[: self.limit], crlf=False, overlong=True, after_crlf=after_crlf)
            if raw.endswith(b"\r"):
                raw = raw[:-1]
                return Line(raw, crlf=b"\r" not in raw, after_crlf=after_crlf)
            return Line(raw, crlf=False, after_crlf=after_crlf)


#: The most ``feed_buffered`` takes at once, whatever the size of the chunk
#: received, so the copies it makes stay small.
MAX_BLOCK = 1 << 16


class DataReader:
    """Consumes the lines of one DATA section and decides its outcome.

    ``write(line)`` receives each unstuffed line (without its end) as long as
    no error has occurred (an OSError from it, a full disk say, is such an
    error: the rest is read and dropped, and answered after the final dot); ``write_block(lines)``, if given, may receive runs
    of such lines at once, each ending in LF (``MessageWriter.write_block``).
    After the final dot, ``error`` is the Reply to give (None: the message is
    good).
    """

    def __init__(self, max_size: int, write: Callable[[bytes], None],
                 write_block: Callable[[bytes], None] | None = None):
        self.max_size = max_size
        self._write = write
        self._write_block = write_block
        self.size = 0
        self.error: Reply | None = None
        self.done = False

    def feed(self, line: Line) -> bool:
        """Take one line; True when it was the final dot."""
        if line.crlf and line.after_crlf and line.text == b"." and not line.overlong:
            self.done = True
            return True
        if line.overlong:
            self._fail(reply.TEXT_LINE_TOO_LONG)
        elif not line.crlf:
            self._fail(reply.BARE_NEWLINE_DATA)
        text = line.text[1:] if line.text.startswith(b".") else line.text
        self.size += len(text) + 2
        if self.size > self.max_size:
            self._fail(reply.MESSAGE_TOO_BIG)
        if self.error is None:
            try:
                self._write(text)
            except OSError as e:
                self._fail(reply.storage_error(e))
        return False

    def _fail(self, error: Reply) -> None:
        if self.error is None:
            self.error = error

    def feed_buffered(self, splitter: LineSplitter) -> bool:
        """Take every complete, ordinary line buffered in ``splitter`` at once.

        True when it took some; False leaves everything to the line path
        (``splitter.next_line`` and ``feed``), which then decides. It is the
        line path, only faster, because it takes a run of lines only when
        each of them would go through ``feed`` as a plain data line:

        * not done, no error yet, no over-long line being discarded, and the
          previous line ended in CRLF;
        * the run is whole lines, each ending in CRLF, with no other CR or LF
          (count of LF == count of CRLF == count of CR): no bare CR or LF;
        * no line in it is over the limit (``len(raw) + 1 > limit``, as in
          ``next_line``);
        * it stops before the first ``.`` CRLF line, and is not taken when
          that line comes first: the final dot, the reply and anything
          pipelined after it stay with the line path;
        * the unstuffed size stays within ``max_size``, so no line in it
          would be the one that fails the size check.

        Then unstuffing the first dot of every line (at the start and after
        each CRLF) and counting ``len + 2`` per line is ``feed`` for each of
        them. An incomplete last line stays buffered for ``next_line``, and
        at most ``MAX_BLOCK`` bytes are taken per call.
        """
        if (self.done or self.error is not None or splitter._discarding
                or not splitter._after_crlf):
            return False
        buf, pos = splitter._buffer, splitter._pos
        end = buf.rfind(b"\n", pos, pos + MAX_BLOCK)
        if end < 0 or buf.startswith(b".\r\n", pos):
            return False
        dot = buf.find(b"\r\n.\r\n", pos, end + 1)
        stop = dot + 2 if dot >= 0 else end + 1
        block = buf[pos:stop]
        n = block.count(b"\n")
        if block.count(b"\r\n") != n or block.count(b"\r") != n:
            return False
        if len(block) > splitter.limit and max(map(len, block.split(b"\n"))) >= splitter.limit:
            return False
        # Every CR is the start of a CRLF (counted above), so dropping them
        # all is CRLF -> LF; then unstuff on the LF form.
        text = block.replace(b"\r", b"")
        text = (text[1:] if text.startswith(b".") else text).replace(b"\n.", b"\n")
        size = len(text) + n  # as received: each line counts its CRLF
        if self.size + size > self.max_size:
            return False
        self.size += size
        splitter._pos = stop
        try:
            if self._write_block is not None:
                self._write_block(text)
            else:
                for line in text.split(b"\n")[:-1]:
                    self._write(line)
        except OSError as e:
            # The rest of the message is read and dropped; the reply comes after the dot.
            self._fail(reply.storage_error(e))
        return True
