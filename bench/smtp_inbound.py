#!/usr/bin/env python3
"""Inbound SMTP throughput: concurrent clients -> mailstack -> Maildir.

Starts ``twistd mailstack`` as a subprocess on a fresh temporary instance
(127.0.0.1 only, several local users), then N concurrent clients each send M
messages of S bytes, one message per connection like Postfix's smtp-source
(or several per connection with ``--reuse``). Prints:

* messages/s accepted (all 250 replies received),
* messages/s in Maildir (until every file is in ``new/``),
* p50/p99/max latency of the 250 reply after the final dot,
* the daemon's peak RSS (VmHWM) and CPU per message, and the client's own CPU
  (so a client-bound run is visible: client CPU near 1 core/s means the client
  is the limit, not the server).

The client is a single asyncio process with raw streams (no smtplib, no
threads): on a 2-core machine it uses a fraction of one core.

    .venv/bin/python bench/smtp_inbound.py                      # 20 x 2000 x 10 KB
    .venv/bin/python bench/smtp_inbound.py -c 20 -m 100 --total 2000   # smtp-source -s 20 -m 2000
    .venv/bin/python bench/smtp_inbound.py --reuse
    .venv/bin/python bench/smtp_inbound.py --serve --domain localhost --port 12527
        # just run the instance (for /work/shared/peers/smtp_bench.py); prints its target spec

Benchmarks print figures; they are never assertions (DESIGN "Tests").
"""

from __future__ import annotations

import argparse
import asyncio
import os
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

from bench.common import (SMTPError, expect, proc_cpu, proc_status,  # noqa: E402
                          read_reply, system_busy)

HOST = "127.0.0.1"


# -- the server under test ----------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def write_config(root: Path, port: int, domain: str, users: list[str], threads: int,
                 processes: int) -> Path:
    """A minimal instance: config, argon2id users file, empty aliases; no TLS."""
    from mailstack.auth.users import Users

    root.mkdir(parents=True, exist_ok=True)
    config = root / "mailstack.toml"
    config.write_text(
        "[server]\n"
        f'hostname = "mail.{domain}"\n'
        f'domains = ["{domain}"]\n'
        'mail_root = "maildirs"\nspool_dir = "spool"\n'
        'users_file = "users"\naliases_file = "aliases"\n'
        f"threads = {threads}\n"
        f"[smtp]\nmax_connections_per_ip = 1000\nprocesses = {processes}\n"
        "[[listen]]\n"
        f'protocol = "smtp"\naddress = "{HOST}"\nport = {port}\n')
    db = Users(root / "users")
    for address in users:
        if not db.exists(address):
            db.set_password(address, "bench-password", create=True)
    (root / "aliases").touch()
    return config


class Daemon:
    def __init__(self, root: Path, port: int, config: Path, log: bool):
        self.root, self.port, self.config = root, port, config
        self.logfile = root / "twistd.log" if log else Path(os.devnull)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> None:
        twistd = Path(sys.executable).with_name("twistd")
        self.proc = subprocess.Popen(
            [str(twistd), "--nodaemon", "--pidfile=", f"--logfile={self.logfile}", "mailstack",
             "--config", str(self.config)],
            cwd=self.root, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"twistd exited with {self.proc.returncode}; see {self.logfile}")
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

    @property
    def pid(self) -> int:
        return self.proc.pid


# -- the client ---------------------------------------------------------------

