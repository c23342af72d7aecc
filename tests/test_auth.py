"""Users, aliases and the directory: parsing, passwords, reloading, resolution.

Real files in temporary directories. Password hashes for the fixtures use
cheap argon2id parameters (the stored hash carries its own parameters), so
only the tests of ``hash_password`` itself pay for the real cost.
"""

from __future__ import annotations

import os
from pathlib import Path

from argon2 import PasswordHasher, extract_parameters
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.python import threadable
from twisted.trial import unittest

from mailstack.addresses import MAX_LOCAL, BadAddress, canonical, canonical_domain, split
from mailstack.auth import aliases as aliases_module
from mailstack.auth.aliases import Aliases, parse_aliases
from mailstack.auth.directory import Destination, Directory
from mailstack.auth import users as users_module
from mailstack.auth.files import ReloadingFile, write_atomically
from mailstack.auth.users import SCHEME, Users, hash_password, parse_users, verify_password

_cheap = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


def cheap_hash(password: str) -> str:
    return SCHEME + _cheap.hash(password)


HASH_A = cheap_hash("password-a")
HASH_B = cheap_hash("password-b")


class TempFiles:
    def path(self, name: str) -> Path:
        directory = Path(self.mktemp())
        directory.mkdir(parents=True)
        return directory / name

    def replace(self, path: Path, text: str) -> None:
        """Change a file the way an editor or the CLI does: a new file renamed over it."""
        write_atomically(path, text)


class UsersFileTests(TempFiles, unittest.SynchronousTestCase):
    def test_parses_comments_blank_lines_and_canonical_names(self):
        lines = ["# users", "", "  Demo@Example.TEST:" + HASH_A, "alice@bücher.example:" + HASH_B]
        users = parse_users(lines, Path("users"))
        self.assertEqual(users, {"demo@example.test": HASH_A,
                                 "alice@xn--bcher-kva.example": HASH_B})

    def test_bad_lines_name_file_and_line(self):
        cases = [
            ("demo@example.test " + HASH_A, "users:3: expected address:{ARGON2ID}<argon2id hash>"),
            ("demo@example.test:{SHA512-CRYPT}$6$abc", "users:3: expected address:{ARGON2ID}"),
            ("demo@example.test:" + HASH_A.replace("$argon2id$", "$argon2i$"),
             "users:3: expected address:{ARGON2ID}"),
            ("demo@example.test:", "users:3: expected address:{ARGON2ID}"),
            ("../bob@example.test:" + HASH_A, "users:3: '../bob@example.test': the part before @"),
            ("bob:" + HASH_A, "users:3: 'bob' is not of the form user@domain"),
            ("bob@exa_mple.test:" + HASH_A, "users:3: 'exa_mple.test' is not a valid domain"),
            ("ALICE@example.test:" + HASH_B, "users:3: alice@example.test is listed twice"),
        ]
        for line, message in cases:
            lines = ["# comment", "alice@example.test:" + HASH_A, line]
            e = self.assertRaises(ValueError, parse_users, lines, Path("users"))
            self.assertTrue(str(e).startswith(message), (line, str(e)))

    def test_broken_file_stops_start_up(self):
        path = self.path("users")
        path.write_text("alice@example.test:" + HASH_A + "\nnonsense\n")
        e = self.assertRaises(ValueError, Users, path)
        self.assertIn(f"{path}:2:", str(e))

    def test_missing_file_means_no_users(self):
        users = Users(self.path("users"))
        self.assertEqual(users.addresses(), [])
        self.assertFalse(users.check_password("demo@example.test", "password-a"))


