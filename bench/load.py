#!/usr/bin/env python3
"""Load: thousands of idle connections on SMTP, IMAP and POP3 at once while
mail streams to users who are IDLE-ing.

Starts ``twistd mailstack`` on loopback ports in a temporary directory, with
a config whose connection limits admit the load ([smtp], [imap], [pop3]
max_connections and max_connections_per_ip, [imap] max_sessions_per_user,
longer idle timeouts so the set-up does not time sessions out), creates the
users the way the tests do (``Users.set_password``, argon2id), then:

1. warms the daemon up (a login of each kind, one delivery) and reads its RSS;
2. opens and holds the connections: IMAP logged in, INBOX selected, in IDLE
   (``--sessions-per-user`` sessions for each IMAP user); POP3 logged in (one
   per user: RFC 1939's exclusive maildrop); SMTP after EHLO;
3. reads the RSS again: (held - before) / connections is the memory one idle
   connection costs;
4. streams deliveries at ``--rate`` per second for ``--duration`` seconds over
   ``--senders`` more SMTP connections, round robin over the IMAP users, and
   records when each 250 came and when each IDLE session of the recipient
   reported ``* n EXISTS``;
5. checks every held connection still answers (IMAP DONE and LOGOUT, POP3 NOOP
   and QUIT, SMTP NOOP and QUIT).

It prints the mix, the login rate, the delivery rate, p50/p99/max of the
time from the SMTP 250 to the IDLE client's EXISTS (one sample per delivery
and IDLE session), errors (refused, dropped or wrongly answered connections,
notifications that never came) and the RSS per idle connection. The client
is one asyncio process (no threads); RLIMIT_NOFILE is raised for it and the
daemon it starts.

    .venv/bin/python bench/load.py                    # 1400 IMAP + 300 POP3 + 300 SMTP
    .venv/bin/python bench/load.py --imap 700 --pop3 150 --smtp 150 --rate 10

Logging in costs one argon2id verification (64 MiB, a fifth of a second of
CPU) per IMAP and POP3 connection, so opening the connections takes minutes
on two cores; ``--dir`` keeps an instance (and its users) for another run.

Benchmarks print figures; they are never assertions (DESIGN "Tests").
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (SMTPError, expect, proc_cpu, proc_status,  # noqa: E402
                          raise_nofile)
from tests.support.instance import PASSWORD, DaemonProcess, free_port  # noqa: E402

HOST = "127.0.0.1"
DOMAIN = "example.test"
SENDER = "load@sender.invalid"
_EXISTS = re.compile(rb"^\* (\d+) EXISTS\r\n$")


class Failed(Exception):
    """A held connection was refused, dropped or answered wrongly."""


class Errors:
    def __init__(self):
        self.count = 0
        self.first: dict[str, str] = {}

    def add(self, kind: str, error: BaseException | str) -> None:
        self.count += 1
        self.first.setdefault(kind, str(error) or type(error).__name__)


class Line:
    """One connection's reader and writer with a line-level API."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Line:
        reader, writer = await asyncio.open_connection(HOST, port)
        return cls(reader, writer)

    async def line(self) -> bytes:
        line = await self.reader.readline()
        if not line:
            raise Failed("connection closed by the server")
        return line

    async def until(self, tag: bytes) -> list[bytes]:
        lines = []
        while True:
            lines.append(await self.line())
            if lines[-1].startswith(tag + b" "):
                if not lines[-1].startswith(tag + b" OK"):
                    raise Failed(lines[-1].decode(errors="replace").strip())
                return lines

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def close(self) -> None:
        self.writer.close()


