"""Now as a mail header date (RFC 5322 3.3), made once per second.

Every message gets a Received header and every submission may get a Date;
under load that is the same string many times a second, and email.utils
builds it from scratch each time.
"""

from __future__ import annotations

import email.utils
import time

_last: tuple[int, str] = (-1, "")


def header_date() -> str:
    """The current second in local time, e.g. ``Sun, 06 Dec 2026 14:33:36 +0000``."""
    global _last
    second = int(time.time())
    if _last[0] != second:
        # One tuple assignment: a pool thread never sees a half-made pair.
        _last = (second, email.utils.formatdate(second, localtime=True))
    return _last[1]
