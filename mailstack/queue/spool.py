"""The durable on-disk queue every accepted message is written to first.

Layout under ``spool_dir``::

    tmp/<id>.msg     message being received (never acknowledged yet)
    queue/<id>.msg   the message, exactly as it is delivered to a Maildir
    queue/<id>.env   its envelope (JSON): sender, recipients and their state
    spare/<name>     envelope files of removed messages, for reuse (below)
    lock             held by the running instance

Commit protocol (DESIGN invariant 1): the message file is fsync'd, the
envelope is written and fsync'd, both are renamed into ``queue/`` (message
first, envelope last: the envelope is the commit record) and ``queue/`` is
fsync'd. Only then does SMTP answer 250. A ``.msg`` without its ``.env`` was
never acknowledged and is removed at start-up.

Commits are batched (``GroupCommit``): the reactor thread writes the files
into ``tmp/`` and renames them, calls that touch only the page cache and the
directories; a pool thread does the fsyncs, one job for all the files of a
batch and one fsync of ``queue/`` (``DirectorySync``) for all its renames.
Each message is still acknowledged only after an fsync of ``queue/`` that
started after its own renames.

The envelope file of a removed message is kept in ``spare/`` and rewritten
in place for the next message instead of creating a new one: a new inode
costs the file system an allocation, and (on ext4 without a journal) a scan
past every inode freed in the last minutes, for each message. A spare is
never in ``queue/``, so what it holds does not matter until it is renamed
there, fsync'd like a new file; one whose inode also appears in a queue
(``take`` links envelopes between spools) is never reused.

A message is held in memory until its commit; only a message larger than
``MessageWriter.SPILL`` is written to ``tmp/`` as it arrives, so the memory
held per session stays bounded.

The stored message uses LF line ends and starts with the ``Return-Path`` and
``Received`` headers, so local delivery is a hard link of this very file;
``body_offset`` marks where the message proper starts (after Return-Path),
which is what the outbound client sends.
"""

from __future__ import annotations

import collections
import fcntl
import itertools
import json
import os
import threading
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailstack.fsutil import fsync_dir, replace_synced
from mailstack.queue.fsync_process import FsyncProcess, error_of
from mailstack.queue.fsyncd import fsync_each

log = Logger(namespace="mailstack.spool")
_counter = itertools.count()
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def new_queue_id(now: float | None = None) -> str:
    """A unique id that sorts by arrival: seconds, microseconds, pid, counter (hex).

    The whole pid is in it (Linux pids fit in 6 hex digits), so two processes
    sharing one mail root never make the same id, hence the same Maildir name.
    """
    now = time.time() if now is None else now
    sec = int(now)
    usec = int((now - sec) * 1_000_000)
    return f"{sec:08X}{usec:05X}{os.getpid():06X}{next(_counter) & 0xFFF:03X}"


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
        # What dataclasses.asdict gives, without its deep copies (once per message).
        raw = {name: getattr(self, name) for name in _ENVELOPE_FIELDS}
        raw["recipients"] = [{name: getattr(r, name) for name in _RECIPIENT_FIELDS}
                             for r in self.recipients]
        return _ENVELOPE_JSON.encode(raw).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> Envelope:
        raw = json.loads(data)
        raw["recipients"] = [Recipient(**r) for r in raw["recipients"]]
        return cls(**raw)


_ENVELOPE_FIELDS = tuple(f.name for f in fields(Envelope))
_RECIPIENT_FIELDS = tuple(f.name for f in fields(Recipient))
#: What json.dumps(sort_keys=True) uses, made once rather than per message.
_ENVELOPE_JSON = json.JSONEncoder(sort_keys=True)


class SpoolLocked(RuntimeError):
    """Another running instance owns this spool directory."""


