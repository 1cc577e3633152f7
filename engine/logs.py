"""The engine's log file: everything every engine process writes to stdout/stderr, size-bounded.

The supervisor points its own stdout and stderr at a pipe before it spawns anything; every child
inherits them, so Python logging, tracebacks and what native libraries (ONNX Runtime, CUDA) print
all arrive in that one pipe. A thread of the supervisor copies the pipe into ``server.log_file``,
starting a new file at ``server.log_max_bytes`` (at a line boundary) and keeping
``server.log_backups`` old ones (``engine.log.1`` the newest), so no client, however hostile, can
fill the disk through the log.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path


class RotatingWriter:
    """Append bytes to ``path``; when it would pass ``max_bytes``, rename it ``path.1`` (shifting
    older ones up to ``path.<backups>``, the oldest deleted) and start a new file."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(self.path, "ab")
        self.size = self.fh.tell()

    def write(self, data: bytes) -> None:
        while data:
            room = self.max_bytes - self.size
            if len(data) <= room:
                self._put(data)
                return
            cut = data.rfind(b"\n", 0, max(room, 0)) + 1       # end the file at a line boundary
            if cut == 0 and self.size == 0:
                cut = room                                     # one line longer than a whole file
            if cut:
                self._put(data[:cut])
                data = data[cut:]
            self.rotate()

    def _put(self, data: bytes) -> None:
        self.fh.write(data)
        self.fh.flush()
        self.size += len(data)

    def rotate(self) -> None:
        self.fh.close()
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self.fh = open(self.path, "ab")
        self.size = 0

    def close(self) -> None:
        self.fh.close()


def redirect_std_to(path: Path, max_bytes: int, backups: int) -> threading.Thread:
    """Point fds 1 and 2 of this process (and of every child it spawns later) at a pipe copied
    into a :class:`RotatingWriter` by a daemon thread; returns the thread."""
    writer = RotatingWriter(path, max_bytes, backups)
    r, w = os.pipe()
    os.dup2(w, 1)
    os.dup2(w, 2)
    os.close(w)

    def pump() -> None:
        with os.fdopen(r, "rb", buffering=0) as pipe:
            while True:
                data = pipe.read(65536)
                if not data:
                    break
                writer.write(data)
        writer.close()

    t = threading.Thread(target=pump, name="log-pump", daemon=True)
    t.start()
    return t