class IdleSession:
    """An IMAP session logged in, INBOX selected, in IDLE; records EXISTS."""

    def __init__(self, user: str):
        self.user = user
        self.base = 0  # EXISTS at SELECT
        self.seen = 0
        self.exists: list[tuple[int, float]] = []  # (n, when)
        self.conn: Line | None = None
        self.reading: asyncio.Task | None = None
        self.done = asyncio.Event()

    async def open(self, port: int) -> None:
        self.conn = c = await Line.open(port)
        await c.line()
        c.send(b'a LOGIN %s "%s"\r\n' % (self.user.encode(), PASSWORD.encode()))
        await c.until(b"a")
        c.send(b"b SELECT INBOX\r\n")
        for line in await c.until(b"b"):
            m = _EXISTS.match(line)
            if m:
                self.base = self.seen = int(m[1])
        c.send(b"i IDLE\r\n")
        if not (await c.line()).startswith(b"+ "):
            raise Failed("no IDLE continuation")

    async def read(self, errors: Errors) -> None:
        """Until DONE is answered: EXISTS lines with their arrival time."""
        try:
            while True:
                line = await self.conn.line()
                m = _EXISTS.match(line)
                if m:
                    self.exists.append((int(m[1]), time.perf_counter()))
                elif line.startswith(b"i "):
                    if not line.startswith(b"i OK"):
                        raise Failed(line.decode(errors="replace").strip())
                    self.done.set()
                    return
        except (OSError, Failed) as e:
            errors.add("IMAP connection lost while idle", e)
            self.done.set()

    async def finish(self) -> None:
        self.conn.send(b"DONE\r\n")
        await self.done.wait()
        self.conn.send(b"z LOGOUT\r\n")
        await self.conn.until(b"z")
        self.conn.close()


async def open_pop3(port: int, user: str) -> Line:
    c = await Line.open(port)
    for command in (None, b"USER " + user.encode(), b"PASS " + PASSWORD.encode(), b"STAT"):
        if command is not None:
            c.send(command + b"\r\n")
        line = await c.line()
        if not line.startswith(b"+OK"):
            raise Failed(line.decode(errors="replace").strip())
    return c


async def close_pop3(c: Line) -> None:
    for command in (b"NOOP", b"QUIT"):
        c.send(command + b"\r\n")
        line = await c.line()
        if not line.startswith(b"+OK"):
            raise Failed(line.decode(errors="replace").strip())
    c.close()


async def open_smtp(port: int, n: int) -> Line:
    c = await Line.open(port)
    await expect(c.reader, 220, "banner")
    c.send(b"EHLO load%d.invalid\r\n" % n)
    await expect(c.reader, 250, "EHLO")
    return c


async def close_smtp(c: Line) -> None:
    c.send(b"NOOP\r\n")
    await expect(c.reader, 250, "NOOP")
    c.send(b"QUIT\r\n")
    await expect(c.reader, 221, "QUIT")
    c.close()


def message(rcpt: str, n: int) -> bytes:
    body = "".join(f"line {i:02d} of message {n} " + "x" * 50 + "\r\n" for i in range(25))
    return (f"From: <{SENDER}>\r\nTo: <{rcpt}>\r\nSubject: load {n}\r\n"
            f"Message-ID: <load.{n}@sender.invalid>\r\n\r\n{body}.\r\n").encode()


async def send_one(c: Line, rcpt: str, n: int) -> float:
    c.send(b"MAIL FROM:<%s>\r\nRCPT TO:<%s>\r\nDATA\r\n" % (SENDER.encode(), rcpt.encode()))
    await expect(c.reader, 250, "MAIL")
    await expect(c.reader, 250, "RCPT")
    await expect(c.reader, 354, "DATA")
    c.send(message(rcpt, n))
    await expect(c.reader, 250, "end of data")
    return time.perf_counter()


async def open_all(what: str, count: int, opener, concurrency: int, errors: Errors) -> list:
    """Open ``count`` connections, at most ``concurrency`` being set up at once."""
    slots = asyncio.Semaphore(concurrency)
    opened = []
    started = time.perf_counter()

    async def one(i):
        async with slots:
            try:
                opened.append(await opener(i))
            except (OSError, Failed, SMTPError) as e:
                errors.add(f"{what} refused", e)
            if len(opened) % 200 == 0 and opened:
                rate = len(opened) / (time.perf_counter() - started)
                print(f"  {what}: {len(opened)}/{count} open ({rate:.1f}/s)", flush=True)

    await asyncio.gather(*(one(i) for i in range(count)))
    took = time.perf_counter() - started
    print(f"{what}: {len(opened)} of {count} open in {took:.1f} s "
          f"({len(opened) / max(took, 1e-9):.1f}/s)", flush=True)
    return opened


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


