"""Crash safety (DESIGN invariants 1 and 2): ``kill -9`` loses nothing acknowledged.

The daemon runs as a real ``twistd mailstack`` process. Several smtplib
clients (threads) stream messages, each with a unique token in its
Message-ID, Subject and last line; the daemon is killed with SIGKILL while
they send, restarted on the same instance directory, and then every Maildir
file is checked:

* every message that got a 250 is delivered exactly once (its token in
  exactly one file of ``new/`` and ``cur/``);
* nothing was delivered that was neither acknowledged nor in flight when
  the daemon died;
* no file is partial: its size is its ``S=`` and it ends with the whole body.

The replay tests drive the spool recovery and local delivery in-process on
hand-made crash states, deterministically.
"""

from __future__ import annotations

import collections
import errno
import os
import random
import re
import signal
import smtplib
import threading
import time
from pathlib import Path

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from mailstack.queue import spool as spool_module
from mailstack.queue.local import LocalDelivery
from mailstack.queue.spool import (DirectorySync, Envelope, GroupCommit, MessageWriter, Recipient,
                                   Spool)
from mailstack.store.maildir import MailRoot, delivery_base
from tests.support.instance import DaemonProcess, Instance

USERS = ("demo@example.test", "alice@example.test", "bob@example.test")
SENDER = "crash@remote.example"
_NAME = re.compile(r"^(?P<base>[^,:]+),S=(?P<size>\d+),W=(?P<wsize>\d+)(?::2,[A-Za-z]*)?$")
_TOKEN = re.compile(rb"^Message-ID: <(?P<token>[^@>]+)@crash\.test>$", re.MULTILINE)


def make_message(token: str, rcpt: str, lines: int = 20) -> bytes:
    """A message whose token is in the Message-ID, the Subject and the last line."""
    head = (f"From: <{SENDER}>\r\nTo: <{rcpt}>\r\nSubject: crash {token}\r\n"
            f"Message-ID: <{token}@crash.test>\r\n\r\n")
    body = "".join(f"{token} line {n:03d} {'x' * 60}\r\n" for n in range(lines))
    # A leading dot (stuffed by smtplib, unstuffed by the server) on the way.
    return (head + body + ".dot line\r\n" + f"end {token}\r\n").encode()


class Ledger:
    """What the clients know: tokens acknowledged (250) and tokens in flight."""

    def __init__(self):
        self.acked: set[str] = set()
        self.inflight: set[str] = set()
        self._lock = threading.Lock()

    def sending(self, token: str) -> None:
        with self._lock:
            self.inflight.add(token)

    def ack(self, token: str) -> None:
        with self._lock:
            self.inflight.discard(token)
            self.acked.add(token)

    def count(self) -> int:
        with self._lock:
            return len(self.acked)


class Sender(threading.Thread):
    """One smtplib client sending messages until told to stop or the server dies.

    Messages are sent several per connection (MAIL after MAIL) and the
    connection is reopened after every ``per_connection`` messages.
    """

    def __init__(self, port: int, prefix: str, ledger: Ledger, stop: threading.Event,
                 limit: int | None = None, per_connection: int = 5, users=USERS):
        super().__init__(daemon=True)
        self.port = port
        self.prefix = prefix
        self.ledger = ledger
        self.stop_event = stop
        self.limit = limit
        self.per_connection = per_connection
        self.users = users
        self.sent = 0
        self.errors: list[str] = []

    def run(self) -> None:
        n = 0
        while not self.stop_event.is_set() and (self.limit is None or n < self.limit):
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as client:
                    for _ in range(self.per_connection):
                        if self.stop_event.is_set() or (self.limit is not None and n >= self.limit):
                            break
                        token = f"{self.prefix}-{n}"
                        rcpt = self.users[n % len(self.users)]
                        n += 1
                        self.ledger.sending(token)
                        client.sendmail(SENDER, [rcpt], make_message(token, rcpt))
                        self.ledger.ack(token)
                        self.sent += 1
            except (OSError, smtplib.SMTPException) as e:
                if self.stop_event.is_set() or self.limit is None:
                    return  # the daemon was killed under us: expected
                self.errors.append(f"{type(e).__name__}: {e}")
                return


