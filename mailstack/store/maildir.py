"""Maildir delivery: every byte written under the mail root goes through here.

Layout: ``<mail_root>/<domain>/<localpart>/Maildir`` with ``cur``, ``new`` and
``tmp`` (Maildir++ folders such as ``.Sent`` beside them). Names follow
Dovecot's convention so other tools can read the tree::

    <sec>.M<usec>Q<queue id>R<n>.<host>,S=<size>,W=<crlf size>

``S=`` is the size on disk (LF line ends, as Dovecot and mutt expect) and
``W=`` the size with CRLF line ends, what IMAP and POP3 report. The part
before the first comma (the *base*) is derived from the queue id and the
recipient's index, so a delivery replayed after a crash can tell that it
already happened (exactly-once delivery).

Safety (SECURITY-TESTS MD-1..MD-4, MD-8): directories are opened one level at
a time with ``O_NOFOLLOW`` so a planted symlink never leads outside the tree;
file names come only from the queue id, never from message or envelope data;
a file appears in ``new/`` only complete and fsync'd, by rename from ``tmp/``,
and the ``new/`` directory is fsync'd before the delivery counts as done.
Directories created on the way (a new user's Maildir) are made durable too:
their parent is fsync'd after each ``mkdir``.

Local delivery works in batches (``Maildir.open_delivery``): the Maildir is
opened once, every message of the batch is linked into ``tmp/`` and renamed
into ``new/``, and then one fsync of ``new/`` makes all of them durable.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import time
from pathlib import Path

from mailstack.addresses import BadAddress, canonical

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: A Maildir++ folder a delivery may target: "." and a plain name, never a path.
_FOLDER = re.compile(r"\.[A-Za-z0-9][A-Za-z0-9_\-]{0,63}\Z")
# The mail root itself comes from the administrator's config and may be a
# symlink (/var/mail -> /srv/mail); only what lies below it is suspect.
_ROOT_FLAGS = _DIR_FLAGS & ~os.O_NOFOLLOW
SUBDIRS = ("cur", "new", "tmp")


def escape_host(hostname: str) -> str:
    """The host part of a Maildir name: ``/`` and ``:`` escaped (Maildir spec)."""
    return hostname.replace("/", r"\057").replace(":", r"\072")


def delivery_base(arrival: float, queue_id: str, index: int, hostname: str) -> str:
    """The unique, replay-stable part of the Maildir name of one delivery."""
    sec = int(arrival)
    usec = int((arrival - sec) * 1_000_000)
    return f"{sec}.M{usec}Q{queue_id}R{index}.{escape_host(hostname)}"


def _base_of(name: str) -> str:
    """The part of a Maildir name before its ``,S=``/``,W=`` fields and ``:2,`` flags."""
    return name.split(",", 1)[0].split(":", 1)[0]


def _subdirs(path: Path) -> list[Path]:
    try:
        return [Path(e.path) for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []


class UnsafePath(OSError):
    """A directory under the mail root is a symlink or not a directory."""


class MailRoot:
    """The tree of all users' Maildirs."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def ensure(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def clean_tmp(self) -> int:
        """Remove stale ``tmp/`` files of every INBOX (done once at start-up).

        A Maildir that is a planted symlink (MD-4) is skipped, not followed,
        and does not stop the start-up of everyone else's mail.
        """
        removed = 0
        for domain in _subdirs(self.root):
            for local in _subdirs(domain):
                try:
                    removed += Maildir(self.root, (domain.name, local.name, "Maildir")).clean_tmp()
                except UnsafePath:
                    continue
        return removed

    def shares_file_system(self, path: Path) -> bool:
        """Whether ``path`` is on this tree's file system (its files can be
        hard-linked into Maildirs, never copied)."""
        try:
            return os.stat(self.root).st_dev == os.stat(path).st_dev
        except OSError:
            return False

    def maildir(self, address: str, folder: str = "") -> Maildir:
        """The INBOX Maildir of a canonical ``local@domain`` address, or with
        ``folder`` one of its Maildir++ folders (``.Junk`` for quarantined mail)."""
        if folder and not _FOLDER.match(folder):
            raise ValueError(f"not a Maildir++ folder name: {folder!r}")
        # canonical() guarantees neither part holds "/", "\0" or "..", nor
        # starts with a dot: both become directory names (AUTH-14, MD-8).
        try:
            ok = canonical(address) == address
        except BadAddress:
            ok = False
        if not ok:
            raise ValueError(f"not a canonical address: {address!r}")
        local, _, domain = address.rpartition("@")
        return Maildir(self.root, (domain, local, "Maildir") + ((folder,) if folder else ()))