class PasswordTests(TempFiles, unittest.SynchronousTestCase):
    def setUp(self):
        self.file = self.path("users")
        self.file.write_text(f"alice@example.test:{HASH_A}\nbob@example.test:{HASH_B}\n"
                             "carol@example.test:{ARGON2ID}$argon2id$not-a-hash\n")
        self.users = Users(self.file)

    def test_right_password(self):
        self.assertTrue(self.users.check_password("alice@example.test", "password-a"))
        self.assertTrue(self.users.check_password("bob@example.test", "password-b"))

    def test_wrong_password(self):
        self.assertFalse(self.users.check_password("alice@example.test", "password-b"))
        self.assertFalse(self.users.check_password("alice@example.test", ""))
        self.assertFalse(self.users.check_password("alice@example.test", "password-a "))

    def test_unknown_user(self):
        # Still verifies a dummy hash (AUTH-6 timing), then answers False.
        self.assertFalse(self.users.check_password("nobody@example.test", "password-a"))
        self.assertFalse(verify_password(None, "mailstack-no-such-user"))

    def test_corrupt_hash_is_a_failure_not_a_crash(self):
        self.assertFalse(self.users.check_password("carol@example.test", "x"))

    def test_unknown_user_costs_a_real_verification(self):
        # The dummy hash has the parameters of a real one (AUTH-6).
        self.assertEqual(extract_parameters(users_module._DUMMY_HASH),
                         extract_parameters(hash_password("x")[len(SCHEME):]))

    def test_hash_password_uses_argon2id_and_verifies(self):
        stored = hash_password("correct horse")
        self.assertTrue(stored.startswith("{ARGON2ID}$argon2id$"))
        self.assertTrue(verify_password(stored, "correct horse"))
        self.assertFalse(verify_password(stored, "correct horse!"))

    def test_set_password_create_and_change(self):
        self.assertRaises(KeyError, self.users.set_password, "Alice@Example.TEST", "x" * 8,
                          create=True)
        self.assertRaises(KeyError, self.users.set_password, "dave@example.test", "x" * 8,
                          create=False)
        self.users.set_password("Bob@Example.TEST", "new password", create=False)
        self.assertTrue(self.users.check_password("bob@example.test", "new password"))
        self.assertFalse(self.users.check_password("bob@example.test", "password-b"))
        # The others are untouched and the file stays private.
        self.assertTrue(self.users.check_password("alice@example.test", "password-a"))
        self.assertEqual(os.stat(self.file).st_mode & 0o777, 0o600)

    def test_remove(self):
        self.users.remove("ALICE@example.test")
        self.assertFalse(self.users.exists("alice@example.test"))
        self.assertFalse(self.users.check_password("alice@example.test", "password-a"))
        self.assertRaises(KeyError, self.users.remove, "alice@example.test")
        self.assertRaises(BadAddress, self.users.remove, "../alice@example.test")


class ReloadTests(TempFiles, unittest.SynchronousTestCase):
    def setUp(self):
        self.file = self.path("users")
        self.file.write_text(f"alice@example.test:{HASH_A}\n")
        self.users = Users(self.file)

    def test_new_user_seen_without_restart(self):
        self.assertFalse(self.users.exists("bob@example.test"))
        self.replace(self.file, f"alice@example.test:{HASH_A}\nbob@example.test:{HASH_B}\n")
        self.assertTrue(self.users.exists("bob@example.test"))
        self.assertTrue(self.users.check_password("bob@example.test", "password-b"))

    def test_edit_in_place_is_seen(self):
        with open(self.file, "a") as f:
            f.write(f"bob@example.test:{HASH_B}\n")
        self.assertEqual(self.users.addresses(), ["alice@example.test", "bob@example.test"])

    def test_edit_by_another_process_through_the_cli_code(self):
        Users(self.file).remove("alice@example.test")
        self.assertFalse(self.users.exists("alice@example.test"))

    def test_broken_edit_keeps_the_previous_version(self):
        self.replace(self.file, f"alice@example.test:{HASH_B}\nthis is not a user line\n")
        self.assertTrue(self.users.check_password("alice@example.test", "password-a"))
        self.assertIn(f"{self.file}:2:", str(self.users._file.last_error))
        # Fixed: the new version takes over and the error is cleared.
        self.replace(self.file, f"alice@example.test:{HASH_B}\n")
        self.assertTrue(self.users.check_password("alice@example.test", "password-b"))
        self.assertIsNone(self.users._file.last_error)

    def test_deleted_file_means_no_users(self):
        self.file.unlink()
        self.assertEqual(self.users.addresses(), [])

    def test_broken_version_is_not_parsed_on_every_lookup(self):
        calls = []

        def parse(lines, path):
            calls.append(list(lines))
            if "bad" in lines:
                raise ValueError(f"{path}:1: bad")
            return tuple(lines)

        path = self.path("list")
        path.write_text("one\n")
        watched = ReloadingFile(path, parse)
        self.assertEqual(watched.get(), ("one",))
        self.replace(path, "bad\n")
        for _ in range(5):
            self.assertEqual(watched.get(), ("one",))
        self.assertEqual(calls, [[], ["one"], ["bad"]])
        self.replace(path, "two\n")
        self.assertEqual(watched.get(), ("two",))

    def test_unchanged_file_is_not_parsed_again(self):
        calls = []
        path = self.path("list")
        path.write_text("one\n")
        watched = ReloadingFile(path, lambda lines, p: calls.append(lines) or tuple(lines))
        for _ in range(5):
            watched.get()
        self.assertEqual(len(calls), 2)  # the empty start value, then the file


    def test_on_the_reactor_thread_one_stat_per_turn(self):
        class Reactor(Clock):
            running = True

        threadable.registerAsIOThread()  # this thread, where trial runs its reactor
        reactor = Reactor()
        path = self.path("list")
        path.write_text("one\n")
        watched = ReloadingFile(path, lambda lines, p: tuple(lines), reactor)
        self.replace(path, "two\n")
        self.assertEqual(watched.get(), ("one",), "changed within the turn")
        reactor.advance(0)
        self.assertEqual(watched.get(), ("two",))
        self.replace(path, "three\n")
        reactor.advance(0)
        self.assertEqual(watched.get(), ("three",))


