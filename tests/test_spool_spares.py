"""Envelope files are reused: a removed message's envelope file in ``spare/``
becomes the next message's, rewritten in place, and never one that another
spool's queue still links to."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

from twisted.trial import unittest

from mailstack.queue import spool as spool_module
from mailstack.queue.spool import Envelope, GroupCommit, Recipient, Spool
from tests.test_crash import run_now


class SpareEnvelopeTests(unittest.TestCase):
    def setUp(self):
        self.spool = self.open(Path(self.mktemp()))

    def open(self, path: Path) -> Spool:
        spool = Spool(path)
        spool.open()
        self.addCleanup(spool.close)
        return spool

    def commit(self, queue_id: str, recipients: int = 1, spool: Spool | None = None):
        spool = spool or self.spool
        writer = spool.writer(queue_id)
        writer.write_line(b"Subject: " + queue_id.encode())
        envelope = Envelope(id=queue_id, sender="s@remote.example", arrival=time.time(),
                            recipients=[Recipient(f"user{n}@example.test", f"user{n}@example.test",
                                                  True) for n in range(recipients)])
        return GroupCommit(spool, run_now).commit(writer, envelope)

    def inode(self, path: Path) -> int:
        return os.stat(path).st_ino

    def test_removed_envelope_file_is_rewritten_for_the_next_message(self):
        self.successResultOf(self.commit("LONG", recipients=40))
        old = self.spool.queue / "LONG.env"
        ino, long_size = self.inode(old), old.stat().st_size
        self.spool.remove("LONG")
        self.assertEqual(os.listdir(self.spool.queue), [])
        self.assertEqual(os.listdir(self.spool.spare), ["LONG.env"])
        self.successResultOf(self.commit("SHORT"))
        env = self.spool.queue / "SHORT.env"
        self.assertEqual(self.inode(env), ino, "the spare file was not reused")
        # No bytes left over from the longer envelope it held before.
        self.assertLess(env.stat().st_size, long_size)
        self.assertEqual(json.loads(env.read_bytes())["id"], "SHORT")
        self.assertEqual([r.address for r in self.spool.load("SHORT").recipients],
                         ["user0@example.test"])
        self.assertEqual(os.listdir(self.spool.spare), [])
        self.assertEqual(os.listdir(self.spool.tmp), [])
        self.assertEqual(sorted(os.listdir(self.spool.queue)), ["SHORT.env", "SHORT.msg"])

    def test_spares_are_found_again_after_a_restart(self):
        self.successResultOf(self.commit("A"))
        ino = self.inode(self.spool.queue / "A.env")
        self.spool.remove("A")
        self.spool.close()
        again = self.open(self.spool.dir)
        self.assertEqual(os.listdir(again.spare), ["A.env"])
        self.successResultOf(self.commit("B", spool=again))
        self.assertEqual(os.listdir(again.spare), [])
        self.assertEqual(self.inode(again.queue / "B.env"), ino)
        self.assertEqual(again.load("B").id, "B")

    def test_a_commit_published_after_the_spool_closed_keeps_its_reused_envelope(self):
        """A batch whose fsyncs answer while the server stops is published by
        path (the spool's directories are closed): from spare/ when its
        envelope file is a reused one."""
        self.successResultOf(self.commit("A"))
        self.spool.remove("A")
        writer = self.spool.writer("LATE")
        writer.write_line(b"Subject: LATE")
        writer.stage(Envelope(id="LATE", sender="s@remote.example", arrival=time.time(),
                              recipients=[Recipient("u@example.test", "u@example.test", True)]))
        self.spool.close()
        writer.publish()
        self.assertEqual(sorted(os.listdir(self.spool.queue)), ["LATE.env", "LATE.msg"])
        self.assertEqual(os.listdir(self.spool.spare), [])
        self.assertEqual(self.spool.load("LATE").id, "LATE")

    def test_a_failed_commit_gives_the_spare_back(self):
        self.successResultOf(self.commit("A"))
        self.spool.remove("A")

        def broken(fds):
            return [errno.EIO] * len(fds)

        self.patch(spool_module, "fsync_each", broken)
        self.failureResultOf(self.commit("FAIL"), OSError)
        self.assertEqual(os.listdir(self.spool.queue), [])
        self.assertEqual(os.listdir(self.spool.tmp), [])
        self.assertEqual(os.listdir(self.spool.spare), ["A.env"])
        self.assertEqual(len(self.spool._spares), 1)

    def test_an_envelope_linked_from_another_spool_is_never_reused(self):
        """``take`` hard-links a worker spool's envelope into the main spool:
        the worker must not recycle it, nor the main spool while the worker
        still links it (a crash inside take)."""
        worker = self.open(Path(self.mktemp()))
        self.successResultOf(self.commit("W1", spool=worker))
        self.spool.take(worker, "W1")
        self.assertEqual(os.listdir(worker.spare), [])
        self.successResultOf(self.commit("W2", spool=worker))
        self.assertEqual(self.spool.load("W1").id, "W1")
        # Linked from both queues, as after a crash between take's link and unlink.
        os.link(worker.queue / "W2.env", self.spool.queue / "W2.env")
        os.link(worker.queue / "W2.msg", self.spool.queue / "W2.msg")
        self.spool.remove("W2")
        self.assertEqual(os.listdir(self.spool.spare), [])
        self.assertEqual(worker.load("W2").id, "W2")

    def test_spares_are_capped(self):
        self.patch(Spool, "SPARES", 2)
        for queue_id in ("A", "B", "C"):
            self.successResultOf(self.commit(queue_id))
        for queue_id in ("A", "B", "C"):
            self.spool.remove(queue_id)
        self.assertEqual(sorted(os.listdir(self.spool.spare)), ["A.env", "B.env"])
        self.assertEqual(os.listdir(self.spool.queue), [])

    def test_a_spool_not_opened_unlinks(self):
        """The ``mailstack queue remove`` command works on a spool it does not own."""
        self.successResultOf(self.commit("A"))
        Spool(self.spool.dir).remove("A")
        self.assertEqual(os.listdir(self.spool.queue), [])
        self.assertEqual(os.listdir(self.spool.spare), [])

    def test_envelope_naming_another_message_reads_as_gone(self):
        """What a reader sees if the file it opened was recycled meanwhile;
        at start-up such a file is quarantined, not delivered."""
        self.successResultOf(self.commit("A"))
        self.successResultOf(self.commit("B"))
        (self.spool.queue / "A.env").write_bytes((self.spool.queue / "B.env").read_bytes())
        with self.assertRaises(FileNotFoundError):
            self.spool.load("A")
        self.assertEqual([env.id for env in self.spool.recover()], ["B"])
        self.assertEqual(sorted(os.listdir(self.spool.dir / "corrupt")), ["A.env", "A.msg"])