class Maildir:
    """One Maildir, addressed by path components below the mail root."""

    def __init__(self, root: Path, components: tuple[str, ...]):
        self.root = Path(root)
        self.components = components
        self.path = self.root.joinpath(*components)

    def _open(self, create: bool, make_subdirs: bool = True) -> int:
        """A descriptor of this Maildir, walked without following symlinks.

        With ``create``, missing directories are made (and their parents
        fsync'd); ``make_subdirs`` also makes sure ``cur``, ``new`` and ``tmp``
        exist (callers that open them anyway pass False and call
        ``_make_subdirs`` only when one is missing).
        """
        fd = os.open(self.root, _ROOT_FLAGS)
        try:
            for name in self.components:
                try:
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    try:
                        os.mkdir(name, 0o700, dir_fd=fd)
                    except FileExistsError:
                        pass
                    os.fsync(fd)
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise UnsafePath(e.errno, f"refusing a symlink or file at {name!r}",
                                         str(self.path)) from None
                    raise
                os.close(fd)
                fd = child
            if create and make_subdirs:
                self._make_subdirs(fd)
            return fd
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def _make_subdirs(fd: int) -> None:
        made = False
        for sub in SUBDIRS:
            try:
                os.mkdir(sub, 0o700, dir_fd=fd)
                made = True
            except FileExistsError:
                pass
        if made:
            os.fsync(fd)

    def _subdir(self, fd: int, name: str) -> int:
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=fd)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafePath(e.errno, f"refusing a symlink at {name!r}", str(self.path)) from None
            raise

    def deliver(self, source: Path, base: str, size: int, wsize: int) -> str:
        """Put a copy of the complete, fsync'd file ``source`` into ``new/``.

        The file is hard-linked when the spool shares the file system (no data
        is copied or synced twice), else copied and fsync'd. Returns the name
        in ``new/``; returns only after ``new/`` itself is fsync'd.
        """
        with self.open_delivery() as target:
            name = target.place(source, base, size, wsize)
            target.sync()
        return name

    def open_delivery(self) -> DeliveryTarget:
        """This Maildir opened (created if needed) for a batch of deliveries."""
        top = self._open(create=True, make_subdirs=False)
        try:
            try:
                tmp, new = self._tmp_and_new(top)
            except FileNotFoundError:
                self._make_subdirs(top)
                tmp, new = self._tmp_and_new(top)
        finally:
            os.close(top)
        return DeliveryTarget(self, tmp, new)

    def _tmp_and_new(self, top: int) -> tuple[int, int]:
        """Both descriptors, or neither (none leaks when ``new`` is refused)."""
        tmp = self._subdir(top, "tmp")
        try:
            return tmp, self._subdir(top, "new")
        except BaseException:
            os.close(tmp)
            raise

    @staticmethod
    def _place_in_tmp(source: Path, name: str, tmp: int, copy: bool = True) -> None:
        for _ in range(2):
            try:
                os.link(source, name, dst_dir_fd=tmp, follow_symlinks=False)
                return
            except FileExistsError:
                # Left by an attempt that crashed before the rename (MD-3).
                os.unlink(name, dir_fd=tmp)
            except OSError as e:
                if not copy or e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise
                break
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=tmp)
        try:
            with open(source, "rb") as src:
                while chunk := src.read(1 << 20):
                    os.write(fd, chunk)
            os.fsync(fd)
        finally:
            os.close(fd)

    def delivered_bases(self) -> set[str]:
        """The base names of every message in ``new/`` and ``cur/``."""
        bases: set[str] = set()
        try:
            top = self._open(create=False)
        except FileNotFoundError:
            return bases
        try:
            for sub in ("new", "cur"):
                try:
                    fd = self._subdir(top, sub)
                except FileNotFoundError:
                    continue
                try:
                    bases.update(_base_of(entry) for entry in os.listdir(fd))
                finally:
                    os.close(fd)
        finally:
            os.close(top)
        return bases

    def has_delivery(self, base: str) -> bool:
        """Whether a message with this base name is in ``new/`` or ``cur/``."""
        return base in self.delivered_bases()

    def clean_tmp(self, max_age: float = 36 * 3600) -> int:
        """Remove files in ``tmp/`` older than ``max_age`` (Maildir spec: 36 h)."""
        try:
            top = self._open(create=False)
        except FileNotFoundError:
            return 0
        removed = 0
        try:
            try:
                tmp = self._subdir(top, "tmp")
            except FileNotFoundError:
                return 0
            try:
                limit = time.time() - max_age
                for entry in os.listdir(tmp):
                    try:
                        st = os.stat(entry, dir_fd=tmp, follow_symlinks=False)
                        # Only files that deliveries leave; a directory or a
                        # symlink someone put there is not ours to remove.
                        if stat.S_ISREG(st.st_mode) and st.st_mtime < limit:
                            os.unlink(entry, dir_fd=tmp)
                            removed += 1
                    except FileNotFoundError:
                        continue  # another process sharing the mail root got it first
            finally:
                os.close(tmp)
        finally:
            os.close(top)
        return removed


class DeliveryTarget:
    """A Maildir's ``tmp/`` and ``new/`` held open for a batch of deliveries.

    ``place`` makes each message visible in ``new/``; ``sync`` (one fsync of
    ``new/``) makes every placed message durable, and only then do they count
    as delivered. Use as a context manager, or call ``close``.
    """

    def __init__(self, maildir: Maildir, tmp: int, new: int):
        self.maildir = maildir
        self._tmp = tmp
        self._new = new
        self._bases: set[str] | None = None

    def place(self, source: Path, base: str, size: int, wsize: int, copy: bool = True) -> str:
        """Link ``source`` into ``tmp/`` (or, where it cannot be linked and
        ``copy`` allows, copy and fsync it) and rename it into ``new/``."""
        name = f"{base},S={size},W={wsize}"
        Maildir._place_in_tmp(source, name, self._tmp, copy)
        os.rename(name, name, src_dir_fd=self._tmp, dst_dir_fd=self._new)
        return name

    def has_delivery(self, base: str) -> bool:
        """Whether ``new/`` or ``cur/`` holds this base name (listed once per target)."""
        if self._bases is None:
            self._bases = self.maildir.delivered_bases()
        return base in self._bases

    @property
    def new_fd(self) -> int:
        """The open ``new/``, for an fsync made elsewhere (instead of ``sync``)."""
        return self._new

    def sync(self) -> None:
        os.fsync(self._new)

    def close(self) -> None:
        for fd in (self._tmp, self._new):
            if fd >= 0:
                os.close(fd)
        self._tmp = self._new = -1

    def __enter__(self) -> DeliveryTarget:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