def make_message(size: int, sender: str, rcpt: str, token: str) -> bytes:
    """A message of about ``size`` bytes (CRLF, dot-stuffed, final dot included)."""
    head = (f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: bench {token}\r\n"
            f"Message-ID: <{token}@bench.invalid>\r\nDate: Thu, 1 Jan 2026 00:00:00 +0000\r\n\r\n")
    line = ("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" * 2)[:76] + "\r\n"
    body_len = max(0, size - len(head))
    body = line * (body_len // len(line)) + "x" * max(0, body_len % len(line) - 2) + "\r\n"
    return (head + body + ".\r\n").encode()


class Stats:
    def __init__(self):
        self.latencies: list[float] = []
        self.errors = 0
        self.last_ack = 0.0
        self.first_error = ""


async def session(client: int, jobs: list[tuple[str, str]], sender: str, reuse: bool,
                  stats: Stats) -> None:
    reader = writer = None
    pending = list(jobs)

    async def open_session():
        r, w = await asyncio.open_connection(HOST, ARGS.port)
        await expect(r, 220, "banner")
        w.write(b"EHLO bench%d.invalid\r\n" % client)
        await expect(r, 250, "EHLO")
        return r, w

    async def close(r, w):
        w.write(b"QUIT\r\n")
        try:
            await read_reply(r)
        except SMTPError:
            pass
        w.close()
        try:
            await w.wait_closed()
        except OSError:
            pass

    while pending:
        rcpt, token = pending.pop()
        data = make_message(ARGS.size, sender, rcpt, token)
        try:
            if writer is None:
                reader, writer = await open_session()
            writer.write(b"MAIL FROM:<%s>\r\n" % sender.encode())
            await expect(reader, 250, "MAIL")
            writer.write(b"RCPT TO:<%s>\r\n" % rcpt.encode())
            await expect(reader, 250, "RCPT")
            writer.write(b"DATA\r\n")
            await expect(reader, 354, "DATA")
            writer.write(data)
            t0 = time.perf_counter()
            await expect(reader, 250, "end of data")
            now = time.perf_counter()
            stats.latencies.append(now - t0)
            stats.last_ack = now
            if not reuse:
                await close(reader, writer)
                reader = writer = None
        except (OSError, SMTPError) as e:
            stats.errors += 1
            stats.first_error = stats.first_error or f"client {client}: {e}"
            if writer is not None:
                writer.close()
            reader = writer = None
    if writer is not None:
        await close(reader, writer)


def count_files(maildirs: list[Path]) -> int:
    n = 0
    for m in maildirs:
        for sub in ("new", "cur"):
            try:
                n += len(os.listdir(m / sub))
            except FileNotFoundError:
                pass
    return n


async def run_clients(rcpts: list[str], maildirs: list[Path], pid: int | None) -> dict:
    a = ARGS
    total = a.total or a.clients * a.messages
    sender = "bench@sender.invalid"
    per_client: list[list[tuple[str, str]]] = [[] for _ in range(a.clients)]
    run_id = f"{os.getpid():x}{int(time.time()):x}"
    for i in range(total):
        rcpt = rcpts[i % len(rcpts)]
        per_client[i % a.clients].append((rcpt, f"{run_id}.{i}"))
    base = count_files(maildirs)
    stats = Stats()
    cpu0 = os.times()
    srv0 = proc_cpu(pid) if pid else 0.0
    sys0 = system_busy()
    t0 = time.perf_counter()
    await asyncio.gather(*(session(c, jobs, sender, a.reuse, stats)
                           for c, jobs in enumerate(per_client)))
    t_sent = time.perf_counter()
    cpu1 = os.times()
    acked = len(stats.latencies)
    deadline = t_sent + a.timeout
    got = count_files(maildirs) - base
    while got < acked and time.perf_counter() < deadline:
        await asyncio.sleep(0.005)
        got = count_files(maildirs) - base
    t_del = time.perf_counter()
    srv1 = proc_cpu(pid) if pid else 0.0
    sys1 = system_busy()
    lat = sorted(stats.latencies) or [0.0]
    q = statistics.quantiles(lat, n=100) if len(lat) > 1 else [lat[0]] * 99
    return {
        "total": total, "acked": acked, "errors": stats.errors, "first_error": stats.first_error,
        "in_maildir": got,
        "accept_s": t_sent - t0, "deliver_s": t_del - t0,
        "accepted_per_s": acked / (stats.last_ack - t0) if acked else 0.0,
        "delivered_per_s": got / (t_del - t0),
        "p50_ms": q[49] * 1000, "p99_ms": q[98] * 1000, "max_ms": lat[-1] * 1000,
        "client_cpu_s": (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system),
        "server_cpu_s": srv1 - srv0,
        "system_busy_pct": 100.0 * os.cpu_count() * (sys1[0] - sys0[0]) / max(sys1[1] - sys0[1], 1),
    }


def report(r: dict, pid: int | None) -> None:
    a = ARGS
    mode = "reused connections" if a.reuse else "one message per connection"
    print(f"{a.clients} clients, {r['total']} messages of {a.size} B ({mode}), "
          f"{len(ARGS.rcpt_list)} recipient(s)")
    print(f"  accepted (250):   {r['acked']:>7} in {r['accept_s']:.2f} s = "
          f"{r['accepted_per_s']:.1f} msgs/s   errors: {r['errors']} {r['first_error']}")
    print(f"  in Maildir new/:  {r['in_maildir']:>7} in {r['deliver_s']:.2f} s = "
          f"{r['delivered_per_s']:.1f} msgs/s"
          + ("" if r["in_maildir"] >= r["acked"] else "   INCOMPLETE"))
    print(f"  250 latency:      p50 {r['p50_ms']:.1f} ms   p99 {r['p99_ms']:.1f} ms   "
          f"max {r['max_ms']:.1f} ms")
    print(f"  client CPU:       {r['client_cpu_s']:.2f} s ({100 * r['client_cpu_s'] / r['accept_s']:.0f}% "
          f"of one core while sending)")
    print(f"  machine CPU:      {r['system_busy_pct']:.0f}% busy of {os.cpu_count() * 100}% "
          "(all processes; others' load makes figures noisy)")
    if pid:
        print(f"  server CPU:       {r['server_cpu_s']:.2f} s, process tree "
              f"({1000 * r['server_cpu_s'] / max(r['in_maildir'], 1):.3f} ms/msg, "
              f"{100 * r['server_cpu_s'] / r['deliver_s']:.0f}% of one core)")
        try:
            print(f"  server peak RSS:  {proc_status(pid, 'VmHWM') / 1024:.1f} MiB (VmHWM of pid "
                  f"{pid} only), now {proc_status(pid, 'VmRSS') / 1024:.1f} MiB")
        except OSError:
            pass


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-c", "--clients", type=int, default=20, help="concurrent clients (20)")
    ap.add_argument("-m", "--messages", type=int, default=2000, help="messages per client (2000)")
    ap.add_argument("--total", type=int, default=0,
                    help="total messages spread over the clients instead of -m per client "
                         "(smtp-source -m semantics)")
    ap.add_argument("-s", "--size", type=int, default=10240, help="message size in bytes (10240)")
    ap.add_argument("-u", "--users", type=int, default=5, help="local users, round-robin (5)")
    ap.add_argument("--domain", default="example.test")
    ap.add_argument("--reuse", action="store_true", help="send all of a client's messages on one connection")
    ap.add_argument("--threads", type=int, default=16, help="server thread pool ([server] threads)")
    ap.add_argument("--processes", type=int, default=1,
                    help="processes serving SMTP ([smtp] processes; 2 on a 2-core machine)")
    ap.add_argument("--no-log", action="store_true", help="twistd log to /dev/null")
    ap.add_argument("--keep", action="store_true", help="keep the temporary instance directory")
    ap.add_argument("--dir", help="instance directory (default: a new temporary one)")
    ap.add_argument("--port", type=int, default=0, help="SMTP port (default: a free one)")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--serve", action="store_true",
                    help="only run the instance until interrupted and print its "
                         "smtp_bench.py target spec (user1's Maildir)")
    ap.add_argument("--target", help="HOST:PORT:MAILDIR[,MAILDIR..]:PID:RCPT[,RCPT..] -- drive an "
                                     "already running server instead of starting mailstack")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    global ARGS
    ARGS = a = parse_args(argv)
    if a.target:
        host, port, maildirs, pid, rcpts = a.target.split(":", 4)
        if host != HOST:
            raise SystemExit("loopback only: HOST must be 127.0.0.1")
        a.port = int(port)
        a.rcpt_list = rcpts.split(",")
        pid = int(pid) if pid.isdigit() else int(Path(pid).read_text().split()[0])
        result = asyncio.run(run_clients(a.rcpt_list, [Path(m) for m in maildirs.split(",")], pid))
        report(result, pid)
        return 0 if result["errors"] == 0 and result["in_maildir"] >= result["acked"] else 1

    root = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="mailstack-bench-"))
    a.port = a.port or free_port()
    users = [f"user{i}@{a.domain}" for i in range(1, a.users + 1)]
    a.rcpt_list = users
    config = write_config(root, a.port, a.domain, users, a.threads, a.processes)
    maildirs = [root / "maildirs" / a.domain / u.partition("@")[0] / "Maildir" for u in users]
    daemon = Daemon(root, a.port, config, log=not a.no_log)
    daemon.start()
    try:
        if a.serve:
            print(f"mailstack pid {daemon.pid} on {HOST}:{a.port}; instance {root}")
            print(f"smtp_bench target: mailstack={HOST}:{a.port}:{maildirs[0]}:{daemon.pid}  "
                  f"(--rcpt {users[0]})", flush=True)
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            try:
                daemon.proc.wait()
            except KeyboardInterrupt:
                pass
            return 0
        print(f"mailstack pid {daemon.pid} on {HOST}:{a.port}; instance {root}")
        result = asyncio.run(run_clients(users, maildirs, daemon.pid))
        report(result, daemon.pid)
        return 0 if result["errors"] == 0 and result["in_maildir"] >= result["acked"] else 1
    finally:
        daemon.stop()
        if not a.keep and not a.dir:
            shutil.rmtree(root, ignore_errors=True)


ARGS: argparse.Namespace

if __name__ == "__main__":
    sys.exit(main())
