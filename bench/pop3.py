#!/usr/bin/env python3
"""POP3 download speed: poplib and a pipelining client against ``twistd mailstack``.

Starts ``twistd mailstack`` as a subprocess on a fresh temporary instance
(POP3 on 127.0.0.1, plaintext allowed on loopback like the Dovecot peer
config), fills two users' Maildirs with COUNT messages of SIZE bytes using
/work/shared/peers/populate_maildir.py (the very files the Dovecot peer
gets), then per run:

* ``poplib``: log in, STAT, RETR every message, QUIT (what peers/pop3_bench.py does);
* ``pipelined``: log in, send every ``RETR n`` in one write on a raw socket,
  read all the answers, QUIT (RFC 2449 PIPELINING);
* ``login``: USER, PASS and QUIT alone, to show what password hashing costs.

Two users tell the POP3 work apart from the password check: ``bench`` has a
cheap argon2id hash (t=1, 1 MiB; Dovecot's peer config uses {PLAIN}) and
``argon`` the production default (argon2-cffi: t=3, 64 MiB, p=4). The
first run is a warm-up (sizes measured, Seen flags set, each message's wire
recipe learned) and is left out of the medians; later logins find the
maildrop unchanged and reuse its listing, as Dovecot reuses its index.
Prints the daemon's peak RSS (VmHWM) before any login, after downloads with
the cheap hash, and at the end (an argon2 check with the production
parameters takes 64 MiB for a moment).

    .venv/bin/python bench/pop3.py                          # 1000 x 10 KB, 6 runs
    .venv/bin/python bench/pop3.py --peer dovecot=127.0.0.1:10110:user3:pass:PID
        # the same runs round-robin against another server too, with ratios
    .venv/bin/python bench/pop3.py --serve --port 10111
        # just run the instance for peers/pop3_bench.py; prints its --target specs

Benchmarks print figures; they are never assertions (DESIGN "Tests").
"""

from __future__ import annotations

import argparse
import poplib
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.common import proc_cpu, proc_status  # noqa: E402

