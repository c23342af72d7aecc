"""A real mailstack on loopback ephemeral ports, in a temporary directory.

``Instance`` runs the service in the test's own reactor (fast, and the test
can look inside); ``DaemonProcess`` runs ``twistd mailstack`` as a separate
process for crash and multi-process tests. Both write a real config file, a
real users file (argon2id) and a self-signed certificate.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from twisted.internet import defer, reactor, task, threads

from mailstack.auth.aliases import Aliases
from mailstack.auth.users import Users
from mailstack.config import load
from mailstack.service import MailstackService
from mailstack.store.folder import parse_name
from mailstack.tls import make_self_signed

DOMAIN = "example.test"
HOSTNAME = "mail.example.test"
PASSWORD = "correct horse battery"
_CERTS: dict[str, bytes] = {}


def free_port() -> int:
    """A currently unused loopback port (for a separate process to bind)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_instance(root: Path, users=("demo@example.test", "alice@example.test"),
                   aliases: dict | None = None, smtp: dict | None = None,
                   server: dict | None = None, listen=(("smtp", 0),), tls: bool = True,
                   mail_root: Path | None = None, sections: dict | None = None) -> Path:
    """Lay out an instance under ``root`` and return its config file.

    ``smtp`` and ``sections`` (``{"auth": {...}, "pop3": {...}}``) add keys
    to those config sections; ``listen`` is a list of (protocol, port).
    """
    root.mkdir(parents=True, exist_ok=True)
    mail_root_text = str(Path(mail_root).resolve()) if mail_root else "maildirs"
    settings = {"hostname": HOSTNAME, "domains": [DOMAIN], "mail_root": mail_root_text,
                "spool_dir": "spool", "users_file": "users", "aliases_file": "aliases",
                "threads": 8, **(server or {})}
    lines = ["[server]"] + [f"{k} = {_toml_value(v)}" for k, v in settings.items()]
    if tls:
        cert, key = root / "cert.pem", root / "key.pem"
        if "pair" not in _CERTS:
            make_self_signed(HOSTNAME, cert, key)
            _CERTS["pair"] = cert.read_bytes(), key.read_bytes()
        else:
            cert.write_bytes(_CERTS["pair"][0])
            key.write_bytes(_CERTS["pair"][1])
            key.chmod(0o600)
        lines += ["[tls]", 'certificate = "cert.pem"', 'private_key = "key.pem"']
    for name, values in {"smtp": smtp or {}, **(sections or {})}.items():
        if values:
            lines += [f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    for protocol, port in listen:
        lines += ["[[listen]]", f'protocol = "{protocol}"', 'address = "127.0.0.1"', f"port = {port}"]
    path = root / "mailstack.toml"
    path.write_text("\n".join(lines) + "\n")
    user_db = Users(root / "users")
    for address in users:
        if not user_db.exists(address):
            user_db.set_password(address, PASSWORD, create=True)
    if aliases:
        alias_db = Aliases(root / "aliases")
        for source, targets in aliases.items():
            alias_db.add(source, list(targets))
    return path


class Instance:
    """The service running in this process's reactor."""

    def __init__(self, root: Path, **layout):
        self.root = Path(root)
        self.config_path = write_instance(self.root, **layout)
        self.config = load(self.config_path)
        self.service = MailstackService(self.config, reactor)

    def start(self) -> None:
        self.service.privilegedStartService()
        self.service.startService()

    def stop(self) -> defer.Deferred:
        return defer.maybeDeferred(self.service.stopService)

    @property
    def smtp_port(self) -> int:
        return self.service.port_of("smtp")

    def port(self, protocol: str) -> int:
        return self.service.port_of(protocol)

    def maildir(self, address: str, sub: str = "new") -> Path:
        local, _, domain = address.partition("@")
        return self.config.server.mail_root / domain / local / "Maildir" / sub

    def messages(self, address: str, sub: str = "new") -> list[Path]:
        """The files of one Maildir subdirectory in arrival order (the store's)."""
        d = self.maildir(address, sub)
        if not d.exists():
            return []
        return sorted(d.iterdir(), key=lambda p: _arrival(sub, p.name))


def _arrival(sub: str, name: str) -> tuple:
    message = parse_name(sub, name, 0)
    return (0, 0, name) if message is None else message.order


@defer.inlineCallbacks
def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02):
    """Poll ``predicate`` without blocking the reactor; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        yield task.deferLater(reactor, interval, lambda: None)


def in_thread(f, *args, **kwargs) -> defer.Deferred:
    """Run a blocking client (smtplib, a raw socket) beside the reactor."""
    return threads.deferToThread(f, *args, **kwargs)


class DaemonProcess:
    """``twistd mailstack`` as a separate process on a fixed free port."""

    def __init__(self, root: Path, **layout):
        self.root = Path(root).resolve()  # twistd runs with this as its working directory
        self.port = free_port()
        layout.setdefault("listen", (("smtp", self.port),))
        self.config_path = write_instance(self.root, **layout)
        self.config = load(self.config_path)
        self.proc: subprocess.Popen | None = None
        self.log = self.root / "twistd.log"

    def start(self, timeout: float = 20.0, foreground_job: bool = False) -> None:
        """``foreground_job``: as a shell runs one, in a process group of its
        own (a Ctrl-C reaches the whole group) and with SIGINT at its default
        action, even when this test run inherited it ignored (a background job)."""
        twistd = Path(sys.executable).with_name("twistd")
        command = [str(twistd), "--nodaemon", "--pidfile=", f"--logfile={self.log}", "mailstack",
                   "--config", str(self.config_path)]
        if foreground_job:
            command = [sys.executable, "-c", "import os, signal, sys; "
                       "signal.signal(signal.SIGINT, signal.SIG_DFL); "
                       "os.execv(sys.argv[1], sys.argv[1:])"] + command
        self.proc = subprocess.Popen(
            command, cwd=self.root, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
            process_group=0 if foreground_job else None)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"twistd exited with {self.proc.returncode}: "
                                   f"{self.log.read_text() if self.log.exists() else ''}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError("twistd did not start listening in time")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
