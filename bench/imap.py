"""IMAP benchmark: SELECT and UID FETCH 1:* (FLAGS) on big folders, per-command
latency, and memory per idle connection, against ``twistd mailstack`` in its
own process.

    .venv/bin/python bench/imap.py [--small 1000] [--big 50000] [--ops 2000] [--idle 200]

Folders are filled on disk the way a delivery agent writes them (Dovecot-style
names with S= and W=, 4 KB messages). For each folder it prints the first
("cold": the process lists the folder and writes its uid list) and the later
("warm": the folder was opened before) SELECT and UID FETCH 1:* (FLAGS)
times; then ops/s and p50/p99 of a Thunderbird-like header fetch of one
message. First, on the fresh server, its RSS before and after ``--idle``
logged-in connections idling (IDLE) on INBOX, over plain TCP and over TLS;
last its peak RSS (VmHWM; argon2 password checks, 64 MiB each, dominate it).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import proc_status  # noqa: E402
from tests.imap_support import Raw  # noqa: E402
from tests.support.instance import PASSWORD, DaemonProcess, free_port  # noqa: E402

USER = "demo@example.test"


def populate(folder: Path, n: int) -> None:
    for sub in ("cur", "new", "tmp"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    body = ("x" * 75 + "\n") * 50
    for i in range(n):
        data = (f"From: sender{i % 97}@example.org\nTo: {USER}\nSubject: message {i}\n"
                f"Date: Mon, 1 Jan 2024 00:00:00 +0000\nMessage-ID: <{i}@example.org>\n\n"
                f"{body}").encode()
        flags = "S" if i % 3 else ""
        wsize = len(data) + data.count(b"\n")
        name = f"{1_600_000_000 + i}.M{i}P1.bench,S={len(data)},W={wsize}:2,{flags}"
        (folder / "cur" / name).write_bytes(data)


class Client(Raw):
    """The tests' raw client, with its own tags and an error for anything but OK."""

    def __init__(self, port: int, tls: bool = False):
        super().__init__(port, tls)
        self.n = 0

    def cmd(self, text: str) -> list[bytes]:
        self.n += 1
        tag = b"t%d" % self.n
        self.sock.sendall(tag + b" " + text.encode() + b"\r\n")
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise EOFError(lines[-3:])
            lines.append(line)
            if line.startswith(tag + b" "):
                if not line.startswith(tag + b" OK"):
                    raise RuntimeError(line)
                return lines

    def login(self) -> None:
        self.cmd(f'LOGIN {USER} "{PASSWORD}"')


def timed(f):
    start = time.perf_counter()
    result = f()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--big", type=int, default=50000)
    parser.add_argument("--ops", type=int, default=2000)
    parser.add_argument("--idle", type=int, default=200)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mailstack-bench-imap-"))
    port, tls_port = free_port(), free_port()
    daemon = DaemonProcess(work, listen=(("smtp", free_port()), ("imap", port),
                                         ("imaps", tls_port)),
                           sections={"auth": {"allow_plaintext_loopback": True},
                                     # The idle rounds log one user in --idle times (the previous round may still be closing).
                                     "imap": {"max_sessions_per_user": 2 * args.idle + 40,
                                              "max_connections_per_ip": 2 * args.idle + 40}})
    daemon.port = port
    maildir = daemon.config.server.mail_root / "example.test" / "demo" / "Maildir"
    print(f"filling {args.small} + {args.big} messages under {work} ...", flush=True)
    populate(maildir / ".Small", args.small)
    populate(maildir / ".Big", args.big)
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    daemon.start()
    pid = daemon.proc.pid
    try:
        # A first round warms up the thread pool and the TLS context; it is not reported.
        for tls, count in ((False, 16), (True, 16), (False, args.idle), (True, args.idle)):
            before = proc_status(pid)

            def idle_client(_):
                cl = Client(tls_port if tls else port, tls)
                cl.login()
                cl.cmd("SELECT INBOX")
                cl.sock.sendall(b"i IDLE\r\n")
                cl.file.readline()
                return cl

            with ThreadPoolExecutor(16) as pool:
                idlers = list(pool.map(idle_client, range(count)))
            time.sleep(1)
            after = proc_status(pid)
            if count == args.idle:
                print(f"{count} idle {'TLS' if tls else 'plain TCP'} connections (logged in, "
                      f"INBOX selected, in IDLE): RSS {before / 1024:.1f} -> "
                      f"{after / 1024:.1f} MB, {(after - before) / count:.1f} KB per connection")
            for cl in idlers:
                cl.sock.close()
            time.sleep(1)
        c = Client(port)
        c.login()
        print(f"server pid {pid}, RSS with one client logged in {proc_status(pid) / 1024:.1f} MB")
        for name, n in (("Small", args.small), ("Big", args.big)):
            for round_ in ("cold", "warm", "warm"):
                t_select, lines = timed(lambda: c.cmd(f"SELECT {name}"))
                t_fetch, lines = timed(lambda: c.cmd("UID FETCH 1:* (FLAGS)"))
                assert len(lines) == n + 1, (len(lines), n)
                print(f"{n:>6} messages {round_}: SELECT {t_select * 1000:7.1f} ms, "
                      f"UID FETCH 1:* (FLAGS) {t_fetch * 1000:7.1f} ms, "
                      f"together {(t_select + t_fetch) * 1000:7.1f} ms; server RSS "
                      f"{proc_status(pid) / 1024:.0f} MB, "
                      f"peak {proc_status(pid, 'VmHWM') / 1024:.0f} MB")
            c.cmd("UNSELECT")
        c.cmd("SELECT Small")
        latencies = []
        start = time.perf_counter()
        for _ in range(args.ops):
            uid = random.randint(1, args.small)
            t, _ = timed(lambda: c.cmd(
                f"UID FETCH {uid} (UID RFC822.SIZE FLAGS BODY.PEEK[HEADER.FIELDS "
                "(From To Subject Date Message-ID)])"))
            latencies.append(t)
        total = time.perf_counter() - start
        latencies.sort()
        print(f"UID FETCH one header x{args.ops}: {args.ops / total:.0f} ops/s, "
              f"p50 {statistics.median(latencies) * 1000:.2f} ms, "
              f"p99 {latencies[int(len(latencies) * 0.99) - 1] * 1000:.2f} ms")
        c.cmd("LOGOUT")

        print(f"peak RSS (VmHWM) {proc_status(pid, 'VmHWM') / 1024:.1f} MB")
    finally:
        daemon.stop()


if __name__ == "__main__":
    main()