HOST = "127.0.0.1"
DOMAIN = "example.test"
PASSWORD = "pass"
POPULATE = Path("/work/shared/peers/populate_maildir.py")
USERS = {"bench": "cheap", "argon": "production"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def write_instance(root: Path, port: int, count: int, size: int) -> Path:
    """Config, users (one cheap and one production hash) and the two Maildirs."""
    from argon2 import PasswordHasher

    from mailstack.auth.users import SCHEME, hash_password

    root.mkdir(parents=True, exist_ok=True)
    config = root / "mailstack.toml"
    config.write_text(
        "[server]\n"
        f'hostname = "mail.{DOMAIN}"\ndomains = ["{DOMAIN}"]\n'
        'mail_root = "maildirs"\nspool_dir = "spool"\n'
        'users_file = "users"\naliases_file = "aliases"\n'
        "[auth]\nallow_plaintext_loopback = true\n"
        "[[listen]]\n"
        f'protocol = "pop3"\naddress = "{HOST}"\nport = {port}\n')
    cheap = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    hashes = {"cheap": SCHEME + cheap.hash(PASSWORD), "production": hash_password(PASSWORD)}
    (root / "users").write_text(
        "".join(f"{user}@{DOMAIN}:{hashes[kind]}\n" for user, kind in USERS.items()))
    (root / "aliases").touch()
    for user in USERS:
        maildir = root / "maildirs" / DOMAIN / user / "Maildir"
        subprocess.run([sys.executable, str(POPULATE), str(maildir), "--count", str(count),
                        "--size", str(size)], check=True, stdout=subprocess.DEVNULL)
    return config


class Daemon:
    def __init__(self, root: Path, port: int, config: Path):
        self.root, self.port, self.config = root, port, config
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> None:
        twistd = Path(sys.executable).with_name("twistd")
        self.proc = subprocess.Popen(
            [str(twistd), "--nodaemon", "--pidfile=", f"--logfile={self.root / 'twistd.log'}",
             "mailstack", "--config", str(self.config)],
            cwd=self.root, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"twistd exited with {self.proc.returncode}; "
                                 f"see {self.root / 'twistd.log'}")
            try:
                socket.create_connection((HOST, self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise SystemExit("twistd did not start listening in time")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# -- clients ------------------------------------------------------------------

def poplib_run(host: str, port: int, user: str, password: str) -> tuple[int, int]:
    """peers/pop3_bench.py's session: USER, PASS, STAT, RETR all, QUIT."""
    p = poplib.POP3(host, port, timeout=60)
    p.user(user)
    p.pass_(password)
    n, _ = p.stat()
    total = 0
    for i in range(1, n + 1):
        total += p.retr(i)[2]
    p.quit()
    return n, total


def _expect_ok(f) -> bytes:
    line = f.readline()
    if not line.startswith(b"+OK"):
        raise SystemExit(f"unexpected reply: {line!r}")
    return line


def pipelined_run(host: str, port: int, user: str, password: str) -> tuple[int, int]:
    """Every RETR in one write; answers read in bulk and counted by their terminators."""
    with socket.create_connection((host, port), timeout=60) as s:
        f = s.makefile("rb")
        _expect_ok(f)
        s.sendall(f"USER {user}\r\nPASS {password}\r\nSTAT\r\n".encode())
        _expect_ok(f)
        _expect_ok(f)
        n = int(_expect_ok(f).split()[1])
        s.sendall(b"".join(b"RETR %d\r\n" % i for i in range(1, n + 1)) + b"QUIT\r\n")
        # Each answer ends in CRLF "." CRLF, which byte-stuffing keeps out of bodies;
        # the first answer's status line has no CRLF before it, hence the prefix.
        done, total, tail = 0, 0, b"\r\n"
        while done < n:
            chunk = f.read1(1 << 20)
            if not chunk:
                raise SystemExit(f"connection closed after {done} of {n} answers")
            total += len(chunk)
            done += (tail + chunk).count(b"\r\n.\r\n")
            tail = (tail + chunk)[-4:]
        f.read1(1 << 16)  # the QUIT reply
    return n, total


def login_run(host: str, port: int, user: str, password: str) -> tuple[int, int]:
    p = poplib.POP3(host, port, timeout=60)
    p.user(user)
    p.pass_(password)
    p.quit()
    return 0, 0


MODES = {"poplib": poplib_run, "pipelined": pipelined_run, "login": login_run}


def measure(mode: str, target: tuple) -> dict:
    name, host, port, user, password, pid = target
    c0 = proc_cpu(pid) if pid else 0.0
    t0 = time.perf_counter()
    n, octets = MODES[mode](host, port, user, password)
    dt = time.perf_counter() - t0
    return {"msgs": n, "octets": octets, "seconds": dt, "server_cpu_s": (proc_cpu(pid) if pid else 0.0) - c0}


def parse_target(spec: str) -> tuple:
    name, rest = spec.split("=", 1)
    host, port, user, password, pid = rest.split(":", 4)
    if host != HOST:
        raise SystemExit("loopback only: HOST must be 127.0.0.1")
    pid = int(pid) if pid.isdigit() else int(Path(pid).read_text().split()[0]) if pid else 0
    return name, host, int(port), user, password, pid


def run(targets: list[tuple], runs: int) -> dict:
    """Every mode against every target, round-robin.

    The order of the targets turns by one each run, so no server always
    follows the same one (the production-hash login leaves 64 MiB of argon2
    work and a cold CPU cache behind it).
    """
    results: dict = {}
    for r in range(runs):
        turn = r % len(targets)
        for mode in MODES:
            for target in targets[turn:] + targets[:turn]:
                row = measure(mode, target)
                results.setdefault((target[0], mode), []).append(row)
                print(f"run {r} {mode:9} {target[0]:16} {row['msgs']:5} msgs "
                      f"{row['octets']:>9} octets {row['seconds']:.3f} s "
                      f"server CPU {row['server_cpu_s']:.2f} s", flush=True)
    return results


def summarise(results: dict, targets: list[tuple]) -> None:
    print("\nmedian seconds (warm-up run excluded):")
    medians = {}
    for (name, mode), rows in results.items():
        kept = rows[1:] or rows
        medians[name, mode] = statistics.median(x["seconds"] for x in kept)
        cpu = statistics.median(x["server_cpu_s"] for x in kept)
        print(f"  {mode:9} {name:16} {medians[name, mode]:.3f} s  "
              f"(warm-up {rows[0]['seconds']:.3f} s, server CPU {cpu:.2f} s)")
    first = targets[0][0]
    for name, *_ in targets[1:]:
        for mode in MODES:
            print(f"  ratio {mode:9} {first}/{name}: {medians[first, mode] / medians[name, mode]:.2f}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=1000, help="messages per user (1000)")
    ap.add_argument("--size", type=int, default=10240, help="message size in bytes (10240)")
    ap.add_argument("--runs", type=int, default=6, help="runs; the first is a warm-up (6)")
    ap.add_argument("--port", type=int, default=0, help="POP3 port (default: a free one)")
    ap.add_argument("--peer", action="append", default=[],
                    help="NAME=HOST:PORT:USER:PASSWORD:PID|PIDFILE, another server to "
                         "measure in the same runs (round-robin)")
    ap.add_argument("--serve", action="store_true",
                    help="only run the instance until interrupted and print its "
                         "peers/pop3_bench.py --target specs")
    ap.add_argument("--keep", action="store_true", help="keep the temporary instance directory")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="mailstack-pop3-bench-"))
    port = a.port or free_port()
    config = write_instance(root, port, a.count, a.size)
    daemon = Daemon(root, port, config)
    daemon.start()
    pid = daemon.proc.pid
    try:
        print(f"mailstack pid {pid} on {HOST}:{port}; instance {root}; "
              f"{a.count} messages of {a.size} B per user")
        idle_hwm = proc_status(pid, "VmHWM")
        if a.serve:
            for user, kind in USERS.items():
                print(f"pop3_bench target ({kind} hash): "
                      f"mailstack-{user}={HOST}:{port}:{user}@{DOMAIN}:{pid}", flush=True)
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            try:
                daemon.proc.wait()
            except KeyboardInterrupt:
                pass
            return 0
        targets = [(f"mailstack-{user}", HOST, port, f"{user}@{DOMAIN}", PASSWORD, pid)
                   for user in USERS]
        # Downloads with the cheap hash first, so the peak they cause is seen
        # apart from argon2's 64 MiB (these count as neither run nor warm-up).
        for mode in ("poplib", "pipelined"):
            measure(mode, targets[0])
        transfer_hwm = proc_status(pid, "VmHWM")
        targets += [parse_target(spec) for spec in a.peer]
        results = run(targets, a.runs)
        summarise(results, targets)
        print(f"\nmailstack peak RSS (VmHWM): {idle_hwm / 1024:.1f} MiB before any login, "
              f"{transfer_hwm / 1024:.1f} MiB after a poplib and a pipelined download "
              f"(cheap hash), {proc_status(pid, 'VmHWM') / 1024:.1f} MiB at the end "
              f"(VmRSS now {proc_status(pid, 'VmRSS') / 1024:.1f} MiB)")
        return 0
    finally:
        daemon.stop()
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