def maildir_files(mail_root: Path) -> list[Path]:
    """Every message file in new/ and cur/ of every INBOX under ``mail_root``."""
    files = []
    for sub in ("new", "cur"):
        files.extend(p for p in mail_root.glob(f"*/*/Maildir/{sub}/*") if p.is_file())
    return files


def check_maildirs(test: unittest.TestCase, mail_root: Path, acked: set[str],
                   inflight: set[str], copies: int = 1) -> collections.Counter:
    """The invariant checks; returns how often each token was delivered.

    ``copies``: recipients of each message (Maildirs a token must be in).
    """
    delivered: collections.Counter = collections.Counter()
    mailboxes: collections.Counter = collections.Counter()
    bases = collections.Counter()
    for path in maildir_files(mail_root):
        m = _NAME.match(path.name)
        test.assertIsNotNone(m, f"not a Maildir name with S= and W=: {path.name}")
        bases[m["base"]] += 1
        data = path.read_bytes()
        test.assertEqual(len(data), int(m["size"]), f"{path}: size is not its S=")
        test.assertEqual(len(data) + data.count(b"\n"), int(m["wsize"]),
                         f"{path}: CRLF size is not its W=")
        found = _TOKEN.search(data)
        test.assertIsNotNone(found, f"{path}: no token header")
        token = found["token"].decode()
        test.assertTrue(data.endswith(b".dot line\nend " + found["token"] + b"\n"),
                        f"{path}: partial or damaged body")
        test.assertTrue(data.startswith(f"Return-Path: <{SENDER}>\n".encode()))
        delivered[token] += 1
        mailboxes[(path.parent.parent, token)] += 1
    duplicates = {t: n for t, n in mailboxes.items() if n > 1}
    test.assertEqual(duplicates, {}, "delivered more than once into one Maildir")
    test.assertEqual({t: n for t, n in delivered.items() if n != copies}, {},
                     f"not delivered to exactly {copies} Maildir(s)")
    test.assertEqual({b: n for b, n in bases.items() if n > 1}, {}, "Maildir base names reused")
    lost = acked - set(delivered)
    test.assertEqual(lost, set(), f"{len(lost)} acknowledged message(s) lost")
    unexpected = set(delivered) - acked - inflight
    test.assertEqual(unexpected, set(), "delivered although never acknowledged nor in flight")
    return delivered