class DirectorySync:
    """Group commit of one directory's fsync, shared by concurrent threads.

    ``sync()`` returns once an fsync of the directory that *started after the
    call* has completed, so every rename the caller made before calling is
    durable. Callers that arrive while an fsync is running wait for it and
    then share the next one: under load, one fsync covers many commits.
    A failed fsync raises in its caller and covers no one; the others retry.
    """

    def __init__(self, path: Path, fd: int | None = None):
        self.path = path
        #: An open descriptor of the directory (saves an open and a close per fsync).
        self.fd = fd
        self._cond = threading.Condition(threading.Lock())
        self._requested = 0
        self._synced = 0
        self._running = False

    def sync(self) -> None:
        with self._cond:
            self._requested += 1
            ticket = self._requested
            while self._synced < ticket:
                if not self._running:
                    break
                self._cond.wait()
            else:
                return
            self._running = True
            covers = self._requested
        ok = False
        try:
            if self.fd is not None:
                os.fsync(self.fd)
            else:
                fsync_dir(self.path)
            ok = True
        finally:
            with self._cond:
                self._running = False
                if ok:
                    self._synced = max(self._synced, covers)
                self._cond.notify_all()


_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class MessageWriter:
    """Receives one message's bytes; committed (durably queued) or aborted once.

    Lines are kept in memory; the file ``tmp/<id>.msg`` is created by
    ``commit`` (in a thread), or as soon as more than ``SPILL`` bytes are
    held, after which the lines go to the file as they come.
    """

    #: Bytes held in memory before the message goes to ``tmp/`` as it arrives.
    SPILL = 1 << 16

    def __init__(self, spool: Spool, queue_id: str):
        self.spool = spool
        self.id = queue_id
        self.path = spool.tmp / f"{queue_id}.msg"
        self._parts: list[bytes] = []
        self._held = 0
        self._fd: int | None = None
        self._env_fd: int | None = None
        #: The name in ``spare/`` of the envelope file reused for this message.
        self._env_spare: str | None = None
        self._done = False
        self._touched = False
        #: Bytes written so far (LF line ends) and lines of them.
        self.size = 0
        self._spilled_lines = 0
        #: Lines held in ``_parts`` beyond one per part (from ``write_block``).
        self._block_lines = 0

    @property
    def lines(self) -> int:
        return self._spilled_lines + len(self._parts) + self._block_lines

    def write_line(self, line: bytes) -> None:
        """Append one line (without its end) followed by LF."""
        self._parts.append(line)
        n = len(line) + 1
        self.size += n
        self._held += n
        if self._held > self.SPILL:
            self._spill()

    def write_block(self, data: bytes) -> None:
        """Append complete lines at once: ``data`` is lines each ending in LF.

        The same as ``write_line`` for each of them, for a reader that
        unstuffs and checks a whole run of DATA lines with bytes operations
        instead of one Python call per line.
        """
        if not data:
            return
        if not data.endswith(b"\n"):
            raise ValueError("write_block takes whole lines ending in LF")
        self._parts.append(data[:-1])
        self._block_lines += data.count(b"\n") - 1
        self.size += len(data)
        self._held += len(data)
        if self._held > self.SPILL:
            self._spill()

    def _spill(self) -> None:
        """Move the lines held in memory to the file (creating it)."""
        if self._fd is None:
            self._touched = True
            self._fd = self.spool.create_in_tmp(self.path.name)
        if self._parts:
            self._parts.append(b"")
            _write_all(self._fd, b"\n".join(self._parts))
            self._spilled_lines += len(self._parts) - 1 + self._block_lines
            self._parts = []
            self._block_lines = 0
        self._held = 0

    def abort(self) -> None:
        """Drop the message (also after a failed commit: removes what it left in ``tmp/``)."""
        self._parts = []
        self._done = True
        self._close()
        if self._env_spare is not None:
            self.spool.return_spare(self._env_spare)
            self._env_spare = None
        if self._touched:
            for path in (self.path, self.spool.tmp / f"{self.id}.env"):
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    def _close(self) -> None:
        for name in ("_fd", "_env_fd"):
            fd = getattr(self, name)
            if fd is not None:
                setattr(self, name, None)
                os.close(fd)

    # -- commit, in the steps ``GroupCommit`` runs for a batch -------------
    def stage(self, envelope: Envelope) -> None:
        """Write the rest of the message and its envelope into ``tmp/``.

        Page-cache writes, no fsync: fast enough for the reactor thread. The
        files stay open for the fsyncs of ``sync_fds``.
        """
        if self._done:
            raise RuntimeError(f"{self.id}: message already committed or aborted")
        self._done = True
        envelope.size = self.size
        envelope.wsize = self.size + self.lines
        self._spill()
        self._env_fd, self._env_spare = self.spool.envelope_file(self.id, envelope.to_json())

    def sync_fds(self) -> tuple[int, int]:
        """The message's and the envelope's descriptors, to fsync after ``stage``."""
        return self._fd, self._env_fd

    def publish(self) -> None:
        """Rename both files into ``queue/``: message first, the envelope
        (the commit record) last. Durable once ``queue/`` is fsync'd."""
        self._close()
        spool = self.spool
        msg, env = f"{self.id}.msg", f"{self.id}.env"
        if spool._tmp_fd is None:
            os.rename(spool.tmp / msg, spool.queue / msg)
            if self._env_spare is None:
                os.rename(spool.tmp / env, spool.queue / env)
            else:
                os.rename(spool.spare / self._env_spare, spool.queue / env)
                self._env_spare = None
            return
        os.rename(msg, msg, src_dir_fd=spool._tmp_fd, dst_dir_fd=spool._queue_fd)
        if self._env_spare is None:
            os.rename(env, env, src_dir_fd=spool._tmp_fd, dst_dir_fd=spool._queue_fd)
        else:
            os.rename(self._env_spare, env, src_dir_fd=spool._spare_fd,
                      dst_dir_fd=spool._queue_fd)
            self._env_spare = None

    def unpublish(self) -> None:
        """Take a published message back out of ``queue/`` (its directory fsync
        failed, so it is not acknowledged and must not be delivered later)."""
        for name in (f"{self.id}.env", f"{self.id}.msg"):
            try:
                os.unlink(self.spool.queue / name)
            except OSError:
                pass


