"""The durable on-disk queue every accepted message is written to first.

Layout under ``spool_dir``::

    tmp/<id>.msg     message being received (never acknowledged yet)
    queue/<id>.msg   the message, exactly as it is delivered to a Maildir
    queue/<id>.env   its envelope (JSON): sender, recipients and their state
    lock             held by the running instance

Commit protocol (DESIGN invariant 1): the message file is fsync'd, the
envelope is written and fsync'd, both are renamed into ``queue/`` (message
first, envelope last: the envelope is the commit record) and ``queue/`` is
fsync'd. Only then does SMTP answer 250. A ``.msg`` without its ``.env`` was
never acknowledged and is removed at start-up.

The stored message uses LF line ends and starts with the ``Return-Path`` and
``Received`` headers, so local delivery is a hard link of this very file;
``body_offset`` marks where the message proper starts (after Return-Path),
which is what the outbound client sends.
"""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mailstack.fsutil import fsync_dir, replace_synced, write_synced

_counter = itertools.count()


def new_queue_id(now: float | None = None) -> str:
    """A unique id that sorts by arrival: seconds, microseconds, pid, counter (hex)."""
    now = time.time() if now is None else now
    sec = int(now)
    usec = int((now - sec) * 1_000_000)
    return f"{sec:08X}{usec:05X}{os.getpid() & 0xFFFF:04X}{next(_counter) & 0xFFF:03X}"


@dataclass
class Recipient:
    #: The final, canonical address after alias expansion.
    address: str
    #: The address the client gave in RCPT TO.
    original: str
    #: Delivered into a local Maildir (True) or to another server (False).
    local: bool
    #: queued, sent or bounced.
    status: str = "queued"
    #: Remote delivery: attempts so far, when to try next (epoch seconds),
    #: the last reply or error, and the host that gave it.
    attempts: int = 0
    next_attempt: float = 0.0
    reply: str = ""
    relay: str = ""
    #: Local delivery: the Maildir++ folder ("" for INBOX, ".Junk" for quarantine).
    folder: str = ""


@dataclass
class Envelope:
    id: str
    sender: str
    recipients: list[Recipient]
    arrival: float
    client: str = ""
    helo: str = ""
    #: Bytes of the Return-Path line in front of the message.
    body_offset: int = 0
    #: Size on disk (LF ends) and size with CRLF ends.
    size: int = 0
    wsize: int = 0
    extra: dict = field(default_factory=dict)

    def pending(self) -> list[tuple[int, Recipient]]:
        return [(i, r) for i, r in enumerate(self.recipients) if r.status == "queued"]

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> Envelope:
        raw = json.loads(data)
        raw["recipients"] = [Recipient(**r) for r in raw["recipients"]]
        return cls(**raw)


class SpoolLocked(RuntimeError):
    """Another running instance owns this spool directory."""


class MessageWriter:
    """Receives one message's bytes into ``tmp/``; committed or aborted once."""

    def __init__(self, spool: Spool, queue_id: str):
        self.spool = spool
        self.id = queue_id
        self.path = spool.tmp / f"{queue_id}.msg"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._file = os.fdopen(fd, "wb", buffering=1 << 16)
        self.size = 0
        self.lines = 0

    def write_line(self, line: bytes) -> None:
        """Append one line (without its end) followed by LF."""
        self._file.write(line)
        self._file.write(b"\n")
        self.size += len(line) + 1
        self.lines += 1

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def commit(self, envelope: Envelope) -> None:
        """Make the message durable and visible in the queue (blocking: use a thread)."""
        envelope.size = self.size
        envelope.wsize = self.size + self.lines
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
        finally:
            self._file.close()
        env_tmp = self.spool.tmp / f"{self.id}.env"
        write_synced(env_tmp, envelope.to_json())
        os.rename(self.path, self.spool.queue / f"{self.id}.msg")
        os.rename(env_tmp, self.spool.queue / f"{self.id}.env")
        fsync_dir(self.spool.queue)


class Spool:
    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.tmp = self.dir / "tmp"
        self.queue = self.dir / "queue"
        self._lock_fd: int | None = None

    def ensure(self) -> None:
        """Create the directories (owner-only access)."""
        for d in (self.dir, self.tmp, self.queue):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)

    def open(self) -> None:
        """Create the directories and take the instance lock (fails fast if held)."""
        self.ensure()
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolLocked(f"{self.dir} is in use by another running mailstack; "
                              "each instance needs its own spool_dir") from None
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def writer(self, queue_id: str) -> MessageWriter:
        return MessageWriter(self, queue_id)

    def message_path(self, queue_id: str) -> Path:
        return self.queue / f"{queue_id}.msg"

    def load(self, queue_id: str) -> Envelope:
        return Envelope.from_json((self.queue / f"{queue_id}.env").read_bytes())

    def update(self, envelope: Envelope) -> None:
        """Durably replace the envelope (recipient states changed)."""
        replace_synced(self.queue / f"{envelope.id}.env", envelope.to_json(),
                       tmp=self.tmp / f"{envelope.id}.env")

    def remove(self, queue_id: str) -> None:
        """Drop a finished message: envelope first, so a crash leaves only an orphan."""
        for suffix in (".env", ".msg"):
            try:
                os.unlink(self.queue / f"{queue_id}{suffix}")
            except FileNotFoundError:
                pass

    def recover(self) -> list[Envelope]:
        """Envelopes of queued messages; removes what was never acknowledged."""
        for entry in os.listdir(self.tmp):
            os.unlink(self.tmp / entry)
        names = os.listdir(self.queue)
        envelopes = []
        for name in sorted(names):
            stem, _, suffix = name.rpartition(".")
            if suffix == "msg" and f"{stem}.env" not in names:
                os.unlink(self.queue / name)
            elif suffix == "env":
                envelopes.append(self.load(stem))
        return envelopes

    def queued_ids(self) -> list[str]:
        return sorted(n[:-4] for n in os.listdir(self.queue) if n.endswith(".env"))