class AliasFileTests(TempFiles, unittest.SynchronousTestCase):
    def test_parses_comments_catch_all_and_several_targets(self):
        lines = [
            "# aliases",
            "Sales@Example.TEST: Alice@example.test, bob@elsewhere.example  # the team",
            "@EXAMPLE.test.: demo@example.test",
            "a#b@example.test: alice@example.test",
            "",
        ]
        self.assertEqual(parse_aliases(lines, Path("aliases")), {
            "sales@example.test": ("alice@example.test", "bob@elsewhere.example"),
            "@example.test": ("demo@example.test",),
            "a#b@example.test": ("alice@example.test",),
        })

    def test_bad_lines_name_file_and_line(self):
        cases = [
            ("sales@example.test alice@example.test", "aliases:2: expected 'address: target"),
            ("sales@example.test:", "aliases:2: expected 'address: target"),
            ("sales@example.test: , ,", "aliases:2: expected 'address: target"),
            ("sales@example.test: ../alice@example.test", "aliases:2: '../alice@example.test'"),
            ("../sales@example.test: alice@example.test", "aliases:2: '../sales@example.test'"),
            ("@exa mple.test: alice@example.test", "aliases:2: 'exa mple.test' is not a valid"),
        ]
        for line, message in cases:
            e = self.assertRaises(ValueError, parse_aliases, ["# x", line], Path("aliases"))
            self.assertTrue(str(e).startswith(message), (line, str(e)))

    def test_add_merges_and_round_trips_through_the_file(self):
        path = self.path("aliases")
        aliases = Aliases(path)
        aliases.add("Team@Example.TEST", ["alice@example.test", "bob@example.test"])
        aliases.add("team@example.test", ["BOB@example.test", "carol@elsewhere.example"])
        aliases.add("a#b@example.test", ["alice@example.test"])
        expected = [("a#b@example.test", ("alice@example.test",)),
                    ("team@example.test", ("alice@example.test", "bob@example.test",
                                           "carol@elsewhere.example"))]
        self.assertEqual(aliases.items(), expected)
        self.assertEqual(Aliases(path).items(), expected)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o644)

    def test_add_refuses_bad_addresses_and_leaves_the_file_alone(self):
        path = self.path("aliases")
        aliases = Aliases(path)
        aliases.add("team@example.test", ["alice@example.test"])
        before = path.read_bytes()
        self.assertRaises(BadAddress, aliases.add, "team@example.test", ["bob/../x@example.test"])
        self.assertRaises(BadAddress, aliases.add, "#team@example.test", ["alice@example.test"])
        self.assertEqual(path.read_bytes(), before)

    def test_remove(self):
        path = self.path("aliases")
        aliases = Aliases(path)
        aliases.add("@example.test", ["alice@example.test"])
        aliases.remove("@EXAMPLE.TEST")
        self.assertEqual(aliases.items(), [])
        self.assertRaises(KeyError, aliases.remove, "@example.test")