async def run(args, daemon: DaemonProcess, imap_users: list[str], pop_users: list[str]) -> None:
    ports = args.ports
    pid = daemon.proc.pid
    errors = Errors()

    # 1. Warm-up: the thread pool, an argon2 verification of each kind, a delivery.
    warm = IdleSession("warmup@" + DOMAIN)
    await warm.open(ports["imap"])
    warm.reading = asyncio.ensure_future(warm.read(errors))
    await close_pop3(await open_pop3(ports["pop3"], "warmup@" + DOMAIN))
    c = await open_smtp(ports["smtp"], 0)
    await send_one(c, "warmup@" + DOMAIN, 0)
    await close_smtp(c)
    await warm.finish()
    await asyncio.sleep(2)
    rss_before = proc_status(pid)

    # 2. The held connections.
    total = args.imap + args.pop3 + args.smtp
    print(f"mix: {args.imap} IMAP (logged in, INBOX selected, IDLE; {len(imap_users)} users x "
          f"{args.sessions_per_user}), {args.pop3} POP3 (logged in, one per user), "
          f"{args.smtp} SMTP (idle after EHLO) = {total} connections; "
          f"plus {args.senders} SMTP senders", flush=True)
    logins_started = time.perf_counter()

    async def open_idle(i):
        s = IdleSession(imap_users[i % len(imap_users)])
        await s.open(ports["imap"])
        s.reading = asyncio.ensure_future(s.read(errors))
        return s

    idlers = await open_all("IMAP IDLE", args.imap, open_idle, args.login_concurrency, errors)
    pops = await open_all("POP3", args.pop3, lambda i: open_pop3(ports["pop3"], pop_users[i]),
                          args.login_concurrency, errors)
    logins = time.perf_counter() - logins_started
    smtps = await open_all("SMTP idle", args.smtp, lambda i: open_smtp(ports["smtp"], i + 1),
                           50, errors)
    held = len(idlers) + len(pops) + len(smtps)
    await asyncio.sleep(2)
    rss_held = proc_status(pid)
    print(f"logins: {len(idlers) + len(pops)} in {logins:.1f} s "
          f"({(len(idlers) + len(pops)) / logins:.1f}/s, argon2id each)")
    print(f"daemon RSS: {rss_before / 1024:.1f} MiB before, {rss_held / 1024:.1f} MiB with "
          f"{held} connections held: {(rss_held - rss_before) / max(held, 1):.1f} KiB per "
          f"idle connection", flush=True)

    # 3. The stream of deliveries to the IDLE-ing users.
    senders: asyncio.Queue = asyncio.Queue()
    for c in await open_all("SMTP senders", args.senders,
                            lambda i: open_smtp(ports["smtp"], 10_000 + i), 50, errors):
        senders.put_nowait(c)
    acks: dict[str, list[float]] = {u: [] for u in imap_users}
    lag: list[float] = []
    count = int(args.rate * args.duration)
    cpu0, client0 = proc_cpu(pid), os.times()
    started = time.perf_counter()

    async def deliver(n: int, rcpt: str) -> None:
        c = await senders.get()
        try:
            acks[rcpt].append(await send_one(c, rcpt, n))
        except (OSError, SMTPError) as e:
            errors.add("SMTP delivery failed", e)
            return
        senders.put_nowait(c)

    jobs = []
    for n in range(count):
        due = started + n / args.rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            lag.append(-delay)
        jobs.append(asyncio.ensure_future(deliver(n + 1, imap_users[n % len(imap_users)])))
    await asyncio.gather(*jobs)
    sent_s = time.perf_counter() - started
    acked = sum(len(v) for v in acks.values())
    expected = sum(len(acks[s.user]) for s in idlers)

    def seen() -> int:
        return sum(min(len(acks[s.user]), max((n for n, _ in s.exists), default=s.base)
                       - s.base) for s in idlers)

    deadline = time.perf_counter() + args.wait
    while seen() < expected and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
    cpu = proc_cpu(pid) - cpu0
    client1 = os.times()
    client_cpu = (client1.user + client1.system) - (client0.user + client0.system)
    latencies = []
    for s in idlers:
        previous = s.base
        for n, when in s.exists:
            for k in range(previous + 1, n + 1):
                index = k - s.base - 1
                if index < len(acks[s.user]):
                    latencies.append(when - acks[s.user][index])
            previous = max(previous, n)
    missing = expected - seen()
    if missing:
        errors.add("EXISTS never came", f"{missing} of {expected} notifications")
    print(f"deliveries: {acked} of {count} acknowledged in {sent_s:.1f} s = "
          f"{acked / sent_s:.1f} msgs/s (asked {args.rate:g}/s"
          + (f"; fell behind by up to {max(lag) * 1000:.0f} ms" if max(lag, default=0) > 0.01
             else "") + ")")
    if latencies:
        print(f"250 -> IDLE EXISTS: {len(latencies)} notifications ({len(idlers)} IDLE sessions, "
              f"{args.sessions_per_user} per user), p50 {quantile(latencies, .5) * 1000:.1f} ms, "
              f"p99 {quantile(latencies, .99) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms,"
              f" min {min(latencies) * 1000:.1f} ms")
    print(f"daemon CPU while streaming: {cpu:.1f} s = {100 * cpu / sent_s:.0f}% of one core; "
          f"client CPU {client_cpu:.1f} s; daemon RSS now {proc_status(pid) / 1024:.1f} MiB, "
          f"peak {proc_status(pid, 'VmHWM') / 1024:.1f} MiB", flush=True)

    # 4. Every held connection still answers.
    async def check(what, closer, conn):
        try:
            await closer(conn)
        except (OSError, Failed, SMTPError) as e:
            errors.add(f"{what} not answering at the end", e)

    await asyncio.gather(*(check("IMAP", IdleSession.finish, s) for s in idlers),
                         *(check("POP3", close_pop3, c) for c in pops),
                         *(check("SMTP", close_smtp, c) for c in smtps))
    while not senders.empty():
        await check("SMTP sender", close_smtp, senders.get_nowait())
    details = "; ".join(f"{k}: {v}" for k, v in errors.first.items())
    print(f"errors: {errors.count}" + (f" (first of each kind: {details})" if details else ""))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--imap", type=int, default=1400, help="IMAP IDLE connections (1400)")
    ap.add_argument("--pop3", type=int, default=300, help="POP3 connections, one per user (300)")
    ap.add_argument("--smtp", type=int, default=300, help="idle SMTP connections (300)")
    ap.add_argument("--sessions-per-user", type=int, default=14,
                    help="IMAP IDLE sessions of each IMAP user (14)")
    ap.add_argument("--rate", type=float, default=20.0, help="deliveries per second (20)")
    ap.add_argument("--duration", type=float, default=30.0, help="seconds of deliveries (30)")
    ap.add_argument("--senders", type=int, default=8, help="SMTP connections delivering (8)")
    ap.add_argument("--wait", type=float, default=30.0,
                    help="seconds to wait for the last notifications (30)")
    ap.add_argument("--login-concurrency", type=int, default=8,
                    help="IMAP/POP3 connections being set up at once (8)")
    ap.add_argument("--threads", type=int, default=16, help="[server] threads (16)")
    ap.add_argument("--dir", help="instance directory, kept (default: a temporary one)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    total = args.imap + args.pop3 + args.smtp + args.senders
    limit = raise_nofile(2 * total + 1024)
    if limit < total + 256:
        raise SystemExit(f"RLIMIT_NOFILE is {limit}: too low for {total} connections")
    imap_users = [f"idle{i}@{DOMAIN}"
                  for i in range(max(1, math.ceil(args.imap / args.sessions_per_user)))]
    pop_users = [f"pop{i}@{DOMAIN}" for i in range(args.pop3)]
    users = ["warmup@" + DOMAIN] + imap_users + pop_users
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="mailstack-bench-load-"))
    args.ports = {p: free_port() for p in ("smtp", "imap", "pop3")}
    room = {"max_connections": total + 100, "max_connections_per_ip": total + 100}
    print(f"instance {root}; creating {len(users)} users (argon2id) ...", flush=True)
    t0 = time.perf_counter()
    daemon = DaemonProcess(
        root, users=users, tls=False, listen=tuple(args.ports.items()),
        server={"threads": args.threads},
        smtp={**room, "idle_timeout": 3600.0},
        sections={"imap": {**room, "max_sessions_per_user": args.sessions_per_user + 2,
                           "login_timeout": 600.0},
                  "pop3": {**room, "idle_timeout": 3600.0},
                  "auth": {"allow_plaintext_loopback": True},
                  "policy.ratelimit": {"max_connections": 0, "max_messages": 0}})
    daemon.port = args.ports["smtp"]
    print(f"users ready in {time.perf_counter() - t0:.1f} s; RLIMIT_NOFILE {limit}", flush=True)
    daemon.start()
    print(f"mailstack pid {daemon.proc.pid}: smtp {args.ports['smtp']}, imap "
          f"{args.ports['imap']}, pop3 {args.ports['pop3']} on {HOST}", flush=True)
    try:
        asyncio.run(run(args, daemon, imap_users, pop_users))
    finally:
        daemon.stop()
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
