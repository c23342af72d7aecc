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

    def _open(self, create: bool) -> int:
        """A descriptor of this Maildir, walked without following symlinks."""
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
                    child = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except OSError as e:
                    if e.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise UnsafePath(e.errno, f"refusing a symlink or file at {name!r}",
                                         str(self.path)) from None
                    raise
                os.close(fd)
                fd = child
            if create:
                for sub in SUBDIRS:
                    try:
                        os.mkdir(sub, 0o700, dir_fd=fd)
                    except FileExistsError:
                        pass
            return fd
        except BaseException:
            os.close(fd)
            raise

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
        name = f"{base},S={size},W={wsize}"
        top = self._open(create=True)
        try:
            tmp, new = self._tmp_and_new(top)
            try:
                self._place_in_tmp(source, name, tmp)
                os.rename(name, name, src_dir_fd=tmp, dst_dir_fd=new)
                os.fsync(new)
            finally:
                os.close(tmp)
                os.close(new)
        finally:
            os.close(top)
        return name

    def _tmp_and_new(self, top: int) -> tuple[int, int]:
        """Both descriptors, or neither (none leaks when ``new`` is refused)."""
        tmp = self._subdir(top, "tmp")
        try:
            return tmp, self._subdir(top, "new")
        except BaseException:
            os.close(tmp)
            raise

    @staticmethod
    def _place_in_tmp(source: Path, name: str, tmp: int) -> None:
        for _ in range(2):
            try:
                os.link(source, name, dst_dir_fd=tmp, follow_symlinks=False)
                return
            except FileExistsError:
                # Left by an attempt that crashed before the rename (MD-3).
                os.unlink(name, dir_fd=tmp)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
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

    def has_delivery(self, base: str) -> bool:
        """Whether a message with this base name is in ``new/`` or ``cur/``.

        Used only when the spool replays after a restart, so its listing cost
        is paid once per interrupted delivery, not per message.
        """
        try:
            top = self._open(create=False)
        except FileNotFoundError:
            return False
        try:
            for sub in ("new", "cur"):
                fd = self._subdir(top, sub)
                try:
                    for entry in os.listdir(fd):
                        if entry.split(",", 1)[0].split(":", 1)[0] == base:
                            return True
                finally:
                    os.close(fd)
        finally:
            os.close(top)
        return False

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
