"""What the benchmarks share: reading a process's memory and CPU from /proc,
the asyncio SMTP reply reader, and the open-files limit."""

from __future__ import annotations

import asyncio
import os
import resource


def proc_status(pid: int, key: str = "VmRSS") -> int:
    """A ``kB`` field of /proc/<pid>/status (VmHWM, VmRSS), in kB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def system_busy() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v) - v[3] - v[4], sum(v)


def proc_cpu(pid: int) -> float:
    """CPU seconds (utime + stime, and reaped children) of ``pid`` and every
    live process under it: a multi-process server such as Postfix is counted
    whole, as /work/shared/peers/smtp_bench.py does."""
    parents, cpu = {}, {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                rest = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        parents.setdefault(int(rest[1]), []).append(int(entry))
        cpu[int(entry)] = sum(int(x) for x in rest[11:15])
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        total += cpu.get(p, 0)
        stack.extend(parents.get(p, []))
    return total / os.sysconf("SC_CLK_TCK")


def raise_nofile(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards ``wanted`` (at most the
    hard limit); child processes, such as the daemon, inherit it. Returns the
    new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


class SMTPError(Exception):
    pass


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One SMTP reply, all its lines: (code, text)."""
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise SMTPError("connection closed")
        lines.append(line)
        if line[3:4] != b"-":
            return int(line[:3]), b"".join(lines)


async def expect(reader, code: int, what: str) -> None:
    got, text = await read_reply(reader)
    if got != code:
        raise SMTPError(f"{what}: expected {code}, got {text!r}")
