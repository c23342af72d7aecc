"""The configuration loader: defaults, paths, and every error reported at once.

Broken configurations live in ``tests/data/configs/*.toml`` (STYLE.md 10),
each naming the problems it must produce in ``# expect:`` lines; one test per
file is generated from that folder, so a new case is a new file.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

from twisted.trial import unittest

from mailstack import config
from mailstack.config import ConfigError, Listener, load

HERE = Path(__file__).resolve().parent
BROKEN = HERE / "data" / "configs"
ETC = HERE.parent / "etc"


def expected_problems(path: Path) -> list[str]:
    """The ``# expect: ...`` lines at the top of a broken config."""
    prefix = b"# expect: "
    return [line[len(prefix):].decode("utf-8") for line in path.read_bytes().splitlines()
            if line.startswith(prefix)]


class DefaultsTests(unittest.SynchronousTestCase):
    def write(self, text: str, name: str = "mailstack.toml") -> Path:
        directory = Path(self.mktemp())
        directory.mkdir(parents=True)
        path = directory / name
        path.write_text(text, "utf-8")
        return path

    def test_empty_file_gives_every_default(self):
        path = self.write("")
        loaded = load(path)
        base = path.resolve().parent
        self.assertEqual(loaded.source, path)
        self.assertEqual(loaded.listen, ())
        self.assertEqual(loaded.smtp, config.SMTPConfig())
        self.assertEqual(loaded.queue, config.QueueConfig())
        for section in ("auth", "submission", "pop3", "dns", "outbound"):
            self.assertEqual(getattr(loaded, section), type(getattr(loaded, section))())
        self.assertEqual(loaded.tls, config.TLSConfig())
        defaults = config.ServerConfig()
        for f in dataclasses.fields(config.ServerConfig):
            value = getattr(loaded.server, f.name)
            if isinstance(f.default, Path):
                # Default paths are relative to the config file, like written ones.
                self.assertEqual(value, base / f.default, f.name)
            else:
                self.assertEqual(value, getattr(defaults, f.name), f.name)

    def test_default_limits_meet_the_rfc_minimums(self):
        smtp = config.SMTPConfig()
        self.assertGreaterEqual(smtp.max_recipients, 100)
        self.assertGreaterEqual(smtp.max_command_line, 512)
        self.assertGreaterEqual(smtp.max_text_line, 1000)
        self.assertGreaterEqual(smtp.max_message_size, 65536)

    def test_relative_paths_resolve_against_the_config_directory(self):
        path = self.write(
            '[server]\nmail_root = "maildirs"\nspool_dir = "../var/spool"\n'
            'users_file = "/abs/users"\n'
            '[tls]\ncertificate = "tls/cert.pem"\nprivate_key = "tls/key.pem"\n',
            name="instance.toml")
        # A relative config path, read from another working directory.
        other = Path(self.mktemp()).resolve()
        other.mkdir()
        relative = os.path.relpath(path.resolve(), other)
        cwd = os.getcwd()
        os.chdir(other)
        try:
            loaded = load(relative)
        finally:
            os.chdir(cwd)
        base = path.resolve().parent
        self.assertEqual(loaded.server.mail_root, base / "maildirs")
        self.assertEqual(loaded.server.spool_dir, base / "../var/spool")
        self.assertEqual(loaded.server.users_file, Path("/abs/users"))
        self.assertEqual(loaded.server.aliases_file, base / "aliases")
        self.assertEqual(loaded.tls.certificate, base / "tls/cert.pem")
        self.assertEqual(loaded.tls.private_key, base / "tls/key.pem")
        self.assertTrue(loaded.server.mail_root.is_absolute())

    def test_values_and_types(self):
        path = self.write(
            '[server]\nhostname = "mx.example.test"\ndomains = ["example.test", "example.org"]\n'
            "threads = 4\n"
            "[smtp]\nidle_timeout = 30\nmax_recipients = 500\n"
            "[queue]\nretry_delay = 2.5\n"
            '[[listen]]\nprotocol = "smtp"\naddress = "::1"\nport = 2525\n'
            '[[listen]]\nprotocol = "smtp"\nport = 0\n'
            '[[listen]]\nprotocol = "smtp"\nport = 0\n')
        loaded = load(path)
        self.assertEqual(loaded.server.hostname, "mx.example.test")
        self.assertEqual(loaded.server.domains, ("example.test", "example.org"))
        self.assertEqual(loaded.server.threads, 4)
        # An integer is accepted where a number of seconds is expected.
        self.assertEqual(loaded.smtp.idle_timeout, 30.0)
        self.assertIsInstance(loaded.smtp.idle_timeout, float)
        self.assertEqual(loaded.smtp.max_recipients, 500)
        self.assertEqual(loaded.queue.retry_delay, 2.5)
        # Port 0 (ephemeral) may appear more than once.
        self.assertEqual(loaded.listen, (Listener("smtp", "::1", 2525),
                                         Listener("smtp", "127.0.0.1", 0),
                                         Listener("smtp", "127.0.0.1", 0)))
        self.assertEqual(loaded.listen[0].speaks, "smtp")
        self.assertEqual(loaded.listen[0].role, "mx")
        self.assertFalse(loaded.listen[0].implicit_tls)

    def test_empty_string_clears_an_optional_path(self):
        loaded = load(self.write('[tls]\ncertificate = ""\nprivate_key = ""\n'))
        self.assertIsNone(loaded.tls.certificate)
        self.assertIsNone(loaded.tls.private_key)

    def test_config_is_frozen(self):
        loaded = load(self.write(""))
        self.assertRaises(dataclasses.FrozenInstanceError, setattr, loaded.smtp,
                          "max_recipients", 1)