def spool_empty(spool_dir: Path) -> bool:
    queue = spool_dir / "queue"
    return queue.is_dir() and not any(n.endswith(".env") for n in os.listdir(queue))


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class KillTests(unittest.TestCase):
    """``kill -9`` of a real daemon mid-stream, at several points."""

    # Whole-class budget: a few seconds per kill cycle on a 2-core machine.
    timeout = 120

    def setUp(self):
        self.daemon = DaemonProcess(Path(self.mktemp()).absolute(), users=USERS, tls=False)
        self.addCleanup(self.daemon.kill)
        self.spool_dir = self.daemon.config.server.spool_dir
        self.mail_root = self.daemon.config.server.mail_root
        self.ledger = Ledger()

    def stream_and_kill(self, prefix: str, kill_after_acks: int | None = None,
                        kill_after_seconds: float | None = None, senders: int = 4) -> None:
        """Start the daemon, stream from ``senders`` clients, SIGKILL it at the trigger."""
        self.daemon.start()
        stop = threading.Event()
        threads = [Sender(self.daemon.port, f"{prefix}.{i}", self.ledger, stop)
                   for i in range(senders)]
        self.addCleanup(stop.set)
        base = self.ledger.count()
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        if kill_after_acks is not None:
            while self.ledger.count() - base < kill_after_acks:
                self.assertLess(time.monotonic(), deadline, "clients made no progress")
                self.assertTrue(any(t.is_alive() for t in threads), "all clients died")
                time.sleep(0.001)
        else:
            time.sleep(kill_after_seconds)
        os.kill(self.daemon.proc.pid, signal.SIGKILL)
        self.daemon.proc.wait(10)
        stop.set()
        for t in threads:
            t.join(15)
            self.assertFalse(t.is_alive(), "a client thread hangs after the kill")

    def restart_and_settle(self) -> None:
        """Restart on the same instance; wait until the spool is drained."""
        self.daemon.start()
        wait_until(lambda: spool_empty(self.spool_dir), 20, "the spool to drain")

    def test_kill_at_several_points(self):
        """Kill after 5, 50 and 150 acknowledged messages, each restart
        resuming the last crash while new mail streams in."""
        for n, point in enumerate((5, 50, 150)):
            self.stream_and_kill(f"k{n}", kill_after_acks=point)
        self.restart_and_settle()
        delivered = check_maildirs(self, self.mail_root, self.ledger.acked, self.ledger.inflight)
        self.assertGreaterEqual(len(self.ledger.acked), 5 + 50 + 150)
        self.assertGreaterEqual(len(delivered), len(self.ledger.acked))
        self.daemon.stop()
        self.assertFalse(os.listdir(self.spool_dir / "tmp"), "spool tmp/ not cleaned")

    def test_kill_during_replay_of_a_backlog(self):
        """A backlog builds up while a Maildir is unusable; the daemon is killed
        while replaying it (deliveries made, spool entries not yet removed),
        and the next start must not deliver any of them twice."""
        blocked = self.mail_root / "example.test" / "demo"
        blocked.parent.mkdir(parents=True, exist_ok=True)
        blocked.write_bytes(b"")  # not a directory: delivery to demo fails
        self.daemon.start()
        stop = threading.Event()
        self.addCleanup(stop.set)
        threads = [Sender(self.daemon.port, f"b{i}", self.ledger, stop, limit=60,
                          per_connection=20, users=("demo@example.test",)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
            self.assertEqual(t.errors, [])
        self.assertEqual(len(self.ledger.acked), 240)
        self.daemon.kill()
        blocked.unlink()
        new = blocked / "Maildir" / "new"
        for attempt in range(3):
            self.daemon.start()
            # Kill as soon as the replay has placed something in new/.
            deadline = time.monotonic() + 10
            while not (new.is_dir() and os.listdir(new)) and not spool_empty(self.spool_dir):
                self.assertLess(time.monotonic(), deadline, "the replay delivered nothing")
                time.sleep(0.0005)
            self.daemon.kill()
            # A mail client (through another process on the same mail root)
            # reads what arrived: the files move to cur/ with a flag, so a
            # replay that delivered again would make a second file.
            for path in list(new.iterdir()):
                os.rename(path, new.parent / "cur" / (path.name + ":2,S"))
            tokens = collections.Counter(
                _TOKEN.search(p.read_bytes())["token"] for p in maildir_files(self.mail_root))
            self.assertEqual([t for t, n in tokens.items() if n > 1], [])
            if spool_empty(self.spool_dir):
                break
        self.restart_and_settle()
        check_maildirs(self, self.mail_root, self.ledger.acked, self.ledger.inflight)

    def test_kill_at_random_short_delays(self):
        """Kill at random instants, some of them during start-up and replay."""
        rng = random.Random(os.environ.get("CRASH_SEED", "mailstack"))
        for n in range(3):
            self.stream_and_kill(f"r{n}", kill_after_seconds=rng.uniform(0.05, 0.6))
            # Check midway: a replay interrupted by the next kill must still
            # end exactly once.
            if n == 1:
                self.restart_and_settle()
                self.daemon.kill()
                check_maildirs(self, self.mail_root, self.ledger.acked, self.ledger.inflight)
        self.restart_and_settle()
        check_maildirs(self, self.mail_root, self.ledger.acked, self.ledger.inflight)
        self.assertTrue(self.ledger.acked, "no message was acknowledged at all")


# -- deterministic replay, in-process -----------------------------------------

HOST = "mail.example.test"


def run_now(f, *args, **kwargs) -> defer.Deferred:
    """``run_blocking`` that runs the work at once in this thread."""
    return defer.maybeDeferred(f, *args, **kwargs)


class ReplayTests(unittest.TestCase):
    def setUp(self):
        root = Path(self.mktemp())
        self.spool = Spool(root / "spool")
        self.spool.open()
        self.addCleanup(self.spool.close)
        self.mail_root = MailRoot(root / "maildirs")
        self.mail_root.ensure()
        self.clock = task.Clock()
        self.local = LocalDelivery(self.spool, self.mail_root, HOST, run_now, self.clock)
        self.addCleanup(self.local.stop)

    def commit(self, token: str, rcpts=("demo@example.test",)) -> Envelope:
        queue_id = spool_module.new_queue_id()
        writer = self.spool.writer(queue_id)
        writer.write_line(f"Return-Path: <{SENDER}>".encode())
        offset = writer.size
        for line in make_message(token, rcpts[0]).decode().split("\r\n")[:-1]:
            writer.write_line(line.encode())
        envelope = Envelope(id=queue_id, sender=SENDER, arrival=time.time(), body_offset=offset,
                            recipients=[Recipient(r, r, True) for r in rcpts])
        self.successResultOf(GroupCommit(self.spool, run_now).commit(writer, envelope))
        return envelope

    def place(self, envelope: Envelope, index: int, sub: str = "new", suffix: str = "") -> Path:
        """A delivery made before the crash, as local delivery would have made it."""
        rcpt = envelope.recipients[index].address
        maildir = self.mail_root.maildir(rcpt)
        base = delivery_base(envelope.arrival, envelope.id, index, HOST)
        name = maildir.deliver(self.spool.message_path(envelope.id), base, envelope.size,
                               envelope.wsize)
        path = maildir.path / "new" / name
        if sub != "new" or suffix:
            target = maildir.path / sub / (name + suffix)
            os.rename(path, target)
            path = target
        return path

    def files(self, address: str) -> list[Path]:
        maildir = self.mail_root.maildir(address).path
        return sorted(p for sub in ("new", "cur") for p in (maildir / sub).glob("*"))

    @defer.inlineCallbacks
    def recover(self):
        results = yield defer.gatherResults(self.local.recover())
        return results

    @defer.inlineCallbacks
    def test_replay_skips_recipient_delivered_before_the_crash(self):
        env = self.commit("replay1", rcpts=("demo@example.test", "alice@example.test"))
        self.place(env, 0)  # demo got it; the envelope still says queued
        self.assertEqual([r.status for r in self.spool.load(env.id).recipients],
                         ["queued", "queued"])
        results = yield self.recover()
        self.assertEqual(results, [False])
        self.assertEqual(len(self.files("demo@example.test")), 1)
        self.assertEqual(len(self.files("alice@example.test")), 1)
        self.assertEqual(self.spool.queued_ids(), [])
        self.assertFalse((self.spool.queue / f"{env.id}.msg").exists())
        check_maildirs(self, self.mail_root.root, {"replay1"}, set(), copies=2)

    @defer.inlineCallbacks
    def test_replay_skips_delivery_already_read_into_cur(self):
        env = self.commit("replay2")
        self.place(env, 0, sub="cur", suffix=":2,S")
        yield self.recover()
        files = self.files("demo@example.test")
        self.assertEqual([p.parent.name for p in files], ["cur"])
        self.assertEqual(self.spool.queued_ids(), [])

    @defer.inlineCallbacks
    def test_replay_after_crash_between_link_and_rename(self):
        """A link left in the Maildir's tmp/ is not a delivery: it is made once."""
        env = self.commit("replay3")
        maildir = self.mail_root.maildir("demo@example.test")
        with maildir.open_delivery():
            pass  # creates the Maildir
        name = (f"{delivery_base(env.arrival, env.id, 0, HOST)},"
                f"S={env.size},W={env.wsize}")
        os.link(self.spool.message_path(env.id), maildir.path / "tmp" / name)
        yield self.recover()
        self.assertEqual([p.name for p in self.files("demo@example.test")], [name])
        self.assertEqual(os.listdir(maildir.path / "tmp"), [])
        check_maildirs(self, self.mail_root.root, {"replay3"}, set())

    @defer.inlineCallbacks
    def test_replay_of_a_message_not_yet_delivered(self):
        env = self.commit("replay4", rcpts=("demo@example.test", "alice@example.test"))
        yield self.recover()
        self.assertEqual(len(self.files("demo@example.test")), 1)
        self.assertEqual(len(self.files("alice@example.test")), 1)
        # Both Maildir files are links of the one spool file: one inode.
        a, = self.files("demo@example.test")
        b, = self.files("alice@example.test")
        self.assertEqual(a.stat().st_ino, b.stat().st_ino)
        self.assertEqual(self.spool.queued_ids(), [])
        check_maildirs(self, self.mail_root.root, {"replay4"}, set(), copies=2)
        self.assertFalse((self.spool.queue / f"{env.id}.env").exists())

    @defer.inlineCallbacks
    def test_orphan_message_without_envelope_is_removed_not_delivered(self):
        env = self.commit("kept")
        orphan = self.spool.queue / "0000000000000000000000ORPHAN.msg"
        orphan.write_bytes(f"Return-Path: <{SENDER}>\nSubject: orphan\n\nnever acknowledged\n"
                           .encode())
        (self.spool.tmp / "ABCDEF.msg").write_bytes(b"half a message")
        (self.spool.tmp / "ABCDEF.env").write_bytes(b"{")
        results = yield self.recover()
        self.assertEqual(results, [False])
        self.assertFalse(orphan.exists())
        self.assertEqual(os.listdir(self.spool.tmp), [])
        self.assertEqual(os.listdir(self.spool.queue), [])
        check_maildirs(self, self.mail_root.root, {"kept"}, set())
        self.assertEqual(self.spool.queued_ids(), [])
        self.assertEqual(env.recipients[0].status, "queued")  # recovery read its own copy

    @defer.inlineCallbacks
    def test_failed_maildir_is_retried_and_delivered_once(self):
        env = self.commit("retry", rcpts=("demo@example.test", "alice@example.test"))
        # alice's Maildir path is blocked by a file: delivery to her fails.
        blocker = self.mail_root.root / "example.test" / "alice"
        blocker.parent.mkdir(parents=True, exist_ok=True)
        blocker.write_bytes(b"")
        results = yield self.recover()
        self.assertEqual(results, [True])
        self.assertEqual(len(self.files("demo@example.test")), 1)
        on_disk = self.spool.load(env.id)
        self.assertEqual([r.status for r in on_disk.recipients], ["sent", "queued"])
        blocker.unlink()
        self.clock.advance(self.local.retry_delay)
        self.assertEqual(len(self.files("demo@example.test")), 1)
        self.assertEqual(len(self.files("alice@example.test")), 1)
        self.assertEqual(self.spool.queued_ids(), [])
        check_maildirs(self, self.mail_root.root, {"retry"}, set(), copies=2)

    def test_batch_delivers_many_messages_with_one_fsync_per_maildir(self):
        envelopes = [self.commit(f"batch{i}", rcpts=(USERS[i % 2],)) for i in range(10)]
        for address in USERS[:2]:
            with self.mail_root.maildir(address).open_delivery():
                pass  # created beforehand: creating directories fsyncs too
        synced = []
        real_fsync = os.fsync

        def counting_fsync(fd):
            synced.append(fd)
            return real_fsync(fd)

        self.patch(os, "fsync", counting_fsync)
        results = self.local._deliver_batch([(env, False) for env in envelopes])
        self.assertEqual(results[0], set())
        self.assertEqual(len(synced), 2)  # one new/ per Maildir, not one per message
        self.assertEqual(self.spool.queued_ids(), [])
        check_maildirs(self, self.mail_root.root, {f"batch{i}" for i in range(10)}, set())


class StartupTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_orphan_removed_at_service_start_and_never_delivered(self):
        instance = Instance(Path(self.mktemp()), tls=False)
        spool = instance.service.spool
        orphan = spool.queue / "0000000000000000000000ORPHAN.msg"
        orphan.write_bytes(b"Return-Path: <x@remote.example>\nMessage-ID: <orphan@crash.test>\n"
                           b"\nnot acknowledged\n")
        instance.start()
        self.addCleanup(instance.stop)
        self.assertFalse(orphan.exists())
        self.assertEqual(os.listdir(spool.queue), [])
        # Give local delivery a moment: the orphan must never appear.
        yield task.deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(maildir_files(instance.config.server.mail_root), [])


class SpoolDurabilityTests(unittest.TestCase):
    def setUp(self):
        self.spool = Spool(Path(self.mktemp()))
        self.spool.ensure()

    def test_large_message_goes_to_disk_as_it_arrives(self):
        writer = MessageWriter(self.spool, "BIG")
        line = b"y" * 998
        lines = (3 * MessageWriter.SPILL) // len(line)
        for _ in range(lines):
            writer.write_line(line)
        self.assertTrue(writer.path.exists(), "a large message is not held in memory")
        self.assertLessEqual(writer._held, MessageWriter.SPILL)
        env = Envelope(id="BIG", sender="", recipients=[], arrival=time.time())
        self.successResultOf(GroupCommit(self.spool, run_now).commit(writer, env))
        data = self.spool.message_path("BIG").read_bytes()
        self.assertEqual(data, (line + b"\n") * lines)
        self.assertEqual(env.size, len(data))
        self.assertEqual(env.wsize, len(data) + lines)
        self.assertEqual(self.spool.load("BIG").size, len(data))

    def test_block_writes_equal_line_writes(self):
        """write_block (whole runs of lines) stores what write_line would,
        with the same S= and W= sizes, in memory and after a spill."""
        lines = [b"Return-Path: <a@b.example>", b"Subject: blocks", b""]
        lines += [b"%05d " % n + b"q" * (n % 300) for n in range(900)]
        by_line = MessageWriter(self.spool, "LINES")
        for line in lines:
            by_line.write_line(line)
        by_block = MessageWriter(self.spool, "BLOCKS")
        by_block.write_line(lines[0])
        rest = lines[1:]
        for start in range(0, len(rest), 37):
            by_block.write_block(b"".join(line + b"\n" for line in rest[start:start + 37]))
        envs = [Envelope(id=w.id, sender="", recipients=[], arrival=time.time())
                for w in (by_line, by_block)]
        commits = GroupCommit(self.spool, run_now)
        self.successResultOf(commits.commit(by_line, envs[0]))
        self.successResultOf(commits.commit(by_block, envs[1]))
        self.assertEqual(self.spool.message_path("BLOCKS").read_bytes(),
                         self.spool.message_path("LINES").read_bytes())
        self.assertEqual((envs[1].size, envs[1].wsize), (envs[0].size, envs[0].wsize))
        self.assertEqual(envs[0].wsize, envs[0].size + len(lines))
        with self.assertRaises(ValueError):
            MessageWriter(self.spool, "BAD").write_block(b"no line end")

    def test_small_message_touches_no_file_until_commit(self):
        writer = MessageWriter(self.spool, "SMALL")
        writer.write_line(b"Subject: x")
        self.assertFalse(writer.path.exists())
        writer.abort()
        self.assertEqual(os.listdir(self.spool.tmp), [])

    def test_abort_after_spill_removes_the_file(self):
        writer = MessageWriter(self.spool, "GONE")
        for _ in range(200):
            writer.write_line(b"z" * 900)
        self.assertTrue(writer.path.exists())
        writer.abort()
        self.assertEqual(os.listdir(self.spool.tmp), [])

    def test_failed_directory_fsync_takes_the_message_back(self):
        writer = MessageWriter(self.spool, "FAIL")
        writer.write_line(b"Subject: x")

        def broken():
            raise OSError(5, "Input/output error")

        self.patch(self.spool.queue_sync, "sync", broken)
        env = Envelope(id="FAIL", sender="", recipients=[], arrival=time.time())
        self.failureResultOf(GroupCommit(self.spool, run_now).commit(writer, env), OSError)
        self.assertEqual(os.listdir(self.spool.queue), [])
        self.assertEqual(os.listdir(self.spool.tmp), [])

    def test_group_commit_covers_concurrent_callers(self):
        """Every caller returns only after an fsync that started after it called;
        concurrent callers share fsyncs."""
        sync = DirectorySync(self.spool.queue)
        log: list[tuple[str, int, float]] = []
        lock = threading.Lock()
        real = spool_module.fsync_dir

        def slow_fsync(path):
            with lock:
                log.append(("start", 0, time.monotonic()))
            time.sleep(0.005)
            real(path)
            with lock:
                log.append(("end", 0, time.monotonic()))

        self.patch(spool_module, "fsync_dir", slow_fsync)
        calls: list[tuple[float, float]] = []

        def caller():
            for _ in range(10):
                t0 = time.monotonic()
                sync.sync()
                calls.append((t0, time.monotonic()))

        threads = [threading.Thread(target=caller) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        self.assertEqual(len(calls), 80)
        starts = [t for kind, _, t in log if kind == "start"]
        ends = [t for kind, _, t in log if kind == "end"]
        self.assertLess(len(starts), 80, "no fsync was shared")
        for t0, t1 in calls:
            self.assertTrue(any(t0 <= s and e <= t1 for s, e in zip(starts, ends)),
                            "a caller returned without an fsync started after its call")


class GroupCommitTests(unittest.TestCase):
    """Batched commits: the fsyncs in thread jobs, one job per batch, and a
    Deferred that fires only after the fsync of ``queue/`` covering it."""

    def setUp(self):
        self.spool = Spool(Path(self.mktemp()))
        self.spool.open()
        self.addCleanup(self.spool.close)
        #: The blocking jobs handed to the pool, run when the test says.
        self.jobs: list[tuple[defer.Deferred, object, tuple]] = []
        self.commits = GroupCommit(self.spool, self.run_later)

    def run_later(self, f, *args):
        d = defer.Deferred()
        self.jobs.append((d, f, args))
        return d

    def kind(self, job) -> str:
        return "queue" if job[1] == self.spool.queue_sync.sync else "files"

    def run_job(self, kind: str) -> int:
        """Run the oldest job of this kind (files or queue); returns how many
        messages a files job covered."""
        [job] = [j for j in self.jobs if self.kind(j) == kind][:1]
        self.jobs.remove(job)
        d, f, args = job
        try:
            result = f(*args)
        except OSError:
            d.errback()
        else:
            d.callback(result)
        return len(args[0]) // 2 if args else 0  # two descriptors per message

    def start(self, queue_id: str) -> defer.Deferred:
        writer = self.spool.writer(queue_id)
        writer.write_line(b"Subject: " + queue_id.encode())
        envelope = Envelope(id=queue_id, sender="", recipients=[], arrival=time.time())
        return self.commits.commit(writer, envelope)

    def test_one_job_per_batch_and_no_ack_before_the_queue_fsync(self):
        first = self.start("A")
        # Written at once, on this thread; nothing in queue/ before the fsyncs.
        self.assertEqual(sorted(os.listdir(self.spool.tmp)), ["A.env", "A.msg"])
        rest = [self.start(q) for q in ("B", "C", "D")]
        self.assertEqual(len(self.jobs), 1, "commits arriving during a file fsync must wait")
        self.assertEqual(os.listdir(self.spool.queue), [])
        self.assertEqual(self.run_job("files"), 1)
        self.assertEqual(sorted(os.listdir(self.spool.queue)), ["A.env", "A.msg"])
        self.assertNoResult(first)
        # Now the queue fsync for A and one file job for B, C and D.
        self.assertEqual(sorted(map(self.kind, self.jobs)), ["files", "queue"])
        self.run_job("queue")
        self.assertIsNone(self.successResultOf(first))
        for d in rest:
            self.assertNoResult(d)
        self.assertEqual(self.run_job("files"), 3)
        self.run_job("queue")
        self.assertEqual(self.jobs, [])
        for d in rest:
            self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.spool.queued_ids(), ["A", "B", "C", "D"])
        self.assertEqual(os.listdir(self.spool.tmp), [])
        self.assertEqual(self.spool.message_path("C").read_bytes(), b"Subject: C\n")

    def test_a_failed_fsync_fails_only_the_messages_it_covers(self):
        a, b = self.start("A"), self.start("B")
        c = self.start("C")
        real = spool_module.fsync_each

        def fsync_each(fds):
            codes = real(fds)
            return [errno.EIO if os.readlink(f"/proc/self/fd/{fd}").endswith("/B.msg") else code
                    for fd, code in zip(fds, codes)]

        self.patch(spool_module, "fsync_each", fsync_each)
        self.run_job("files")  # A's
        self.run_job("queue")
        self.run_job("files")  # B's and C's: B fails
        self.failureResultOf(b, OSError)
        self.assertNotIn("B.msg", os.listdir(self.spool.tmp))
        self.run_job("queue")  # C's
        self.successResultOf(a)
        self.successResultOf(c)
        self.assertEqual(self.spool.queued_ids(), ["A", "C"])
        self.assertEqual(os.listdir(self.spool.tmp), [])

    def test_a_failed_queue_fsync_takes_the_whole_batch_back(self):
        first = self.start("A")
        batch = [self.start("B"), self.start("C")]
        self.run_job("files")  # A's
        self.run_job("queue")
        self.successResultOf(first)
        self.run_job("files")  # B's and C's
        [(d, _, _)] = self.jobs
        self.jobs.clear()
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            d.errback()
        for d in batch:
            self.failureResultOf(d, OSError)
        self.assertEqual(self.spool.queued_ids(), ["A"])
        self.assertEqual(sorted(os.listdir(self.spool.queue)), ["A.env", "A.msg"])
        self.assertEqual(os.listdir(self.spool.tmp), [])
