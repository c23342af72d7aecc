"""The aliases file: where mail for an address is sent instead, or as well.

Format, one alias per line (``#`` comments allowed)::

    postmaster@example.test: demo@example.test
    team@example.test: alice@example.test, bob@elsewhere.example
    @example.test: demo@example.test          # catch-all for the domain

Resolution of a recipient (like Postfix's virtual_alias_maps): an exact alias
wins; otherwise a real user receives the mail; otherwise the domain's
catch-all applies. Targets are expanded again (a target that is itself an
alias), up to ``MAX_DEPTH`` levels, with loops cut.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from mailstack.addresses import BadAddress, canonical, canonical_domain
from mailstack.auth.files import ReloadingFile, locked, write_atomically

MAX_DEPTH = 8

# A comment starts at a "#" that begins the line or follows white space: "#"
# is a valid character inside a local part (RFC 5322 atext), "a#b@x".
_COMMENT = re.compile(r"(?:^|\s)#.*")


def parse_aliases(lines: list[str], path: Path) -> dict[str, tuple[str, ...]]:
    aliases: dict[str, tuple[str, ...]] = {}
    for number, line in enumerate(lines, 1):
        line = _COMMENT.sub("", line, count=1).strip()
        if not line:
            continue
        source, sep, rest = line.partition(":")
        targets = [t.strip() for t in rest.split(",") if t.strip()]
        if not sep or not targets:
            raise ValueError(f"{path}:{number}: expected 'address: target[, target...]'")
        try:
            key = _canonical_source(source.strip())
            aliases[key] = tuple(canonical(t) for t in targets)
        except BadAddress as e:
            raise ValueError(f"{path}:{number}: {e}") from None
    return aliases


def _canonical_source(source: str) -> str:
    if source.startswith("@"):
        return "@" + canonical_domain(source[1:])
    return canonical(source)


class Aliases:
    """The alias map, kept in step with the file on disk."""

    def __init__(self, path: Path, reactor=None):
        """``reactor``: the server's, to stat the file once per reactor turn."""
        self.path = Path(path)
        self._file = ReloadingFile(self.path, parse_aliases, reactor)

    def items(self) -> list[tuple[str, tuple[str, ...]]]:
        return sorted(self._file.get().items())

    def resolve(self, address: str, is_user: Callable[[str], bool],
                is_local_domain: Callable[[str], bool]) -> list[str] | None:
        """Final recipients of ``address``, or None when nobody receives it.

        ``address`` is canonical. The result holds local users and remote
        addresses, each once, in a stable order.
        """
        table = self._file.get()
        result: list[str] = []
        seen: set[str] = set()

        def expand(addr: str, depth: int) -> bool:
            if addr in seen:
                return True
            seen.add(addr)
            domain = addr.rpartition("@")[2]
            targets = table.get(addr)
            if targets is None and not is_local_domain(domain):
                result.append(addr)          # remote target
                return True
            if targets is None and is_user(addr):
                result.append(addr)
                return True
            if targets is None:
                targets = table.get("@" + domain)
            if targets is None or depth >= MAX_DEPTH:
                return False
            found = False
            for target in targets:
                if target == addr and is_user(addr):
                    result.append(addr)      # "a: a, b" keeps a copy for a
                    found = True
                else:
                    found = expand(target, depth + 1) or found
            return found

        return result if expand(address, 0) and result else None

    # Editing (the CLI).
    def add(self, source: str, targets: list[str]) -> None:
        key = _canonical_source(source)
        new = tuple(canonical(t) for t in targets)
        with locked(self.path):
            table = self._read_fresh()
            merged = list(table.get(key, ()))
            merged += [t for t in new if t not in merged]
            table[key] = tuple(merged)
            self._write(table)

    def remove(self, source: str) -> None:
        key = _canonical_source(source)
        with locked(self.path):
            table = self._read_fresh()
            if table.pop(key, None) is None:
                raise KeyError(f"{key} is not an alias")
            self._write(table)

    def _read_fresh(self) -> dict[str, tuple[str, ...]]:
        lines = self.path.read_text("utf-8").splitlines() if self.path.exists() else []
        return parse_aliases(lines, self.path)

    def _write(self, table: dict[str, tuple[str, ...]]) -> None:
        text = "".join(f"{s}: {', '.join(t)}\n" for s, t in sorted(table.items()))
        write_atomically(self.path, text, mode=0o644)