class ErrorReportTests(unittest.SynchronousTestCase):
    def test_missing_file(self):
        path = Path(self.mktemp()) / "nowhere.toml"
        e = self.assertRaises(ConfigError, load, path)
        self.assertEqual(e.path, path)
        self.assertEqual(e.problems, ["cannot read the file: No such file or directory"])
        self.assertIn(str(path), str(e))

    def test_directory_instead_of_file(self):
        path = Path(self.mktemp())
        path.mkdir()
        e = self.assertRaises(ConfigError, load, path)
        self.assertEqual(e.problems, ["cannot read the file: Is a directory"])

    def test_message_names_the_file_and_lists_every_problem(self):
        path = BROKEN / "several-problems.toml"
        e = self.assertRaises(ConfigError, load, path)
        lines = str(e).splitlines()
        self.assertEqual(lines[0], f"{path}: {len(e.problems)} problem(s) in the configuration:")
        self.assertEqual(lines[1:], [f"  - {p}" for p in e.problems])
        self.assertEqual(len(e.problems), len(expected_problems(path)))

    def test_every_broken_config_has_expectations(self):
        files = sorted(BROKEN.glob("*.toml"))
        self.assertGreater(len(files), 20)
        for path in files:
            self.assertTrue(expected_problems(path), f"{path.name} has no '# expect:' line")


class BrokenConfigTests(unittest.SynchronousTestCase):
    """One test per file of tests/data/configs (added below the class)."""

    def check(self, path: Path) -> None:
        expected = expected_problems(path)
        e = self.assertRaises(ConfigError, load, path)
        self.assertEqual(e.path, path)
        self.assertTrue(str(e).startswith(f"{path}: "))
        unmatched = list(e.problems)
        for want in expected:
            hits = [p for p in unmatched if want in p]
            self.assertTrue(hits, f"{path.name}: no problem contains {want!r}; got {e.problems}")
            unmatched.remove(hits[0])
        self.assertEqual(unmatched, [], f"{path.name}: unexpected problems")


def _add_case(path: Path) -> None:
    def test(self):
        self.check(path)

    name = "test_" + path.stem.replace("-", "_")
    test.__name__ = name
    test.__doc__ = f"tests/data/configs/{path.name}"
    setattr(BrokenConfigTests, name, test)


for _path in sorted(BROKEN.glob("*.toml")):
    _add_case(_path)


class SampleConfigTests(unittest.SynchronousTestCase):
    def test_production_sample_loads(self):
        # Loading checks types and values only; the /etc/letsencrypt files need not exist.
        loaded = load(ETC / "mailstack.toml")
        self.assertEqual(loaded.server.domains, ("example.com",))
        self.assertEqual(loaded.server.mail_root, Path("/var/lib/mailstack/maildirs"))
        self.assertEqual(loaded.tls.certificate,
                         Path("/etc/letsencrypt/live/mail.example.com/fullchain.pem"))
        self.assertEqual({(lst.protocol, lst.port) for lst in loaded.listen},
                         {("smtp", 25), ("submission", 587), ("submissions", 465),
                          ("pop3", 110), ("pop3s", 995)})
        self.assertTrue(all(lst.address == "0.0.0.0" for lst in loaded.listen))

    def test_production_sample_shows_the_defaults(self):
        # The sample says "what is shown is the default unless marked example".
        loaded = load(ETC / "mailstack.toml")
        self.assertEqual(loaded.smtp, config.SMTPConfig())
        self.assertEqual(loaded.queue, config.QueueConfig())
        for section in ("auth", "submission", "pop3", "dns", "outbound"):
            self.assertEqual(getattr(loaded, section), type(getattr(loaded, section))())
        self.assertEqual(loaded.server.threads, config.ServerConfig().threads)

    def test_development_config_loads(self):
        loaded = load(ETC / "mailstack.dev.toml")
        checkout = ETC.parent
        self.assertEqual(loaded.server.mail_root.resolve(), checkout / "maildirs")
        self.assertEqual(loaded.server.users_file.resolve(), checkout / "var/dev/users")
        self.assertIn(Listener("smtp", "127.0.0.1", 2525), loaded.listen)
        self.assertTrue(all(lst.address == "127.0.0.1" for lst in loaded.listen))


class TwistdTests(unittest.SynchronousTestCase):
    def test_twistd_stops_at_once_on_a_bad_config(self):
        directory = Path(self.mktemp()).resolve()
        directory.mkdir()
        bad = directory / "bad.toml"
        bad.write_text('[smtp]\nmax_recipients = "lots"\n[tls]\ncertificate = "c.pem"\n')
        twistd = Path(sys.executable).with_name("twistd")
        done = subprocess.run(
            [str(twistd), "--nodaemon", "--pidfile=", "mailstack", "--config", str(bad)],
            cwd=directory, capture_output=True, timeout=30, text=True)
        self.assertNotEqual(done.returncode, 0)
        output = done.stdout + done.stderr
        self.assertIn(str(bad), output)
        self.assertIn("smtp.max_recipients: expected an integer, got str 'lots'", output)
        self.assertIn("tls: certificate and private_key must be given together", output)
        self.assertNotIn("Traceback", output)