class GroupCommit:
    """Commits messages to the spool in batches: SMTP's 250 waits for this.

    Every blocking call made from a pool thread hands the GIL to and from the
    reactor thread, and under load each hand-off is a pair of context
    switches: a commit made wholly in a thread (about eleven file-system
    calls) cost more CPU than receiving the message. So the reactor thread
    does the calls that only touch the page cache and the directories
    (``stage``: write the files into ``tmp/``; ``publish``: rename them into
    ``queue/``), and only the fsyncs are made elsewhere, a batch at a time: by
    the fsync process (``fsync_process``) when the server runs one, which
    costs the reactor no GIL hand-off at all, else by a pool thread job:

    1. every staged message's two files are fsync'd (one request for the batch);
    2. on the reactor, those that synced are renamed into ``queue/``;
    3. one fsync of ``queue/`` (``Spool.queue_sync``) covers them all, and
       only then does each one's Deferred fire.

    At most one job of each step runs at a time; what arrives meanwhile waits
    and goes in the next batch, so a lone message is committed at once and a
    busy server shares each fsync of ``queue/`` among many sessions. A failure
    fails only the messages it covers; each is removed from ``tmp/`` and
    ``queue/`` (``MessageWriter.abort``, ``unpublish``) before its Deferred
    fails, so nothing unacknowledged is delivered.
    """

    def __init__(self, spool: Spool, run_blocking: Callable[..., Deferred],
                 fsyncs: FsyncProcess | None = None):
        self.spool = spool
        self._run = run_blocking
        self._fsyncs = fsyncs
        self._staged: list[tuple[MessageWriter, Deferred]] = []
        self._published: list[tuple[MessageWriter, Deferred]] = []
        self._syncing_files = False
        self._syncing_queue = False

    def commit(self, writer: MessageWriter, envelope: Envelope) -> Deferred:
        """Fires (with None) once the message is durably queued; fails with
        the OSError that kept it from being, having removed what it wrote."""
        d = Deferred()
        try:
            writer.stage(envelope)
        except Exception:
            writer.abort()
            return fail()
        self._staged.append((writer, d))
        self._next_file_sync()
        return d

    def _next_file_sync(self) -> None:
        if self._syncing_files or not self._staged:
            return
        batch, self._staged = self._staged, []
        self._syncing_files = True
        fds = [fd for writer, _ in batch for fd in writer.sync_fds()]
        if self._fsyncs is not None:
            d = self._fsyncs.fsync(fds)
        else:
            d = self._run(fsync_each, fds)
        d.addCallback(_failures_of_pairs).addBoth(self._files_synced, batch)

    def _files_synced(self, errors, batch) -> None:
        self._syncing_files = False
        if isinstance(errors, Failure):
            errors = [errors] * len(batch)
        for (writer, d), error in zip(batch, errors):
            if error is None:
                try:
                    writer.publish()
                except OSError:
                    error = Failure()
                    writer.unpublish()
            if error is None:
                self._published.append((writer, d))
            else:
                writer.abort()
                d.errback(error)
        self._next_file_sync()
        self._next_queue_sync()

    def _next_queue_sync(self) -> None:
        if self._syncing_queue or not self._published:
            return
        batch, self._published = self._published, []
        self._syncing_queue = True
        fd = self.spool.queue_sync.fd
        if self._fsyncs is not None and fd is not None:
            d = self._fsyncs.fsync([fd]).addCallback(_raise_first)
        else:
            d = self._run(self.spool.queue_sync.sync)
        d.addBoth(self._queue_synced, batch)

    def _queue_synced(self, result, batch) -> None:
        self._syncing_queue = False
        for writer, d in batch:
            if isinstance(result, Failure):
                writer.unpublish()
                writer.abort()
                d.errback(result)
            else:
                d.callback(None)
        self._next_queue_sync()


