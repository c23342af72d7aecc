"""Maildir delivery on real files: names, links, replays, symlinks, tmp/ cleaning.

SECURITY-TESTS section 9 (MD-1..MD-4, MD-8).
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

from twisted.trial import unittest

from mailstack.store.maildir import MailRoot, Maildir, UnsafePath, delivery_base, escape_host

BODY = b"Return-Path: <a@remote.example>\nSubject: hi\n\nhello\n"
SIZE, WSIZE = len(BODY), len(BODY.replace(b"\n", b"\r\n"))
ADDRESS = "alice@example.test"


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class MaildirTestCase(unittest.SynchronousTestCase):
    def setUp(self):
        self.top = Path(self.mktemp()).resolve()
        self.root = self.top / "maildirs"
        self.mail_root = MailRoot(self.root)
        self.mail_root.ensure()
        self.spool = self.top / "spool"
        self.spool.mkdir()
        self.source = self.spool / "Q1"
        self.source.write_bytes(BODY)
        self.source.chmod(0o600)
        self.maildir = self.mail_root.maildir(ADDRESS)
        self.base = delivery_base(1_700_000_000.25, "Q1", 0, "mail.example.test")

    def deliver(self, base: str | None = None, maildir: Maildir | None = None) -> str:
        return (maildir or self.maildir).deliver(self.source, base or self.base, SIZE, WSIZE)

    def sub(self, name: str) -> Path:
        return self.root / "example.test" / "alice" / "Maildir" / name

    def listing(self, name: str) -> list[str]:
        return sorted(os.listdir(self.sub(name)))


class NameTests(unittest.SynchronousTestCase):
    def test_delivery_base(self):
        self.assertEqual(delivery_base(1_700_000_000.123456, "ABC", 2, "mail.example.test"),
                         "1700000000.M123456QABCR2.mail.example.test")
        self.assertEqual(delivery_base(1_700_000_000.0, "ABC", 0, "h"), "1700000000.M0QABCR0.h")

    def test_host_is_escaped(self):
        # Maildir spec: "/" and ":" in the host name become \057 and \072.
        self.assertEqual(escape_host("a/b:c"), "a\\057b\\072c")
        base = delivery_base(1.5, "Q", 0, "evil/../host:2,S")
        self.assertNotIn("/", base)
        self.assertNotIn(":", base)


class DeliverTests(MaildirTestCase):
    def test_hard_link_with_sizes_in_the_name(self):
        name = self.deliver()
        self.assertEqual(name, f"{self.base},S={SIZE},W={WSIZE}")
        self.assertEqual(self.listing("new"), [name])
        self.assertEqual(self.listing("tmp"), [])
        self.assertEqual(self.listing("cur"), [])
        delivered = self.sub("new") / name
        self.assertEqual(delivered.stat().st_ino, self.source.stat().st_ino)
        self.assertEqual(self.source.stat().st_nlink, 2)
        self.assertEqual(delivered.read_bytes(), BODY)

    def test_directories_are_private(self):
        self.deliver()
        for path in (self.root / "example.test", self.root / "example.test" / "alice",
                     self.sub(""), self.sub("cur"), self.sub("new"), self.sub("tmp")):
            self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o700, path)

    def test_several_recipients_and_messages(self):
        bob = self.mail_root.maildir("bob@example.test")
        first = self.deliver()
        second = self.deliver(delivery_base(1_700_000_000.25, "Q1", 1, "mail.example.test"), bob)
        third = self.deliver(delivery_base(1_700_000_001.0, "Q2", 0, "mail.example.test"))
        self.assertEqual(self.listing("new"), sorted([first, third]))
        self.assertEqual(os.listdir(self.root / "example.test" / "bob" / "Maildir" / "new"),
                         [second])

    def test_replay_does_not_duplicate(self):
        # A delivery replayed after a crash keeps one copy under its stable name.
        first = self.deliver()
        self.assertEqual(self.deliver(), first)
        self.assertEqual(self.listing("new"), [first])

    def test_stale_tmp_file_from_a_crash(self):
        # MD-1/MD-3: an attempt that died between link and rename left tmp/<name>.
        self.deliver(delivery_base(1.0, "Q0", 0, "h"))  # creates the Maildir
        name = f"{self.base},S={SIZE},W={WSIZE}"
        (self.sub("tmp") / name).write_bytes(b"half a mess")
        self.assertEqual(self.deliver(), name)
        self.assertEqual(self.listing("tmp"), [])
        delivered = self.sub("new") / name
        self.assertEqual(delivered.read_bytes(), BODY)
        self.assertEqual(delivered.stat().st_ino, self.source.stat().st_ino)

    def test_stale_tmp_symlink_is_replaced_not_followed(self):
        self.deliver(delivery_base(1.0, "Q0", 0, "h"))
        outside = self.top / "outside"
        outside.write_bytes(b"precious")
        name = f"{self.base},S={SIZE},W={WSIZE}"
        (self.sub("tmp") / name).symlink_to(outside)
        self.deliver()
        self.assertEqual(outside.read_bytes(), b"precious")
        self.assertEqual((self.sub("new") / name).read_bytes(), BODY)
        self.assertFalse((self.sub("new") / name).is_symlink())

    def test_copy_when_the_spool_is_on_another_file_system(self):
        try:
            other = Path(tempfile.mkdtemp(dir="/dev/shm"))
        except OSError:
            raise unittest.SkipTest("no /dev/shm for a second file system")
        self.addCleanup(shutil.rmtree, other)
        if other.stat().st_dev == self.root.stat().st_dev:
            raise unittest.SkipTest("/dev/shm is on the same file system")
        self.source = other / "Q1"
        self.source.write_bytes(BODY)
        name = self.deliver()
        delivered = self.sub("new") / name
        self.assertEqual(delivered.read_bytes(), BODY)
        self.assertNotEqual(delivered.stat().st_dev, self.source.stat().st_dev)
        self.assertEqual(stat.S_IMODE(delivered.stat().st_mode), 0o600)
        self.assertEqual(self.listing("tmp"), [])

    def test_mail_root_may_be_a_symlink(self):
        # The root comes from the administrator's config; only what is below it is suspect.
        link = self.top / "mail-link"
        link.symlink_to(self.root)
        name = self.deliver(maildir=MailRoot(link).maildir(ADDRESS))
        self.assertEqual(self.listing("new"), [name])

    def test_only_canonical_addresses_name_a_maildir(self):
        for address in ("bob@..", "bob@.", "../bob@example.test", "bob/x@example.test",
                        "bob@example.test/..", "bob", "@example.test", "bob@", ".bob@example.test",
                        "Bob@example.test", "bob@Example.test", "bob\0@example.test"):
            self.assertRaises(ValueError, self.mail_root.maildir, address)


class HasDeliveryTests(MaildirTestCase):
    def test_in_new_then_in_cur_with_flags(self):
        self.assertFalse(self.maildir.has_delivery(self.base))
        name = self.deliver()
        self.assertTrue(self.maildir.has_delivery(self.base))
        # A mail client reads it: new/NAME -> cur/NAME:2,S
        os.rename(self.sub("new") / name, self.sub("cur") / f"{name}:2,S")
        self.assertTrue(self.maildir.has_delivery(self.base))
        self.assertTrue(self.mail_root.maildir(ADDRESS).has_delivery(self.base))

    def test_other_bases_do_not_match(self):
        base = delivery_base(1_700_000_000.25, "Q1", 10, "mail.example.test")
        self.deliver(base)
        self.assertFalse(self.maildir.has_delivery(base[:-len(".mail.example.test")]))
        self.assertFalse(self.maildir.has_delivery(
            delivery_base(1_700_000_000.25, "Q1", 1, "mail.example.test")))
        self.assertTrue(self.maildir.has_delivery(base))

    def test_missing_maildir_is_not_created(self):
        self.assertFalse(self.maildir.has_delivery(self.base))
        self.assertFalse((self.root / "example.test").exists())

    def test_maildir_without_cur(self):
        self.deliver()
        self.sub("cur").rmdir()
        self.assertTrue(self.maildir.has_delivery(self.base))


class SymlinkTests(MaildirTestCase):
    """MD-4: a symlink anywhere below the mail root is refused, nothing written outside."""

    def setUp(self):
        super().setUp()
        self.outside = self.top / "outside"
        self.outside.mkdir()
        for sub in ("cur", "new", "tmp"):
            (self.outside / sub).mkdir()

    def assertNothingOutside(self):
        found = [str(p.relative_to(self.outside)) for p in self.outside.rglob("*")]
        self.assertEqual(sorted(found), ["cur", "new", "tmp"])

    def assertRefused(self, lookup: bool = True):
        fds = open_fds()
        self.assertRaises(UnsafePath, self.deliver)
        if lookup:
            self.assertRaises(UnsafePath, self.maildir.has_delivery, self.base)
        else:
            # has_delivery reads only new/ and cur/.
            self.assertFalse(self.maildir.has_delivery(self.base))
        self.assertEqual(open_fds(), fds)
        self.assertNothingOutside()

    def test_domain_directory(self):
        (self.root / "example.test").symlink_to(self.outside)
        self.assertRefused()

    def test_user_directory(self):
        (self.root / "example.test").mkdir()
        (self.root / "example.test" / "alice").symlink_to(self.outside)
        self.assertRefused()

    def test_maildir_directory(self):
        (self.root / "example.test" / "alice").mkdir(parents=True)
        self.sub("").symlink_to(self.outside)
        self.assertRefused()

    def test_new_and_tmp(self):
        for name in ("new", "tmp"):
            self.deliver(delivery_base(1.0, "Q0", 0, "h"))
            shutil.rmtree(self.sub(name))
            self.sub(name).symlink_to(self.outside / name)
            self.assertRefused(lookup=name != "tmp")
            self.sub(name).unlink()
            self.sub(name).mkdir()

    def test_cur(self):
        self.deliver(delivery_base(1.0, "Q0", 0, "h"))
        shutil.rmtree(self.sub("cur"))
        self.sub("cur").symlink_to(self.outside / "cur")
        (self.outside / "cur" / f"{self.base},S=1,W=1:2,S").write_bytes(b"x")
        fds = open_fds()
        self.assertRaises(UnsafePath, self.maildir.has_delivery, self.base)
        self.assertEqual(open_fds(), fds)

    def test_a_file_instead_of_a_directory(self):
        (self.root / "example.test" / "alice").mkdir(parents=True)
        self.sub("").write_bytes(b"not a directory")
        fds = open_fds()
        self.assertRaises(UnsafePath, self.deliver)
        self.assertEqual(open_fds(), fds)


class CleanTmpTests(MaildirTestCase):
    def age(self, path: Path, hours: float) -> None:
        then = time.time() - hours * 3600
        os.utime(path, (then, then), follow_symlinks=False)

    def test_removes_only_old_files(self):
        self.deliver()
        old, fresh = self.sub("tmp") / "old", self.sub("tmp") / "fresh"
        old.write_bytes(b"x")
        fresh.write_bytes(b"y")
        self.age(old, 37)
        self.age(fresh, 35)
        delivered = self.sub("new") / self.listing("new")[0]
        self.age(delivered, 100)
        self.assertEqual(self.maildir.clean_tmp(), 1)
        self.assertEqual(self.listing("tmp"), ["fresh"])
        self.assertTrue(delivered.exists())
        self.assertEqual(self.maildir.clean_tmp(max_age=0), 1)
        self.assertEqual(self.listing("tmp"), [])

    def test_whole_mail_root(self):
        bob = self.mail_root.maildir("bob@example.org")
        self.deliver()
        self.deliver(maildir=bob)
        for maildir in (self.sub(""), self.root / "example.org" / "bob" / "Maildir"):
            (maildir / "tmp" / "stale").write_bytes(b"x")
            self.age(maildir / "tmp" / "stale", 48)
        (self.root / "example.test" / "nomaildir").mkdir()
        (self.root / "stray-file").write_bytes(b"")
        self.assertEqual(self.mail_root.clean_tmp(), 2)
        self.assertEqual(self.mail_root.clean_tmp(), 0)

    def test_missing_maildir(self):
        self.assertEqual(self.maildir.clean_tmp(), 0)
        self.assertEqual(self.mail_root.clean_tmp(), 0)

    def test_odd_entries_do_not_stop_start_up(self):
        # A directory or a symlink in tmp/ is left alone; the rest is cleaned.
        self.deliver()
        outside = self.top / "outside"
        outside.write_bytes(b"precious")
        self.age(outside, 48)
        (self.sub("tmp") / "a-dir").mkdir()
        self.age(self.sub("tmp") / "a-dir", 48)
        (self.sub("tmp") / "a-link").symlink_to(outside)
        self.age(self.sub("tmp") / "a-link", 48)
        (self.sub("tmp") / "stale").write_bytes(b"x")
        self.age(self.sub("tmp") / "stale", 48)
        self.assertEqual(self.mail_root.clean_tmp(), 1)
        self.assertEqual(self.listing("tmp"), ["a-dir", "a-link"])
        self.assertEqual(outside.read_bytes(), b"precious")

    def test_planted_symlinks_do_not_stop_start_up(self):
        # MD-4 at start-up: a user's Maildir or tmp/ that is a symlink is skipped.
        outside = self.top / "outside"
        (outside / "tmp").mkdir(parents=True)
        (outside / "tmp" / "victim").write_bytes(b"precious")
        self.age(outside / "tmp" / "victim", 48)
        (self.root / "example.test" / "mallory").mkdir(parents=True)
        (self.root / "example.test" / "mallory" / "Maildir").symlink_to(outside)
        self.deliver()
        (self.sub("tmp") / "stale").write_bytes(b"x")
        self.age(self.sub("tmp") / "stale", 48)
        self.assertEqual(self.mail_root.clean_tmp(), 1)
        self.assertTrue((outside / "tmp" / "victim").exists())

        shutil.rmtree(self.sub("tmp"))
        self.sub("tmp").symlink_to(outside / "tmp")
        self.assertEqual(self.mail_root.clean_tmp(), 0)
        self.assertTrue((outside / "tmp" / "victim").exists())


class ArrivalOrderTests(unittest.TestCase):
    """New messages get UIDs and POP3 numbers in arrival order, microseconds included."""

    def test_microseconds_compare_as_numbers(self):
        from mailstack.store.folder import parse_name

        names = ["1795452383.M100000Q2R0.host,S=1,W=2", "1795452383.M99999Q1R0.host,S=1,W=2",
                 "1795452382.M999999Q0R0.host,S=1,W=2", "1795452383.M5P12Q3.host:2,S"]
        ordered = sorted((parse_name("new", n, 1) for n in names), key=lambda m: m.order)
        self.assertEqual([m.base.split(".")[1][:7] for m in ordered],
                         ["M999999", "M5P12Q3", "M99999Q", "M100000"])
