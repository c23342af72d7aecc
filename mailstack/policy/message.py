"""The message on its way through the end-of-data checks, and its header fields.

``MessageBuffer`` holds what DATA receives while the policy chain is on: the
checks need the whole message (DKIM hashes the body) and their results go in
front of it (Authentication-Results, Received-SPF), so it cannot go straight
to the spool. Lines are kept in memory up to ``SPILL`` bytes, then in an
unnamed temporary file in the spool's ``tmp/`` (gone when closed, even after
a crash), so a session holds a bounded amount of memory on the reactor.

``write_to`` copies the message into the spool writer (in a pool thread),
dropping ``Authentication-Results`` fields that claim our authserv-id: one
that arrives with the message is forged or stale (RFC 8601 5).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Iterator

_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+):")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class MessageBuffer:
    #: Bytes held in memory before the lines go to a temporary file.
    SPILL = 1 << 16

    def __init__(self, tmp_dir: Path | str | None = None):
        self._tmp_dir = tmp_dir
        self._lines: list[bytes] = []
        self._held = 0
        self._file = None
        self.size = 0

    def write_line(self, line: bytes) -> None:
        """One message line without its line end (DataReader's sink)."""
        self._lines.append(line)
        self._held += len(line) + 1
        self.size += len(line) + 2
        if self._held > self.SPILL:
            self._spill()

    def _spill(self) -> None:
        if self._file is None:
            self._file = tempfile.TemporaryFile(dir=self._tmp_dir)
        self._lines.append(b"")
        self._file.write(b"\n".join(self._lines))
        self._lines = []
        self._held = 0

    @property
    def in_memory(self) -> bool:
        """Whether reading it touches no file (it may then run on the reactor)."""
        return self._file is None

    def lines(self) -> Iterator[bytes]:
        """Every line, without line ends (blocking when spilled: use a thread)."""
        if self._file is not None:
            self._file.seek(0)
            for line in self._file:
                yield line[:-1] if line.endswith(b"\n") else line
        yield from self._lines

    def read(self) -> bytes:
        """The whole message with CRLF line ends (blocking when spilled)."""
        return b"".join(line + b"\r\n" for line in self.lines())

    def write_to(self, write_line: Callable[[bytes], None],
                 drop: Callable[[str, str], bool] | None = None) -> None:
        """Copy every line into ``write_line``, leaving out the header fields
        for which ``drop(name, unfolded value)`` is true (blocking)."""
        in_header = True
        pending: list[bytes] = []

        def flush():
            if not pending:
                return
            match = _FIELD.match(pending[0])
            if drop is None or match is None or not drop(
                    match.group(1).decode("ascii").lower(),
                    b"".join(pending)[match.end():].decode("utf-8", "replace")):
                for part in pending:
                    write_line(part)
            pending.clear()

        for line in self.lines():
            if not in_header:
                write_line(line)
            elif line == b"":
                flush()
                in_header = False
                write_line(line)
            elif line[:1] in (b" ", b"\t") and pending:
                pending.append(line)
            else:
                flush()
                pending.append(line)
        flush()

    def close(self) -> None:
        self._lines = []
        if self._file is not None:
            self._file.close()
            self._file = None


def header_fields(data: bytes) -> list[tuple[str, str]]:
    """The header section as (name, unfolded value) pairs, top first.

    The grammar is dkimpy's (``rfc822_parse``): a field name is printable
    ASCII up to the first colon; lines starting with WSP continue the field
    above; the first empty line ends the header. A line that is neither is
    returned with the name "" so callers can refuse the message.
    """
    fields: list[tuple[str, str]] = []
    for raw in re.split(rb"\r?\n", data):
        if raw == b"":
            break
        if raw[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + raw.decode("utf-8", "replace"))
            continue
        match = _FIELD.match(raw)
        if match is None:
            fields.append(("", raw.decode("utf-8", "replace")))
            continue
        fields.append((match.group(1).decode("ascii"),
                       raw[match.end():].decode("utf-8", "replace")))
    return fields


def _skip_cfws(value: str, i: int) -> int:
    """Index after folding white space and (nested) comments (RFC 5322 3.2.2)."""
    depth = 0
    while i < len(value):
        c = value[i]
        if depth:
            if c == "\\":
                i += 1
            elif c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
        elif c == "(":
            depth = 1
        elif c not in " \t\r\n":
            break
        i += 1
    return i


def authserv_id_of(value: str) -> str:
    """The authserv-id an Authentication-Results value starts with (RFC 8601 2.2)."""
    i = _skip_cfws(value, 0)
    if value[i:i + 1] == '"':
        end = value.find('"', i + 1)
        return value[i + 1:end if end >= 0 else None].lower()
    j = i
    while j < len(value) and value[j] not in " \t\r\n;(":
        j += 1
    return value[i:j].lower()


def claims_authserv_id(name: str, value: str, authserv_id: str) -> bool:
    """Whether a header field is an Authentication-Results in our name."""
    return name.lower() == "authentication-results" and \
        authserv_id_of(value) == authserv_id.lower()


def comment(text: str, limit: int = 160) -> str:
    """Text made safe for a header comment: no control characters, no
    parentheses or backslashes (RFC 5322 ctext), bounded length."""
    text = _CONTROL.sub(" ", text)
    text = text.replace("\\", "/").replace("(", "[").replace(")", "]").replace(";", ",")
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def printable(text: str, limit: int = 900) -> str:
    """Text for a header field value: control characters (CR, LF, ...) become
    spaces, so nothing a client sent can start a header line of its own."""
    text = _CONTROL.sub(" ", text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def fold(name: str, value: str, width: int = 78) -> list[str]:
    """A header field folded at spaces (RFC 5322 2.2.3): each continuation line
    starts with the space it replaces, so unfolding gives back ``value``."""
    lines = [f"{name}:"]
    for word in value.split(" "):
        if len(lines[-1]) + 1 + len(word) > width and lines[-1].strip() and len(lines) < 1000:
            lines.append(" " + word)
        else:
            lines[-1] += " " + word
    return lines


def header_lines(name: str, parts: list[str], separator: str = ";") -> list[str]:
    """A header field folded one part per line (RFC 5322 2.2.3): the first part
    on the name's line, each following one on a continuation line."""
    lines = [f"{name}: {parts[0]}"]
    for part in parts[1:]:
        lines[-1] += separator
        lines.append(f"\t{part}")
    return lines