def _failures_of_pairs(codes: list[int]) -> list[Failure | None]:
    """Per writer (two descriptors each, in order): the failure of its first
    descriptor that did not sync, or None."""
    return [Failure(error_of(a or b)) if a or b else None for a, b in zip(codes[::2], codes[1::2])]


def _raise_first(codes: list[int]) -> None:
    for code in codes:
        if code:
            raise error_of(code)


def _still_at(fd: int, path: Path) -> bool:
    """Whether the open file ``fd`` is still the one at ``path``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


class Spool:
    #: Envelope files kept in ``spare/`` for reuse, at most.
    SPARES = 1024

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.tmp = self.dir / "tmp"
        self.queue = self.dir / "queue"
        self.spare = self.dir / "spare"
        self._lock_fd: int | None = None
        #: ``tmp/``, ``queue/`` and ``spare/`` held open by the running instance (``open``).
        self._tmp_fd: int | None = None
        self._queue_fd: int | None = None
        self._spare_fd: int | None = None
        #: Names in ``spare/`` free for reuse. Removes run in pool threads and
        #: commits on the reactor; the set keeps a name from being listed twice
        #: (two writers on one file).
        self._spares: collections.deque[str] = collections.deque()
        self._spare_names: set[str] = set()
        self._spare_lock = threading.Lock()
        #: Group commit of ``queue/`` (renames into it are durable after ``sync()``).
        self.queue_sync = DirectorySync(self.queue)

    def ensure(self) -> None:
        """Create the directories (owner-only access), durably."""
        for d in (self.dir, self.tmp, self.queue, self.spare):
            missing = []
            p = d
            while not p.is_dir():
                missing.append(p)
                p = p.parent
            if missing:
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
                for created in reversed(missing):
                    fsync_dir(created.parent)

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
        self._tmp_fd = os.open(self.tmp, _DIR_FLAGS)
        self._queue_fd = os.open(self.queue, _DIR_FLAGS)
        self.queue_sync.fd = self._queue_fd
        self._spare_fd = os.open(self.spare, _DIR_FLAGS)
        names = os.listdir(self._spare_fd)
        with self._spare_lock:
            self._spares.extend(names)
            self._spare_names.update(names)

    def close(self) -> None:
        self.queue_sync.fd = None
        with self._spare_lock:
            self._spares.clear()
            self._spare_names.clear()
        for name in ("_tmp_fd", "_queue_fd", "_spare_fd", "_lock_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)

    def create_in_tmp(self, name: str) -> int:
        """A new file ``tmp/<name>`` (O_EXCL, owner-only), opened for writing;
        relative to the open ``tmp/`` of the running instance when there is one."""
        if self._tmp_fd is None:
            return os.open(self.tmp / name, _CREATE, 0o600)
        return os.open(name, _CREATE, 0o600, dir_fd=self._tmp_fd)

    def envelope_file(self, queue_id: str, data: bytes) -> tuple[int, str | None]:
        """A file holding ``data``, opened for writing, for the envelope of a
        new message; and its name in ``spare/`` when it is a reused one, or
        None when it is a new ``tmp/<id>.env``."""
        while True:
            with self._spare_lock:
                if not self._spares:
                    break
                name = self._spares.popleft()
                self._spare_names.discard(name)
            try:
                fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                             dir_fd=self._spare_fd)
            except OSError:
                continue  # not a file we can reuse: a new one instead
            st = os.fstat(fd)
            if st.st_nlink != 1:
                os.close(fd)  # also in a queue: never overwrite it
                continue
            try:
                _write_all(fd, data)
                if st.st_size > len(data):
                    os.ftruncate(fd, len(data))
            except OSError:
                os.close(fd)
                self.return_spare(name)
                raise
            return fd, name
        fd = self.create_in_tmp(f"{queue_id}.env")
        try:
            _write_all(fd, data)
        except OSError:
            os.close(fd)
            raise
        return fd, None

    def return_spare(self, name: str) -> None:
        """Put back a spare that ``envelope_file`` handed out and a commit did not use."""
        with self._spare_lock:
            if self._spare_fd is not None and name not in self._spare_names:
                self._spares.append(name)
                self._spare_names.add(name)

    def _recycle(self, name: str) -> bool:
        """Move ``queue/<name>`` into ``spare/`` for reuse, if there is room
        and no other link to it; False when it must be unlinked instead."""
        with self._spare_lock:
            if (self._spare_fd is None or len(self._spares) >= self.SPARES
                    or name in self._spare_names):
                return False
            spare_fd = self._spare_fd
        try:
            if os.stat(name, dir_fd=self._queue_fd, follow_symlinks=False).st_nlink != 1:
                return False
            os.rename(name, name, src_dir_fd=self._queue_fd, dst_dir_fd=spare_fd)
        except FileNotFoundError:
            return True  # already gone
        self.return_spare(name)
        return True

    def writer(self, queue_id: str) -> MessageWriter:
        return MessageWriter(self, queue_id)

    def message_path(self, queue_id: str) -> Path:
        return self.queue / f"{queue_id}.msg"

    def load(self, queue_id: str) -> Envelope:
        """The envelope of a queued message; FileNotFoundError once it is gone
        (also when the file was recycled for another message as it was read)."""
        path = self.queue / f"{queue_id}.env"
        with open(path, "rb") as f:
            try:
                envelope = Envelope.from_json(f.read())
            except (ValueError, TypeError, KeyError):
                if _still_at(f.fileno(), path):
                    raise
                envelope = None  # rewritten for another message as we read it
        if envelope is None or envelope.id != queue_id:
            raise FileNotFoundError(f"{queue_id}: removed from the queue")
        return envelope

    def update(self, envelope: Envelope) -> None:
        """Durably replace the envelope (recipient states changed)."""
        replace_synced(self.queue / f"{envelope.id}.env", envelope.to_json(),
                       tmp=self.tmp / f"{envelope.id}.env")

    def remove(self, queue_id: str, recycle: bool = True) -> None:
        """Drop a finished message: envelope first, so a crash leaves only an
        orphan. The envelope file goes to ``spare/`` when ``recycle`` allows."""
        queue_fd = self._queue_fd
        for suffix in (".env", ".msg"):
            if suffix == ".env" and recycle and self._recycle(f"{queue_id}.env"):
                continue
            try:
                if queue_fd is None:
                    os.unlink(self.queue / f"{queue_id}{suffix}")
                else:
                    os.unlink(f"{queue_id}{suffix}", dir_fd=queue_fd)
            except FileNotFoundError:
                pass

    def take(self, other: Spool, queue_id: str) -> Envelope:
        """Move one committed message from ``other`` (an SMTP worker's spool)
        into this one and return its envelope. The worker that owned ``other``
        has handed the message over or is dead, so nothing else moves it.

        Links first, the envelope last (the commit record here), fsyncs this
        ``queue/``, and only then unlinks the originals: a crash at any point
        leaves the message in at least one spool. In the narrow window after
        the fsync and before the unlinks are durable it may be in both, and is
        then delivered from both: local delivery is idempotent (Maildir names
        come from the queue id), a remote one may repeat. Never lost.
        """
        try:
            os.link(other.queue / f"{queue_id}.msg", self.queue / f"{queue_id}.msg")
        except FileExistsError:
            pass  # taken before, and the unlinks were lost in a crash
        try:
            os.link(other.queue / f"{queue_id}.env", self.queue / f"{queue_id}.env")
        except FileExistsError:
            pass
        self.queue_sync.sync()
        envelope = self.load(queue_id)
        other.remove(queue_id, recycle=False)  # the envelope's inode is ours now
        fsync_dir(other.queue)
        return envelope

    def take_all(self, other: Spool) -> list[Envelope]:
        """Every committed message of ``other`` moved here (``take``); what
        ``other`` never acknowledged is removed, as ``recover`` would."""
        other.ensure()
        envelopes = [self.take(other, queue_id) for queue_id in other.queued_ids()]
        other.recover()
        return envelopes

    def recover(self) -> list[Envelope]:
        """Envelopes of queued messages; removes what was never acknowledged.

        An envelope that cannot be read, or names another message, is moved
        with its message into ``corrupt/`` (and logged) rather than stopping
        the start-up: one bad file must not keep every other message from
        being delivered.
        """
        for entry in os.listdir(self.tmp):
            os.unlink(self.tmp / entry)
        names = os.listdir(self.queue)
        envelopes = []
        for name in sorted(names):
            stem, _, suffix = name.rpartition(".")
            if suffix == "msg" and f"{stem}.env" not in names:
                os.unlink(self.queue / name)
            elif suffix == "env":
                try:
                    envelopes.append(self.load(stem))
                except (ValueError, TypeError, KeyError, FileNotFoundError) as e:
                    self._quarantine(stem, e)  # FileNotFoundError: another message's id
        return envelopes

    def _quarantine(self, queue_id: str, error: Exception) -> None:
        corrupt = self.dir / "corrupt"
        corrupt.mkdir(mode=0o700, exist_ok=True)
        for suffix in (".msg", ".env"):
            try:
                os.rename(self.queue / f"{queue_id}{suffix}", corrupt / f"{queue_id}{suffix}")
            except FileNotFoundError:
                pass
        log.error("{id}: unreadable envelope ({err}); moved to {dir}", id=queue_id,
                  err=error, dir=str(corrupt))

    def queued_ids(self) -> list[str]:
        return sorted(n[:-4] for n in os.listdir(self.queue) if n.endswith(".env"))
