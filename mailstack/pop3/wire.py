"""A stored message in POP3's wire form (RFC 1939 3 and 11), a chunk at a time.

RETR and TOP answers are multi-line responses: every line ends in CRLF, a
line that starts with "." gets one more (byte-stuffing), and ``.CRLF`` ends
the answer. Stored files may use LF (mailstack, Postfix) or CRLF (some
Dovecot trees) line ends. The encoder works on chunks of any size, so a
large message is sent without being held in memory, and it gives the same
octets however the file is cut (a CR and its LF, or a line end and the dot
after it, may fall in different chunks).

Sizes follow RFC 1939 11: each line end counts as two octets, and the
stuffing dots "need not (and must not) be counted twice", since the client
removes them. So a size is what the client keeps, which is also Dovecot's
``W=`` size in a Maildir file name.
"""

from __future__ import annotations

import re
from typing import BinaryIO, Iterator

CHUNK = 1 << 16
#: A line that starts with a dot. The regular expression engine finds it in
#: about half the time ``bytes.find`` takes for this two-octet needle.
_DOT_LINE = re.compile(rb"\n\.")


class WireEncoder:
    """Stored bytes in, wire bytes out; ``size`` counts the unstuffed wire octets."""

    def __init__(self) -> None:
        self.size = 0
        #: The last chunk ended in CR, held back in case the next starts with LF.
        self._cr = False
        #: The output so far ends a line (or is empty): a "." next needs stuffing.
        self._line_start = True

    def feed(self, chunk: bytes) -> bytes:
        if self._cr:
            chunk = b"\r" + chunk
            self._cr = False
        if chunk.endswith(b"\r"):
            self._cr = True
            chunk = chunk[:-1]
        if not chunk:
            return b""
        return self._encode(chunk)

    def finish(self) -> bytes:
        """The rest of the message: a held CR, and a line end if the last line has none."""
        tail = self._encode(b"\r") if self._cr else b""
        self._cr = False
        if not self._line_start:
            # RFC 1939 3: the terminating "." must start a line of its own.
            tail += b"\r\n"
            self.size += 2
            self._line_start = True
        return tail

    def _encode(self, data: bytes) -> bytes:
        # A few C-level passes. Files with LF line ends (mailstack's,
        # Postfix's) get their CRs by one replace; a chunk whose line ends
        # are all CRLF (rebuilding it from its LFs gives it back) is left as
        # it is; only other chunks (bare CRs or LFs) are normalised.
        if b"\r" not in data:
            data = data.replace(b"\n", b"\r\n")
        elif data.replace(b"\r", b"").replace(b"\n", b"\r\n") != data:
            data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        self.size += len(data)
        stuffed = data.replace(b"\r\n.", b"\r\n..") if _DOT_LINE.search(data) else data
        if self._line_start and data.startswith(b"."):
            stuffed = b"." + stuffed
        self._line_start = data.endswith(b"\n")
        return stuffed


def encode(data: bytes) -> bytes:
    """A whole message in wire form (without the terminating ``.CRLF``)."""
    encoder = WireEncoder()
    return encoder.feed(data) + encoder.finish()


#: Recipes: how the wire form of a stored message is made again without
#: searching it, when it is that simple (see ``recipe_of``).
AS_IS = 1
LF_TO_CRLF = 2


def recipe_of(data: bytes, wire: bytes) -> int | None:
    """How ``wire``, which is ``encode(data)``, can be made from ``data`` alone.

    ``AS_IS`` when they are the same (CRLF lines, the last one ended, none
    starting with a dot), ``LF_TO_CRLF`` when ``wire`` only adds a CR
    before each LF (LF lines, the same otherwise); None for anything else.
    """
    if wire == data:
        return AS_IS
    if b"\r" not in data and len(wire) == len(data) + data.count(b"\n"):
        return LF_TO_CRLF
    return None


def by_recipe(recipe: int, data: bytes) -> bytes:
    """``encode(data)`` for a message whose recipe is known."""
    return data if recipe == AS_IS else data.replace(b"\n", b"\r\n")


def wire_size(f: BinaryIO) -> int:
    """The RFC 1939 size of a stored message, read in chunks."""
    encoder = WireEncoder()
    while chunk := f.read(CHUNK):
        encoder.feed(chunk)
    encoder.finish()
    return encoder.size


def message_chunks(f: BinaryIO) -> Iterator[bytes]:
    """The stored bytes RETR sends: the whole file."""
    while chunk := f.read(CHUNK):
        yield chunk


def top_chunks(f: BinaryIO, lines: int) -> Iterator[bytes]:
    """The stored bytes TOP sends: the header, the blank line and ``lines`` body lines.

    RFC 1939 7: if the body has fewer lines, the whole message is sent. A
    message with no blank line is all header. Clients ask for huge counts
    to get a whole message without marking it seen (fetchmail's
    ``TOP n 99999999``), so the body is read in chunks and its lines counted,
    not split.
    """
    # The header, line by line (readline is bounded, so a line without any
    # LF cannot make it read the whole file at once).
    whole = True  # the previous piece ended a line
    while True:
        piece = f.readline(CHUNK)
        if not piece:
            return
        yield piece
        blank = whole and piece in (b"\n", b"\r\n")
        whole = piece.endswith(b"\n")
        if blank:
            break
    while lines > 0:
        chunk = f.read(CHUNK)
        if not chunk:
            return
        count = chunk.count(b"\n")
        if count < lines:
            lines -= count
            yield chunk
            continue
        end = -1
        for _ in range(lines):
            end = chunk.index(b"\n", end + 1)
        yield chunk[:end + 1]
        return
