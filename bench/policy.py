#!/usr/bin/env python3
"""Inbound throughput with the whole policy chain on, and with it off.

Starts the DNS fixture (tests/support/dnsserver.py) in a subprocess, serving
the sender's SPF record, DKIM key, DMARC policy (p=reject) and an empty DNSBL
zone, then runs ``twistd mailstack`` twice on a fresh instance:

* **on**: ``checkers = lists, ratelimit, dnsbl, spf, greylist, dkim, arc,
  dmarc`` (greylisting with delay 0, so every message still passes through
  its sqlite database; rate limits high enough not to refuse);
* **off**: ``checkers = []``.

N concurrent asyncio clients connect from 127.0.0.2.. (the instance trusts
only 127.0.0.1, so they are internet clients) and send M messages each, one
per connection, each DKIM-signed (rsa-sha256, 2048 bits) by the sender's
domain. Prints per mode: messages/s accepted (250 after the final dot),
messages/s in the Maildir, p50/p99 latency of that 250, and the server's CPU
per message; then the on/off ratio. The resolver caches answers (as a real
one does), so after the first message the DNS work is mostly cache hits.

    .venv/bin/python bench/policy.py                 # 10 clients x 100 messages x 4 KB
    .venv/bin/python bench/policy.py -c 20 -m 200 --size 10240

Benchmarks print figures; they are never assertions (DESIGN "Tests").
"""

from __future__ import annotations

import argparse
import asyncio
import json
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
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

HOST = "127.0.0.1"
DOMAIN = "bench.test"
USER = "demo@example.test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


# -- the DNS fixture, in its own process ---------------------------------------

def serve_dns(zone_file: str) -> None:
    """Child mode: run the fixture, print its port, serve until killed."""
    from twisted.internet import reactor

    from tests.support.dnsserver import DNSFixture
    from tests.support.policykit import start_dns
    zone = json.loads(Path(zone_file).read_text())
    fixture = DNSFixture({k: {t: [tuple(v) if t == "MX" else v for v in vs]
                              for t, vs in rr.items()} for k, rr in zone.items()})
    start_dns(fixture)
    print(fixture.port, flush=True)
    reactor.run()