class ResolveTests(TempFiles, unittest.SynchronousTestCase):
    """Directory.resolve: exact alias, then user, then catch-all; chains bounded."""

    def setUp(self):
        users = self.path("users")
        users.write_text("".join(f"{a}:{HASH_A}\n" for a in (
            "alice@example.test", "bob@example.test", "demo@example.test", "info@example.org")))
        self.aliases_file = users.with_name("aliases")
        self.directory = Directory(("example.test", "example.org"), Users(users),
                                   Aliases(self.aliases_file))

    def alias(self, text: str) -> None:
        self.replace(self.aliases_file, text)

    def resolve(self, address: str):
        found = self.directory.resolve(address)
        return None if found is None else [(d.address, d.local) for d in found]

    def test_user(self):
        self.assertEqual(self.resolve("alice@example.test"), [("alice@example.test", True)])
        self.assertEqual(self.directory.resolve("ALICE@Example.TEST."),
                         [Destination("alice@example.test", True)])

    def test_unknown_user_without_catch_all(self):
        self.assertIsNone(self.resolve("nobody@example.test"))

    def test_exact_alias_beats_user_and_catch_all(self):
        self.alias("alice@example.test: bob@example.test\n@example.test: demo@example.test\n")
        self.assertEqual(self.resolve("alice@example.test"), [("bob@example.test", True)])

    def test_user_beats_catch_all(self):
        self.alias("@example.test: demo@example.test\n")
        self.assertEqual(self.resolve("bob@example.test"), [("bob@example.test", True)])
        self.assertEqual(self.resolve("anything@example.test"), [("demo@example.test", True)])
        # The catch-all is per domain.
        self.assertIsNone(self.resolve("anything@example.org"))

    def test_catch_all_to_an_unknown_address_of_its_own_domain(self):
        self.alias("@example.test: ghost@example.test\n")
        self.assertIsNone(self.resolve("anything@example.test"))

    def test_several_targets_with_a_remote_one(self):
        self.alias("team@example.test: alice@example.test, friend@elsewhere.example, "
                   "info@example.org, alice@example.test\n")
        self.assertEqual(self.resolve("team@example.test"), [
            ("alice@example.test", True), ("friend@elsewhere.example", False),
            ("info@example.org", True)])

    def test_unknown_targets_are_skipped(self):
        self.alias("team@example.test: ghost@example.test, bob@example.test\n"
                   "void@example.test: ghost@example.test\n")
        self.assertEqual(self.resolve("team@example.test"), [("bob@example.test", True)])
        self.assertIsNone(self.resolve("void@example.test"))

    def test_chain(self):
        self.alias("a@example.test: b@example.test\nb@example.test: c@example.org\n"
                   "c@example.org: demo@example.test, far@elsewhere.example\n")
        self.assertEqual(self.resolve("a@example.test"),
                         [("demo@example.test", True), ("far@elsewhere.example", False)])

    def test_diamond_delivers_once(self):
        self.alias("a@example.test: b@example.test, c@example.test\n"
                   "b@example.test: demo@example.test\nc@example.test: demo@example.test\n")
        self.assertEqual(self.resolve("a@example.test"), [("demo@example.test", True)])

    def test_loop_without_a_mailbox(self):
        self.alias("a@example.test: b@example.test\nb@example.test: a@example.test\n")
        self.assertIsNone(self.resolve("a@example.test"))
        self.alias("a@example.test: a@example.test\n")
        self.assertIsNone(self.resolve("a@example.test"))

    def test_loop_with_a_mailbox(self):
        self.alias("a@example.test: b@example.test\n"
                   "b@example.test: a@example.test, demo@example.test\n")
        self.assertEqual(self.resolve("a@example.test"), [("demo@example.test", True)])
        self.assertEqual(self.resolve("b@example.test"), [("demo@example.test", True)])

    def test_self_alias_keeps_a_copy(self):
        self.alias("alice@example.test: alice@example.test, bob@example.test\n")
        self.assertEqual(self.resolve("alice@example.test"),
                         [("alice@example.test", True), ("bob@example.test", True)])

    def test_self_alias_of_a_non_user(self):
        self.alias("list@example.test: list@example.test, bob@example.test\n")
        self.assertEqual(self.resolve("list@example.test"), [("bob@example.test", True)])

    def test_chain_depth_is_bounded(self):
        depth = aliases_module.MAX_DEPTH

        def chain(n):
            links = [f"h{i}@example.test: h{i + 1}@example.test\n" for i in range(n - 1)]
            return "".join(links) + f"h{n - 1}@example.test: demo@example.test\n"

        self.alias(chain(depth))
        self.assertEqual(self.resolve("h0@example.test"), [("demo@example.test", True)])
        self.alias(chain(depth + 1))
        self.assertIsNone(self.resolve("h0@example.test"))

    def test_wide_and_deep_alias_graph_terminates(self):
        # Every alias points to every other: bounded by the seen set, not by luck.
        names = [f"x{i}@example.test" for i in range(60)]
        self.alias("".join(f"{n}: {', '.join(names)}, demo@example.test\n" for n in names))
        self.assertEqual(self.resolve("x0@example.test"), [("demo@example.test", True)])

    def test_foreign_and_bad_addresses_resolve_to_nobody(self):
        # Resolving is not permission to relay (RELAY-1), nor a path to a file (AUTH-14).
        self.alias("@example.test: demo@example.test\n")
        for address in ("v@evil.test", "alice@example.test.evil.test", "alice@evilexample.test",
                        "../alice@example.test", "alice/../bob@example.test",
                        "alice\0@example.test", "alice", "", "v@[127.0.0.1]",
                        '"alice"@example.test'):
            self.assertIsNone(self.directory.resolve(address), address)

    def test_alias_file_change_is_seen(self):
        self.assertIsNone(self.resolve("sales@example.test"))
        self.alias("sales@example.test: alice@example.test\n")
        self.assertEqual(self.resolve("sales@example.test"), [("alice@example.test", True)])
        self.alias("sales@example.test alice@example.test\n")  # broken: keep the last good one
        self.assertEqual(self.resolve("sales@example.test"), [("alice@example.test", True)])


