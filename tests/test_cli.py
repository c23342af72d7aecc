"""The ``mailstack`` admin command, run as a real process against a real instance."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from twisted.trial import unittest

from mailstack.auth.aliases import Aliases
from mailstack.auth.users import Users
from tests.support.instance import DOMAIN, write_instance

PASSWORD_LINE = re.compile(r"^Created (\S+) with the password: (\S+)$", re.M)


class CLITestCase(unittest.SynchronousTestCase):
    def setUp(self):
        self.root = Path(self.mktemp()).resolve()
        self.config = write_instance(self.root, users=(), tls=False)
        self.users_file = self.root / "users"
        self.aliases_file = self.root / "aliases"

    def run_cli(self, *args: str, stdin: str = "", config: bool = True,
                env: dict | None = None) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "mailstack.cli", *args]
        if config:
            argv += ["--config", str(self.config)]
        environ = {k: v for k, v in os.environ.items() if k != "MAILSTACK_CONFIG"}
        environ.update(env or {})
        # Run from elsewhere: nothing may depend on the working directory.
        return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60,
                              cwd=self.root.parent, env=environ)

    def assertSucceeds(self, done: subprocess.CompletedProcess) -> str:
        self.assertEqual((done.returncode, done.stderr), (0, ""), done.stdout)
        return done.stdout

    def assertFailsWith(self, done: subprocess.CompletedProcess, text: str) -> None:
        """Exit status 1 and one line on stderr that says why."""
        self.assertEqual(done.returncode, 1, done.stderr)
        lines = done.stderr.splitlines()
        self.assertEqual(len(lines), 1, done.stderr)
        self.assertTrue(lines[0].startswith("mailstack: "), lines[0])
        self.assertIn(text, lines[0])
        self.assertNotIn("Traceback", done.stderr)

    def add_user(self, address: str, password: str = "first password") -> None:
        self.assertSucceeds(self.run_cli("user", "add", address, "--password-stdin",
                                         stdin=password + "\n"))


class InitTests(CLITestCase):
    def setUp(self):
        super().setUp()
        # The config names a certificate that does not exist yet.
        with open(self.config, "a") as f:
            f.write('[tls]\ncertificate = "tls/cert.pem"\nprivate_key = "tls/key.pem"\n')
        self.cert = self.root / "tls" / "cert.pem"
        self.key = self.root / "tls" / "key.pem"

    def test_init_with_user(self):
        out = self.assertSucceeds(self.run_cli("init", "--user", "Demo@Example.TEST"))
        self.assertTrue((self.root / "maildirs").is_dir())
        self.assertTrue((self.root / "spool").is_dir())
        self.assertIn("Created a self-signed certificate for mail.example.test in "
                      f"{self.cert}", out)
        self.assertIn(b"-----BEGIN CERTIFICATE-----", self.cert.read_bytes())
        self.assertEqual(os.stat(self.key).st_mode & 0o777, 0o600)
        [(address, password)] = PASSWORD_LINE.findall(out)
        self.assertEqual(address, "demo@example.test")
        self.assertGreaterEqual(len(password), 12)
        self.assertTrue(Users(self.users_file).check_password("demo@example.test", password))
        self.assertEqual(Aliases(self.aliases_file).items(),
                         [(f"postmaster@{DOMAIN}", ("demo@example.test",))])

        # Again: nothing is replaced and no password is printed.
        before = {p: p.read_bytes() for p in (self.cert, self.key, self.users_file,
                                             self.aliases_file)}
        out = self.assertSucceeds(self.run_cli("init", "--user", "demo@example.test"))
        self.assertNotIn("password:", out)
        self.assertNotIn("certificate", out)
        self.assertIn("demo@example.test exists already; its password is unchanged.", out)
        self.assertEqual({p: p.read_bytes() for p in before}, before)

    def test_init_keeps_an_existing_postmaster_alias(self):
        Aliases(self.aliases_file).add(f"postmaster@{DOMAIN}", ["boss@example.test"])
        self.assertSucceeds(self.run_cli("init", "--user", "demo@example.test"))
        self.assertEqual(Aliases(self.aliases_file).items(),
                         [(f"postmaster@{DOMAIN}", ("boss@example.test",))])

    def test_init_without_user(self):
        out = self.assertSucceeds(self.run_cli("init"))
        self.assertIn("Instance ready", out)
        self.assertTrue(self.cert.exists())
        self.assertFalse(self.users_file.exists())

    def test_init_refuses_a_foreign_domain(self):
        done = self.run_cli("init", "--user", "demo@elsewhere.example")
        self.assertFailsWith(done, "demo@elsewhere.example: the domain is not in server.domains")
        self.assertFalse(self.users_file.exists())


class UserTests(CLITestCase):
    def test_add_list_passwd_del(self):
        out = self.assertSucceeds(self.run_cli("user", "add", "Bob@Example.TEST",
                                               "--password-stdin", stdin="first password\n"))
        self.assertEqual(out, "Created bob@example.test\n")
        self.add_user("alice@example.test")
        self.assertEqual(self.assertSucceeds(self.run_cli("user", "list")),
                         "alice@example.test\nbob@example.test\n")
        users = Users(self.users_file)
        self.assertTrue(users.check_password("bob@example.test", "first password"))

        out = self.assertSucceeds(self.run_cli("user", "passwd", "bob@example.test",
                                               "--password-stdin", stdin="second password\r\n"))
        self.assertEqual(out, "Changed the password of bob@example.test\n")
        self.assertTrue(users.check_password("bob@example.test", "second password"))
        self.assertFalse(users.check_password("bob@example.test", "first password"))

        out = self.assertSucceeds(self.run_cli("user", "del", "BOB@example.test"))
        self.assertIn("Removed bob@example.test", out)
        self.assertEqual(self.assertSucceeds(self.run_cli("user", "list")), "alice@example.test\n")
        self.assertEqual(os.stat(self.users_file).st_mode & 0o777, 0o600)

    def test_user_exists(self):
        self.add_user("bob@example.test")
        before = self.users_file.read_bytes()
        done = self.run_cli("user", "add", "BOB@example.test", "--password-stdin",
                            stdin="other password\n")
        self.assertFailsWith(done, "bob@example.test already exists")
        self.assertEqual(self.users_file.read_bytes(), before)

    def test_unknown_user(self):
        self.assertFailsWith(self.run_cli("user", "del", "ghost@example.test"),
                             "ghost@example.test does not exist")
        done = self.run_cli("user", "passwd", "ghost@example.test", "--password-stdin",
                            stdin="long enough\n")
        self.assertFailsWith(done, "ghost@example.test does not exist")
        self.assertFalse(self.users_file.exists())

    def test_domain_not_local(self):
        done = self.run_cli("user", "add", "bob@elsewhere.example", "--password-stdin",
                            stdin="long enough\n")
        self.assertFailsWith(done, "bob@elsewhere.example: the domain is not in server.domains")

    def test_bad_addresses(self):
        for address in ("../bob@example.test", "bob/../alice@example.test", "#bob@example.test"):
            done = self.run_cli("user", "add", address, "--password-stdin", stdin="long enough\n")
            self.assertFailsWith(done, repr(address))
        self.assertFalse(self.users_file.exists())

    def test_short_or_missing_password(self):
        for stdin in ("short\n", ""):
            done = self.run_cli("user", "add", "bob@example.test", "--password-stdin", stdin=stdin)
            self.assertFailsWith(done, "the password must have at least 8 characters")
        self.assertFalse(self.users_file.exists())


class AliasTests(CLITestCase):
    def test_add_list_del(self):
        out = self.assertSucceeds(self.run_cli("alias", "add", "Sales@Example.TEST",
                                               "alice@example.test", "Bob@Elsewhere.Example"))
        self.assertEqual(out, "sales@example.test -> alice@example.test, bob@elsewhere.example\n")
        self.assertSucceeds(self.run_cli("alias", "add", "@example.test", "demo@example.test"))
        self.assertSucceeds(self.run_cli("alias", "add", "sales@example.test", "carol@example.test",
                                         "alice@example.test"))
        self.assertEqual(self.assertSucceeds(self.run_cli("alias", "list")),
                         "@example.test: demo@example.test\n"
                         "sales@example.test: alice@example.test, bob@elsewhere.example, "
                         "carol@example.test\n")
        self.assertSucceeds(self.run_cli("alias", "del", "@EXAMPLE.TEST"))
        self.assertEqual(self.assertSucceeds(self.run_cli("alias", "list")),
                         "sales@example.test: alice@example.test, bob@elsewhere.example, "
                         "carol@example.test\n")

    def test_errors(self):
        self.assertFailsWith(self.run_cli("alias", "add", "sales@elsewhere.example",
                                          "alice@example.test"),
                             "sales@elsewhere.example: the domain is not in server.domains")
        self.assertFailsWith(self.run_cli("alias", "add", "@elsewhere.example",
                                          "alice@example.test"),
                             "@elsewhere.example: the domain is not in server.domains")
        self.assertFailsWith(self.run_cli("alias", "add", "sales@example.test",
                                          "../alice@example.test"),
                             "'../alice@example.test'")
        self.assertFailsWith(self.run_cli("alias", "add", "../sales@example.test",
                                          "alice@example.test"),
                             "'../sales@example.test'")
        self.assertFailsWith(self.run_cli("alias", "del", "sales@example.test"),
                             "sales@example.test is not an alias")
        self.assertFalse(self.aliases_file.exists())


class InvocationTests(CLITestCase):
    def test_config_before_the_command(self):
        self.add_user("bob@example.test")
        done = self.run_cli("--config", str(self.config), "user", "list", config=False)
        self.assertEqual(self.assertSucceeds(done), "bob@example.test\n")
        done = self.run_cli("-c", str(self.config), "alias", "list", config=False)
        self.assertSucceeds(done)

    def test_config_from_the_environment(self):
        self.add_user("bob@example.test")
        done = self.run_cli("user", "list", config=False,
                            env={"MAILSTACK_CONFIG": str(self.config)})
        self.assertEqual(self.assertSucceeds(done), "bob@example.test\n")

    def test_bad_config(self):
        bad = self.root / "bad.toml"
        bad.write_text('[server]\ndomains = "example.test"\n')
        done = self.run_cli("user", "list", "--config", str(bad), config=False)
        self.assertEqual(done.returncode, 1)
        self.assertIn(f"mailstack: {bad}: 1 problem(s)", done.stderr)
        self.assertIn("server.domains: expected a list of strings", done.stderr)
        self.assertNotIn("Traceback", done.stderr)

    def test_unusable_users_file(self):
        self.users_file.mkdir()
        self.assertFailsWith(self.run_cli("user", "list"), f"{self.users_file}: Is a directory")

    def test_no_command(self):
        done = self.run_cli(config=False)
        self.assertEqual(done.returncode, 2)
        self.assertIn("usage: mailstack", done.stdout)
