"""A user's mailboxes: names, their Maildir++ directories, subscriptions.

Clients see ``/`` as the hierarchy separator; on disk a mailbox is a
Maildir++ folder beside ``cur``, ``new`` and ``tmp`` of the INBOX, named
``.`` plus its components joined by ``.`` (``Archive/2024`` is
``.Archive.2024``). Each component is written in modified UTF-7 (RFC 3501
5.1.3), as Dovecot does, after ``~`` and ``.`` are escaped as ``~7e`` and
``~2e``, so the mapping is injective (SECURITY-TESTS MBX-5): ``a.b`` and
``a/b`` are different directories. Names are checked before anything is
looked up (MBX-1..4): no empty, ``.`` or ``..`` component, no control
characters, NFC only; a name can therefore never leave the user's Maildir.

Subscriptions live in ``mailstack-subscriptions`` (one name a line), new
UIDVALIDITY values come from ``mailstack-uidvalidity`` (always increasing, so
a mailbox deleted and created again never reuses one); both change under
``flock`` on ``mailstack-folders.lock``. Dovecot's ``subscriptions`` file is
read when ours does not exist yet.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import stat
import time
import unicodedata

from mailstack.store.folder import Folder
from mailstack.store.index import FolderIndex, IndexRegistry
from mailstack.store.maildir import Maildir, UnsafePath
from mailstack.store.uidlist import locked, read_at, replace_at

INBOX = "INBOX"
SEPARATOR = "/"
#: RFC 6154 special-use mailboxes, created on a user's first login.
SPECIAL_USE = {"Sent": "\\Sent", "Drafts": "\\Drafts", "Trash": "\\Trash", "Junk": "\\Junk",
               "Archive": "\\Archive"}
SUBSCRIPTIONS = "mailstack-subscriptions"
DOVECOT_SUBSCRIPTIONS = "subscriptions"
UIDVALIDITY = "mailstack-uidvalidity"
LOCK = "mailstack-folders.lock"
_MAX_DISK_NAME = 255
_ESCAPED = re.compile(r"~(2e|7e)")


class MailboxError(Exception):
    """A mailbox operation the client asked for cannot be done (IMAP NO)."""

    code = ""


class BadMailboxName(MailboxError):
    code = "CANNOT"


class MailboxExists(MailboxError):
    code = "ALREADYEXISTS"


class NoSuchMailbox(MailboxError):
    code = "NONEXISTENT"


class MailboxLimit(MailboxError):
    code = "LIMIT"


# -- modified UTF-7 (RFC 3501 5.1.3) ------------------------------------------
def mutf7_encode(name: str) -> bytes:
    out = []
    run: list[str] = []

    def flush():
        if run:
            raw = "".join(run).encode("utf-16-be")
            out.append(b"&" + base64.b64encode(raw).rstrip(b"=").replace(b"/", b",") + b"-")
            run.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append(b"&-" if ch == "&" else ch.encode("ascii"))
        else:
            run.append(ch)
    flush()
    return b"".join(out)


def mutf7_decode(data: bytes) -> str:
    """Strict decoding: ValueError for 8-bit bytes, bad base64, or a needless encoding."""
    out = []
    i = 0
    while i < len(data):
        c = data[i]
        if c < 0x20 or c > 0x7E:
            raise ValueError("8-bit or control byte in a mailbox name")
        if c != 0x26:  # "&"
            out.append(chr(c))
            i += 1
            continue
        end = data.find(b"-", i + 1)
        if end < 0:
            raise ValueError("unterminated modified UTF-7 shift")
        chunk = data[i + 1:end]
        i = end + 1
        if not chunk:
            out.append("&")
            continue
        if not re.fullmatch(rb"[A-Za-z0-9+,]+", chunk) or len(chunk) % 4 == 1:
            raise ValueError("bad modified UTF-7 base64")
        raw = base64.b64decode(chunk.replace(b",", b"/") + b"=" * (-len(chunk) % 4))
        if len(raw) % 2:
            raise ValueError("bad modified UTF-7 length")
        text = raw.decode("utf-16-be")  # UnicodeDecodeError is a ValueError
        if any(0x20 <= ord(ch) <= 0x7E for ch in text) or mutf7_encode(text)[1:-1] != chunk:
            raise ValueError("needless or non-canonical modified UTF-7")
        out.append(text)
    return "".join(out)


# -- names ----------------------------------------------------------------------
def normalize(name: str) -> str:
    """The canonical form of a client's mailbox name, or BadMailboxName (MBX-1..4).

    Only ``INBOX`` is case-insensitive (RFC 3501 5.1), also as the first
    component of a longer name.
    """
    if not name:
        raise BadMailboxName("Empty mailbox name")
    parts = name.split(SEPARATOR)
    if parts[0].upper() == INBOX:
        parts[0] = INBOX
    for part in parts:
        if part in ("", ".", ".."):
            raise BadMailboxName("Bad hierarchy in mailbox name (empty, '.' or '..' part)")
        for ch in part:
            o = ord(ch)
            if o < 0x20 or 0x7F <= o <= 0x9F or ch in "\u2028\u2029":
                raise BadMailboxName("Control character in mailbox name")
    if unicodedata.normalize("NFC", name) != name:
        raise BadMailboxName("Mailbox name is not in Unicode NFC")
    return SEPARATOR.join(parts)


def disk_name(name: str) -> str:
    """``Archive/2024`` -> ``.Archive.2024`` (not for INBOX itself)."""
    parts = [p.replace("~", "~7e").replace(".", "~2e") for p in name.split(SEPARATOR)]
    disk = "." + ".".join(mutf7_encode(p).decode("ascii") for p in parts)
    if len(disk) > _MAX_DISK_NAME:
        raise BadMailboxName("Mailbox name too long")
    return disk


def from_disk(entry: str) -> str | None:
    """The mailbox name of a Maildir++ directory entry, or None if it is none."""
    if not entry.startswith(".") or entry in (".", ".."):
        return None
    try:
        parts = [mutf7_decode(p.encode("ascii")) for p in entry[1:].split(".")]
    except (ValueError, UnicodeEncodeError):
        return None
    parts = [_ESCAPED.sub(lambda m: chr(int(m.group(1), 16)), p) for p in parts]
    try:
        return normalize(SEPARATOR.join(parts))
    except BadMailboxName:
        return None


def parents(name: str) -> list[str]:
    parts = name.split(SEPARATOR)
    return [SEPARATOR.join(parts[:i]) for i in range(1, len(parts))]


class Mailboxes:
    """The mailboxes of one user, over the INBOX Maildir ``inbox``."""

    def __init__(self, inbox: Maildir, registry: IndexRegistry, max_mailboxes: int = 1000):
        self.inbox = inbox
        self.registry = registry
        self.max_mailboxes = max_mailboxes

    # -- helpers ------------------------------------------------------------
    def _top(self) -> int:
        return self.inbox._open(create=True)

    def folder(self, name: str) -> Folder:
        if name == INBOX:
            return Folder(self.inbox.root, self.inbox.components)
        return Folder(self.inbox.root, self.inbox.components + (disk_name(name),))

    def index(self, name: str) -> FolderIndex:
        """The shared index of an existing mailbox (NoSuchMailbox otherwise)."""
        name = normalize(name)
        if name != INBOX and not self.selectable(name):
            raise NoSuchMailbox("No such mailbox")
        index = self.registry.get(self.folder(name), self.new_uidvalidity)
        index.refresh()
        if index.gone:
            raise NoSuchMailbox("No such mailbox")
        return index

    def new_uidvalidity(self) -> int:
        top = self._top()
        try:
            with locked(top, LOCK):
                found = read_at(top, UIDVALIDITY)
                last = int(found[0]) if found and found[0].strip().isdigit() else 0
                value = max(int(time.time()), last + 1) % (2 ** 32) or 1
                replace_at(top, UIDVALIDITY, b"%d\n" % value)
                return value
        finally:
            os.close(top)

    def _entries(self, top: int) -> dict[str, str]:
        """Existing mailbox names -> directory entry (INBOX not included)."""
        found = {}
        with os.scandir(top) as entries:
            for entry in entries:
                if entry.name.startswith(".") and entry.is_dir(follow_symlinks=False):
                    name = from_disk(entry.name)
                    if name is not None and name != INBOX:
                        found[name] = entry.name
        return found

    # -- listing ------------------------------------------------------------
    def names(self) -> dict[str, bool]:
        """Every mailbox name -> selectable; parents that exist only as a
        prefix of others are listed as not selectable (\\Noselect)."""
        top = self._top()
        try:
            existing = self._entries(top)
        finally:
            os.close(top)
        result = {INBOX: True}
        for name in existing:
            result[name] = True
        for name in list(result):
            for parent in parents(name):
                result.setdefault(parent, False)
        return result

    def selectable(self, name: str) -> bool:
        if name == INBOX:
            return True
        try:
            disk = disk_name(name)
        except BadMailboxName:
            return False
        top = self._top()
        try:
            st = os.stat(disk, dir_fd=top, follow_symlinks=False)
        except FileNotFoundError:
            return False
        finally:
            os.close(top)
        return stat.S_ISDIR(st.st_mode)

    # -- changes ------------------------------------------------------------
    def create(self, name: str) -> str:
        """Create a mailbox and any missing superior names (RFC 3501 6.3.3)."""
        name = normalize(name)
        if name == INBOX:
            raise MailboxExists("INBOX always exists")
        if "*" in name or "%" in name:
            raise BadMailboxName("Wildcards are not allowed in mailbox names")
        wanted = [(n, disk_name(n)) for n in parents(name) + [name] if n != INBOX]
        top = self._top()
        try:
            with locked(top, LOCK):
                existing = self._entries(top)
                if name in existing:
                    raise MailboxExists("Mailbox already exists")
                missing = [(n, d) for n, d in wanted if n not in existing]
                if len(existing) + len(missing) > self.max_mailboxes:
                    raise MailboxLimit("Too many mailboxes")
                for _, disk in missing:
                    self._make(top, disk)
                os.fsync(top)
        finally:
            os.close(top)
        return name

    @staticmethod
    def _make(top: int, disk: str) -> None:
        try:
            os.mkdir(disk, 0o700, dir_fd=top)
        except FileExistsError:
            raise MailboxExists("Mailbox already exists") from None
        except OSError as e:
            raise BadMailboxName(f"Cannot create mailbox: {e.strerror}") from None
        fd = os.open(disk, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=top)
        try:
            for sub in ("cur", "new", "tmp"):
                os.mkdir(sub, 0o700, dir_fd=fd)
            # Maildir++: marks a folder for delivery tools such as maildrop.
            os.close(os.open("maildirfolder", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW,
                             0o600, dir_fd=fd))
            os.fsync(fd)
        finally:
            os.close(fd)

    def delete(self, name: str) -> None:
        name = normalize(name)
        if name == INBOX:
            raise BadMailboxName("INBOX cannot be deleted")  # RFC 3501 6.3.4
        names = self.names()
        if name not in names:
            raise NoSuchMailbox("No such mailbox")
        if not names[name]:
            # RFC 3501 6.3.4: a \Noselect name with inferiors cannot be deleted.
            raise MailboxError("Mailbox has inferior hierarchical names")
        disk = disk_name(name)
        top = self._top()
        try:
            with locked(top, LOCK):
                trash = f"mailstack-deleted.{os.getpid()}.{time.monotonic_ns()}"
                try:
                    os.rename(disk, trash, src_dir_fd=top, dst_dir_fd=top)
                except FileNotFoundError:
                    raise NoSuchMailbox("No such mailbox") from None
                os.fsync(top)
            shutil.rmtree(trash, dir_fd=top)
        finally:
            os.close(top)
        self.registry.forget(str(self.folder(name).path))

    def rename(self, old: str, new: str) -> None:
        old, new = normalize(old), normalize(new)
        if new == INBOX:
            raise MailboxExists("INBOX already exists")
        if "*" in new or "%" in new:
            raise BadMailboxName("Wildcards are not allowed in mailbox names")
        if old == INBOX:
            self._rename_inbox(new)
            return
        if new == old or new.startswith(old + SEPARATOR):
            raise BadMailboxName("Cannot rename a mailbox into itself")
        names = self.names()
        if old not in names:
            raise NoSuchMailbox("No such mailbox")
        if new in names:
            raise MailboxExists("Target mailbox already exists")
        moves = [(n, new + n[len(old):]) for n in names
                 if names[n] and (n == old or n.startswith(old + SEPARATOR))]
        disk_moves = [(disk_name(a), disk_name(b)) for a, b in moves]  # BadMailboxName first
        top = self._top()
        try:
            with locked(top, LOCK):
                for a, b in disk_moves:
                    try:
                        os.stat(b, dir_fd=top, follow_symlinks=False)
                        raise MailboxExists("Target mailbox already exists")
                    except FileNotFoundError:
                        pass
                for a, b in disk_moves:
                    os.rename(a, b, src_dir_fd=top, dst_dir_fd=top)
                os.fsync(top)
                subs = self._read_subscriptions(top)
                if subs is not None:
                    renamed = [new + s[len(old):] if s == old or s.startswith(old + SEPARATOR)
                               else s for s in subs]
                    if renamed != subs:
                        self._write_subscriptions(top, renamed)
        finally:
            os.close(top)
        for a, _ in moves:
            self.registry.forget(str(self.folder(a).path))

    def _rename_inbox(self, new: str) -> None:
        """RFC 3501 6.3.5: move every INBOX message to a new mailbox; INBOX stays, empty."""
        if self.selectable(new):
            raise MailboxExists("Target mailbox already exists")
        self.create(new)
        source = self.index(INBOX)
        target = self.index(new)
        items = [(source.entries[u].msg, source.entries[u].msg.flags) for u in source.uids]
        target.take_messages(source, items, move=True)
        source.refresh(force=True)
        target.refresh(force=True)

    # -- subscriptions (RFC 3501 6.3.6, 6.3.7) ------------------------------
    def _read_subscriptions(self, top: int) -> list[str] | None:
        found = read_at(top, SUBSCRIPTIONS)
        if found is None:
            return None
        return [n for n in found[0].decode("utf-8", "replace").split("\n") if n]

    def _write_subscriptions(self, top: int, names: list[str]) -> None:
        unique = list(dict.fromkeys(names))
        replace_at(top, SUBSCRIPTIONS, "".join(n + "\n" for n in unique).encode("utf-8"))

    def subscriptions(self) -> list[str]:
        top = self._top()
        try:
            return self._read_subscriptions(top) or []
        finally:
            os.close(top)

    def set_subscribed(self, name: str, subscribed: bool) -> None:
        name = normalize(name)
        if name != INBOX:
            disk_name(name)  # the same length limit as for a mailbox (MBX-6)
        top = self._top()
        try:
            with locked(top, LOCK):
                names = self._read_subscriptions(top) or []
                if subscribed and name not in names:
                    self._write_subscriptions(top, names + [name])
                elif not subscribed and name in names:
                    self._write_subscriptions(top, [n for n in names if n != name])
        finally:
            os.close(top)

    def ensure_defaults(self) -> None:
        """On first login: the special-use mailboxes, all subscribed (with INBOX).

        A Maildir from Dovecot keeps its subscriptions (and gets the defaults).
        """
        top = self._top()
        try:
            if read_at(top, SUBSCRIPTIONS) is not None:
                return
            subscribed = [INBOX] + self._dovecot_subscriptions(top)
        finally:
            os.close(top)
        for name in SPECIAL_USE:
            if not self.selectable(name):
                try:
                    self.create(name)
                except MailboxExists:
                    pass
            subscribed.append(name)
        top = self._top()
        try:
            with locked(top, LOCK):
                if read_at(top, SUBSCRIPTIONS) is None:
                    self._write_subscriptions(top, subscribed)
        finally:
            os.close(top)

    @staticmethod
    def _dovecot_subscriptions(top: int) -> list[str]:
        found = read_at(top, DOVECOT_SUBSCRIPTIONS)
        if found is None:
            return []
        lines = found[0].decode("utf-8", "replace").split("\n")
        if lines and lines[0].startswith("V\t"):
            # Version 2: a header, then names with TAB as the hierarchy separator.
            names = [line.replace("\t", SEPARATOR) for line in lines[1:] if line]
        else:
            # Version 1: names with Maildir++'s own "." separator.
            names = [line.replace(".", SEPARATOR) for line in lines if line]
        result = []
        for name in names:
            try:
                result.append(normalize(name))
            except BadMailboxName:
                continue
        return result