def start_dns(workdir: Path, zone: dict) -> tuple[subprocess.Popen, int]:
    zone_file = workdir / "zone.json"
    zone_file.write_text(json.dumps(zone))
    proc = subprocess.Popen([sys.executable, __file__, "--dns-serve", str(zone_file)],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    port = int(proc.stdout.readline())
    return proc, port


# -- the instance ----------------------------------------------------------------

def write_config(root: Path, port: int, dns_port: int, chain_on: bool, users: bytes) -> Path:
    root.mkdir(parents=True)
    (root / "users").write_bytes(users)
    (root / "users").chmod(0o600)
    (root / "aliases").write_text("")
    checkers = ('["lists", "ratelimit", "dnsbl", "spf", "greylist", "dkim", "arc", "dmarc"]'
                if chain_on else "[]")
    (root / "lists").write_text("allow sender someone@partner.test\n")
    text = f"""
[server]
hostname = "mail.example.test"
domains = ["example.test"]
mail_root = "maildirs"
spool_dir = "spool"
users_file = "users"
aliases_file = "aliases"
threads = 16

[smtp]
max_connections_per_ip = 1000

[dns]
nameservers = ["127.0.0.1"]
port = {dns_port}
timeout = 2.0

[policy]
checkers = {checkers}
trusted_networks = ["127.0.0.1/32"]

[policy.greylist]
delay = 0.0

[policy.ratelimit]
max_connections = 0
max_messages = 0

[policy.dnsbl]
zones = ["bl.test"]

[policy.lists]
file = "lists"

[[listen]]
protocol = "smtp"
address = "127.0.0.1"
port = {port}
"""
    path = root / "mailstack.toml"
    path.write_text(text)
    return path


def start_server(root: Path, config: Path, port: int) -> subprocess.Popen:
    twistd = Path(sys.executable).with_name("twistd")
    proc = subprocess.Popen([str(twistd), "--nodaemon", "--pidfile=", f"--logfile={root}/log",
                             "mailstack", "--config", str(config)],
                            cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError((root / "log").read_text())
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("twistd did not start")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the clients -----------------------------------------------------------------

async def expect(reader, code: bytes) -> None:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("closed")
        if line[3:4] != b"-":
            if not line.startswith(code):
                raise RuntimeError(f"expected {code!r}, got {line!r}")
            return


async def one_message(port: int, source: str, message: bytes, latencies: list) -> None:
    reader, writer = await asyncio.open_connection(HOST, port, local_addr=(source, 0))
    try:
        await expect(reader, b"220")
        for command, code in ((b"EHLO mx.bench.test", b"250"),
                              (f"MAIL FROM:<alice@{DOMAIN}>".encode(), b"250"),
                              (f"RCPT TO:<{USER}>".encode(), b"250"),
                              (b"DATA", b"354")):
            writer.write(command + b"\r\n")
            await expect(reader, code)
        started = time.perf_counter()
        writer.write(message + b".\r\n")
        await expect(reader, b"250")
        latencies.append(time.perf_counter() - started)
        writer.write(b"QUIT\r\n")
        await expect(reader, b"221")
    finally:
        writer.close()


async def client(port: int, source: str, count: int, message: bytes, latencies: list) -> None:
    for _ in range(count):
        await one_message(port, source, message, latencies)


def run_clients(port: int, clients: int, per_client: int, message: bytes) -> tuple[float, list]:
    latencies: list[float] = []

    async def main():
        await asyncio.gather(*(client(port, f"127.0.0.{2 + i % 200}", per_client, message,
                                      latencies) for i in range(clients)))

    started = time.perf_counter()
    asyncio.run(main())
    return time.perf_counter() - started, latencies


def build_message(size: int, key) -> bytes:
    from tests.support.policykit import crlf, sign
    line = b"The quick brown fox jumps over the lazy dog, once more for the benchmark.\n"
    body = line * max(1, size // len(line))
    message = crlf(b"From: Alice <alice@" + DOMAIN.encode() + b">\nTo: " + USER.encode()
                   + b"\nSubject: benchmark\nDate: Mon, 01 Jan 2024 00:00:00 +0000\n"
                   b"Message-ID: <bench@bench.test>\n\n" + body)
    signed = sign(message, key)
    return signed.replace(b"\r\n.", b"\r\n..")


def run(mode: str, workdir: Path, dns_port: int, args, message: bytes, users: bytes) -> dict:
    root = workdir / mode
    port = free_port()
    config = write_config(root, port, dns_port, mode == "on", users)
    proc = start_server(root, config, port)
    try:
        run_clients(port, 2, 2, message)  # warm up (caches, sqlite, threads)
        new = root / "maildirs" / "example.test" / "demo" / "Maildir" / "new"
        before = len(os.listdir(new)) if new.exists() else 0
        cpu0 = cpu_seconds(proc.pid)
        total = args.clients * args.messages
        t0 = time.perf_counter()
        elapsed, latencies = run_clients(port, args.clients, args.messages, message)
        deadline = time.monotonic() + 120
        while len(os.listdir(new)) - before < total and time.monotonic() < deadline:
            time.sleep(0.005)
        delivered_elapsed = time.perf_counter() - t0
        delivered = len(os.listdir(new)) - before
        cpu = cpu_seconds(proc.pid) - cpu0
        latencies.sort()
        sample = open(new / sorted(os.listdir(new))[-1], "rb").read().split(b"\n\n", 1)[0]
        return {"mode": mode, "accepted_per_s": total / elapsed,
                "delivered": delivered, "delivered_per_s": delivered / max(delivered_elapsed, 1e-9),
                "p50_ms": statistics.median(latencies) * 1000,
                "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
                "cpu_ms_per_msg": cpu / total * 1000,
                "headers": sample.decode("utf-8", "replace")}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--clients", type=int, default=10)
    parser.add_argument("-m", "--messages", type=int, default=100, help="per client")
    parser.add_argument("--size", type=int, default=4096, help="body bytes")
    parser.add_argument("--dns-serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dns_serve:
        serve_dns(args.dns_serve)
        return

    from mailstack.auth.users import Users
    from tests.support.policykit import make_key, split_txt
    workdir = Path(tempfile.mkdtemp(prefix="mailstack-bench-policy-"))
    try:
        key = make_key(DOMAIN, "b1", "rsa", 2048)
        zone = {DOMAIN: {"TXT": ["v=spf1 ip4:127.0.0.0/8 -all"], "MX": [[10, "mx.bench.test"]]},
                f"_dmarc.{DOMAIN}": {"TXT": ["v=DMARC1; p=reject"]},
                key.record_name: {"TXT": [split_txt(key.txt)]}}
        dns_proc, dns_port = start_dns(workdir, zone)
        try:
            users_db = Users(workdir / "users")
            users_db.set_password(USER, "bench password", create=True)
            users = (workdir / "users").read_bytes()
            message = build_message(args.size, key)
            results = [run(mode, workdir, dns_port, args, message, users)
                       for mode in ("off", "on")]
        finally:
            dns_proc.kill()
            dns_proc.wait()
        print(f"{args.clients} clients x {args.messages} messages x {len(message)} bytes, "
              "one message per connection, from 127.0.0.2..")
        for r in results:
            print(f"chain {r['mode']:>3}: {r['accepted_per_s']:7.1f} msg/s accepted, "
                  f"{r['delivered_per_s']:7.1f} msg/s in Maildir ({r['delivered']}), "
                  f"250 after dot p50 {r['p50_ms']:6.1f} ms p99 {r['p99_ms']:6.1f} ms, "
                  f"server CPU {r['cpu_ms_per_msg']:5.2f} ms/msg")
        off, on = results
        print(f"on/off: {on['accepted_per_s'] / off['accepted_per_s']:.2f} of the throughput, "
              f"{on['cpu_ms_per_msg'] / off['cpu_ms_per_msg']:.2f}x the CPU per message")
        print("\nheaders of the last message with the chain on:\n" + on["headers"][:900])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
