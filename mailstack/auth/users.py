"""The users file: one ``address:{ARGON2ID}$argon2id$...`` line per mailbox.

The format is Dovecot's passwd-file scheme prefix, so the file reads like
what administrators already know. Only argon2id hashes (argon2-cffi) are
accepted; lines starting with ``#`` and blank lines are ignored.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from mailstack.addresses import BadAddress, canonical
from mailstack.auth.files import ReloadingFile, locked, write_atomically

SCHEME = "{ARGON2ID}"
_hasher = PasswordHasher()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


# Verified when the user does not exist, so that a wrong name and a wrong
# password take the same time (SECURITY-TESTS AUTH-6). It has the hasher's
# parameters and random salt and digest: verifying it costs a real
# verification, but building it costs nothing, unlike hashing at import time
# (which every run of the CLI would pay).
_DUMMY_HASH = (f"$argon2id$v=19$m={_hasher.memory_cost},t={_hasher.time_cost},"
               f"p={_hasher.parallelism}${_b64(os.urandom(_hasher.salt_len))}"
               f"${_b64(os.urandom(_hasher.hash_len))}")


def hash_password(password: str) -> str:
    """The ``{ARGON2ID}...`` form of ``password`` for the users file."""
    return SCHEME + _hasher.hash(password)


def verify_password(stored: str | None, password: str) -> bool:
    """Check ``password`` against a stored hash; slow on purpose, run it in a thread."""
    try:
        if stored is None:
            _hasher.verify(_DUMMY_HASH, password)
            return False
        return _hasher.verify(stored[len(SCHEME):], password)
    except (VerificationError, InvalidHashError):
        return False


def parse_users(lines: list[str], path: Path) -> dict[str, str]:
    users: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        address, sep, stored = line.partition(":")
        if not sep or not stored.startswith(SCHEME + "$argon2id$"):
            raise ValueError(f"{path}:{number}: expected address:{SCHEME}<argon2id hash>")
        try:
            key = canonical(address)
        except BadAddress as e:
            raise ValueError(f"{path}:{number}: {e}") from None
        if key in users:
            raise ValueError(f"{path}:{number}: {key} is listed twice")
        users[key] = stored
    return users


class Users:
    """The users known to this server, kept in step with the file on disk."""

    def __init__(self, path: Path, reactor=None):
        """``reactor``: the server's, to stat the file once per reactor turn."""
        self.path = Path(path)
        self._file = ReloadingFile(self.path, parse_users, reactor)

    def exists(self, address: str) -> bool:
        return address in self._file.get()

    def stored_hash(self, address: str) -> str | None:
        return self._file.get().get(address)

    def addresses(self) -> list[str]:
        return sorted(self._file.get())

    def check_password(self, address: str, password: str) -> bool:
        """Blocking argon2 verification; callers run it off the reactor thread."""
        return verify_password(self.stored_hash(address), password)

    # Editing (the CLI). Each edit holds the lock and rewrites the whole file.
    def set_password(self, address: str, password: str, *, create: bool) -> None:
        address = canonical(address)
        with locked(self.path):
            users = self._read_fresh()
            if create and address in users:
                raise KeyError(f"{address} already exists")
            if not create and address not in users:
                raise KeyError(f"{address} does not exist")
            users[address] = hash_password(password)
            self._write(users)

    def remove(self, address: str) -> None:
        address = canonical(address)
        with locked(self.path):
            users = self._read_fresh()
            if users.pop(address, None) is None:
                raise KeyError(f"{address} does not exist")
            self._write(users)

    def _read_fresh(self) -> dict[str, str]:
        lines = self.path.read_text("utf-8").splitlines() if self.path.exists() else []
        return parse_users(lines, self.path)

    def _write(self, users: dict[str, str]) -> None:
        text = "".join(f"{a}:{h}\n" for a, h in sorted(users.items()))
        write_atomically(self.path, text)
