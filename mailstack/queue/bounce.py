"""Delivery status notifications (RFC 3464) for mail that failed or is delayed.

A DSN goes from ``MAILER-DAEMON@<hostname>`` with the null sender to the
original envelope sender, as a multipart/report holding a readable note, the
machine-readable message/delivery-status and the original headers (not the
body: a bounce must not carry the spam it answers back out). Mail from the
null sender is never bounced (RFC 5321 6.1: no bounce for a bounce).
"""

from __future__ import annotations

import datetime
import email.utils
import re
import secrets

from mailstack.dates import header_date
from mailstack.queue.spool import Envelope, Recipient

_ENHANCED = re.compile(r"\b([245])\.(\d{1,3})\.(\d{1,3})\b")


def status_of(reply: str, permanent: bool) -> str:
    """The RFC 3463 status of a failure: from the reply text, else a generic one."""
    match = _ENHANCED.search(reply)
    if match:
        return match.group(0)
    return "5.0.0" if permanent else "4.0.0"


def build_dsn(hostname: str, envelope: Envelope, recipients: list[Recipient],
              original_headers: bytes, action: str = "failed") -> bytes:
    """The whole DSN message (LF line ends, as stored in the spool)."""
    boundary = f"{envelope.id}.{secrets.token_hex(8)}/{hostname}"
    now = header_date()
    arrival = email.utils.format_datetime(email.utils.localtime(
        datetime.datetime.fromtimestamp(envelope.arrival)))
    failed = action == "failed"
    subject = ("Undelivered Mail Returned to Sender" if failed
               else "Delayed Mail (still being retried)")
    intro = ([f"This is the mail system at host {hostname}.", "",
              "I'm sorry to have to inform you that your message could not",
              "be delivered to one or more recipients. The reasons are below."]
             if failed else
             [f"This is the mail system at host {hostname}.", "",
              "Your message could not be delivered yet. The mail system will keep",
              "trying; you do not need to send it again."])
    notes = [f"<{r.address}>: {r.reply or 'no reason recorded'}" for r in recipients]
    status_lines = [f"Reporting-MTA: dns; {hostname}", f"X-Mailstack-Queue-ID: {envelope.id}",
                    f"Arrival-Date: {arrival}"]
    for r in recipients:
        status_lines += ["", f"Final-Recipient: rfc822; {r.address}"]
        if r.original and r.original != r.address:
            status_lines.append(f"Original-Recipient: rfc822; {r.original}")
        status_lines += [f"Action: {action}", f"Status: {status_of(r.reply, failed)}"]
        if r.relay:
            status_lines.append(f"Remote-MTA: dns; {r.relay}")
        if r.reply:
            status_lines.append(f"Diagnostic-Code: smtp; {r.reply}")
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{envelope.sender}>",
        f"Subject: {subject}",
        f"Date: {now}",
        f"Message-ID: <{envelope.id}.{action}.{secrets.token_hex(4)}@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;\n\tboundary="{boundary}"',
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Description: Notification",
        "",
        *intro, "", *notes, "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "Content-Description: Delivery report",
        "",
        *status_lines, "",
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        "Content-Description: Undelivered Message Headers",
        "",
    ]
    text = "\n".join(lines).encode("utf-8") + b"\n"
    headers = original_headers.replace(b"\r\n", b"\n").rstrip(b"\n")
    return text + headers + f"\n\n--{boundary}--\n".encode("ascii")
