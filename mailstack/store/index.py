"""The per-folder index IMAP works from: UIDs, flags and names of every message.

One ``FolderIndex`` per folder and process, shared by all sessions (see
``IndexRegistry``). It lists ``new/`` and ``cur/`` only when their mtimes
changed, so a session that opens a folder seen before does not read it again
(a 50,000-message folder costs three ``stat`` calls per command when nothing
changed). A directory modified within the last second is listed again on the
next refresh: Linux mtimes tick only every few milliseconds, so a second
change in the same tick would otherwise go unseen (Dovecot does the same).

Every change (a flag, an expunge, a new message) increments ``modseq``; the
last changes are kept in a log so each session can tell what changed since
it last looked without comparing whole folders.

Message files are never rewritten: flags change by ``rename`` into ``cur/``
with a new ``:2,`` suffix (Maildir spec), keywords as letters a-z mapped in
``mailstack-keywords``. Messages written by IMAP (APPEND, COPY, MOVE) are
complete and fsync'd in ``tmp/`` or hard-linked, renamed into ``cur/``, and
``cur/`` is fsync'd before the call returns (DESIGN invariant 1).
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import time
from collections import OrderedDict, deque
from typing import Callable, Iterable

from mailstack.store.folder import Folder, StoredMessage, parse_name
from mailstack.store.maildir import UnsafePath, escape_host
from mailstack.store.uidlist import (KEYWORDS, MAX_KEYWORDS, UIDLIST, UidList, load_keywords,
                                     load_uidlist, locked, read_at, render_keywords,
                                     replace_at, stamp_at, valid_keyword)

#: Maildir info letters of the IMAP system flags (Maildir spec, "info semantics").
SYSTEM_LETTERS = {"\\draft": "D", "\\flagged": "F", "\\answered": "R", "\\seen": "S",
                  "\\deleted": "T", "$forwarded": "P"}
LETTER_FLAGS = {"D": "\\Draft", "F": "\\Flagged", "R": "\\Answered", "S": "\\Seen",
                "T": "\\Deleted", "P": "$Forwarded"}
_CHANGE_LOG = 4096
_DIRTY_WINDOW_NS = 1_000_000_000
_counter = itertools.count()
_HOST = escape_host(socket.gethostname() or "localhost").replace(",", r"\054")


class FolderGone(Exception):
    """The folder was deleted or renamed away."""


class TooManyKeywords(Exception):
    """A Maildir name holds at most 26 keyword letters."""


class Entry:
    __slots__ = ("uid", "msg", "modseq")

    def __init__(self, uid: int, msg: StoredMessage, modseq: int):
        self.uid = uid
        self.msg = msg
        self.modseq = modseq


def new_base() -> str:
    """A fresh, unique Maildir base name (Maildir spec: time, pid, counter, host)."""
    now = time.time()
    sec = int(now)
    return f"{sec}.M{int((now - sec) * 1e6)}P{os.getpid()}Q{next(_counter)}.{_HOST}"


def to_stored(data: bytes) -> bytes:
    """Message bytes as stored: LF line ends (Dovecot and mutt expect them)."""
    return data.replace(b"\r\n", b"\n")


def stored_name(base: str, data: bytes, letters: str) -> str:
    wsize = len(data) + data.count(b"\n")
    return f"{base},S={len(data)},W={wsize}:2,{letters}"


class FolderIndex:
    """UIDs, flags and file names of one folder; see the module docstring."""

    def __init__(self, folder: Folder, new_uidvalidity: Callable[[], int]):
        self.folder = folder
        self._new_uidvalidity = new_uidvalidity
        self.uidvalidity = 0
        self.uidnext = 1
        self.modseq = 1
        self.uids: list[int] = []
        self.entries: dict[int, Entry] = {}
        self.by_base: dict[str, int] = {}
        self.keywords: list[str] = []
        self.gone = False
        self._changes: deque[tuple[int, int]] = deque(maxlen=_CHANGE_LOG)
        self._dir_stamp: tuple = (None, None)
        self._file_stamps = None
        self._uidlist: UidList | None = None
        self._uidlist_stamp = None
        self._wsizes: dict[str, int] = {}
        self._mtimes: dict[str, float] = {}
        #: Called with no argument after a refresh found changes.
        self.listeners: set[Callable[[], None]] = set()

    # -- refresh ------------------------------------------------------------
    def refresh(self, force: bool = False) -> bool:
        """Catch up with the disk; True if anything changed."""
        if self.gone:
            return False
        try:
            top = self.folder._open(create=False)
        except (FileNotFoundError, NotADirectoryError, UnsafePath):
            self._vanish()
            return True
        try:
            dir_stamp = self._stamp_dirs(top)
            file_stamps = (stamp_at(top, UIDLIST), stamp_at(top, KEYWORDS))
            old = self._dir_stamp
            if not force and dir_stamp == old and file_stamps == self._file_stamps:
                return False
            if self._file_stamps is None or file_stamps[1] != self._file_stamps[1]:
                self.keywords = load_keywords(top)
            self._file_stamps = file_stamps
            # A delivery only touches new/: then cur/, usually the big one, is not
            # listed again (its entries are known and its mtime is unchanged).
            cur_known = not force and old[1] is not None and old[1] == dir_stamp[1]
            changed = self._rescan(top, cur_known)
            self._dir_stamp = tuple(s if self._settled(s) else None for s in dir_stamp)
        finally:
            os.close(top)
        if changed:
            self.notify()
        return changed

    def notify(self) -> None:
        for listener in list(self.listeners):
            listener()

    def _stamp_dirs(self, top: int) -> tuple:
        stamps = []
        for sub in ("new", "cur"):
            try:
                stamps.append(os.stat(sub, dir_fd=top, follow_symlinks=False).st_mtime_ns)
            except FileNotFoundError:
                os.mkdir(sub, 0o700, dir_fd=top)
                stamps.append(0)
        return tuple(stamps)

    @staticmethod
    def _settled(stamp: int) -> bool:
        return time.time_ns() - stamp > _DIRTY_WINDOW_NS

    def _vanish(self) -> None:
        self.gone = True
        for uid in self.uids:
            self._changes.append((self.modseq, uid))
        self.uids = []
        self.entries.clear()
        self.by_base.clear()
        self.modseq += 1
        self.notify()

    def _list(self, top: int, subs=("new", "cur")) -> dict[str, tuple[str, str]]:
        """base -> (subdir, name) of every file in new/ then cur/ (in that order: a
        message moving from new/ to cur/ during the listing is seen at least once).

        Names are only split here; ``parse_name`` checks a name (MD-5) when it is
        new to the index, so an unchanged folder costs no parsing.
        """
        found: dict[str, tuple[str, str]] = {}
        for sub in subs:
            fd = self.folder._subdir(top, sub)
            try:
                names = os.listdir(fd)
            finally:
                os.close(fd)
            for name in names:
                found[name.split(":", 1)[0].split(",", 1)[0]] = (sub, name)
        return found

    def _rescan(self, top: int, cur_known: bool = False) -> bool:
        if cur_known:
            found = self._list(top, ("new",))
            for entry in self.entries.values():
                if entry.msg.subdir == "cur":
                    found.setdefault(entry.msg.base, ("cur", entry.msg.name))
        else:
            found = self._list(top)
        if any(b not in found for b in self.by_base):
            # readdir() may miss a file renamed while it runs: confirm with a second look.
            for base, item in self._list(top).items():
                found.setdefault(base, item)
        changed = False
        self._load_uidlist(top, found)
        new = []
        for base, (sub, name) in found.items():
            if base not in self.by_base:
                msg = parse_name(sub, name, -1)
                if msg is not None and msg.base == base:
                    new.append(msg)
        if new:
            self._add(top, new, found)
            changed = True
        for base in [b for b in self.by_base if b not in found]:
            uid = self.by_base.pop(base)
            del self.entries[uid]
            self._log(uid)
            changed = True
        if len(self.uids) != len(self.entries):
            self.uids = [u for u in self.uids if u in self.entries]
        for uid, entry in self.entries.items():
            old = entry.msg
            sub, name = found[old.base]
            if name != old.name or sub != old.subdir:
                msg = parse_name(sub, name, -1) or StoredMessage(
                    old.base, sub, name, old.size, old.wsize, old.flags)
                if msg.flags != old.flags:
                    self._log(uid)
                    changed = True
                entry.msg = msg
                entry.modseq = self.modseq
        if changed:
            self.modseq += 1
        return changed

    def _load_uidlist(self, top: int, present: dict) -> None:
        stamp = stamp_at(top, UIDLIST)
        if self._uidlist is None or stamp != self._uidlist_stamp:
            uidlist, self._uidlist_stamp = load_uidlist(top)
            if uidlist is None:
                with locked(top):
                    uidlist, self._uidlist_stamp = load_uidlist(top)
                    if uidlist is None:
                        uidlist = UidList(uidvalidity=self._new_uidvalidity())
                        self._write_uidlist(top, uidlist, present)
            self._uidlist = uidlist
            self.uidvalidity = uidlist.uidvalidity
        self.uidnext = max(self.uidnext, self._uidlist.uidnext)

    def _write_uidlist(self, top: int, uidlist: UidList, present: dict) -> None:
        """Write under the lock; entries of files gone from two listings are dropped."""
        gone = [b for b in uidlist.uids if b not in present]
        if gone:
            again = self._list(top)
            for base in gone:
                if base not in again:
                    del uidlist.uids[base]
        replace_at(top, UIDLIST, uidlist.render())
        self._uidlist_stamp = stamp_at(top, UIDLIST)
        if self._file_stamps is not None:
            # Our own write is no reason to list the folder again.
            self._file_stamps = (self._uidlist_stamp, self._file_stamps[1])

    def _add(self, top: int, new: list[StoredMessage], present: dict) -> None:
        new.sort(key=lambda m: m.order)
        unknown = [m for m in new if m.base not in self._uidlist.uids]
        if unknown:
            with locked(top):
                uidlist, stamp = load_uidlist(top)
                if uidlist is None:
                    uidlist = UidList(uidvalidity=self._new_uidvalidity())
                for msg in unknown:
                    if msg.base not in uidlist.uids:
                        uidlist.uids[msg.base] = uidlist.uidnext
                        uidlist.uidnext += 1
                # Entries missing from ``present`` are looked for again before
                # they are dropped (files another process added meanwhile).
                self._write_uidlist(top, uidlist, present)
                self._uidlist = uidlist
                self.uidvalidity = uidlist.uidvalidity
                self.uidnext = max(self.uidnext, uidlist.uidnext)
        added = []
        for msg in new:
            uid = self._uidlist.uids[msg.base]
            if uid in self.entries:  # two files claim one UID (a copied tree): keep one
                continue
            self.entries[uid] = Entry(uid, msg, self.modseq)
            self.by_base[msg.base] = uid
            added.append(uid)  # not logged: sessions see new UIDs beyond their view
        added.sort()
        # A new list, never changed in place: sessions hold the old one as their view.
        if self.uids and added and added[0] < self.uids[-1]:
            self.uids = sorted(self.uids + added)
        else:
            self.uids = self.uids + added

    def _log(self, uid: int) -> None:
        self._changes.append((self.modseq, uid))

    def changed_since(self, modseq: int) -> set[int] | None:
        """UIDs changed after ``modseq`` (flags, new or gone), or None if too long ago."""
        if modseq >= self.modseq:
            return set()
        if not self._changes or self._changes[0][0] > modseq:
            return None
        return {uid for m, uid in self._changes if m >= modseq}

    # -- \Recent (RFC 3501 2.3.2) ------------------------------------------
    def recent_count(self) -> int:
        mark = self._uidlist.recent if self._uidlist else 0
        return sum(1 for _ in itertools.takewhile(lambda u: u > mark, reversed(self.uids)))

    def claim_recent(self) -> set[int]:
        """The UIDs that are \\Recent for the calling session (and for no other)."""
        if not self.uids or (self._uidlist and self.uids[-1] <= self._uidlist.recent):
            return set()
        top = self._open()
        try:
            with locked(top):
                uidlist, _ = load_uidlist(top)
                if uidlist is None:
                    return set()
                claimed = {u for u in self.uids if u > uidlist.recent}
                if claimed:
                    uidlist.recent = max(claimed)
                    self._write_uidlist(top, uidlist, self.by_base)
                self._uidlist = uidlist
                return claimed
        finally:
            os.close(top)

    # -- flags --------------------------------------------------------------
    def flags_of(self, letters: str) -> list[str]:
        """IMAP flags of Maildir letters: system flags in RFC 3501 order, then keywords."""
        flags = [LETTER_FLAGS[c] for c in "RFTSDP" if c in letters]
        for c in letters:
            if "a" <= c <= "z":
                i = ord(c) - 97
                if i < len(self.keywords) and self.keywords[i]:
                    flags.append(self.keywords[i])
        return flags

    def letters_of(self, flags: Iterable[str], create: bool = True) -> str:
        """Maildir letters for IMAP flags; new keywords get a letter (TooManyKeywords)."""
        letters = set()
        wanted = []
        for flag in flags:
            low = flag.lower()
            if low in SYSTEM_LETTERS:
                letters.add(SYSTEM_LETTERS[low])
            elif low == "\\recent" or not valid_keyword(flag):
                continue
            else:
                wanted.append(flag)
        if wanted:
            letters.update(self._keyword_letters(wanted, create))
        return "".join(sorted(letters))

    def _keyword_letters(self, names: list[str], create: bool) -> set[str]:
        def lookup():
            lower = [k.lower() for k in self.keywords]
            return {n: chr(97 + lower.index(n.lower())) for n in names if n.lower() in lower}

        found = lookup()
        missing = [n for n in names if n not in found]
        if missing and create:
            top = self._open()
            try:
                with locked(top):
                    self.keywords = load_keywords(top)
                    lower = [k.lower() for k in self.keywords]
                    for name in missing:
                        if name.lower() in lower:
                            continue
                        if len(self.keywords) >= MAX_KEYWORDS:
                            raise TooManyKeywords(name)
                        self.keywords.append(name)
                        lower.append(name.lower())
                    replace_at(top, KEYWORDS, render_keywords(self.keywords))
                    if self._file_stamps is not None:
                        self._file_stamps = (self._file_stamps[0], stamp_at(top, KEYWORDS))
            finally:
                os.close(top)
            found = lookup()
        return set(found.values())

    def set_flags(self, changes: dict[int, str]) -> dict[int, str]:
        """Give messages exactly these letters; returns what changed (uid -> letters)."""
        done = {}
        for uid, letters in changes.items():
            entry = self.entries.get(uid)
            if entry is None or entry.msg.flags == letters:
                continue
            try:
                entry.msg = self.folder.set_flags(entry.msg, letters)
            except FileNotFoundError:
                continue  # expunged meanwhile: the next refresh reports it
            entry.modseq = self.modseq
            self._log(uid)
            done[uid] = entry.msg.flags
        if done:
            self.modseq += 1
            self.notify()
        return done

    def expunge(self, uids: Iterable[int]) -> list[int]:
        """Remove these messages; returns the UIDs removed, ascending."""
        removed = []
        for uid in sorted(uids):
            entry = self.entries.get(uid)
            if entry is None:
                continue
            self.folder.delete(entry.msg)
            del self.entries[uid]
            self.by_base.pop(entry.msg.base, None)
            self._log(uid)
            removed.append(uid)
        if removed:
            gone = set(removed)
            self.uids = [u for u in self.uids if u not in gone]
            self.modseq += 1
            self.notify()
        return removed

    # -- reading ------------------------------------------------------------
    def _open(self) -> int:
        try:
            return self.folder._open(create=False)
        except (FileNotFoundError, UnsafePath):
            raise FolderGone(self.folder.path) from None

    def read(self, uid: int, limit: int | None = None) -> bytes:
        """The stored bytes of a message (its first ``limit`` bytes); follows renames."""
        entry = self.entries[uid]
        with self.folder.open_message(entry.msg) as f:
            return f.read() if limit is None else f.read(limit)

    def read_header(self, uid: int) -> bytes:
        """The header of a message, through the blank line (or the whole message)."""
        data = self.read(uid, 65536)
        if b"\n\n" in data or len(data) < 65536:
            return data
        return self.read(uid)

    def wsize(self, uid: int) -> int:
        """RFC822.SIZE: the size with CRLF line ends (W= in the name, else counted once)."""
        msg = self.entries[uid].msg
        if msg.wsize >= 0:
            return msg.wsize
        size = self._wsizes.get(msg.base)
        if size is None:
            data = self.read(uid)
            size = len(data) + data.count(b"\n") - data.count(b"\r\n")
            self._wsizes[msg.base] = size
        return size

    def mtime(self, uid: int) -> float:
        """INTERNALDATE: the file's mtime (Dovecot's convention; APPEND sets it)."""
        msg = self.entries[uid].msg
        value = self._mtimes.get(msg.base)
        if value is None:
            top = self._open()
            try:
                sub = self.folder._subdir(top, msg.subdir)
                try:
                    value = os.stat(msg.name, dir_fd=sub, follow_symlinks=False).st_mtime
                except FileNotFoundError:
                    found = self.folder.find(msg.base)
                    if found is None:
                        raise
                    self.entries[uid].msg = found
                    os.close(sub)
                    sub = self.folder._subdir(top, found.subdir)
                    value = os.stat(found.name, dir_fd=sub, follow_symlinks=False).st_mtime
                finally:
                    os.close(sub)
            finally:
                os.close(top)
            self._mtimes[msg.base] = value
        return value

    # -- writing (blocking: run these in the thread pool) ---------------------
    def write_message(self, data: bytes, letters: str, mtime: float | None) -> str:
        """Store a new message durably; returns its base. ``data`` has LF line ends."""
        top = self._open()
        try:
            tmp = self.folder._subdir(top, "tmp")
            cur = self.folder._subdir(top, "cur")
            try:
                while True:
                    base = new_base()
                    name = stored_name(base, data, letters)
                    try:
                        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                     | os.O_CLOEXEC, 0o600, dir_fd=tmp)
                    except FileExistsError:
                        continue  # SECURITY-TESTS MD-3: never overwrite
                    break
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                    os.fsync(fd)
                except BaseException:
                    os.close(fd)
                    os.unlink(name, dir_fd=tmp)
                    raise
                os.close(fd)
                if mtime is not None:
                    os.utime(name, (mtime, mtime), dir_fd=tmp, follow_symlinks=False)
                os.rename(name, name, src_dir_fd=tmp, dst_dir_fd=cur)
                os.fsync(cur)
            finally:
                os.close(tmp)
                os.close(cur)
        finally:
            os.close(top)
        return base

    def take_messages(self, source: FolderIndex, items: list[tuple[StoredMessage, str]],
                      move: bool) -> list[str]:
        """Copy (hard link) or move (rename) messages of ``source`` in here.

        ``items`` are (message, letters); returns the new bases in order, ""
        for a message that was gone. Each file keeps its inode, so its data
        is already durable; ``cur/`` (and the source directory on a move) is
        fsync'd before returning.
        """
        bases = []
        top = self._open()
        src_top = source._open()
        try:
            cur = self.folder._subdir(top, "cur")
            touched: set[str] = set()
            try:
                for msg, letters in items:
                    base = new_base()
                    name = f"{base}{msg.name.split(':', 1)[0][len(msg.base):]}:2,{letters}"
                    for _ in range(3):
                        try:
                            self._take_one(source, src_top, msg, cur, name, move)
                            touched.add(msg.subdir)
                            bases.append(base)
                            break
                        except FileNotFoundError:
                            found = source.folder.find(msg.base)
                            if found is None:
                                bases.append("")
                                break
                            msg = found
                    else:
                        bases.append("")
                os.fsync(cur)
                if move:
                    for sub in touched:
                        fd = source.folder._subdir(src_top, sub)
                        try:
                            os.fsync(fd)
                        finally:
                            os.close(fd)
            finally:
                os.close(cur)
        finally:
            os.close(top)
            os.close(src_top)
        return bases

    def _take_one(self, source: FolderIndex, src_top: int, msg: StoredMessage, cur: int,
                  name: str, move: bool) -> None:
        src = source.folder._subdir(src_top, msg.subdir)
        try:
            if move:
                os.rename(msg.name, name, src_dir_fd=src, dst_dir_fd=cur)
                return
            try:
                os.link(msg.name, name, src_dir_fd=src, dst_dir_fd=cur, follow_symlinks=False)
                return
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise
            data = source.read(source.by_base[msg.base]) if msg.base in source.by_base else b""
            top = self._open()
            try:
                tmp = self.folder._subdir(top, "tmp")
                try:
                    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                 | os.O_CLOEXEC, 0o600, dir_fd=tmp)
                    try:
                        os.write(fd, data)
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                    os.rename(name, name, src_dir_fd=tmp, dst_dir_fd=cur)
                finally:
                    os.close(tmp)
            finally:
                os.close(top)
        finally:
            os.close(src)

    def uids_of(self, bases: list[str]) -> list[int | None]:
        """The UIDs of messages just written here (after ``refresh``)."""
        self.refresh(force=True)
        return [self.by_base.get(b) if b else None for b in bases]


class IndexRegistry:
    """The process's folder indexes, by path; the least recently used are dropped."""

    def __init__(self, size: int = 100):
        self.size = size
        self._indexes: OrderedDict[str, FolderIndex] = OrderedDict()

    def get(self, folder: Folder, new_uidvalidity: Callable[[], int]) -> FolderIndex:
        key = str(folder.path)
        index = self._indexes.get(key)
        if index is None or index.gone:
            index = FolderIndex(folder, new_uidvalidity)
            self._indexes[key] = index
        self._indexes.move_to_end(key)
        while len(self._indexes) > self.size:
            oldest = next(iter(self._indexes))
            if self._indexes[oldest].listeners:
                self._indexes.move_to_end(oldest)  # in use by a session: keep it
                if all(i.listeners for i in self._indexes.values()):
                    break
                continue
            del self._indexes[oldest]
        return index

    def forget(self, path_prefix: str) -> None:
        """Drop the indexes of a deleted or renamed folder (and its children)."""
        for key in list(self._indexes):
            if key == path_prefix or key.startswith(path_prefix + "."):
                index = self._indexes.pop(key)
                index.refresh()

    def indexes(self) -> list[FolderIndex]:
        return list(self._indexes.values())
