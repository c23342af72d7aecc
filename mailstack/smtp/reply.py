"""SMTP replies: one type, one writer, codes named with their RFC.

Handlers return or raise ``Reply``; ``Session.reply`` is the only place that
writes one. Reply text never carries raw client bytes with CR or LF
(SECURITY-TESTS HDR-4): ``Reply.lines`` strips control characters, and
anything else outside 7-bit text (RFC 5321 4.2 textstring; SMTPUTF8 is not
offered).
"""

from __future__ import annotations

import errno
import functools
import re
from dataclasses import dataclass

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NOT_TEXT = re.compile(r"[^\x20-\x7e]")


@dataclass(frozen=True)
class Reply(Exception):
    code: int
    #: RFC 3463 enhanced status code ("" for the greeting and EHLO lines).
    enhanced: str
    text: str

    def lines(self) -> list[bytes]:
        parts = self.text.split("\n")
        out = []
        for i, part in enumerate(parts):
            sep = " " if i == len(parts) - 1 else "-"
            prefix = f"{self.code}{sep}"
            if self.enhanced:
                prefix += self.enhanced + " "
            if not (part.isascii() and part.isprintable()):
                part = _NOT_TEXT.sub("?", part)
            out.append((prefix + part).encode("ascii"))
        return out

    @functools.cached_property
    def wire(self) -> bytes:
        """The reply as sent, each line ending in CRLF (made once per reply:
        most are the module's constants)."""
        return b"".join(line + b"\r\n" for line in self.lines())

    @property
    def is_error(self) -> bool:
        return self.code >= 400


def printable(value: bytes | str, limit: int = 200) -> str:
    """Client-supplied text made safe for a reply or a log line."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    value = _CONTROL.sub("?", value)
    return value if len(value) <= limit else value[:limit] + "..."


# RFC 5321 4.2.2 and RFC 3463 / RFC 5248 enhanced codes, as used here.
OK = Reply(250, "2.0.0", "Ok")
SENDER_OK = Reply(250, "2.1.0", "Ok")
RECIPIENT_OK = Reply(250, "2.1.5", "Ok")
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
SYNTAX = Reply(500, "5.5.2", "Error: bad syntax")
LINE_TOO_LONG = Reply(500, "5.5.2", "Error: line too long (RFC 5321 4.5.3.1.4)")
BARE_NEWLINE_CMD = Reply(500, "5.5.2", "Error: command lines must end with CRLF (RFC 5321 2.3.8)")
UNKNOWN_COMMAND = Reply(500, "5.5.1", "Error: command not recognized")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented")
BAD_SEQUENCE = Reply(503, "5.5.1", "Error: bad sequence of commands")
NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
BAD_PARAMETER = Reply(555, "5.5.4", "Error: unsupported MAIL/RCPT parameter")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Error: too many recipients")
RELAY_DENIED = Reply(554, "5.7.1", "Relay access denied")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Error: message size exceeds fixed limit")
TEXT_LINE_TOO_LONG = Reply(500, "5.5.2", "Error: message line longer than 1000 octets "
                                         "(RFC 5321 4.5.3.1.6)")
BARE_NEWLINE_DATA = Reply(550, "5.5.2", "Error: bare CR or LF in message; use CRLF line "
                                        "endings (RFC 5321 2.3.8)")
SYNC_ERROR = Reply(554, "5.5.0", "Error: SMTP protocol synchronization (data sent before 354)")
UNAUTH_PIPELINING = Reply(503, "5.5.0", "Error: improper use of SMTP command pipelining "
                                        "(PIPELINING is offered after EHLO, not HELO)")
LOCAL_ERROR = Reply(451, "4.3.0", "Error: local error in processing, try again later")
NO_STORAGE = Reply(452, "4.3.1", "Error: insufficient system storage, try again later")


def storage_error(error: OSError) -> Reply:
    """The reply for a failed spool write: 452 4.3.1 when the disk or the
    quota is full (RFC 3463 X.3.1), else 451 4.3.0 (SECURITY-TESTS MD-6)."""
    return NO_STORAGE if error.errno in (errno.ENOSPC, errno.EDQUOT) else LOCAL_ERROR
TIMEOUT = Reply(421, "4.4.2", "Error: timeout exceeded")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Error: too many errors")
HTTP_COMMAND = Reply(500, "5.5.1", "Error: this is an SMTP server, not an HTTP server")
TLS_NOT_AVAILABLE = Reply(454, "4.7.0", "TLS not available")
BYE = Reply(221, "2.0.0", "Bye")
