"""The folder index without a server: UIDs, flags, keywords, and two "processes"
(two indexes on one folder) keeping each other's UIDs."""

from __future__ import annotations

import os
import time
from pathlib import Path

from twisted.trial import unittest

from mailstack.store.folder import Folder
from mailstack.store.index import FolderIndex, TooManyKeywords
from mailstack.store.uidlist import parse_uidlist


class IndexTests(unittest.TestCase):
    def setUp(self):
        self.root = Path(self.mktemp())
        self.path = self.root / "d" / "u" / "Maildir"
        for sub in ("cur", "new", "tmp"):
            (self.path / sub).mkdir(parents=True)
        self.n = 0
        self.validity = iter(range(1000, 2000))

    def index(self) -> FolderIndex:
        return FolderIndex(Folder(self.root, ("d", "u", "Maildir")), lambda: next(self.validity))

    def put(self, sub: str = "new", info: str = "") -> str:
        self.n += 1
        base = f"{1_600_000_000 + self.n}.M{self.n}P1.host"
        (self.path / sub / (base + ",S=4,W=5" + info)).write_bytes(b"x\nyz")
        return base

    def uidlist(self):
        return parse_uidlist((self.path / "mailstack-uidlist").read_bytes())

    def test_uids_are_stable_and_shared(self):
        a = self.put()
        b = self.put("cur", ":2,S")
        first = self.index()
        first.refresh()
        self.assertEqual(first.uids, [1, 2])
        self.assertEqual(first.uidvalidity, 1000)
        second = self.index()  # another process, same folder
        second.refresh()
        self.assertEqual((second.uids, second.uidvalidity), ([1, 2], 1000))
        os.rename(self.path / "new" / (a + ",S=4,W=5"), self.path / "cur" / (a + ",S=4,W=5:2,F"))
        c = self.put()
        second.refresh(force=True)
        first.refresh(force=True)
        self.assertEqual(first.uids, [1, 2, 3])
        self.assertEqual(second.by_base[c], 3)
        self.assertEqual(first.flags_of(first.entries[1].msg.flags), ["\\Flagged"])
        (self.path / "cur" / (b + ",S=4,W=5:2,S")).unlink()
        self.put()
        first.refresh(force=True)
        self.assertEqual(first.uids, [1, 3, 4])
        self.assertEqual(sorted(self.uidlist().uids.values()), [1, 3, 4], "expunged UIDs dropped")
        self.assertEqual(self.uidlist().uidnext, 5)

    def test_sizes_flags_keywords(self):
        self.put("cur", ":2,")
        (self.path / "cur" / "1700000000.Mx.host:2,S").write_bytes(b"a\nb\n")  # no S=/W=
        index = self.index()
        index.refresh()
        self.assertEqual([index.wsize(u) for u in index.uids], [5, 6])
        letters = index.letters_of(["\\Seen", "$Label1", "\\Recent", "bad)flag"])
        self.assertEqual(letters, "Sa")
        changed = index.set_flags({1: letters})
        self.assertEqual(changed, {1: "Sa"})
        self.assertTrue(any(n.endswith(":2,Sa") for n in os.listdir(self.path / "cur")))
        self.assertEqual((self.path / "mailstack-keywords").read_text(), "0 $Label1\n")
        index.letters_of([f"k{i}" for i in range(25)])
        self.assertRaises(TooManyKeywords, index.letters_of, ["one-too-many"])

    def test_recent_once_and_append(self):
        self.put()
        index = self.index()
        index.refresh()
        self.assertEqual(index.claim_recent(), {1})
        self.assertEqual(index.claim_recent(), set())
        base = index.write_message(b"Subject: x\n\nbody\n", "S", 1_700_000_000.0)
        uid = index.uids_of([base])[0]
        self.assertEqual(uid, 2)
        self.assertEqual(index.mtime(uid), 1_700_000_000.0)
        self.assertEqual(index.recent_count(), 1)
        name = [n for n in os.listdir(self.path / "cur") if n.startswith(base)][0]
        self.assertTrue(name.endswith(",S=17,W=20:2,S"), name)

    def test_delivery_seen_without_listing_cur_again(self):
        self.put("cur", ":2,S")
        index = self.index()
        index.refresh()
        # Let the directories settle, as they do between deliveries.
        past = time.time() - 10
        for sub in ("new", "cur"):
            os.utime(self.path / sub, (past, past))
        index.refresh(force=True)
        listed = []
        original = index._list
        index._list = lambda top, subs=("new", "cur"): listed.append(subs) or original(top, subs)
        self.put("new")
        index.refresh()
        self.assertEqual(listed, [("new",)])
        self.assertEqual(index.uids, [1, 2])
