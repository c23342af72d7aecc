#!/usr/bin/env python3
"""Outbound delivery throughput: queue N messages for a remote domain, time their delivery.

A mailstack (``twistd mailstack`` subprocess, fresh temporary instance)
forwards every message through an alias to ``sink@remote.test``; a DNS server
and an SMTP sink run in this process on 127.0.0.1. The messages are queued
while the sink is down; then the sink starts and a flush request (what
``mailstack queue flush`` does) releases them all at once, so the figure is
pure delivery. Run once with connection reuse (messages_per_connection=50)
and once without (1).

    .venv/bin/python bench/outbound.py [--messages 2000] [--size 10240]
"""

from __future__ import annotations

import argparse
import os
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import reactor  # noqa: E402

from tests.support.dnsserver import DNSFixture  # noqa: E402
from tests.support.instance import free_port, write_instance  # noqa: E402
from tests.support.sink import Sink  # noqa: E402


def run_reactor_thread():
    thread = threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False},
                              daemon=True)
    thread.start()
    return thread


def call(f, *args):
    """Run f in the reactor thread and wait for its result."""
    done = threading.Event()
    box = {}

    def go():
        box["v"] = f(*args)
        done.set()

    reactor.callFromThread(go)
    done.wait(10)
    return box.get("v")


def one_run(messages: int, size: int, per_connection: int, dns_port: int) -> dict:
    root = Path(tempfile.mkdtemp(prefix="mailstack-bench-out-"))
    sink = Sink("127.0.0.1", free_port())
    smtp_port = free_port()
    config = write_instance(
        root, aliases={"fwd@example.test": ["sink@remote.test"]}, listen=(("smtp", smtp_port),),
        sections={"dns": {"nameservers": ["127.0.0.1"], "port": dns_port, "timeout": 2.0},
                  "outbound": {"port": sink.port, "allow_private": True,
                               "messages_per_connection": per_connection,
                               "max_connections": 20},
                  "queue": {"first_retry": 3600.0}})
    twistd = Path(sys.executable).with_name("twistd")
    daemon = subprocess.Popen([str(twistd), "--nodaemon", "--pidfile=", f"--logfile={root}/log",
                               "mailstack", "--config", str(config)], cwd=root)
    try:
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                smtplib.SMTP("127.0.0.1", smtp_port).quit()
                break
            except OSError:
                time.sleep(0.1)
        body = b"Subject: bench\r\n\r\n" + (b"x" * 76 + b"\r\n") * (size // 78)

        def send(n):
            with smtplib.SMTP("127.0.0.1", smtp_port) as c:
                for _ in range(n):
                    c.sendmail("bench@example.test", ["fwd@example.test"], body)

        with ThreadPoolExecutor(10) as pool:
            list(pool.map(send, [messages // 10] * 10))
        # Every message has failed once against the closed sink port by now or soon;
        # wait until all are deferred, then open the sink and flush.
        queue = Path(root) / "spool" / "queue"
        while sum(1 for p in queue.glob("*.env") if b'"attempts": 1' in p.read_bytes()) < messages:
            time.sleep(0.2)
        call(sink.start)
        start = time.time()
        (Path(root) / "spool" / "flush").touch()
        while len(sink.state.messages) < messages:
            time.sleep(0.02)
        elapsed = time.time() - start
        return {"messages": messages, "seconds": elapsed, "per_s": messages / elapsed,
                "connections": sink.state.connections}
    finally:
        daemon.terminate()
        daemon.wait(20)
        call(sink.stop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--size", type=int, default=10240)
    args = parser.parse_args()
    run_reactor_thread()
    dns = DNSFixture({"remote.test": {"MX": [(10, "mx.remote.test")]},
                      "mx.remote.test": {"A": ["127.0.0.1"]}})
    dns_port = call(dns.start)
    for per_connection in (50, 1):
        r = one_run(args.messages, args.size, per_connection, dns_port)
        print(f"messages_per_connection={per_connection:>3}: {r['messages']} messages of "
              f"{args.size} B delivered in {r['seconds']:.2f} s = {r['per_s']:.0f} msg/s "
              f"over {r['connections']} connections")
    reactor.callFromThread(reactor.stop)


if __name__ == "__main__":
    main()