class LocalDomainTests(unittest.SynchronousTestCase):
    """RELAY-10, RELAY-11: exact, case-insensitive, trailing-dot-stripped, IDNA-consistent."""

    def setUp(self):
        self.directory = Directory(("example.test", "xn--bcher-kva.example"), None, None)

    def test_matches(self):
        for domain in ("example.test", "example.test.", "EXAMPLE.TEST", "Example.Test.",
                       "xn--bcher-kva.example", "bücher.example", "BÜCHER.example."):
            self.assertTrue(self.directory.is_local_domain(domain), domain)

    def test_traps(self):
        for domain in ("evilexample.test", "example.test.evil.test", "xample.test", "test",
                       "sub.example.test", "example.tes", "example.test..", "", ".",
                       "[127.0.0.1]", "example.test/..", "example test"):
            self.assertFalse(self.directory.is_local_domain(domain), domain)

    def test_primary_domain(self):
        self.assertEqual(self.directory.primary_domain, "example.test")
        self.assertEqual(Directory((), None, None).primary_domain, "localhost")


class CanonicalTests(unittest.SynchronousTestCase):
    """AUTH-14: canonicalise before any lookup, refuse path characters."""

    def test_canonical_forms(self):
        for given_, expected in [
            ("BOB@Example.TEST", "bob@example.test"),
            ("bob@LOCAL.TEST.", "bob@local.test"),
            ("Bob.Smith+tag@example.test", "bob.smith+tag@example.test"),
            ("bob@bücher.example", "bob@xn--bcher-kva.example"),
            ("  bob@example.test\n", "bob@example.test"),
            ("a" * MAX_LOCAL + "@example.test", "a" * MAX_LOCAL + "@example.test"),
        ]:
            self.assertEqual(canonical(given_), expected)

    def test_refused(self):
        for bad in [
            "../bob@example.test", "bob/../alice@example.test", "bob\0", "bob\0@example.test",
            ".bob@example.test", "bob.@example.test", "bo..b@example.test", "..@example.test",
            "bob", "BOB", "@example.test", "bob@", "bob@../etc", "bob@example..test",
            "bob@exa mple.test", "bob@example.test/x", "a@b@example.test", '"bob"@example.test',
            "bob smith@example.test", "bob\\@example.test", "#bob@example.test",
            "a" * (MAX_LOCAL + 1) + "@example.test", "bob@" + "a" * 64 + ".test",
            "bob@" + ".".join(["a" * 60] * 5), "bob@[127.0.0.1]", "bob@-example.test",
            "bob\r\n@example.test", "bøb@example.test",
        ]:
            self.assertRaises(BadAddress, canonical, bad)

    def test_canonical_domain(self):
        self.assertEqual(canonical_domain("Example.TEST."), "example.test")
        self.assertRaises(BadAddress, canonical_domain, "")
        self.assertRaises(BadAddress, canonical_domain, "a..b")

    def test_split(self):
        self.assertEqual(split("bob@example.test"), ("bob", "example.test"))

    @settings(max_examples=300, deadline=None)
    @given(st.text(max_size=80))
    def test_any_text_is_canonical_or_refused(self, text):
        try:
            address = canonical(text)
        except BadAddress:
            return
        local, domain = split(address)
        # Safe as directory names, and canonical is idempotent.
        self.assertNotIn("/", address)
        self.assertNotIn("\0", address)
        self.assertFalse(local.startswith((".", "#")))
        self.assertNotIn("..", local)
        self.assertEqual(address, address.lower())
        self.assertTrue(address.isascii())
        self.assertEqual(canonical(address), address)

    @settings(max_examples=200, deadline=None)
    @given(st.from_regex(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.\\]{1,20}@[A-Za-z0-9.\-]{1,30}",
                         fullmatch=True))
    def test_address_like_text_is_canonical_or_refused(self, text):
        try:
            address = canonical(text)
        except BadAddress:
            return
        self.assertNotIn("/", address)
        self.assertEqual(canonical(address), address)
