"""The fsync child (``python -m mailstack.queue.fsyncd``): see ``fsync_process``.

Standard library only, so the process is small and starts fast.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Sequence

#: Descriptors in one request; the kernel takes at most 253 (SCM_MAX_FD).
MAX_FDS = 250


def fsync_each(fds: Sequence[int]) -> list[int]:
    """Blocking: fsync each descriptor; its errno, or 0 once synced, in order."""
    codes = []
    for fd in fds:
        try:
            os.fsync(fd)
            codes.append(0)
        except OSError as e:
            codes.append(e.errno or errno.EIO)
    return codes


def serve(sock: socket.socket) -> None:
    """The child: answer requests until the socket closes."""
    while True:
        try:
            _, fds, _, _ = socket.recv_fds(sock, 1, MAX_FDS)
        except OSError:
            return
        if not fds:
            return  # end of file: the server has closed its end (or died)
        try:
            codes = fsync_each(fds)
        finally:
            for fd in fds:
                os.close(fd)
        try:
            sock.send(struct.pack(f"={len(codes)}H", *codes))
        except OSError:
            return


def main() -> None:
    serve(socket.socket(fileno=0))


if __name__ == "__main__":
    main()
